"""Does the serving engine run the model the training forward trained? (issue 9 diagnosis)

For held-out prompts of one task, the engine's greedy generation in ``full`` mode (prefill + decode steps,
`serve.engine.generate`) is compared with the training forward (`train.lm.forward_train`, sparse stage, as
at inference) run on the prompt followed by the engine's own tokens: the largest logit difference and the
argmax agreement at every generated position. Also reported: the teacher-forced answer accuracy (what the
training curve shows, `train.pretrain.answer_accuracy`) next to the engine's greedy exact match (what
`serve.evaluate_tasks` scores), so a gap between the two can be told apart from a train / serve mismatch.

    python -m benchmarks.probe_train_serve --ckpt checkpoints/mini --task niah_multikey --length 4096 --n 4 \
        --out benchmarks/results/probe-train-serve-cpu.json
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import run_info, write_json
from serve.engine import generate
from serve.shipped import load_model
from train import lm
from train import tasks as T
from train.pretrain import ANSWER_ROOM, answer_accuracy


@functools.partial(jax.jit, static_argnames=("config",))
def _sparse_logits(params, config, tokens):
    return lm.forward_train(params, config, tokens, "sparse", remat=False)[0]


def probe(params, config, task: str, length: int, n: int) -> dict:
    examples = [T.make_example(task, length, T.HELDOUT_SEED + i) for i in range(n)]
    n_new = max(len(e.answer) for e in examples) + 1   # the answer and its EOS
    prompts = np.stack([e.prompt for e in examples])
    res = generate(params, config, prompts, n_new, mode="full", return_logits=True)
    gen, gen_logits = np.asarray(res.tokens), np.asarray(res.logits, np.float32)
    teacher = _sparse_logits(params, config, jnp.asarray(np.concatenate([prompts, gen], axis=1)))
    p = length - 1   # the position whose logits give the first generated token
    teacher = np.asarray(teacher[:, p:p + n_new], np.float32)
    diff = np.abs(teacher - gen_logits).max(-1)                                   # [n, n_new]
    agree = teacher.argmax(-1) == gen_logits.argmax(-1)                           # [n, n_new]
    tokens, mask = T.example_rows(examples, length + ANSWER_ROOM)
    tf_acc = np.asarray(answer_accuracy(params, config, jnp.asarray(tokens), jnp.asarray(mask)))
    return {"per_prompt": [{"answer": e.answer.tolist(), "generated": g.tolist(),
                            "greedy_score": float(T.score(task, e, g)), "teacher_forced_acc": float(a),
                            "max_logit_diff_per_step": np.round(d, 4).tolist()}
                           for e, g, a, d in zip(examples, gen, tf_acc, diff)],
            "max_logit_diff": float(diff.max()), "argmax_agreement": float(agree.mean()),
            "greedy_exact_match": float(np.mean([T.score(task, e, g) for e, g in zip(examples, gen)])),
            "teacher_forced_acc": float(tf_acc.mean())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="model directory (default: checkpoints/mini)")
    ap.add_argument("--task", default="niah_multikey", choices=T.TASKS)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    params, config, _ = load_model(args.ckpt)
    out = {**run_info(), "ckpt": args.ckpt or "checkpoints/mini", "task": args.task, "length": args.length,
           "n_prompts": args.n, "dtype": config.dtype,
           "what": "engine (prefill + decode, full mode, greedy) vs the training forward (sparse stage) on the "
                   "engine's own tokens: logit difference and argmax agreement per generated position; teacher-"
                   "forced answer accuracy vs greedy exact match",
           **probe(params, config, args.task, args.length, args.n)}
    write_json(args.out, out)
    print({k: out[k] for k in ("max_logit_diff", "argmax_agreement", "teacher_forced_acc", "greedy_exact_match")})


if __name__ == "__main__":
    main()
