"""Full-cache decode step time on the GPU (issue 2): `small`, and `v4_flash` attention dims with a few
layers, at 32K and 128K contexts; bytes read per step vs the measured HBM bandwidth.

    PYTHONPATH=$PWD python3 benchmarks/bench_decode.py --out benchmarks/results/decode-h100.json

The cache is synthetic (random entries, as after a prefill of `context` tokens); each configuration
runs windows of `tau` decode steps as one jitted scan (the engine's path); the first window compiles
and is excluded; the median over the remaining windows is reported.
"""
from __future__ import annotations

import argparse

import jax

from benchmarks.common import (
    KV_DTYPES,
    hbm_bandwidth,
    run_info,
    step_bytes_full,
    synthetic_cache,
    v4_attention_stack,
    write_json,
)
from fm_jax.config import get_config
from fm_jax.model import init_params
from serve.engine import LSAConfig, decode_loop


def configs(smoke: bool, kv_dtype: str = "fp8"):
    if smoke:
        return {"tiny": get_config("tiny")}
    return {"small": get_config("small"),                                     # 2 CSA + 2 HCA layers:
            "v4_flash_attn4": v4_attention_stack(kv_dtype=kv_dtype)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tau", type=int, default=32)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the script)")
    ap.add_argument("--kv-dtype", default="fp8", choices=KV_DTYPES,
                    help="v4_flash_attn4's KV entries: fp8 (584-byte rows, the preset's) or bf16 (1024 bytes)")
    args = ap.parse_args(argv)
    bw = hbm_bandwidth(64 << 20 if args.smoke else 2 << 30)
    rows = []
    for name, c in configs(args.smoke, args.kv_dtype).items():
        params = init_params(c, jax.random.PRNGKey(0))
        for ctx in [int(x) for x in args.contexts.split(",")]:
            for b in [int(x) for x in args.batches.split(",")]:
                n_new = 1 + args.windows * args.tau
                cache, hidden, _ = synthetic_cache(c, b, ctx, ctx + n_new)
                tok = jax.numpy.zeros((b,), jax.numpy.int32)
                res = decode_loop(params, c, cache, tok, hidden, n_new, mode="full", lsa=LSAConfig(tau=args.tau))
                step_s = res.stats["decode_s"] / ((args.windows - 1) * args.tau)
                nbytes = step_bytes_full(c, params, b, ctx)
                row = {"config": name, "kv_fp8": c.kv_fp8, "batch": b, "context": ctx, "step_ms": step_s * 1e3,
                       "tokens_per_s": b / step_s, "bytes_per_step": nbytes,
                       "achieved_gbps": nbytes / step_s / 1e9, "hbm_fraction": nbytes / step_s / bw}
                print(row, flush=True)
                rows.append(row)
                del cache
    write_json(args.out, {**run_info(), "hbm_copy_gbps": bw / 1e9, "rows": rows,
                          "note": "bytes_per_step = params + window + HCA entries + CSA index keys + top-k entries"})


if __name__ == "__main__":
    main()
