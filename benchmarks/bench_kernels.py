"""GPU benchmark + on-device correctness check for the two Pallas kernels (issue 4), in one process.

Run on the device machine from the repo root:
    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python3 benchmarks/bench_kernels.py --out $OUT/kernels.json

Sections (``--sections``, comma separated): ceilings, check, indexer, indexer_mgpu, attention, stream, topk, step,
sweep, fp8sweep (block configs of the packed fp8-row attention kernel).
``indexer_mgpu`` times the Mosaic GPU scoring kernel (rows ``impl="mosaic"``, ``keys="fp8_pages64"``) against the
Triton kernel and the XLA path over the same page-blocked keys (``impl="pallas"`` / ``"xla"``,
``keys="fp8_pages64"``; ``speedup_vs_xla`` pairs pages with pages and rows with rows) at batch 1 / 8,
N = 64K / 256K, H = 64; ``check`` also checks the Mosaic kernel and the paged Triton kernel on device.
``attention`` rows with bf16 kv include the Mosaic GPU attention kernel (``impl="mosaic"``,
``pallas_kernels.sparse_attention_mgpu``; same bytes and roofline); ``check`` checks it on device too.
``stream`` times XLA's row sum over the same packed key bytes (the scoring kernel's I/O without its math) as a
size-matched ceiling; ``step`` splits one decode step's GPU time into top-k, scoring, attention and the rest,
with ``lax.top_k`` and with the top-k kernel (``ModelConfig.topk_impl``);
``topk`` checks the exact top-k kernel against ``lax.top_k`` on awkward rows (ties, -inf, +-0) and times both at
k=512 (rows ``kernel="topk"``, ``impl`` pallas | xla; ``--quick``: the three target shapes, no sweep; off-GPU or
``--tiny``: a dry run in interpret mode).
Timing: every case is jitted as a list of S independent calls over S different input sets, and also 2S;
per-call time = (T(2S) - T(S)) / S with T the median wall time of ``block_until_ready`` over repeats. That
cancels the host dispatch overhead and keeps the GPU busy back to back; distinct input sets keep the L2
(50 MB) from serving repeated reads. Never on zeros: keys are random fp8 bytes (NaN codes removed) with
random positive scales, q / weights / kv are random normals.
Attention rows carry ``kv_dtype``: "bf16" (kv and window as bf16 [B, N, D]) or "fp8" (V4's packed 584-byte rows,
``fm_jax.layers.kv_fp8``, dequantised in registers by the kernel and after the gather by the XLA path); their
bytes count what each format moves (``--kv-dtypes`` picks which run).
Roofline per row: ``max(bytes / copy_bw, flops / matmul_rate)`` with both ceilings measured in this run;
``roofline_fraction = roofline_time / time``.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fm_jax.layers import kv_fp8
from fm_jax.layers.key_pages import block_index_keys
from pallas_kernels.indexer_score import indexer_scores_pallas
from pallas_kernels.reference import (
    indexer_scores_reference,
    indexer_scores_xla,
    sparse_attention_reference,
    sparse_attention_xla,
    topk_xla,
)
from pallas_kernels.sparse_attention import sparse_attention_pallas
from pallas_kernels.topk import DIGIT_SETS, topk_pallas
from pallas_kernels.topk import default_config as topk_default_config

LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


# --------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------
def _wall(f, args, reps):
    out = f(args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = f(args)
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t0)
    del out
    return statistics.median(ts)


def traced_kernels(run, reps=3):
    """Calls ``run()`` (which must block) ``reps`` times under the profiler and reads the CUPTI trace.
    Returns ({kernel name: [count, total ns]} over the device's stream lines, GPU line names)."""
    import glob
    import tempfile
    d = tempfile.mkdtemp(prefix="jaxprof")
    with jax.profiler.trace(d):
        for _ in range(reps):
            run()
    files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    kernels, lines = {}, []
    if not files:
        return kernels, lines
    for plane in jax.profiler.ProfileData.from_file(files[0]).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        plines = list(plane.lines)
        lines += [ln.name for ln in plines]
        for ln in plines:
            if ln.name.startswith("Stream"):
                for ev in ln.events:
                    entry = kernels.setdefault(ev.name[:60], [0, 0])
                    entry[0] += 1
                    entry[1] += ev.duration_ns
    return kernels, lines


def device_time(f, args, reps=3):
    """GPU busy time of one f(args) from a profiler (CUPTI) trace: sum of kernel / copy durations on the
    device's stream lines. Returns (seconds, {kernel name: count}, line names) or (None, {}, [])."""
    jax.block_until_ready(f(args))
    kernels, lines = traced_kernels(lambda: jax.block_until_ready(f(args)), reps)
    names = {k[:48]: c for k, (c, _) in kernels.items()}
    total = sum(ns for _, ns in kernels.values())
    if total == 0:
        return None, names, lines
    return total * 1e-9 / reps, names, lines


def time_per_call(fn, sets, reps=3):
    """sets: list of 2S argument tuples. Returns (device seconds per call, info).

    device: CUPTI kernel time per call (launch gaps excluded). wall: (T(2S) - T(S)) / S with T the median
    wall time of block_until_ready (host launch overhead included)."""
    s = len(sets) // 2
    f = jax.jit(lambda xs: [fn(*x) for x in xs])
    t1 = _wall(f, sets[:s], reps)
    t2 = _wall(f, sets, reps)
    wall = max((t2 - t1) / s, 1e-9)
    try:
        dev, names, lines = device_time(f, sets)
    except Exception as e:  # noqa: BLE001
        dev, names, lines = None, {"error": repr(e)[:300]}, []
    per = dev / len(sets) if dev else wall
    return per, dict(t_s=t1, t_2s=t2, s=s, wall_per_call_us=wall * 1e6,
                     device_per_call_us=(dev / len(sets) * 1e6) if dev else None,
                     kernels={k: v for k, v in list(names.items())[:8]}, lines=lines[:12])


def n_sets(bytes_per_call, mem_cap=8e9):
    est = bytes_per_call / 2.5e12 + 4e-6
    s = int(min(16, max(2, math.ceil(300e-6 / est))))
    s = int(max(1, min(s, mem_cap // (2 * max(bytes_per_call, 1)))))
    return max(s, 1)


# --------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------
def rand_packed_keys(key, b, n, d):
    """Random packed fp8 keys without NaN codes, positive random scales (never zeros)."""
    k1, k2 = jax.random.split(key)
    by = jax.random.bits(k1, (b, n, d), jnp.uint8)
    by = jnp.where((by & 0x7F) == 0x7F, by ^ jnp.uint8(1), by)      # 0x7F / 0xFF are NaN in e4m3fn
    sc = jax.random.uniform(k2, (b, n), jnp.float32, 1e-3, 1e-2)
    sb = jax.lax.bitcast_convert_type(sc, jnp.uint8)
    return jnp.concatenate([by, sb], axis=-1)


def indexer_inputs(key, b, m, h, d, n, qdtype=jnp.bfloat16, multi=False, ragged=False):
    ks = jax.random.split(key, 4)
    qs = (b, m, h, d) if multi else (b, h, d)
    q = jax.random.normal(ks[0], qs, jnp.float32).astype(qdtype)
    w = jax.random.normal(ks[1], qs[:-1], jnp.float32) * (h ** -0.5)
    keys = rand_packed_keys(ks[2], b, n, d)
    if ragged:
        lens = jax.random.randint(ks[3], (b,), n // 2, n + 1).astype(jnp.int32)
    else:
        lens = jnp.full((b,), n, jnp.int32)
    return q, w, keys, lens


ROPE_DIM = 64   # V4-Flash: the packed rows' bf16 RoPE dims


def attention_inputs(key, b, h, d, n, k, w, dtype=jnp.bfloat16, pad_frac=0.0, kv_dtype="bf16"):
    """kv_dtype "fp8": kv and window as packed fp8 rows (uint8 [B, ., 584] for D = 512) of random normals."""
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (b, h, d), jnp.float32).astype(dtype)
    rows = ((lambda x: kv_fp8.pack(x, ROPE_DIM)) if kv_dtype == "fp8" else (lambda x: x.astype(dtype)))
    kv = rows(jax.random.normal(ks[1], (b, n, d), jnp.float32))
    idx = jax.random.randint(ks[2], (b, k), 0, n).astype(jnp.int32)
    if pad_frac > 0:
        idx = jnp.where(jax.random.uniform(ks[3], (b, k)) < pad_frac, -1, idx)
    win = rows(jax.random.normal(ks[4], (b, w, d), jnp.float32))
    wl = jnp.full((b,), w, jnp.int32)
    sink = jax.random.normal(ks[5], (h,), jnp.float32)
    return q, kv, idx, win, wl, sink


# --------------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------------
def measure_ceilings():
    n = 1 << 28                                   # 1 GiB of uint32
    x = jax.random.bits(jax.random.PRNGKey(1), (n,), jnp.uint32)
    sets = [(x,), (x + 1,), (x + 2,), (x + 3,)]
    per, _ = time_per_call(lambda a: a ^ jnp.uint32(0x5A5A5A5A), sets, reps=7)
    bw = 2 * n * 4 / per
    del x, sets
    gc.collect()
    m = 8192
    ks = jax.random.split(jax.random.PRNGKey(2), 8)
    mats = [(jax.random.normal(ks[2 * i], (m, m), jnp.bfloat16), jax.random.normal(ks[2 * i + 1], (m, m), jnp.bfloat16))
            for i in range(4)]
    per_mm, _ = time_per_call(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16),
                              mats, reps=5)
    tf = 2 * m ** 3 / per_mm
    del mats
    gc.collect()
    log(f"ceilings: copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {tf / 1e12:.0f} TFLOP/s")
    return dict(hbm_copy_gbps=bw / 1e9, bf16_matmul_tflops=tf / 1e12, copy_bytes=2 * n * 4, matmul_n=m)


def rel_err(x, r):
    x = np.asarray(x, np.float64)
    r = np.asarray(r, np.float64)
    fin = np.isfinite(r)
    same_mask = bool(np.array_equal(np.isfinite(x), fin)) and bool(np.all(x[~fin] == r[~fin]))
    err = np.linalg.norm(np.where(fin, x, 0) - np.where(fin, r, 0)) / max(np.linalg.norm(np.where(fin, r, 0)), 1e-30)
    return float(err), same_mask, bool(np.any(np.isnan(x)))


def _checked(res, name, measure, *args):
    """Appends one check row: `measure(*args)` returns its figures with `ok`; an exception is a failed check."""
    try:
        row = dict(case=name, **measure(*args))
        figures = " ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                           if k not in ("case", "ok"))
        log(f"check {name}: {figures} -> {'OK' if row['ok'] else 'FAIL'}")
    except Exception as ex_:  # noqa: BLE001 - a kernel that fails to run is a failed check
        row = dict(case=name, ok=False, error=repr(ex_)[:2000])
        log(f"check {name}: ERROR {ex_!r}"[:3000])
        traceback.print_exc()
    res.append(row)


def _scores_check(out, ref, xla=None, tol=1e-5):
    """Figures of a scoring check against the float32 reference (masks must agree, no NaN)."""
    e, mask_ok, nan = rel_err(out, ref)
    row = dict(rel_err=e, masks_equal=mask_ok, nan=nan, tol=tol, ok=e < tol and mask_ok and not nan)
    if xla is not None:
        row["xla_rel_err"] = rel_err(xla, ref)[0]
    return row


def _attention_check(out, lse, ref, tol, xla_out=None):
    """Figures of an attention check: output and lse against the reference's, no NaN."""
    e, _, nan = rel_err(out, ref[0])
    el, _, nan2 = rel_err(lse, ref[1])
    row = dict(rel_err=e, lse_rel_err=el, nan=nan or nan2, tol=tol, ok=e < tol and el < tol and not nan and not nan2)
    if xla_out is not None:
        row["xla_rel_err"] = rel_err(xla_out, ref[0])[0]
    return row


def _indexer_measure(impl, args, ref, act, page_entries, cfg):
    """One scoring kernel ("pallas" Triton, "mosaic") on `args` (keys page-blocked when `page_entries` is
    given) against `ref`; on rows also the XLA path."""
    if impl == "mosaic":
        from pallas_kernels.indexer_score_mgpu import indexer_scores_mosaic as fn  # lazy: see indexer_case
    else:
        fn = indexer_scores_pallas
    pe = dict(page_entries=page_entries) if page_entries else {}
    out = jax.jit(functools.partial(fn, act=act, **pe, **cfg))(*args)
    xla = None if page_entries else jax.jit(functools.partial(indexer_scores_xla, act=act))(*args)
    return _scores_check(out, ref, xla)


def _attention_measure(c, args, kvd, acfg):
    """One attention case (`c["impl"]`: "pallas" with its split config, or "mosaic") against the reference."""
    rd = dict(rope_dim=ROPE_DIM) if kvd == "fp8" else {}
    scale = c["d"] ** -0.5
    tol = 1e-2 if c["dt"] == jnp.bfloat16 and c["qd"] == jnp.bfloat16 else 1e-5
    ref = sparse_attention_reference(*args, scale=scale, **rd)
    if c.get("impl") == "mosaic":
        from pallas_kernels.sparse_attention_mgpu import sparse_attention_mosaic  # lazy: see attention_case
        return _attention_check(*jax.jit(functools.partial(sparse_attention_mosaic, scale=scale))(*args), ref, tol)
    cfg = dict(acfg, **({"n_splits": c["splits"]} if c["splits"] else {}),
               **({"fused_combine": True} if c.get("fused") else {}))
    out, lse = jax.jit(functools.partial(sparse_attention_pallas, scale=scale, **rd, **cfg))(*args)
    xo, _ = jax.jit(functools.partial(sparse_attention_xla, scale=scale, **rd))(*args)
    return _attention_check(out, lse, ref, tol, xo)


def run_checks(chosen=None):
    chosen = chosen or {}
    icfg = chosen.get("indexer") or {}
    acfg = chosen.get("attention_small") or {}
    res = []
    key = jax.random.PRNGKey(123)
    cases = [
        dict(b=2, m=1, h=64, d=128, n=65536 + 37, qd=jnp.bfloat16, multi=False, act="none"),
        dict(b=2, m=1, h=128, d=128, n=20000, qd=jnp.float32, multi=False, act="sigmoid"),
        dict(b=2, m=5, h=64, d=128, n=3000, qd=jnp.bfloat16, multi=True, act="none"),
        dict(b=3, m=1, h=4, d=32, n=1000, qd=jnp.float32, multi=False, act="none"),
    ]
    for c in cases:
        key, sub = jax.random.split(key)
        q, w, keys, lens = indexer_inputs(sub, c["b"], c["m"], c["h"], c["d"], c["n"], c["qd"], c["multi"], ragged=True)
        ref = indexer_scores_reference(q, w, keys, lens, act=c["act"])
        _checked(res, f"indexer b{c['b']} m{c['m']} h{c['h']} d{c['d']} n{c['n']} {jnp.dtype(c['qd']).name} {c['act']}",
                 _indexer_measure, "pallas", (q, w, keys, lens), ref, c["act"], None, icfg)
    # page-blocked keys (P = 64), the Mosaic GPU kernel and the paged Triton kernel: ragged lengths, a partial
    # last block, f32 q
    mcases = [dict(b=2, n=65536 + 64, qd=jnp.bfloat16, act="none"), dict(b=8, n=4096, qd=jnp.bfloat16, act="none"),
              dict(b=3, n=37 * 64, qd=jnp.float32, act="sigmoid"), dict(b=1, n=262144, qd=jnp.bfloat16, act="none")]
    for c in mcases:
        key, sub = jax.random.split(key)
        q, w, keys, lens = indexer_inputs(sub, c["b"], 1, 64, 128, c["n"], c["qd"], ragged=True)
        ref = indexer_scores_reference(q, w, keys, lens, act=c["act"])
        pages = block_index_keys(keys, 64)
        for impl in ("mosaic", "pallas"):
            _checked(res, f"indexer {impl} b{c['b']} h64 d128 n{c['n']} pages64 {jnp.dtype(c['qd']).name} {c['act']}",
                     _indexer_measure, impl, (q, w, pages, lens), ref, c["act"], 64, {})
    acases = [
        dict(b=3, h=64, d=512, n=4096, k=512, w=128, dt=jnp.bfloat16, qd=jnp.bfloat16, splits=None),
        dict(b=2, h=64, d=512, n=2000, k=300, w=100, dt=jnp.bfloat16, qd=jnp.float32, splits=3),
        dict(b=2, h=20, d=64, n=500, k=70, w=33, dt=jnp.float32, qd=jnp.float32, splits=1),
        # the in-kernel split merge: the batch > 8 default (2 splits), and 5 splits merged by the last arrival
        dict(b=40, h=64, d=512, n=4096, k=512, w=128, dt=jnp.bfloat16, qd=jnp.bfloat16, splits=None),
        dict(b=3, h=64, d=512, n=4096, k=512, w=128, dt=jnp.bfloat16, qd=jnp.bfloat16, splits=5, fused=True),
        # V4's packed fp8 rows (dequantised in registers), with each merge path
        dict(b=3, h=64, d=512, n=4096, k=512, w=128, dt=jnp.bfloat16, qd=jnp.bfloat16, splits=None, kv="fp8"),
        dict(b=40, h=64, d=512, n=4096, k=512, w=128, dt=jnp.bfloat16, qd=jnp.bfloat16, splits=None, kv="fp8"),
        dict(b=2, h=64, d=512, n=2000, k=300, w=100, dt=jnp.bfloat16, qd=jnp.float32, splits=3, kv="fp8"),
        # the Mosaic GPU kernel (bf16 q and kv, 64 heads): one split per CTA pair (batch 64) and several
        dict(b=3, h=64, d=512, n=4096, k=512, w=128, dt=jnp.bfloat16, qd=jnp.bfloat16, impl="mosaic"),
        dict(b=8, h=64, d=512, n=4096, k=512, w=128, dt=jnp.bfloat16, qd=jnp.bfloat16, impl="mosaic"),
        dict(b=64, h=64, d=512, n=4096, k=512, w=128, dt=jnp.bfloat16, qd=jnp.bfloat16, impl="mosaic"),
        dict(b=2, h=64, d=512, n=2000, k=300, w=100, dt=jnp.bfloat16, qd=jnp.bfloat16, impl="mosaic"),
    ]
    for c in acases:
        key, sub = jax.random.split(key)
        kvd = c.get("kv", "bf16")
        q, kv, idx, win, wl, sink = attention_inputs(sub, c["b"], c["h"], c["d"], c["n"], c["k"], c["w"], c["dt"], 0.2,
                                                     kv_dtype=kvd)
        q = q.astype(c["qd"])
        idx = idx.at[0, :17].set(idx[0, 0])          # duplicates
        idx = idx.at[-1].set(-1)                      # a request with only window entries
        wl = wl.at[0].set(c["w"] // 3)
        name = (f"attention {c.get('impl', 'pallas')} b{c['b']} h{c['h']} d{c['d']} k{c['k']} w{c['w']} "
                f"{kvd if kvd == 'fp8' else jnp.dtype(c['dt']).name}/{jnp.dtype(c['qd']).name}")
        if "impl" not in c:
            name += f" splits {c['splits']}{' fused' if c.get('fused') else ''}"
        _checked(res, name, _attention_measure, c, (q, kv, idx, win, wl, sink), kvd, acfg)
    return res


def roofline(bytes_, flops, ceil):
    return max(bytes_ / (ceil["hbm_copy_gbps"] * 1e9), flops / (ceil["bf16_matmul_tflops"] * 1e12))


def indexer_case(ceil, b, h, n, impl, qdtype=jnp.bfloat16, d=128, cfg=None, page_entries=None):
    """impl "pallas" (Triton kernel) | "mosaic" (Mosaic GPU kernel, page-blocked keys only) | "xla".
    `page_entries`: time over page-blocked keys ([B, n_pages, P * (D + 4)], the decode cache's layout; the
    same bytes as the rows, so the same roofline); "mosaic" defaults to V4's P = 64."""
    if impl == "mosaic" and not page_entries:
        page_entries = 64
    bytes_ = b * n * (d + 4) + b * h * d * jnp.dtype(qdtype).itemsize + b * h * 4 + b * n * 4 + b * 4
    flops = 2 * b * h * d * n
    s = n_sets(bytes_ if impl != "xla" else bytes_ * 4)
    sets = [indexer_inputs(jax.random.PRNGKey(1000 + i), b, 1, h, d, n, qdtype) for i in range(2 * s)]
    if page_entries:
        sets = [(q, w, block_index_keys(k, page_entries), ln) for q, w, k, ln in sets]
    pe = dict(page_entries=page_entries) if page_entries else {}
    if impl == "pallas":
        fn = lambda q, w, k, ln: indexer_scores_pallas(q, w, k, ln, **pe, **(cfg or {}))
    elif impl == "mosaic":
        from pallas_kernels.indexer_score_mgpu import indexer_scores_mosaic  # lazy: a failure costs its rows only
        fn = lambda q, w, k, ln: indexer_scores_mosaic(q, w, k, ln, **pe, **(cfg or {}))
    else:
        fn = functools.partial(indexer_scores_xla, **pe)
    per, raw = time_per_call(fn, sets)
    del sets
    gc.collect()
    rt = roofline(bytes_, flops, ceil)
    return dict(kernel="indexer_scores", impl=impl, heads=h, dim=d, q_dtype=jnp.dtype(qdtype).name,
                keys=f"fp8_pages{page_entries}" if page_entries else "fp8_packed",
                batch=b, n_entries=n, time_us=per * 1e6, gbps=bytes_ / per / 1e9, tflops=flops / per / 1e12,
                bytes=bytes_, flops=flops, roofline_us=rt * 1e6, roofline_fraction=rt / per, config=cfg or "default",
                wall_us=raw["wall_per_call_us"], time_source="cupti" if raw["device_per_call_us"] else "wall",
                timing=raw)


def attention_case(ceil, b, impl, h=64, d=512, k=512, w=128, n=4096, cfg=None, kv_dtype="bf16"):
    """impl "pallas" (Triton kernel) | "mosaic" (Mosaic GPU kernel, bf16 kv only) | "xla"; same bytes and roofline."""
    row = kv_fp8.entry_bytes(d, ROPE_DIM) if kv_dtype == "fp8" else d * 2       # bytes of one kv row
    bytes_ = b * (h * d * 2 + k * row + w * row + k * 4 + h * d * 4 + h * 4 + 4) + h * 4
    flops = 4 * b * h * d * (k + w)
    s = n_sets(bytes_ if impl != "xla" else bytes_ * 3, mem_cap=12e9 * bytes_ / (b * n * row + bytes_))
    sets = [attention_inputs(jax.random.PRNGKey(2000 + i), b, h, d, n, k, w, kv_dtype=kv_dtype) for i in range(2 * s)]
    scale = d ** -0.5
    rd = dict(rope_dim=ROPE_DIM) if kv_dtype == "fp8" else {}
    if impl == "pallas":
        fn = lambda *a: sparse_attention_pallas(*a, scale=scale, **rd, **(cfg or {}))
    elif impl == "mosaic":
        from pallas_kernels.sparse_attention_mgpu import sparse_attention_mosaic  # lazy: a failure costs its rows only
        fn = lambda *a: sparse_attention_mosaic(*a, scale=scale, **rd, **(cfg or {}))
    else:
        fn = lambda *a: sparse_attention_xla(*a, scale=scale, **rd)
    per, raw = time_per_call(fn, sets)
    del sets
    gc.collect()
    rt = roofline(bytes_, flops, ceil)
    return dict(kernel="sparse_attention", impl=impl, heads=h, dim=d, window=w, pool=n, batch=b, topk=k,
                q_dtype="bfloat16", kv_dtype=kv_dtype, time_us=per * 1e6, gbps=bytes_ / per / 1e9, tflops=flops / per / 1e12, bytes=bytes_, flops=flops,
                roofline_us=rt * 1e6, roofline_fraction=rt / per, config=cfg or "default",
                wall_us=raw["wall_per_call_us"], time_source="cupti" if raw["device_per_call_us"] else "wall",
                timing=raw)


def stream_case(ceil, b, n, d=128):
    """Size-matched streaming ceiling for a scoring row: XLA's row sum over the same packed key bytes
    (reads B*N*(D+4) bytes, writes B*N int32: the scoring kernel's exact I/O, no math)."""
    bytes_ = b * n * (d + 4) + b * n * 4
    s = n_sets(bytes_)
    sets = [(rand_packed_keys(jax.random.PRNGKey(4000 + i), b, n, d),) for i in range(2 * s)]
    per, raw = time_per_call(lambda k: jnp.sum(k, axis=-1, dtype=jnp.int32), sets)
    del sets
    gc.collect()
    rt = roofline(bytes_, 0, ceil)
    return dict(kernel="stream_rowsum", impl="xla", heads=0, batch=b, n_entries=n, time_us=per * 1e6,
                gbps=bytes_ / per / 1e9, tflops=0.0, bytes=bytes_, flops=0, roofline_us=rt * 1e6,
                roofline_fraction=rt / per, config="jnp.sum(keys, -1, int32)", wall_us=raw["wall_per_call_us"],
                time_source="cupti" if raw["device_per_call_us"] else "wall", timing=raw)


def add_stream_ratios(rows):
    """Kernel scoring rows (Triton, Mosaic) get ``stream_us`` (the size-matched streaming time) and ``vs_stream``."""
    stream = {(r["batch"], r["n_entries"]): r["time_us"] for r in rows if r.get("kernel") == "stream_rowsum"}
    for r in rows:
        if r.get("kernel") == "indexer_scores" and r.get("impl") in ("pallas", "mosaic") and "time_us" in r:
            t = stream.get((r["batch"], r["n_entries"]))
            r["stream_us"] = t
            r["vs_stream"] = (t / r["time_us"]) if t else None


def _time_of(agg, keys):
    return sum(v for k, v in agg.items() if any(s in k.lower() for s in keys))


def topk_step_share(cases=((1, 32768), (1, 131072), (8, 32768), (8, 131072)), topk_impls=("xla", "pallas")):
    """GPU time of one decode step (V4-Flash attention dims, 4 layers CSA/HCA/CSA/HCA, dense FFN, cache
    donated) split into top-k (sort / cub / radix-select kernels), Pallas scoring, Pallas attention and the rest,
    once per Lightning Indexer top-k (`ModelConfig.topk_impl`): the step's breakdown before and after the
    top-k kernel. A top-k that fails to run is a row with its error."""
    from benchmarks.common import synthetic_cache, v4_attention_stack
    from fm_jax import backbone
    from fm_jax.model import init_params
    base = v4_attention_stack()
    params = init_params(base, jax.random.PRNGKey(0))
    out = []
    for topk_impl in topk_impls:
        c = base.replace(topk_impl=topk_impl)
        step = jax.jit(lambda p, cache, tok, c=c: backbone.run_step(p, c, cache, tok)[:2], donate_argnums=(1,))
        for b, ctx in cases:
            state = {"cache": synthetic_cache(c, b, ctx, ctx + 64)[0]}
            tok = jnp.arange(b, dtype=jnp.int32) + 7

            def run(state=state, tok=tok, step=step):   # the cache is donated: thread it through every call
                logits, state["cache"] = step(params, state["cache"], tok)
                jax.block_until_ready(logits)

            row = dict(batch=b, context=ctx, topk_impl=topk_impl)
            try:
                run()
                run()
                reps = 3
                kernels, _ = traced_kernels(run, reps)
            except Exception as ex_:  # noqa: BLE001 - a failing top-k is a result here
                out.append({**row, "error": repr(ex_)[:1000]})
                log(f"step b{b} ctx {ctx} topk {topk_impl}: failed: {ex_!r:.200}")
                continue
            agg = {k: ns / 1e3 / reps for k, (_, ns) in kernels.items()}
            total = sum(agg.values())
            part = functools.partial(_time_of, agg)
            row.update(step_gpu_us=total, topk_us=part(("sort", "cub", "topk", "top_k")),
                       indexer_scores_us=part(("indexer_scores",)), sparse_attention_us=part(("sparse_attention",)),
                       largest={k: v for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:10]})
            row["topk_fraction"] = row["topk_us"] / total if total else None   # None: no GPU trace (CPU)
            out.append(row)
            log(f"step b{b} ctx {ctx} topk {topk_impl}: {total:7.0f} us GPU, top-k {row['topk_us']:6.1f} us "
                f"({row['topk_fraction'] or 0:.1%}), scoring {row['indexer_scores_us']:.1f} us, "
                f"attention {row['sparse_attention_us']:.1f} us")
            del state
            gc.collect()
    return out


def add_speedups(rows):
    xla = {}
    for r in rows:
        if r.get("impl") == "xla" and "time_us" in r:
            xla[(r["kernel"], r.get("heads"), r["batch"], r.get("n_entries"), r.get("topk"), r.get("q_dtype"),
                 r.get("kv_dtype"), r.get("keys"))] = r
    for r in rows:
        if "time_us" not in r:
            continue
        x = xla.get((r["kernel"], r.get("heads"), r["batch"], r.get("n_entries"), r.get("topk"), r.get("q_dtype"),
                     r.get("kv_dtype"), r.get("keys")))   # like for like: rows vs rows, pages vs pages
        r["speedup_vs_xla"] = (x["time_us"] / r["time_us"]) if x else None
        r["speedup_vs_xla_wall"] = (x["timing"]["wall_per_call_us"] / r["timing"]["wall_per_call_us"]) if x else None


def _topk_fn(impl, k, cfg=None):
    """The timed top-k call; off-GPU the kernel runs in interpret mode (harness dry runs only)."""
    if impl == "xla":
        return lambda x: topk_xla(x, k)
    interpret = jax.default_backend() != "gpu"
    return lambda x: topk_pallas(x, k, interpret=interpret, **(cfg or {}))


def topk_rows(seed, b, n, k):
    """float32 [b, n] scores whose rows cycle through the cases that matter for exactness: random normal, four
    levels (ties across the k-th place), fewer than k finite (-inf elsewhere), the k-th value repeated
    around the threshold, +-0 with subnormals, all equal."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(b):
        x = rng.normal(size=n).astype(np.float32)
        kind = r % 6
        if kind == 1:
            x = rng.choice(np.array([-1.5, 0.25, 2.0, 3.0], np.float32), size=n)
        elif kind == 2:
            x = np.where(rng.uniform(size=n) < k / (2 * n), x, -np.inf)
        elif kind == 3:
            x = np.where(rng.uniform(size=n) < 0.2, np.sort(x)[::-1][k - 1], x)
        elif kind == 4:
            x = rng.choice(np.array([0.0, -0.0, 1e-45, -1e-45, 1e-39, -1.0, 1.0], np.float32), size=n)
        elif kind == 5:
            x[:] = 0.5
        out.append(x.astype(np.float32))
    return jnp.asarray(np.stack(out))


def _topk_measure(x, k, cfg, ref):
    """The compiled top-k kernel against lax.top_k's (values, indices): same indices, bitwise-same values."""
    pv, pi = (np.asarray(a) for a in jax.jit(_topk_fn("pallas", k, cfg))(x))
    rv, ri = (np.asarray(a) for a in ref)
    same_idx = bool(np.array_equal(pi, ri))
    same_val = bool(np.array_equal(pv.view(np.int32), rv.view(np.int32)))
    bad_rows = [int(r) for r in np.nonzero(np.any(pi != ri, axis=1))[0]]
    return dict(kernel="topk", same_indices=same_idx, same_values=same_val, bad_rows=bad_rows[:16],
                ok=same_idx and same_val)


def run_topk_checks(cases):
    """The compiled top-k kernel (both digit layouts; int8 one-hots) against lax.top_k: identical indices,
    bitwise-identical values."""
    res = []
    for b, n, k in cases:
        x = topk_rows(b * n + k, b, n, k)
        ref = jax.lax.top_k(x, k)
        for cfg in [dict(digits=d) for d in DIGIT_SETS] + [dict(digits=DIGIT_SETS[1], onehot="int8")]:
            name = f"topk b{b} n{n} k{k} digits {'/'.join(map(str, cfg['digits']))} {cfg.get('onehot', 'bf16')}"
            _checked(res, name, _topk_measure, x, k, cfg, ref)
    return res


def topk_case(ceil, b, n, impl, k=512, cfg=None):
    """Exact top-k of random normal float32 [b, n] scores (k=512): the Pallas radix select or lax.top_k."""
    bytes_ = b * n * 4 + b * k * 8
    # few sets: each is a separate 6-7 launch graph to compile; CUPTI time is a per-call mean anyway
    s = min(4, n_sets(bytes_ * 4)) if jax.default_backend() == "gpu" else 1
    sets = [(jax.random.normal(jax.random.PRNGKey(3000 + i), (b, n), jnp.float32),) for i in range(2 * s)]
    per, raw = time_per_call(_topk_fn(impl, k, cfg), sets)
    del sets
    gc.collect()
    rt = roofline(bytes_, 0, ceil)
    return dict(kernel="topk", impl=impl, heads=0, batch=b, n_entries=n, topk=k, time_us=per * 1e6,
                gbps=bytes_ / per / 1e9, tflops=0.0, bytes=bytes_, flops=0, roofline_us=rt * 1e6,
                roofline_fraction=rt / per, config=cfg or ("default" if impl == "pallas" else "lax.top_k"),
                launches=sum(raw["kernels"].values()) / (2 * s * 3) if raw["device_per_call_us"] else None,
                wall_us=raw["wall_per_call_us"], time_source="cupti" if raw["device_per_call_us"] else "wall",
                timing=raw)


def run_profile():
    """A few launches of each kernel config, no timing: run under ncu (see NOTES_kernels.md)."""
    cases = [("indexer", dict(b=1, h=64, n=65536)), ("indexer", dict(b=8, h=64, n=65536)),
             ("indexer", dict(b=1, h=128, n=65536)), ("attention", dict(b=8)), ("attention", dict(b=64))]
    for kind, c in cases:
        if kind == "indexer":
            args = indexer_inputs(jax.random.PRNGKey(7), c["b"], 1, c["h"], 128, c["n"])
            f = jax.jit(indexer_scores_pallas)
        else:
            args = attention_inputs(jax.random.PRNGKey(7), c["b"], 64, 512, 4096, 512, 128)
            f = jax.jit(functools.partial(sparse_attention_pallas, scale=512 ** -0.5))
        for _ in range(2):
            jax.block_until_ready(f(*args))
        log(f"profiled {kind} {c}")


def ncu_summary(path):
    """Prints the few ncu metrics that matter per kernel launch from an ncu --csv --page details dump."""
    import csv
    keep = ("Duration", "Registers Per Thread", "Achieved Occupancy", "Theoretical Occupancy", "DRAM Throughput",
            "Memory Throughput", "Compute (SM) Throughput", "Dynamic Shared Memory Per Block",
            "Static Shared Memory Per Block", "Grid Size", "Block Size", "Stall Long Scoreboard", "Stall Barrier",
            "Stall Wait", "Stall Math Pipe Throttle", "Stall MIO Throttle", "Stall LG Throttle", "Stall Short Scoreboard",
            "Stall Not Selected", "Warp Cycles Per Issued Instruction", "Stall Membar", "Stall Dispatch Stall",
            "l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum", "l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum",
            "dram__bytes_read.sum", "dram__bytes_write.sum", "Block Limit Registers", "Block Limit Shared Mem")
    with open(path) as f:
        lines = [ln for ln in f if ln.startswith('"')]
    rows = list(csv.DictReader(lines))
    by = {}
    for r in rows:
        name = r.get("Metric Name", "")
        if any(name == k or name.startswith(k) for k in keep):
            by.setdefault((r.get("ID"), r.get("Kernel Name", "")[:40]), []).append(
                f"{name}={r.get('Metric Value')}{r.get('Metric Unit', '')}")
    for (i, k), v in by.items():
        print(f"[{i}] {k}: " + "; ".join(v))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "kernels.json"))
    ap.add_argument("--sections", default="ceilings,check,indexer,indexer_mgpu,attention,topk")
    ap.add_argument("--quick", action="store_true", help="few sizes (smoke run)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run of the harness: sizes / 64")
    ap.add_argument("--sweep", action="store_true", help="also time alternative block configs")
    ap.add_argument("--topk-sweep", action="store_true", help="top-k's alternative configs also under --quick")
    ap.add_argument("--ceilings-from", default="",
                    help="without the ceilings section: take them from this earlier result JSON (same machine)")
    ap.add_argument("--mgpu-q-dtypes", default="bfloat16,float32",
                    help="indexer_mgpu: query dtypes to time (comma separated: bfloat16, float32)")
    ap.add_argument("--attention-impls", default="pallas,xla,mosaic",
                    help="attention rows: which of pallas, xla, mosaic (a kernel that faults poisons the process)")
    ap.add_argument("--kv-dtypes", default="bf16,fp8", help="attention rows: bf16 and/or fp8 (packed 584-byte rows)")
    ap.add_argument("--step-cases", default="1:32768,1:131072,8:32768,8:131072",
                    help="step section: batch:context pairs, comma separated")
    ap.add_argument("--ncu-summary", default="", help="summarise an ncu csv dump and exit")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if args.ncu_summary:
        ncu_summary(args.ncu_summary)
        return
    if "profile" in sections:
        run_profile()
        return
    t_start = time.time()
    dev = jax.devices()[0]
    result = dict(device=getattr(dev, "device_kind", str(dev)), platform=dev.platform, jax_version=jax.__version__,
                  date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  command="PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python3 benchmarks/bench_kernels.py " + " ".join(sys.argv[1:]),
                  rows=[], checks=[], topk=[], sweep=[])
    log(f"device {result['device']} jax {jax.__version__} python {sys.version.split()[0]}")

    def save():
        result["elapsed_s"] = time.time() - t_start
        result["log"] = LOG[-400:]
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    ceil = dict(hbm_copy_gbps=3000.0, bf16_matmul_tflops=800.0)
    if "ceilings" in sections:
        ceil = measure_ceilings()
    elif args.ceilings_from:   # a run on the same machine measured them (saves ~50 s of a device call)
        with open(args.ceilings_from) as f:
            ceil = json.load(f)["ceilings"] | dict(source=args.ceilings_from)
        log(f"ceilings from {args.ceilings_from}: copy {ceil['hbm_copy_gbps']:.0f} GB/s, "
            f"bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s")
    result["ceilings"] = ceil
    save()

    def add(fn, *a, to="rows", **kw):
        try:
            r = fn(ceil, *a, **kw)
            result[to].append(r)
            log(f"{to[:5]:5s} {r['kernel']:16s} {r['impl']:6s} {r.get('kv_dtype', ''):4s} h{r['heads']:3d} b{r['batch']:3d} "
                f"{'n' if 'n_entries' in r else 'k'}{r.get('n_entries', r.get('topk')):7d} {r['time_us']:9.1f} us "
                f"(wall {r['timing']['wall_per_call_us']:8.1f}) {r['gbps']:6.0f} GB/s {r['tflops']:6.1f} TF/s "
                f"roof {r['roofline_fraction']:.2f} cfg {r['config']}")
            return r
        except Exception as e:  # noqa: BLE001
            log(f"ERROR {fn.__name__} {a} {kw}: {e!r}"[:3000])
            traceback.print_exc()
            result[to].append(dict(kernel=fn.__name__, args=str(a), kw=str(kw), error=repr(e)[:2000]))
            return None
        finally:
            save()

    def pick(cases):
        """cases: {cfg_key: [time or None per shape]} -> cfg_key with the lowest mean time / best time."""
        n_shapes = len(next(iter(cases.values())))
        bests = [min((v[i] for v in cases.values() if v[i]), default=None) for i in range(n_shapes)]
        score = {k: sum(v[i] / bests[i] for i in range(n_shapes)) if all(v) else 1e9 for k, v in cases.items()}
        return min(score, key=score.get)

    chosen = dict(indexer=None, attention_small=None, attention_large=None)   # main rows: library defaults
    if "sweep" in sections or args.sweep:   # alternatives, recorded under "sweep" only
        icfgs = [dict(), dict(block_n=64), dict(block_n=256, num_warps=8), dict(num_warps=8),
                 dict(blocks_per_program=4), dict(block_n=64, num_warps=2)]
        best = {}
        for c in icfgs:
            for h, b, n in ((64, 1, 65536), (64, 1, 262144)):
                r = add(indexer_case, b, h, n, "pallas", cfg=c, to="sweep")
                if r and r["time_us"] < best.get((b, n), (1e9,))[0]:
                    best[(b, n)] = (r["time_us"], c)
        acfgs = [dict(), dict(fused_combine=False), dict(fused_combine=True),
                 dict(heads_per_program=16, block_k=64, n_splits=2, fused_combine=True),
                 dict(heads_per_program=16, block_k=64, n_splits=4, fused_combine=True),
                 dict(heads_per_program=32, block_k=32, n_splits=2, fused_combine=True),
                 dict(heads_per_program=64, block_k=32, num_warps=8, n_splits=4, fused_combine=False)]
        for b in (8, 32):
            for c in acfgs:
                r = add(attention_case, b, "pallas", cfg=c, to="sweep")
                if r and r["time_us"] < best.get(("attention", b), (1e9,))[0]:
                    best[("attention", b)] = (r["time_us"], c)
        result["sweep_best"] = {str(k): v for k, v in best.items()}
        log(f"sweep best: {best}")
    if "fp8sweep" in sections:   # packed-row kernel block configs (alternatives, recorded under "sweep" only)
        fcfgs = [dict(), dict(heads_per_program=32, block_k=32), dict(heads_per_program=64, block_k=32, num_warps=8),
                 dict(heads_per_program=16, block_k=32), dict(num_warps=8)]
        for b in ((1, 8) if args.quick else (1, 8, 32, 64)):
            for c in fcfgs:
                add(attention_case, b, "pallas", cfg=c, kv_dtype="fp8", to="sweep")
    result["chosen_configs"] = chosen
    save()
    if "check" in sections:
        result["checks"] = run_checks(chosen)
        save()

    if "attention" in sections:
        attn_impls = set(args.attention_impls.split(","))
        if unknown := attn_impls - {"pallas", "xla", "mosaic"}:
            raise SystemExit(f"--attention-impls: unknown {sorted(unknown)} (pallas, xla, mosaic)")
        bs = (1, 8, 32, 64) if not args.quick else (8, 64)
        for kvd in args.kv_dtypes.split(","):
            if kvd not in ("bf16", "fp8"):
                raise SystemExit(f"--kv-dtypes: unknown kv dtype {kvd!r} (bf16, fp8)")
            for b in bs:
                if "pallas" in attn_impls:
                    add(attention_case, b, "pallas", cfg=chosen["attention_small" if b <= 8 else "attention_large"],
                        kv_dtype=kvd)
                if "xla" in attn_impls:
                    add(attention_case, b, "xla", kv_dtype=kvd)
                if kvd == "bf16" and "mosaic" in attn_impls:   # the Mosaic GPU kernel (bf16 kv only)
                    add(attention_case, b, "mosaic", kv_dtype=kvd)
    if "indexer" in sections:
        hs, ns, bs = (64, 128), (16384, 65536, 262144), (1, 8, 32)
        if args.tiny:
            ns = (256, 1024)
        if args.quick:
            hs, ns, bs = (64,), (65536,), (1, 8)
        for h in hs:
            for n in ns:
                for b in bs:
                    add(indexer_case, b, h, n, "pallas", cfg=chosen["indexer"])
                    add(indexer_case, b, h, n, "xla")
        if not args.quick:
            add(indexer_case, 1, 64, 65536, "pallas", qdtype=jnp.float32, cfg=chosen["indexer"])
            add(indexer_case, 1, 64, 65536, "xla", qdtype=jnp.float32)
    if "indexer_mgpu" in sections:   # Mosaic GPU vs Triton vs XLA over the same page-blocked keys (P = 64)
        shapes = [(1, 65536), (1, 262144), (8, 65536), (8, 262144)]
        if args.tiny:
            shapes = [(1, 1024), (8, 1024)]
        for qname in args.mgpu_q_dtypes.split(","):   # the model's index query is float32 (hi + lo bf16 parts)
            qdt = jnp.dtype(qname)
            for b, n in shapes:
                add(indexer_case, b, 64, n, "mosaic", qdtype=qdt)
                add(indexer_case, b, 64, n, "pallas", qdtype=qdt, page_entries=64)
                add(indexer_case, b, 64, n, "xla", qdtype=qdt, page_entries=64)
        if "sweep" in sections or args.sweep:   # launch plans of the Mosaic kernel (`indexer_score_mgpu.plan`)
            for cfg in (dict(blocks_per_cta=1), dict(blocks_per_cta=4), dict(blocks_per_cta=8, stages=4),
                        dict(blocks_per_cta=16, stages=6), dict(block_n=64, blocks_per_cta=4),
                        dict(block_n=256, blocks_per_cta=2, stages=2)):
                for b, n in shapes:
                    add(indexer_case, b, 64, n, "mosaic", cfg=cfg, to="sweep")
    if "stream" in sections:
        for b, n in ((1, 65536), (1, 262144), (8, 65536), (8, 262144)):
            add(stream_case, b, n)
        add_stream_ratios(result["rows"])
    add_speedups(result["rows"])
    save()
    if "step" in sections:
        try:
            cases = tuple(tuple(int(v) for v in bc.split(":")) for bc in args.step_cases.split(","))
            result["step_topk_share"] = topk_step_share(cases)
        except Exception as e:  # noqa: BLE001
            log(f"ERROR step: {e!r}"[:3000])
            traceback.print_exc()
        save()
    if "topk" in sections:
        shapes = [(b, n) for n in (8192, 65536, 262144) for b in (1, 8, 32)]
        checks = [(1, 65536, 512), (8, 65536, 512), (8, 262144, 512), (6, 20000 + 37, 512), (3, 300, 64),
                  (2, 200, 64), (32, 8192, 512), (32, 262144, 512)]     # (2, 200): one program per row
        sweep = not args.quick or args.topk_sweep
        if args.quick:                # the issue's three target shapes
            shapes, checks = [(1, 65536), (8, 65536), (8, 262144)], checks[:4]
        if args.tiny or jax.default_backend() != "gpu":   # CPU dry run: the kernel in interpret mode
            shapes, checks, sweep = [(1, 2048), (8, 2048)], [(6, 1000 + 37, 64)], False
        result["checks"] += run_topk_checks(checks)
        save()
        for b, n in shapes:
            add(topk_case, b, n, "pallas")
            add(topk_case, b, n, "xla")
            if sweep:                 # the other digit layout, to set default_config's rule
                for digits in DIGIT_SETS:
                    if digits != topk_default_config(b, n)["digits"]:
                        add(topk_case, b, n, "pallas", cfg=dict(digits=digits), to="sweep")
        if sweep:                     # block shapes at the issue's target shapes
            for b, n in ((1, 65536), (8, 65536), (8, 262144)):
                for cfg in ([dict(onehot="int8"), dict(skip_empty=False), dict(chunk=128), dict(chunk=512),
                             dict(num_warps=8),
                             dict(num_stages=1)]
                            + [dict(chunks_per_program=c) for c in (1, 4, 16, 64)]):
                    add(topk_case, b, n, "pallas", cfg=cfg, to="sweep")
    add_speedups(result["rows"])
    save()
    log("")
    log(f"{'kernel':16s} {'impl':6s} {'h':>4s} {'b':>4s} {'n|k':>7s} {'dev us':>9s} {'wall us':>9s} {'GB/s':>7s} "
        f"{'TF/s':>6s} {'roof':>5s} {'xX':>5s} {'xXwall':>6s}")
    for r in result["rows"]:
        if "time_us" not in r:
            continue
        sp = r.get("speedup_vs_xla")
        log(f"{r['kernel']:16s} {r['impl']:6s} {r['heads']:4d} {r['batch']:4d} {r.get('n_entries', r.get('topk')):7d} "
            f"{r['time_us']:9.1f} {r['timing']['wall_per_call_us']:9.1f} {r['gbps']:7.0f} {r['tflops']:6.1f} "
            f"{r['roofline_fraction']:5.2f} {(sp if sp else 0):5.2f} {(r.get('speedup_vs_xla_wall') or 0):6.2f}")
    log(f"total {time.time() - t_start:.0f} s")
    save()


if __name__ == "__main__":
    main()
