"""Chunked prefill on the GPU (issue 10 item 4): prefill tokens/s, peak device memory and the achieved
fraction of the bf16 roofline, for `small` and the V4-Flash attention stack, modes `full` (the whole CSA
cache on the device) and `lsa` (CSA entries stream to the host mirror as chunks complete them; the
device keeps window, HCA entries, the Memory Indexer's target-layer index keys and one CSA layer's
scratch), from a prompt of random tokens through the real prefill (no synthetic cache).

    PYTHONPATH=$PWD python3 benchmarks/bench_prefill.py --presets small,v4_attn --contexts 32768,131072 \\
        --modes full,lsa --chunk 8192 --out benchmarks/results/prefill-h100.json
    PYTHONPATH=$PWD python3 benchmarks/bench_prefill.py --smoke --out /tmp/prefill-smoke.json   # CPU check

Every (preset, context, mode) runs in a subprocess of its own, so `peak_bytes_in_use` (a process-lifetime
maximum) is that run's peak and nothing of the previous run stays allocated.

Timing: the first chunk compiles every layer kind's program; `steady_tokens_per_s` counts the chunks
after it (the cheapest chunk is the one left out: the indexer's work grows with the position), and
`prefill_s` is the whole prefill including compilation. `--repeat 2` runs the prefill twice and times
the second run (compiled) as `warm_prefill_s`.

FLOPs (`model_flops`, counted per token, multiply-add = 2): every projection (q, kv, grouped output,
compressors, indexer query and weights), the attention over the window (min(t+1, W) keys) plus the
compressed entries (CSA: min(top-k, visible), HCA: all visible) for QK and PV, the Lightning Indexer's
scores over every visible index key, and the FFN with the MoE at its routed top-k + shared experts
(this implementation computes every expert; that extra work is not counted), hyper-connection mixers
and the LM head of the last token left out (< 1%). Roofline: `--peak-tflops` (default: the device's
dense bf16 peak from a table, 989 TFLOP/s for H100/H200 SXM). Anchor: FlashMLA's sparse prefill kernel,
640 TFLOP/s on an H800.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from benchmarks.common import device_memory, run_info, v4_attention_stack, write_json
from fm_jax import memory_indexer as mi
from fm_jax.cache import n_visible_entries
from fm_jax.config import KIND_CSA, KIND_WINDOW, get_config
from fm_jax.model import init_params
from fm_jax.prefill import bucket, chunk_multiple
from serve.engine import kv_bytes

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}


def make_config(preset: str, max_len: int, smoke: bool):
    if smoke:  # the smallest model with every layer kind: compiles in seconds on a CPU
        c = get_config("tiny")
    elif preset == "v4_attn":
        c = v4_attention_stack()
    else:
        c = get_config(preset)
    # the benchmark's random weights do not care where the trained RoPE table ends: let long prompts run
    return c.replace(max_seq_len=max(c.max_seq_len, max_len)) if max_len > c.max_seq_len else c


def model_flops(c, context: int) -> dict:
    """FLOPs of one prefill of `context` tokens (see module doc), split by part."""
    t = np.arange(context, dtype=np.float64)
    d, hd, h = c.d_model, c.head_dim, c.n_heads
    proj = attn = index = ffn = 0.0
    for layer in range(c.n_layers):
        kind, r = c.layer_kind(layer), c.compress_ratios[layer]
        macs = d * c.q_lora_rank + c.q_lora_rank * h * hd + d * hd + h * hd * c.o_lora_rank + \
            c.o_groups * c.o_lora_rank * d
        keys = np.minimum(t + 1, c.window)
        if kind != KIND_WINDOW:
            coff = 2 if kind == KIND_CSA else 1
            macs += d * 2 * coff * hd
            vis = n_visible_entries(t, r).astype(np.float64)
            if kind == KIND_CSA:
                macs += d * 4 * c.index_head_dim + c.q_lora_rank * c.n_index_heads * c.index_head_dim + \
                    d * c.n_index_heads
                keys = keys + np.minimum(vis, c.index_topk)
                index += 2.0 * c.n_index_heads * c.index_head_dim * vis.sum()
            else:
                keys = keys + vis
        proj += 2.0 * macs * context
        attn += 4.0 * h * hd * keys.sum()
        if c.ffn == "moe":
            ffn += 2.0 * 3 * d * c.moe_inter_dim * (c.moe_top_k + c.n_shared_experts) * context
        else:
            ffn += 2.0 * 3 * d * c.dense_inter_dim * context
    return {"projections": proj, "attention": attn, "indexer": index, "ffn": ffn,
            "total": proj + attn + index + ffn}


def peak_tflops(arg: float | None) -> float | None:
    if arg:
        return arg
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def run_one(spec: dict) -> dict:
    """One (preset, context, mode) run in this process."""
    from fm_jax.prefill import prefill_chunked
    from serve.engine import LSAConfig, decode_loop
    from serve.prefill import MirrorStore

    ctx, mode, chunk, batch = spec["context"], spec["mode"], spec["chunk"], spec["batch"]
    n_new = 1 + spec["decode_windows"] * spec["tau"]
    max_len = ctx + n_new
    c = make_config(spec["preset"], bucket(max_len, chunk), spec["smoke"])
    chunk = min(chunk, bucket(ctx, chunk_multiple(c)))
    capacity = bucket(max_len, chunk)
    params = init_params(c, jax.random.PRNGKey(0))
    icfg = mi.config_from_model(c)
    prompt = np.random.default_rng(1).integers(0, c.vocab_size, (batch, ctx)).astype(np.int32)
    mem0 = device_memory()
    row = {"preset": spec["preset"], "context": ctx, "mode": mode, "batch": batch, "chunk": chunk,
           "capacity": capacity, "config": {"n_layers": c.n_layers, "compress_ratios": list(c.compress_ratios),
                                            "dtype": c.dtype, "max_seq_len": c.max_seq_len},
           "params_bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)))}
    times = []
    for rep in range(spec["repeat"]):
        store = MirrorStore(c, batch, capacity, chunk, icfg.target_layers) if mode == "lsa" else None
        chunk_end = []

        def on_chunk(start, h, chunk_end=chunk_end):  # sync once, after the first (compiling) chunk
            if start == 0:
                jax.block_until_ready(h)
            chunk_end.append(time.perf_counter())

        t0 = time.perf_counter()
        logits, cache, hidden = prefill_chunked(params, c, prompt, max_len, chunk=chunk, logits="last",
                                                csa_store=store, on_chunk=on_chunk)
        jax.block_until_ready((logits, cache))
        total = time.perf_counter() - t0
        times.append({"prefill_s": total, "first_chunk_s": chunk_end[0] - t0, "n_chunks": len(chunk_end)})
        if rep + 1 < spec["repeat"]:
            del logits, cache, hidden, store
    first = times[0]
    steady_tokens = batch * (bucket(ctx, chunk) - chunk)
    row.update({"prefill_s": first["prefill_s"], "first_chunk_s_incl_compile": first["first_chunk_s"],
                "n_chunks": first["n_chunks"],
                "steady_tokens_per_s": steady_tokens / (first["prefill_s"] - first["first_chunk_s"])
                if first["n_chunks"] > 1 else None,
                "prefill_tokens_per_s_incl_compile": batch * ctx / first["prefill_s"]})
    if spec["repeat"] > 1:
        row["warm_prefill_s"] = times[-1]["prefill_s"]
        row["warm_tokens_per_s"] = batch * ctx / times[-1]["prefill_s"]
    fl = model_flops(c, ctx)
    row["model_flops"] = {k: v * batch for k, v in fl.items()}
    best_s = row.get("warm_prefill_s") or (
        (first["prefill_s"] - first["first_chunk_s"]) * bucket(ctx, chunk) / max(bucket(ctx, chunk) - chunk, 1)
        if first["n_chunks"] > 1 else first["prefill_s"])
    row["achieved_tflops"] = fl["total"] * batch / best_s / 1e12
    pk = peak_tflops(spec["peak_tflops"])
    row["roofline_tflops"] = pk
    row["roofline_fraction"] = row["achieved_tflops"] / pk if pk else None
    row["memory_before"] = mem0
    row["memory_after_prefill"] = device_memory()
    by_full = kv_bytes(c, np.full((batch,), ctx))
    by_lsa = kv_bytes(c, np.full((batch,), ctx), reserve_cells=0, target_layers=icfg.target_layers)
    row["kv_bytes_full"] = int(by_full["full"].sum())
    row["kv_bytes_device_lsa_without_reserve"] = int(by_lsa["device"].sum())
    if store is not None:
        row["host_mirror_bytes"] = store.mirror.nbytes()
        row["h2d_bytes"] = store.h2d_bytes
        row["d2h_bytes"] = store.d2h_bytes
    if spec["decode_windows"]:
        tok = np.asarray(logits).argmax(-1).astype(np.int32)
        lsa = LSAConfig(tau=spec["tau"], kmax_pages=spec["kmax_pages"])
        indexer = (icfg, mi.init_params(icfg, jax.random.PRNGKey(2))) if mode == "lsa" else None
        res = decode_loop(params, c, cache, jax.device_put(tok), hidden, n_new, mode=mode, indexer=indexer,
                          lsa=lsa, mirror=None if store is None else store.mirror)
        st = res.stats
        steps = (spec["decode_windows"] - 1) * spec["tau"]
        row["decode_step_ms"] = st["decode_s"] / steps * 1e3 if steps else None
        row["decode_device_kv_bytes"] = st["device_kv_bytes"]
        row["memory_after_decode"] = device_memory()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--presets", default="small,v4_attn", help="small, mini, v4_attn (v4_flash attention stack)")
    ap.add_argument("--contexts", default=None, help="default 32768,131072,524288,1048576 (--smoke: 100)")
    ap.add_argument("--modes", default="full,lsa")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="2: also time a second, compiled prefill")
    ap.add_argument("--decode-windows", type=int, default=0, help="decode this many tau-windows after prefill")
    ap.add_argument("--tau", type=int, default=64)
    ap.add_argument("--kmax-pages", type=int, default=128)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any backend (CPU check of the script)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one spec (JSON) and print its row
    args = ap.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    if args.contexts is None:
        args.contexts = "100" if args.smoke else "32768,131072,524288,1048576"
    if args.smoke and args.presets == ap.get_default("presets"):
        args.presets = "small"  # every preset is the tiny model under --smoke: run it once
    chunk = 32 if args.smoke and args.chunk == ap.get_default("chunk") else args.chunk
    payload = {**run_info(), "chunk": chunk, "rows": []}
    for preset in args.presets.split(","):
        for ctx in [int(x) for x in args.contexts.split(",")]:
            for mode in args.modes.split(","):
                spec = {"preset": preset, "context": ctx, "mode": mode, "chunk": chunk, "batch": args.batch,
                        "repeat": args.repeat, "decode_windows": args.decode_windows, "tau": args.tau,
                        "kmax_pages": args.kmax_pages, "peak_tflops": args.peak_tflops, "smoke": args.smoke}
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--out", args.out, "--one",
                                       json.dumps(spec)], capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep +
                                           os.environ.get("PYTHONPATH", "")})
                rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
                row = rows[0] if rows else {**spec, "error": (proc.stderr or proc.stdout)[-2000:]}
                row["wall_s"] = time.perf_counter() - t0
                print(json.dumps({k: row.get(k) for k in ("preset", "context", "mode", "prefill_s",
                                                          "steady_tokens_per_s", "roofline_fraction",
                                                          "memory_after_prefill", "error")}), flush=True)
                payload["rows"].append(row)
                write_json(args.out, payload)  # per row: a cut-short run keeps its rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
