"""The release's serving headline on one GPU (issue 11 item 3): at a fixed device-memory budget for KV,
how many concurrent requests fit at 256K / 512K / 1M tokens with the full cache and with LSA
(K_max 96 / 192 / 384 pages), and the decode tokens/s at those batches.

Model: V4-Flash's attention geometry over all 43 layers (2 window-only, 21 CSA, 20 HCA; fp8 KV rows,
mHC), the FFN reduced to a dense 2048-wide SwiGLU and the vocabulary to 4096 so the weights fit; random
weights and KV. Per-request bytes are `serve.engine.kv_bytes` (what the engine allocates); LSA also
needs the host mirror (every CSA entry, `kv_tiers.HostMirror`), so its batch is the smaller of the
device bound and the host bound, both reported. The release: 8xH20, 1.6x / 2.4x / 2.7x requests and
1.7x / 2.0x / 2.8x decode throughput at 256K / 512K / 1M.

    python3 benchmarks/bench_serving.py --out benchmarks/results/serving-h100.json
    python3 benchmarks/bench_serving.py --out /tmp/s.json --smoke          # CPU check of the script

Decode runs from `benchmarks.common.synthetic_cache(distinct=False)` (random rows of one request copied to
all; LSA's CSA entries built straight into the host mirror), `--windows` windows of `tau` steps; the first window
(compilation, first recall) is excluded. `recall_over_window` < 1 means recall landed within the window
it overlaps.
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import KV_DTYPES, cycle_median, param_bytes, run_info, synthetic_cache, write_json
from fm_jax import memory_indexer as mi
from fm_jax.config import get_config
from fm_jax.model import init_params
from serve.engine import LSAConfig, decode_loop, kv_bytes

RELEASE = {262144: {"kmax_pages": 96, "concurrency": 1.6, "throughput": 1.7},
           524288: {"kmax_pages": 192, "concurrency": 2.4, "throughput": 2.0},
           1048576: {"kmax_pages": 384, "concurrency": 2.7, "throughput": 2.8}}


def release_row(context: int) -> dict:
    """The release's K_max and ratios at the nearest of its contexts."""
    return RELEASE[min(RELEASE, key=lambda r: abs(r - context))]


def serving_config(smoke: bool, kv_dtype: str = "fp8"):
    """kv_dtype "fp8": V4's 584-byte entries (the preset's); "bf16": entries in the compute dtype."""
    fp8 = kv_dtype == "fp8"
    if smoke:  # the three layer kinds at toy widths (fp8 rows need 64 nope dims + rope)
        return get_config("tiny", n_layers=4, compress_ratios=(0, 4, 16, 4), kv_fp8=fp8, head_dim=72,
                          hc_mult=4, page_entries=8, max_seq_len=16384)
    return get_config("v4_flash", ffn="dense", dense_inter_dim=2048, vocab_size=4096, n_hash_layers=0, kv_fp8=fp8)


def plan(c, context: int, n_new: int, kmax_pages: int, target_layers, device_budget: float, host_budget: float,
         tau: int) -> dict:
    """Largest batches under the budgets (bytes) from the engine's own per-request accounting."""
    lsa = LSAConfig(tau=tau, kmax_pages=kmax_pages, recency_tail_pages=min(32, kmax_pages // 3), sink_pages=0)
    n = np.asarray([context + n_new])
    full = kv_bytes(c, n)
    tiered = kv_bytes(c, n, reserve_cells=kmax_pages * c.page_entries, target_layers=target_layers)
    full_dev, lsa_dev, lsa_host = int(full["full"][0]), int(tiered["device"][0]), int(full["csa_full"][0])
    b_full = int(device_budget // full_dev)
    b_dev, b_host = int(device_budget // lsa_dev), int(host_budget // lsa_host)
    return {"context": context, "kmax_pages": kmax_pages, "lsa": lsa,
            "full_device_bytes_per_request": full_dev, "lsa_device_bytes_per_request": lsa_dev,
            "lsa_host_bytes_per_request": lsa_host, "full_batch": b_full, "lsa_batch_device_bound": b_dev,
            "lsa_batch_host_bound": b_host, "lsa_batch": min(b_dev, b_host),
            "lsa_bound": "device" if b_dev <= b_host else "host",
            "concurrency_ratio": min(b_dev, b_host) / b_full if b_full else math.inf}


def time_decode(params, c, indexer, mode: str, batch: int, context: int, lsa: LSAConfig, windows: int) -> dict:
    n_new = 1 + windows * lsa.tau
    cache, hidden, mirror = synthetic_cache(c, batch, context, context + n_new, distinct=False, tiered=mode == "lsa",
                                            target_layers=indexer[0].target_layers)
    token = jnp.zeros((batch,), jnp.int32)
    t0 = time.perf_counter()
    res = decode_loop(params, c, cache, token, hidden, n_new, mode=mode, indexer=indexer if mode == "lsa" else None,
                      lsa=lsa, mirror=mirror)
    wall = time.perf_counter() - t0
    st = res.stats
    steps = (windows - 1) * lsa.tau
    row = {"batch": batch, "step_ms": st["decode_s"] / steps * 1e3,
           "tokens_per_s": batch * steps / st["decode_s"], "first_window_s": st["first_window_s"],
           "wall_s": wall, "device_kv_bytes": st["device_kv_bytes"]}
    if mode == "lsa":
        landed = cycle_median(st, "recall_landed_s")
        row.update({"recalled_bytes_per_cycle": cycle_median(st, "recalled_bytes"),
                    "recall_landed_s_per_cycle": landed,
                    "recall_over_window": landed / (st["decode_s"] / (windows - 1)),
                    "resident_fraction": st["resident_fraction"]})
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default=None, help="default 262144,524288,1048064 (--smoke: 2048,4096)")
    ap.add_argument("--kmax-pages", default=None, help="per context; default the release's 96,192,384")
    ap.add_argument("--device-budget-gb", type=float, default=None,
                    help="KV budget; default: the device's memory limit minus weights minus --workspace-gb")
    ap.add_argument("--workspace-gb", type=float, default=6.0, help="kept free for activations and recall staging")
    ap.add_argument("--host-budget-gb", type=float, default=None,
                    help="host-mirror budget; default 70%% of the host memory available now")
    ap.add_argument("--max-time-batch", type=int, default=None,
                    help="cap on the batch actually decoded (reported when it binds); default: none")
    ap.add_argument("--tau", type=int, default=64)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--plan-only", action="store_true",
                    help="batches from the byte accounting, no decode (no weights are allocated)")
    ap.add_argument("--kv-dtype", default="fp8", choices=KV_DTYPES,
                    help="fp8: V4's 584-byte KV entries (the preset's); bf16: entries in the compute dtype")
    ap.add_argument("--smoke", action="store_true", help="toy widths and budgets (CPU check of the script)")
    args = ap.parse_args(argv)
    if args.windows < 3:  # window 1 compiles; a recall overlaps window k only when a window k + 1 follows
        raise SystemExit("--windows must be >= 3 (steady-state step time and at least one overlapped recall)")
    contexts = [int(x) for x in (args.contexts or ("2048,4096" if args.smoke else "262144,524288,1048064")).split(",")]
    if args.kmax_pages:
        kmax = [int(x) for x in args.kmax_pages.split(",")]
    else:  # the release's K_max of the nearest context (a sixteenth at smoke sizes)
        kmax = [release_row(ctx)["kmax_pages"] // (16 if args.smoke else 1) for ctx in contexts]
    if len(kmax) != len(contexts):
        raise SystemExit("--kmax-pages needs one value per context")
    c = serving_config(args.smoke, args.kv_dtype)
    icfg = mi.config_from_model(c, target_layers=(c.csa_layers[len(c.csa_layers) // 2],), rope_dtype="float32")
    # shapes only under --plan-only (V4-Flash's attention weights are several GB)
    init = jax.eval_shape if args.plan_only else (lambda f, *a: f(*a))
    params = init(lambda k: init_params(c, k), jax.random.PRNGKey(0))
    indexer = (icfg, init(lambda k: mi.init_params(icfg, k), jax.random.PRNGKey(1)))
    weights = param_bytes(params) + param_bytes(indexer[1])
    if args.device_budget_gb is not None:
        device_budget = args.device_budget_gb * 1e9
    elif args.smoke:
        device_budget = 64e6
    else:
        limit = jax.devices()[0].memory_stats()["bytes_limit"]
        device_budget = limit - weights - args.workspace_gb * 1e9
    if args.host_budget_gb is not None:
        host_budget = args.host_budget_gb * 1e9
    elif args.smoke:
        host_budget = 256e6
    else:
        import psutil
        host_budget = 0.7 * psutil.virtual_memory().available
    out = {**run_info(), "what": "serving headline (issue 11 item 3): concurrency and decode throughput at a fixed "
                                 "device KV budget, full cache vs LSA",
           "model": {"preset": c.name, "n_layers": c.n_layers, "compress_ratios": c.compress_ratios,
                     "kv_fp8": c.kv_fp8, "kv_entry_bytes": c.kv_entry_bytes, "page_entries": c.page_entries,
                     "ffn": f"{c.ffn} {c.dense_inter_dim} (reduced; V4-Flash: MoE 256 experts x 2048)",
                     "vocab_size": c.vocab_size, "hc_mult": c.hc_mult, "weights_bytes": weights,
                     "memory_indexer_target_layers": icfg.target_layers},
           "device_kv_budget_bytes": device_budget, "host_mirror_budget_bytes": host_budget,
           "release": {str(k): v for k, v in RELEASE.items()}, "rows": []}
    for ctx, k in zip(contexts, kmax):
        row = plan(c, ctx, 1 + args.windows * args.tau, k, icfg.target_layers, device_budget, host_budget, args.tau)
        lsa = row.pop("lsa")
        row["release"] = release_row(ctx)
        print(row, flush=True)
        if not args.plan_only:
            for mode, b in (("full", row["full_batch"]), ("lsa", row["lsa_batch"])):
                tb = min(b, args.max_time_batch or b)
                if tb < 1:
                    row[mode] = {"batch": 0, "note": "not even one request fits the budget"}
                    continue
                row[mode] = time_decode(params, c, indexer, mode, tb, ctx, lsa, args.windows)
                if tb < b:
                    row[mode]["note"] = f"decoded at batch {tb} (--max-time-batch), below the {b} that fit"
                print(mode, row[mode], flush=True)
            if row["full"].get("tokens_per_s") and row["lsa"].get("tokens_per_s"):
                row["throughput_ratio"] = row["lsa"]["tokens_per_s"] / row["full"]["tokens_per_s"]
        out["rows"].append(row)
        write_json(args.out, out)  # per row: a run cut short keeps its rows
    return out


if __name__ == "__main__":
    main()
