"""Which needle does a trained model copy? The first answer token of held-out niah_multikey prompts, by
context length (inside the window or not), number of needles and key length (issue 9: the shipped model
matches a variable name in var_tracking but not a needle's key).

    python -m benchmarks.probe_keymatch --out probe.json   # checkpoints/mini, full cache, CPU is fine

For each configuration: `acc1` (the first answer token is the asked needle's first value) and `picked`, how
often the first token is the first value of the needle in each appearance position (the last entry: of none).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import jax
import numpy as np

from serve.engine import generate
from serve.shipped import load_model
from train import tasks as T

CONFIGS = ((120, 4, 2), (120, 2, 2), (250, 4, 2), (512, 4, 2), (512, 4, 1), (512, 2, 2))  # (context, needles, key_len)


def probe(params, config, context_len: int, n_needles: int, key_len: int, n: int, seed: int) -> dict:
    examples = [T.make_example("niah_multikey", context_len, seed + i, n_needles=n_needles, key_len=key_len)
                for i in range(n)]
    res = generate(params, config, np.stack([e.prompt for e in examples]), 1, mode="full")
    picked = np.zeros(n_needles + 1, np.int64)
    for e, toks in zip(examples, res.tokens):
        firsts = [int(e.prompt[s + key_len + 2]) for s in e.meta["item_starts"]]  # KEY key+ VAL v1 ...
        first = int(toks[0])
        picked[firsts.index(first) if first in firsts else n_needles] += 1
    acc1 = float(np.mean([int(t[0]) == int(e.answer[0]) for e, t in zip(examples, res.tokens)]))
    return {"context_len": context_len, "n_needles": n_needles, "key_len": key_len, "n": n, "acc1": acc1,
            "chance": 1 / n_needles, "picked": picked.tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", default=None, help="model directory (default: checkpoints/mini)")
    ap.add_argument("--n", type=int, default=32, help="prompts per configuration")
    ap.add_argument("--seed-base", type=int, default=T.HELDOUT_SEED + 200)
    args = ap.parse_args(argv)
    params, config, _ = load_model(args.ckpt)
    t0, rows = time.time(), []
    for context_len, n_needles, key_len in CONFIGS:
        rows.append(probe(params, config, context_len, n_needles, key_len, args.n, args.seed_base))
        print(json.dumps(rows[-1]), flush=True)
    rec = {"what": __doc__.split("\n\n")[0], "ckpt": args.ckpt or "checkpoints/mini", "window": config.window,
           "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "date": datetime.date.today().isoformat(), "wall_s": round(time.time() - t0, 1),
           "command": " ".join(["python -m benchmarks.probe_keymatch", *(sys.argv[1:] if argv is None else argv)]),
           "rows": rows}
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
