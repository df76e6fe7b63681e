"""Where the backbone's CSA attention goes when it answers a multi-key prompt (issue 9 diagnosis).

For held-out `niah_multikey` prompts, the attention probabilities of every CSA layer at the ANSWER position
(the query that produces the first answer token) are summed over the compressed entries overlapping each
needle. If the model matched the question's key, the asked needle would get the mass; if it only found
"the needles", the mass spreads over all of them.

    python -m benchmarks.probe_attention --ckpt checkpoints/mini/backbone --length 1024 --n 16 \
        --out benchmarks/results/probe-multikey-attention-cpu.json

The probabilities are read from the training forward (`train.lm.forward_train`, dense stage, float32,
eagerly) by intercepting its softmax calls whose last axis is `2 * window + n_entries + 1` (window, compressed
entries, sink: the attention softmax of `train.lm.attention_train`); nothing else in the model has that shape.
"""
from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import run_info, write_json
from fm_jax import checkpoint as ck
from train import lm
from train import tasks as T


@contextlib.contextmanager
def attention_probs(c, length: int, sink: list):
    """Within the block, every attention softmax of the training forward (`[B, T, H, 2W + N + 1]`) is
    appended to `sink` as a NumPy array (eager execution only)."""
    widths = {2 * c.window + 1 + (length // r if r else 0) for r in set(c.compress_ratios)}
    orig = jax.nn.softmax

    def spy(x, axis=-1, **kw):
        y = orig(x, axis=axis, **kw)
        if x.ndim == 4 and x.shape[2] == c.n_heads and x.shape[-1] in widths:
            sink.append(np.asarray(y))
        return y

    jax.nn.softmax = spy
    try:
        with jax.disable_jit():
            yield
    finally:
        jax.nn.softmax = orig


def probe(params, c, length: int, n: int) -> dict:
    csa = [l for l in range(c.n_layers) if c.compress_ratios[l] == c.csa_ratio]
    per = {l: {"target": [], "other_mean": [], "target_is_max": []} for l in csa}
    correct = []
    for i in range(n):
        ex = T.make_example("niah_multikey", length, T.HELDOUT_SEED + i)
        probs = []
        with attention_probs(c, length, probs):
            logits, _ = lm.forward_train(params, c, jnp.asarray(ex.prompt[None]), "dense", remat=False)
        assert len(probs) == c.n_layers, [p.shape for p in probs]
        correct.append(int(jnp.argmax(logits[0, -1])) == int(ex.answer[0]))
        starts, lens = ex.meta["item_starts"], ex.meta["item_lengths"]
        tgt = int(ex.meta["target_items"][0])
        r = c.csa_ratio
        for l in csa:
            comp = probs[l][0, -1, :, 2 * c.window:-1]                      # [H, n_entries] at ANSWER
            mass = np.stack([comp[:, s // r:(s + m - 1) // r + 1].sum(-1) for s, m in zip(starts, lens)], 1)
            others = np.delete(mass, tgt, axis=1)
            per[l]["target"].append(mass[:, tgt])
            per[l]["other_mean"].append(others.mean(1))
            per[l]["target_is_max"].append(mass.argmax(1) == tgt)
    layers = {f"L{l}": {k: np.mean(np.asarray(v, np.float64), 0).round(3).tolist() for k, v in d.items()}
              for l, d in per.items()}
    return {"first_token_correct": float(np.mean(correct)),
            "n_needles": T.DEFAULT_PARAMS["niah_multikey"]["n_needles"], "layers_per_head": layers}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="checkpoints/mini/backbone")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    c = ck.load_config(args.ckpt)
    params = ck.restore_params(args.ckpt, c)
    c = c.replace(dtype="float32")
    params = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, params)
    out = {**run_info(), "ckpt": args.ckpt, "length": args.length, "n_prompts": args.n,
           "what": "CSA attention mass at the ANSWER position of held-out niah_multikey prompts, per layer and head "
                   "(mean over prompts): on the asked needle, on each other needle, and how often the asked needle "
                   "gets the most; chance for the last is 0.25",
           **probe(params, c, args.length, args.n)}
    write_json(args.out, out)
    for l, d in out["layers_per_head"].items():
        print(l, d)
    print("first token correct", out["first_token_correct"])


if __name__ == "__main__":
    main()
