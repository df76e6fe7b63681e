"""Where the compiled Pallas top-k goes wrong on the GPU: `topk_pallas` against `lax.top_k` on random normal
rows, per block config, at shapes from one program per row (N = 512) to several (N = 4K, 8K).

Per case: whether the order matches, how many of the k picks are in the reference's set per row, the smallest
picked value against the reference's k-th, and the first picks of row 0.

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python3 -m benchmarks.probe_topk_gpu --out $OUT/topk_probe.json
    python -m benchmarks.probe_topk_gpu --interpret --out /tmp/p.json      # CPU (interpret mode)
"""
from __future__ import annotations

import argparse
import functools

import jax
import numpy as np

from benchmarks.common import run_info, write_json
from pallas_kernels.topk import topk_pallas

SHAPES = ((1, 4096, 512), (2, 8192, 512), (1, 4096, 16), (1, 512, 512))   # (batch, n_entries, k)
CONFIGS = (dict(), dict(skip_empty=False), dict(chunks_per_program=1), dict(skip_empty=False, chunks_per_program=1),
           dict(digits=(8, 8, 8, 8)), dict(digits=(8, 8, 8, 8), skip_empty=False, chunks_per_program=1),
           dict(num_warps=8), dict(onehot="int8", digits=(8, 8, 8, 8)))


def probe(b: int, n: int, k: int, cfg: dict, interpret: bool, seed: int = 0) -> dict:
    x = np.random.default_rng(seed).normal(size=(b, n)).astype(np.float32)   # fresh per case
    ref_v, ref_i = (np.asarray(a) for a in jax.lax.top_k(x, k))
    row = dict(batch=b, n_entries=n, topk=k, config=str(cfg))
    try:
        v, i = (np.asarray(a) for a in jax.jit(functools.partial(topk_pallas, k=k, interpret=interpret, **cfg))(x))
    except Exception as e:  # noqa: BLE001 - a failing variant is a result here
        return {**row, "error": repr(e)[:400]}
    return {**row, "same_order": bool((i == ref_i).all()),
            "in_reference_set": [len(set(i[r].tolist()) & set(ref_i[r].tolist())) for r in range(b)],
            "kth_reference": float(ref_v[0, -1]), "smallest_picked": float(v[0].min()),
            "picks_row0": i[0, :6].tolist(), "reference_row0": ref_i[0, :6].tolist()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--interpret", action="store_true", help="interpret mode (CPU)")
    ap.add_argument("--quick", action="store_true", help="the smallest shape and two configs")
    args = ap.parse_args(argv)
    shapes, configs = (SHAPES[-1:], CONFIGS[:2]) if args.quick else (SHAPES, CONFIGS)
    rows = []
    for b, n, k in shapes:
        for cfg in configs:
            rows.append(probe(b, n, k, cfg, args.interpret))
            print(rows[-1], flush=True)
    out = {**run_info(), "what": "the compiled Pallas top-k against lax.top_k, per shape and block config",
           "rows": rows}
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
