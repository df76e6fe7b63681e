"""Shared pieces of the GPU benchmarks: run metadata, measured ceilings, synthetic prefilled caches."""
from __future__ import annotations

import datetime
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax.cache import store_kv
from fm_jax.config import KIND_CSA, KIND_WINDOW, get_config
from fm_jax.layers.key_pages import block_index_keys
from fm_jax.layers.quant import pack_index_keys


def run_info() -> dict:
    d = jax.devices()[0]
    return {"device": d.device_kind, "platform": d.platform, "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def device_memory() -> dict:
    """Device 0's peak / current bytes in use and JAX's allocation limit (None each on backends without
    memory stats, e.g. the CPU). `peak_bytes_in_use` is a process-lifetime maximum."""
    try:
        st = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends that raise instead of returning None
        st = {}
    return {k: st.get(k) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def v4_attention_stack(compress_ratios=(4, 128, 4, 128), kv_dtype: str = "fp8"):
    """v4_flash attention dims (d_model 4096, 64 heads x 512, index 64 x 128, top-512, window 128) with 4
    layers, a dense FFN (so no hash-routed layers) and a small vocabulary: the attention stack the decode
    benchmarks time. kv_dtype "fp8": V4's 584-byte KV entries (the preset's own); "bf16": 1024-byte entries."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    return get_config("v4_flash", n_layers=4, compress_ratios=compress_ratios, ffn="dense", dense_inter_dim=2048,
                      vocab_size=4096, hc_mult=1, n_hash_layers=0, kv_fp8=kv_dtype == "fp8")


KV_DTYPES = ("fp8", "bf16")


def median_time(fn, *, warmup: int = 2, reps: int = 10) -> float:
    """Median wall time (s) of fn() (which must block on its result)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def hbm_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth (bytes/s, read + write counted) on random data."""
    x = jax.random.normal(jax.random.PRNGKey(0), (n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0000001)  # one read + one write per element
    t = median_time(lambda: f(x).block_until_ready())
    return 2 * n_bytes / t


def h2d_bandwidth(n_bytes: int = 512 << 20) -> dict:
    """Host-to-device bandwidth (bytes/s) from NumPy and from a pinned_host JAX array."""
    host = np.random.default_rng(0).integers(0, 255, n_bytes, dtype=np.uint8)
    dev = jax.devices()[0]
    out = {"numpy": n_bytes / median_time(lambda: jax.device_put(host, dev).block_until_ready(), reps=5)}
    try:
        pinned = jax.device_put(host, jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host"))
        pinned.block_until_ready()
        out["pinned_host"] = n_bytes / median_time(
            lambda: jax.device_put(pinned, jax.sharding.SingleDeviceSharding(dev)).block_until_ready(), reps=5)
    except Exception as e:  # noqa: BLE001 - report, do not fail the run
        out["pinned_host_error"] = repr(e)[:200]
    return out


def synthetic_cache(config, batch: int, context: int, max_len: int, seed: int = 0, *, distinct: bool = True,
                    tiered: bool = False, target_layers=()):
    """A cache as after prefilling `context` random tokens -> (cache, hidden per layer [B, d_model],
    HostMirror or None): random window / entries / index keys / compressor states (random weights and
    keys, as the benchmarks' issue asks), lengths = context. Nothing is allocated at its full size first.

    `distinct=False` draws one request's rows and copies them to the others (serving-scale batches: the
    decode time does not depend on the values; memory and bytes moved do). With `tiered` the CSA entries
    go to a `kv_tiers.HostMirror` in host memory and the cache's CSA layers hold no entry buffer except the
    index keys of `target_layers`: the state the chunked prefill leaves for modes lsa / recency / random
    (`serve.prefill`), so batches whose full cache would not fit the device can be built."""
    from fm_jax import kv_tiers as kt
    from fm_jax.cache import entry_capacity, init_layer_cache, kv_zeros
    key = jax.random.PRNGKey(seed)
    n_rows = batch if distinct else 1

    def tiled(x):  # [n_rows, ...] -> [batch, ...] on the device (a copy per request, not a broadcast view)
        if distinct:
            return x
        return jax.jit(lambda a: jnp.broadcast_to(a, (batch,) + a.shape[1:]) + jnp.zeros((), a.dtype))(x)

    def rows(k, n):   # KV rows (bf16/f32 or packed fp8), [n_rows, n, row]
        return jax.jit(functools.partial(store_kv, config))(
            jax.random.normal(k, (n_rows, n, config.head_dim), jnp.float32))

    def index_keys(k, n):   # packed rows [n_rows, n, D + 4] (page-blocked below, as the cache stores them)
        return jax.jit(pack_index_keys)(jax.random.normal(k, (n_rows, n, config.index_head_dim), jnp.float32))

    def rand_like(k, tree):
        return jax.tree_util.tree_map(lambda a: jax.random.normal(k, a.shape, a.dtype), tree)

    layers, mirror_kv, mirror_keys = [], {}, {}
    for l in range(config.n_layers):
        key, *ks = jax.random.split(key, 6)
        kind = config.layer_kind(l)
        shapes = jax.eval_shape(lambda l=l: init_layer_cache(config, l, batch, max_len))
        new = {"window": tiled(rows(ks[0], config.window))}
        if kind != KIND_WINDOW:
            n = entry_capacity(config, l, max_len)
            valid = (jnp.arange(n) < context // config.compress_ratios[l])[None, :, None]
            kv = jnp.where(valid, rows(ks[1], n), jnp.zeros((), kv_zeros(config, 1, 0).dtype))
            new["comp_state"] = rand_like(ks[2], shapes["comp_state"])
            if kind == KIND_CSA:
                keys = block_index_keys(jnp.where(valid, index_keys(ks[3], n), jnp.zeros((), jnp.uint8)),
                                        config.page_entries)
                new["index_state"] = rand_like(ks[4], shapes["index_state"])
                if tiered:
                    p = config.page_entries
                    # one page: kv rows [P, row], page-blocked keys [P * (D + 4)]
                    for store, rows_, page in ((mirror_kv, kv, (p, kv.shape[-1])), (mirror_keys, keys, keys.shape[2:])):
                        host = np.empty((batch, n // p) + page, np.dtype(rows_.dtype))
                        host[...] = np.asarray(rows_).reshape(n_rows, n // p, *page)  # broadcasts when n_rows = 1
                        store[l] = host
                    new["comp_kv"] = kv_zeros(config, batch, 0)
                    new["index_keys"] = tiled(keys) if l in target_layers else \
                        jnp.zeros((batch, 0, config.index_page_bytes), jnp.uint8)
                else:
                    new["comp_kv"], new["index_keys"] = tiled(kv), tiled(keys)
            else:
                new["comp_kv"] = tiled(kv)
        layers.append(new)
    hidden = [jax.random.normal(jax.random.fold_in(key, l), (batch, config.d_model), jnp.float32)
              .astype(config.compute_dtype) for l in range(config.n_layers)]
    cache = {"lengths": jnp.full((batch,), context, jnp.int32), "capacity": jnp.asarray(max_len, jnp.int32),
             "layers": tuple(layers)}
    return cache, hidden, (kt.HostMirror(mirror_kv, mirror_keys) if tiered else None)


def cycle_median(stats: dict, key: str) -> float:
    """Steady-state median of a per-cycle stat of `decode_loop` (`stats["per_cycle"]`): over the cycles after
    the first, which compiles and recalls the whole initial resident set."""
    return float(np.median([pc[key] for pc in stats["per_cycle"][1:]]))


def param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def step_bytes_full(config, params, batch: int, context: int) -> int:
    """Fewest HBM bytes one full-cache decode step must read: all parameters once, plus per request
    the window, every HCA entry, and for CSA layers every index key (the Lightning Indexer scans
    them) and the top-k attended entries."""
    row = config.kv_entry_bytes
    per_req = 0
    for l in range(config.n_layers):
        per_req += min(context, config.window) * row
        kind, r = config.layer_kind(l), config.compress_ratios[l]
        if kind == KIND_CSA:
            n = context // r
            per_req += n * config.index_key_bytes + min(n, config.index_topk) * row
        elif kind != KIND_WINDOW:
            per_req += context // r * row
    return param_bytes(params) + batch * per_req


def write_json(path: str, payload: dict) -> None:
    """Write `payload` to `path` whole or not at all (a run killed mid-write keeps the previous file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)
    print("wrote", path)
