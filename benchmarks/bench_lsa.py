"""LSA vs full cache on the GPU (issue 3): `v4_flash` attention dims, 4 CSA layers (Memory Indexer on
one of them, the V4 proportion being 3 of 21), random weights and index keys, contexts 128K / 512K / 1M,
batch 1 and 8. Reports device KV bytes full vs LSA, decode step time full vs LSA, recall bytes and time
per cycle, and the H2D bandwidth achieved vs the measured host-to-device ceiling.

    PYTHONPATH=$PWD python3 benchmarks/bench_lsa.py --out benchmarks/results/lsa-h100.json

With random indexer weights the chosen pages change from cycle to cycle (worst case for recall); a
trained indexer's picks are stable and most pages are LRU hits.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks.common import (
    KV_DTYPES,
    cycle_median,
    h2d_bandwidth,
    run_info,
    synthetic_cache,
    v4_attention_stack,
    write_json,
)
from fm_jax import kv_tiers as kt
from fm_jax import memory_indexer as mi
from fm_jax.config import get_config
from fm_jax.model import init_params
from serve.engine import LSAConfig, decode_loop


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    # "1M": the largest context whose decode positions stay inside v4_flash's 1M-position RoPE table
    ap.add_argument("--contexts", default=None, help="default 131072,524288,1048064 (--smoke: 4096)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tau", type=int, default=64)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--kmax-pages", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the script)")
    ap.add_argument("--host-mirror", default="numpy", choices=kt.MIRROR_BACKENDS,
                    help="the host mirror's arrays (LSAConfig.host_mirror; benchmarks/bench_recall.py compares them)")
    ap.add_argument("--kv-dtype", default="fp8", choices=KV_DTYPES,
                    help="attention KV entries: fp8 (V4's 584-byte rows, the preset's) or bf16 (1024 bytes)")
    args = ap.parse_args(argv)
    if args.contexts is None:   # the tiny smoke model's RoPE table ends at 16384 positions
        args.contexts = "4096" if args.smoke else "131072,524288,1048064"
    if args.smoke:
        fp8 = dict(kv_fp8=True, head_dim=72) if args.kv_dtype == "fp8" else {}   # 64 nope dims + 8 rope
        c = get_config("tiny", n_layers=4, compress_ratios=(4, 4, 4, 4), **fp8)
    else:
        c = v4_attention_stack(compress_ratios=(4, 4, 4, 4), kv_dtype=args.kv_dtype)
    params = init_params(c, jax.random.PRNGKey(0))
    icfg = mi.config_from_model(c, target_layers=(1,), rope_dtype="float32")
    indexer = (icfg, mi.init_params(icfg, jax.random.PRNGKey(1)))
    lsa = LSAConfig(tau=args.tau, kmax_pages=args.kmax_pages, recency_tail_pages=2, sink_pages=1,
                    host_mirror=args.host_mirror)
    h2d = h2d_bandwidth(64 << 20 if args.smoke else 1 << 30)
    print("h2d", h2d, flush=True)
    rows = []
    for ctx in [int(x) for x in args.contexts.split(",")]:
        for b in [int(x) for x in args.batches.split(",")]:
            n_new = 1 + args.windows * args.tau
            row = {"context": ctx, "batch": b, "kv_dtype": args.kv_dtype, "kv_entry_bytes": c.kv_entry_bytes}
            for mode in ("full", "lsa"):
                cache, hidden, _ = synthetic_cache(c, b, ctx, ctx + n_new)
                tok = jnp.zeros((b,), jnp.int32)
                res = decode_loop(params, c, cache, tok, hidden, n_new, mode=mode, indexer=indexer, lsa=lsa)
                del cache
                st = res.stats
                steps = (args.windows - 1) * args.tau
                row[f"{mode}_step_ms"] = st["decode_s"] / steps * 1e3
                row[f"{mode}_device_kv_bytes"] = st["device_kv_bytes"]
                row[f"{mode}_device_csa_bytes"] = st["device_csa_bytes"]
                if mode == "lsa":
                    med = functools.partial(cycle_median, st)
                    row.update({
                        "full_csa_bytes": st["full_csa_bytes"],
                        "csa_device_fraction": st["device_csa_fraction"],
                        "kv_device_fraction": st["device_kv_fraction"],
                        "resident_fraction": st["resident_fraction"],
                        "first_cycle_recalled_bytes": st["per_cycle"][0]["recalled_bytes"],
                        "recalled_bytes_per_cycle": med("recalled_bytes"),
                        "recall_s_per_cycle": med("recall_s"),  # host: choice, gather, dispatch
                        "recall_landed_s_per_cycle": med("recall_landed_s"),  # until the pages are on the device
                        "scoring_s_per_cycle": med("scoring_s"),
                        "write_through_s_per_cycle": med("write_through_s"),
                        "window_compute_s": st["decode_s"] / (args.windows - 1),
                        "h2d_gbps_achieved": med("recalled_bytes") / max(med("recall_landed_s"), 1e-9) / 1e9,
                    })
            row["lsa_over_full_step"] = row["lsa_step_ms"] / row["full_step_ms"]
            # hidden under compute iff the pages land within a window (the transfer is what has to overlap)
            row["recall_over_window"] = row["recall_landed_s_per_cycle"] / row["window_compute_s"]
            print(row, flush=True)
            rows.append(row)
            write_json(args.out, _payload(c, icfg, lsa, h2d, rows))  # per row: a cut-short run keeps its rows


def _payload(c, icfg, lsa, h2d, rows) -> dict:
    return {**run_info(), "h2d_ceiling_gbps": {k: v / 1e9 for k, v in h2d.items() if "error" not in k},
            "lsa": {"tau": lsa.tau, "kmax_pages": lsa.kmax_pages, "page_entries": c.page_entries,
                    "tail_pages": lsa.recency_tail_pages, "sink_pages": lsa.sink_pages,
                    "stale_by_one": lsa.stale_by_one, "host_mirror": lsa.host_mirror},
            "model": {"n_layers": c.n_layers, "compress_ratios": c.compress_ratios, "kv_fp8": c.kv_fp8,
                      "target_layers": icfg.target_layers}, "rows": rows}


if __name__ == "__main__":
    main()
