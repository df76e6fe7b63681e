"""Recall routes from the host mirror to the device (issue 11 item 5), timed to landing.

A mirror of `--layers` CSA layers (kv arrays [B, n_pages, page_entries, row] and page-blocked index keys
[B, n_pages, page_entries * 132], the v4_flash page geometry: 64 entries of 584-byte fp8 rows or 512 bf16
values, 132-byte keys) and a recall of
`--recall-pages` random pages per request from every array, per batch. Routes:

  numpy_threads      today's `kv_tiers.HostMirror.recall_to_device`: NumPy gather on host threads, each
                     array staged through pinned_host, then to the device
  numpy_direct       the same without the pinned staging copy (NumPy -> device device_put)
  pinned_mirror      the engine's "pinned" backend, `kv_pinned.PinnedMirror.recall_to_device` (pinned_take)
  pinned_fori[_uN]   `kv_pinned.gather_pages(method="fori")`: pinned_host JAX arrays, one jitted loop of
                     dynamic_slice (pinned) -> device_put (device) -> dynamic_update_slice (unrolled N times)
  pinned_take        `kv_pinned.gather_pages(method="take")`: jit(in_shardings=pinned_host,
                     out_shardings=device) of the fancy-index gather of whole pages (indices pinned too)
  pinned_compute_on  the gather under compute_on('device_host'), then device_put to the device
  page_list          one pinned_host array per (request, page) with every array's bytes of that page
                     (sglang-jax's host pool), one batched jax.device_put of the recalled pages, unpacked
                     on the device
  ceiling_pinned     one contiguous pinned_host -> device device_put of the same byte count
  ceiling_pinned_split  the same bytes as one pinned array per mirror array, one batched device_put
  ceiling_numpy      one contiguous NumPy -> device device_put

Overlap: each timed route's recall (and each ceiling's copy) issued right after (the engine's order) and
right before a device program ~3x as long as today's recall (50-300 ms): whether the copy lands while the
program runs, or queues behind it (a jitted gather shares the compute stream). The engine's
`recall_landed_s` is the "after" case: at batch 1 it reads about one window (issue 11), which this tells
apart: a copy that really waits for the window, or one that lands early and is seen late.

Every route's recalled bytes are checked bit for bit against the NumPy gather before it is timed (a route
that fails or differs is recorded with its error, not timed). Write-through: one page per array and request
replaced with new device bytes (NumPy: device->host + in-place copy, as the engine does; pinned: the donated
jitted dynamic_update_slice of `kv_pinned.write_pages`; page_list: pack on the device + device_put to
pinned_host), then read back bit for bit.

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python3 -m benchmarks.bench_recall --out benchmarks/results/recall-h200.json

(run from the repository root: the probes start `python -m benchmarks.bench_recall` children; about 3 minutes
on the H200, `--budget-s` stops starting batches after 150 s.)
"""
from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import KV_DTYPES, median_time, run_info, v4_attention_stack, write_json
from fm_jax import kv_pinned as kp
from fm_jax import kv_tiers as kt
from fm_jax.cache import kv_row
from fm_jax.config import get_config


# ------------------------------------------------------------------------------------------ data
def random_rows(rng, shape, dtype) -> np.ndarray:
    """Random bytes as `dtype`; bf16 NaN patterns become +-inf (NaN-free, so extreme values included:
    inf, subnormals, -0)."""
    dtype = np.dtype(dtype)
    x = np.frombuffer(rng.bytes(int(np.prod(shape)) * dtype.itemsize), np.uint8).copy()
    if dtype.itemsize == 2:
        bits = x.view(np.uint16)
        nan = (bits & 0x7F80) == 0x7F80
        bits[nan] &= 0xFF80
    return x.view(dtype).reshape(shape)


def make_mirror(config, layers: int, batch: int, n_pages: int, seed: int = 0) -> kt.HostMirror:
    width, dtype = kv_row(config)
    rng = np.random.default_rng(seed)
    p = config.page_entries
    kv = {l: random_rows(rng, (batch, n_pages, p, width), dtype) for l in range(layers)}
    keys = {l: random_rows(rng, (batch, n_pages, config.index_page_bytes), np.uint8) for l in range(layers)}
    return kt.HostMirror(kv, keys)


def arrays(mirror: kt.HostMirror) -> list:
    """The mirror's arrays in recall order: kv, keys of every layer."""
    return [src for _, _, src in mirror._arrays()]


def as_bytes(x) -> np.ndarray:
    x = np.asarray(x)
    return np.ascontiguousarray(x).view(np.uint8)


# ------------------------------------------------------------------------------------------ routes
def mirror_recall(mirror, pages) -> list:
    """`recall_to_device` of a HostMirror-like mirror, as a list in `arrays` order."""
    out = mirror.recall_to_device(kt.RecallPlan(np.zeros_like(pages), pages, pages.size))
    return [a for l in out for a in out[l]]


def mirror_write(mirror, new, pages) -> None:
    """`write_layers` (as the engine writes a window's pages); `new` is in `arrays` order (kv, keys per layer)."""
    mirror.write_layers({l: (new[2 * i], new[2 * i + 1]) for i, l in enumerate(mirror.layers)}, pages)


class NumpyThreads:
    """Today's route (kv_tiers.HostMirror)."""

    def __init__(self, mirror, dev, shared):
        self.mirror = mirror

    def recall(self, pages):
        return mirror_recall(self.mirror, pages)

    def write(self, new, pages):
        mirror_write(self.mirror, new, pages)


class NumpyDirect(NumpyThreads):
    """Today's route without the pinned staging copy: NumPy -> device `jax.device_put`."""

    def __init__(self, mirror, dev, shared):
        super().__init__(kt.HostMirror(mirror.kv, mirror.keys, pinned_staging=False), dev, shared)


class PinnedFori:
    """kv_pinned.gather_pages / write_pages on pinned_host copies of the mirror arrays, one copy shared by
    every pinned route (`shared["pinned"]`: host memory for one copy, not one per route)."""

    def __init__(self, mirror, dev, shared, unroll=1):
        if "pinned" not in shared:  # as their bits, as kv_pinned.PinnedMirror holds them
            shared["pinned"] = [kp.to_pinned(kp.as_bits(a), dev) for a in arrays(mirror)]
        self.shared, self.dev, self.unroll = shared, dev, unroll
        self.names = [(l, name) for l, name, _ in mirror._arrays()]
        self.dtypes = [a.dtype for a in arrays(mirror)]

    @property
    def arrays(self) -> list:
        return self.shared["pinned"]

    def recall(self, pages):
        return list(kp.gather_pages(self.arrays, np.arange(len(pages)), pages, self.dev, self.unroll, self.dtypes,
                                    method="fori"))

    def write(self, new, pages):
        self.shared["pinned"] = list(kp.write_pages(self.arrays, new, np.arange(len(pages)), pages, self.dev))
        jax.block_until_ready(self.arrays)


class PinnedMirrorRoute(PinnedFori):
    """The engine's "pinned" backend, `kv_pinned.PinnedMirror` (the pinned_fori gather behind the HostMirror
    interface), over the shared pinned arrays."""

    def _view(self):
        b = self.arrays[0].shape[0]
        return kp.PinnedMirror([(slice(0, b), self.dev, dict(zip(self.names, self.arrays)))],
                               tuple(dict.fromkeys(l for l, _ in self.names)), dict(zip(self.names, self.dtypes)))

    def recall(self, pages):
        return mirror_recall(self._view(), pages)

    def write(self, new, pages):
        view = self._view()
        mirror_write(view, new, pages)
        self.shared["pinned"] = [view.shards[0][2][k] for k in self.names]
        jax.block_until_ready(self.arrays)


class PinnedTake(PinnedFori):
    """`kv_pinned.gather_pages(method="take")`: one jitted gather of whole pages reading the pinned_host
    arrays (and indices), written to device memory; the pinned mirror's recall."""

    def recall(self, pages):
        return list(kp.gather_pages(self.arrays, np.arange(len(pages)), pages, self.dev, dtypes=self.dtypes))

    def _flat(self, pages):
        return np.arange(len(pages))[:, None] * self.arrays[0].shape[1] + pages


class PinnedComputeOn(PinnedTake):
    """The gather on the host (compute_on('device_host')) into pinned_host, then one move to the device."""

    def __init__(self, mirror, dev, shared):
        from jax.experimental.compute_on import compute_on  # experimental: a missing one is recorded
        PinnedFori.__init__(self, mirror, dev, shared)
        dsh = jax.sharding.SingleDeviceSharding(dev)

        def gather(arrs, idx):
            return [a.reshape((-1,) + a.shape[2:])[idx] for a in arrs]
        if "out_memory_spaces" in inspect.signature(compute_on).parameters:  # jax >= 0.11: a function transform
            host_gather = compute_on(gather, compute_type="device_host",
                                     out_memory_spaces=[jax.memory.Space.Host] * len(self.arrays))
        else:  # jax 0.10: a context manager
            def host_gather(arrs, idx):
                with compute_on("device_host"):
                    return gather(arrs, idx)

        @jax.jit
        def fn(arrs, idx):
            return [kp.from_bits(x, t) for x, t in zip(jax.device_put(host_gather(arrs, idx), dsh), self.dtypes)]
        self.fn = fn

    def recall(self, pages):
        return self.fn(self.arrays, kp.to_pinned(self._flat(pages).astype(np.int32), self.dev))


class PageList:
    """sglang-jax's host pool: one pinned_host uint8 array per (request, page) holding that page of every
    mirror array; recall = one batched device_put of the recalled pages + one jitted unpack."""

    def __init__(self, mirror, dev, shared):
        src = arrays(mirror)
        self.specs = [(a.shape[2:], a.dtype) for a in src]
        b, n = src[0].shape[:2]
        self.dev, self.hsh = dev, kp.host_sharding(dev)
        self.pages = [jax.device_put([np.concatenate([as_bytes(a[r, j]).reshape(-1) for a in src]) for j in range(n)],
                                     [self.hsh] * n) for r in range(b)]
        self.unpack = jax.jit(self._unpack, static_argnums=(1, 2))
        self.pack = jax.jit(lambda xs: jnp.concatenate([_bytes_of(x) for x in xs], axis=-1))

    def _unpack(self, blobs, b, m):
        flat, out, off = jnp.stack(blobs).reshape(b, m, -1), [], 0
        for shape, dtype in self.specs:
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            part = flat[..., off:off + size]
            if np.dtype(dtype).itemsize > 1:
                part = jax.lax.bitcast_convert_type(part.reshape(b, m, -1, np.dtype(dtype).itemsize), dtype)
            out.append(part.reshape((b, m) + shape))
            off += size
        return out

    def recall(self, pages):
        sel = [self.pages[r][j] for r in range(len(pages)) for j in pages[r]]
        moved = jax.device_put(sel, [jax.sharding.SingleDeviceSharding(self.dev)] * len(sel))
        return self.unpack(moved, *pages.shape)

    def write(self, new, pages):
        packed = self.pack([jax.device_put(x, self.dev) for x in new])  # [b, m, page bytes]
        for r in range(len(pages)):
            for j, p in enumerate(pages[r]):
                if p >= 0:
                    self.pages[r][p] = jax.device_put(packed[r, j], self.hsh)
        jax.block_until_ready(self.pages)


def _bytes_of(x):
    """[b, m, ...] any dtype -> uint8 [b, m, bytes] (bit pattern)."""
    if x.dtype.itemsize > 1:
        x = jax.lax.bitcast_convert_type(x, jnp.uint8)
    return x.reshape(x.shape[:2] + (-1,))


ROUTES = {"numpy_threads": NumpyThreads, "numpy_direct": NumpyDirect, "pinned_mirror": PinnedMirrorRoute,
          "pinned_fori": PinnedFori,
          "pinned_fori_u8": functools.partial(PinnedFori, unroll=8), "pinned_take": PinnedTake,
          "pinned_compute_on": PinnedComputeOn, "page_list": PageList}


# ------------------------------------------------------------------------------------------ timing
def timed(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn(i) to the landing of its result (block_until_ready); i counts the calls."""
    calls = itertools.count()
    return median_time(lambda: jax.block_until_ready(fn(next(calls))), warmup=warmup, reps=reps)


class Ceiling:
    """A contiguous copy of the recall's byte count (no gather): `recall` ignores the pages."""

    def __init__(self, copy):
        self.copy = copy

    def recall(self, pages):
        return self.copy()


def ceilings(n_bytes: int, n_arrays: int, dev) -> dict:
    """{name: Ceiling}: one pinned_host array, one per mirror array (batched), and NumPy, to the device."""
    dsh = jax.sharding.SingleDeviceSharding(dev)
    host = np.frombuffer(np.random.default_rng(1).bytes(n_bytes - n_bytes % n_arrays), np.uint8)
    one = kp.to_pinned(host, dev)
    split = jax.device_put(list(host.reshape(n_arrays, -1)), [kp.host_sharding(dev)] * n_arrays)
    return {"ceiling_pinned": Ceiling(lambda: jax.device_put(one, dsh)),
            "ceiling_pinned_split": Ceiling(lambda: jax.device_put(split, [dsh] * n_arrays)),
            "ceiling_numpy": Ceiling(lambda: jax.device_put(host, dsh))}


def busy_program(dev, seconds: float):
    """() -> a dispatched device program that runs about `seconds` (a loop of matmuls with a static trip
    count, like the decode window's scan: a loop whose count is data makes XLA:GPU read the condition back
    every iteration, and the dispatching thread then waits the whole program out), to see whether a recall
    issued beside it lands before it ends (overlap) or after."""
    x = jax.device_put(jnp.full((1024, 1024), 1.0 / 1024, jnp.float32), dev)
    loop = jax.jit(lambda x, k: jax.lax.fori_loop(0, k, lambda i, y: y @ x, x), static_argnums=1)
    n = 8
    for _ in range(2):  # twice: the first estimate includes the dispatch overhead of a short loop
        n = max(1, round(n * seconds / timed(lambda i, n=n: loop(x, n), 3, warmup=1)))
    loop(x, n).block_until_ready()  # compiled
    return lambda: loop(x, n)


def dispatch_s(busy) -> float:
    """Seconds until the call returns (not the program): about the program's length if dispatch blocks."""
    t0 = time.perf_counter()
    c = busy()
    t = time.perf_counter() - t0
    c.block_until_ready()
    return t


def overlap(route, pages, busy, reps: int) -> dict:
    """Times (s, from dispatching `busy`) of a recall issued right after a busy device program (the engine's
    order: window, then next window's recall) and right before it. "after": lands before the program ends
    iff the copy runs beside compute; "before": the program ends late iff it waits behind the recall."""
    out = {}
    for order in ("after", "before"):
        rows = []
        for _ in range(reps):
            t0 = time.perf_counter()
            if order == "after":
                c = busy()
                got = route.recall(pages)
            else:
                got = route.recall(pages)
                c = busy()
            issued = time.perf_counter() - t0
            jax.block_until_ready(got)
            landed = time.perf_counter() - t0
            jax.block_until_ready(c)
            rows.append((issued, landed, time.perf_counter() - t0))
        issued, landed, done = np.median(np.asarray(rows), axis=0)
        out[order] = {"issued_s": float(issued), "landed_s": float(landed), "busy_done_s": float(done)}
    return out


def probe(names: list) -> str | None:
    """Run routes `names` on the smoke shapes in a child process: None when they work, else why not. A
    route whose compilation aborts the process (an XLA check failure) is then left out of the main run
    instead of ending it."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        cmd = [sys.executable, "-m", "benchmarks.bench_recall", "--smoke", "--no-probe", "--routes", ",".join(names),
               "--batches", "2", "--reps", "1", "--out", os.path.join(tmp, "p.json")]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return "probe timed out (300 s)"
        if p.returncode:
            return f"probe process exited {p.returncode}: {(p.stderr or p.stdout)[-600:]}"
        return None


def probe_routes(names: list) -> dict:
    """{route: why it cannot run, or None} for every route but today's: all in one child, and one child per
    route only when that one fails (before this process takes the GPU)."""
    risky = [n for n in names if n != "numpy_threads"]
    if not risky or probe(risky) is None:
        return dict.fromkeys(risky)
    return {n: probe([n]) for n in risky}


def run_batch(row, routes, mirror, m, reps, rng, save) -> None:
    """Fill `row` ({"batch": B}) with every route's recall and write-through figures, calling save() as
    each route finishes."""
    batch = row["batch"]
    n_pages = arrays(mirror)[0].shape[1]
    plans = [np.stack([rng.choice(n_pages, m, replace=False) for _ in range(batch)]) for _ in range(3)]
    want = [[as_bytes(a[np.arange(batch)[:, None], p]) for a in arrays(mirror)] for p in plans[:1]][0]
    n_bytes = sum(w.nbytes for w in want)
    row.update({"recall_pages_per_request": m, "arrays": len(want), "recalled_bytes": n_bytes, "routes": {}})
    for name, route in list(routes.items()):
        res = row["routes"][name] = {}
        try:
            t0 = time.perf_counter()
            got = jax.block_until_ready(route.recall(plans[0]))
            first = time.perf_counter() - t0  # with compilation
            bad = [i for i, (g, w) in enumerate(zip(got, want)) if not np.array_equal(as_bytes(g), w)]
            if bad:
                res["error"] = f"recalled bytes differ from the NumPy gather in arrays {bad[:8]}"
            else:  # a route slower than 2 s a call (compilation included) is timed once: the run stays short
                slow = first > 2.0
                res["recall_s"] = timed(lambda i, r=route: r.recall(plans[i % 3]), 1 if slow else reps,
                                        warmup=0 if slow else 2)
                res["gbps"] = n_bytes / res["recall_s"] / 1e9
        except Exception as e:  # noqa: BLE001 - a route the backend cannot run is recorded, not fatal
            res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(name, res, flush=True)
        save()
    routes = {**routes, **ceilings(n_bytes - n_bytes % len(want), len(want), jax.devices()[0])}
    for name in [n for n in routes if n.startswith("ceiling")]:
        t = timed(lambda i, r=routes[name]: r.recall(None), reps)
        row["routes"][name] = {"recall_s": t, "gbps": (n_bytes - n_bytes % len(want)) / t / 1e9}
    timed_routes = [n for n in routes if "recall_s" in row["routes"][n]]
    if timed_routes:  # a program ~3x today's recall (50-300 ms: the run stays short), timed alone first
        ref = row["routes"]["numpy_threads" if "numpy_threads" in timed_routes else timed_routes[0]]["recall_s"]
        busy = busy_program(jax.devices()[0], min(0.3, max(0.05, 3 * ref)))
        row["busy_alone_s"] = timed(lambda i: busy(), 3, warmup=1)
        row["busy_dispatch_s"] = dispatch_s(busy)
        for n in [n for n in timed_routes if row["routes"][n]["recall_s"] < 1.0]:
            row["routes"][n]["overlap"] = overlap(routes[n], plans[1], busy, min(2, reps))
            print(n, "overlap", row["routes"][n]["overlap"], flush=True)
        save()
    row["write_through"] = write_through({n: r for n, r in routes.items() if not isinstance(r, Ceiling)}, mirror,
                                         batch, reps, rng, row["routes"])
    save()


def write_through(routes, mirror, batch, reps, rng, recalled) -> dict:
    """Replace one page per array and request with new device bytes in every working route (all write the
    same bytes, so the mirrors stay equal), read it back, time the writes (median of `reps`)."""
    src = arrays(mirror)
    pages = rng.integers(0, src[0].shape[1], (batch, 1))
    new = [jax.device_put(random_rows(rng, (batch, 1) + a.shape[2:], a.dtype)) for a in src]
    out = {}
    for name, route in routes.items():
        if "recall_s" not in recalled.get(name, {}) or not hasattr(route, "write"):
            continue
        try:
            t = timed(lambda i, r=route: r.write(new, pages), reps, warmup=1)
            got = route.recall(pages)
            ok = all(np.array_equal(as_bytes(g), as_bytes(x)) for g, x in zip(got, new))
            out[name] = {"write_s": t, "bit_exact": ok}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("write", name, out[name], flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default=None, help="default 1,8,16 (--smoke: 1,2)")
    ap.add_argument("--layers", type=int, default=None, help="CSA layers (2 arrays each); default 16 (--smoke 2)")
    ap.add_argument("--mirror-pages", type=int, default=None, help="pages per request in the mirror; default 256")
    ap.add_argument("--recall-pages", type=int, default=None, help="pages recalled per request; default 32")
    ap.add_argument("--kv-dtypes", default="fp8,bf16")
    ap.add_argument("--routes", default=",".join(ROUTES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="start no batch and no kv dtype after this many seconds (the probes included)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the script)")
    ap.add_argument("--no-probe", action="store_true",
                    help="skip the child-process probe of every route (default: probed unless --smoke)")
    args = ap.parse_args(argv)
    d = dict(batches="1,2", layers=2, mirror_pages=16, recall_pages=4) if args.smoke else \
        dict(batches="1,8,16", layers=16, mirror_pages=256, recall_pages=32)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name in args.routes.split(","):
        if name not in ROUTES:
            raise SystemExit(f"unknown route {name!r}: choose from {list(ROUTES)}")
    start = time.perf_counter()
    names = args.routes.split(",")
    probes = {} if args.smoke or args.no_probe else probe_routes(names)
    for n, why in probes.items():
        print("probe", n, why or "ok", flush=True)
    dev = jax.devices()[0]
    payload = {**run_info(), "args": vars(args), "probe_errors": {n: w for n, w in probes.items() if w}, "runs": []}
    batches = [int(x) for x in args.batches.split(",")]
    for kv_dtype in args.kv_dtypes.split(","):
        if kv_dtype not in KV_DTYPES:
            raise SystemExit(f"kv dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        if time.perf_counter() - start > args.budget_s:
            payload["runs"].append({"kv_dtype": kv_dtype, "skipped": f"past --budget-s {args.budget_s}"})
            continue
        c = _config(args.smoke, kv_dtype)
        t0 = time.perf_counter()
        mirror = make_mirror(c, args.layers, max(batches), args.mirror_pages)
        routes, shared = {}, {}
        for name in names:
            if probes.get(name):
                routes[name] = _Failed(f"probe: {probes[name]}")
                continue
            try:
                routes[name] = ROUTES[name](mirror, dev, shared)
            except Exception as e:  # noqa: BLE001
                print(name, "setup failed:", e, flush=True)
                routes[name] = _Failed(f"setup: {type(e).__name__}: {str(e)[:300]}")
        run = {"kv_dtype": kv_dtype, "page_entries": c.page_entries, "kv_row": list(arrays(mirror)[0].shape[3:]),
               "kv_row_dtype": str(arrays(mirror)[0].dtype), "key_bytes": c.index_key_bytes,
               "page_bytes": kt.page_bytes(c), "mirror_bytes": mirror.nbytes(),
               "setup_s": time.perf_counter() - t0, "rows": []}
        payload["runs"].append(run)
        rng = np.random.default_rng(2)
        for b in batches:
            if time.perf_counter() - start > args.budget_s:
                run["rows"].append({"batch": b, "skipped": f"past --budget-s {args.budget_s}"})
                continue
            run["rows"].append({"batch": b})  # filled route by route and saved after each: a run cut short
            run_batch(run["rows"][-1], routes, mirror, args.recall_pages, args.reps, rng,  # keeps what it measured
                      lambda: write_json(args.out, payload))
            run["rows"][-1]["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        del routes, mirror, shared
    return 0


class _Failed:
    def __init__(self, error):
        self.error = error

    def recall(self, pages):
        raise RuntimeError(self.error)


def _config(smoke: bool, kv_dtype: str):
    if smoke:
        rows = dict(kv_fp8=True, head_dim=72) if kv_dtype == "fp8" else dict(dtype="bfloat16")
        return get_config("tiny", n_layers=4, compress_ratios=(4, 4, 4, 4), **rows)
    return v4_attention_stack(compress_ratios=(4, 4, 4, 4), kv_dtype=kv_dtype)


if __name__ == "__main__":
    raise SystemExit(main())
