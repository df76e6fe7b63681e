"""The host mirror as JAX arrays in `pinned_host` memory (SPEC §5; the mission's "host-offloaded KV arrays
via `jax.device_put` memory kinds"): the alternative to `kv_tiers.HostMirror`'s NumPy arrays.

Each (CSA layer, kv | keys) array [B, n_pages, *page] lives in the pinned host memory of one device per
data shard (the first device of the shard, `sharding.batch_row_groups`). Recall is one jitted
program per shard that reads the pinned arrays and writes device arrays, so no host thread copies a byte:
by default ("take") one gather of whole pages with the arrays and the page indices in pinned memory and the
result on the device (XLA's host offloader may run the gather itself on the host: it warns so on the GPU; it
measured fastest there all the same, see `gather_pages`); or ("fori") a loop over the recalled (request,
page) pairs of a `dynamic_slice` moved to the device (`jax.device_put` inside jit) and a
`dynamic_update_slice` into the device result. The other devices of a shard get a device-to-device copy.
Write-through is a jitted `dynamic_update_slice` into the donated pinned array of the page moved to the host
inside the program (MoveToHost), so the mirror is updated in place. Float rows are held as their bits
(`as_bits`) and bitcast back on the device.

Shapes: `*page` is one page, [page_entries, row] for kv and [page_entries * (index_head_dim + 4)] for the
page-blocked index keys (`fm_jax.layers.key_pages`).

Being programs, recall and write-through run in order with the decode windows on the device's compute
stream: a recall issued while a window runs lands after it (the NumPy mirror's `device_put` copies need not
wait). Which mirror is faster, and which overlaps compute, is measured by `benchmarks/bench_recall.py`.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax.sharding import batch_row_groups

HOST_KIND = "pinned_host"


def host_sharding(device) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(device, memory_kind=HOST_KIND)


def to_pinned(x, device=None) -> jax.Array:
    """A host or device array -> a JAX array in the pinned host memory of `device` (default: device 0)."""
    return jax.device_put(x, host_sharding(jax.devices()[0] if device is None else device))


def as_bits(x):
    """A float array (NumPy: a view; JAX: a bitcast) as unsigned ints of its width; other arrays as they
    are. The mirror holds bits: its loops only move bytes, and the CPU backend widens every bf16 dynamic
    slice's whole operand to f32 (measured: 20x slower gathers on a bf16 mirror)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    bits = jnp.dtype(f"uint{8 * jnp.dtype(x.dtype).itemsize}")
    return x.view(bits) if isinstance(x, np.ndarray) else jax.lax.bitcast_convert_type(x, bits)


def from_bits(x: jax.Array, dtype) -> jax.Array:
    """The inverse of `as_bits` (a bitcast to `dtype` of the same width)."""
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


@functools.cache
def _gather_fn(device, unroll: int):
    dev = jax.sharding.SingleDeviceSharding(device)

    def gather(arrays, rows, pages, dtypes):
        """arrays: tuple of pinned [B, n_pages, *page]; rows int32 [b] (mirror rows of the requests);
        pages int32 [b, M] -> tuple of device arrays [b, M, *page] of `dtypes` (bitcast, same width)."""
        b, m = pages.shape
        outs = tuple(jnp.zeros((b, m) + a.shape[2:], a.dtype, device=dev) for a in arrays)

        def body(i, outs):
            r, j = i // m, i % m
            new = []
            for a, out in zip(arrays, outs):
                rest = (0,) * (a.ndim - 2)   # kv pages [P, row], key pages [page bytes]
                page = jax.lax.dynamic_slice(a, (rows[r], pages[r, j]) + rest, (1, 1) + a.shape[2:])
                new.append(jax.lax.dynamic_update_slice(out, jax.device_put(page, dev), (r, j) + rest))
            return tuple(new)
        outs = jax.lax.fori_loop(0, b * m, body, outs, unroll=unroll)
        return tuple(from_bits(x, t) for x, t in zip(outs, dtypes))
    return jax.jit(gather, out_shardings=dev, static_argnums=3)


@functools.cache
def _take_fn(device, n: int, dtypes: tuple):
    dev, host = jax.sharding.SingleDeviceSharding(device), host_sharding(device)

    def take(arrays, idx):
        """arrays: tuple of pinned [B, n_pages, *page]; idx int32 [b, M] (pinned too: XLA wants one memory
        space per op) into the flattened [B * n_pages] pages -> tuple of device arrays [b, M, *page]."""
        return tuple(from_bits(a.reshape((-1,) + a.shape[2:])[idx], t) for a, t in zip(arrays, dtypes))
    return jax.jit(take, in_shardings=((host,) * n, host), out_shardings=dev)


GATHERS = ("take", "fori")


def gather_pages(arrays, rows, pages, device=None, unroll: int = 1, dtypes=None, method: str = "take"):
    """Recall on `device` (default: device 0, whose pinned memory holds `arrays`): tuple of pinned
    [B, n_pages, *page] arrays, rows [b], pages [b, M] (NumPy ints) -> tuple of device [b, M, *page]
    (the copies may still be running), bitcast to `dtypes` (default: the arrays' own). `method` "take": one
    jitted gather of whole pages reading the pinned arrays, written to device memory (on the H200 11-21 GB/s,
    against 1-14 for the NumPy mirror: benchmarks/results/recall-h200.json); "fori": a loop of per-page
    dynamic slices moved to the device (5-8 GB/s there), `unroll` times unrolled."""
    device = jax.devices()[0] if device is None else device
    dtypes = tuple(jnp.dtype(a.dtype) for a in arrays) if dtypes is None else tuple(map(jnp.dtype, dtypes))
    rows, pages = np.asarray(rows, np.int64), np.asarray(pages, np.int64)
    if method == "take":
        idx = (rows[:, None] * arrays[0].shape[1] + pages).astype(np.int32)
        return _take_fn(device, len(arrays), dtypes)(tuple(arrays), to_pinned(idx, device))
    if method != "fori":
        raise ValueError(f"method must be one of {GATHERS}, got {method!r}")
    put = functools.partial(jax.device_put, device=device)
    return _gather_fn(device, unroll)(tuple(arrays), put(rows.astype(np.int32)), put(pages.astype(np.int32)), dtypes)


@functools.cache
def _write_fn(device):
    host = host_sharding(device)

    def write(arrays, new, src, dst):
        """arrays: tuple of pinned [B, n_pages, *page] (donated); new: tuple of [b, m, *page];
        src int32 [n, 2] (request, index in new), dst int32 [n, 2] (mirror row, page)."""
        def body(i, arrays):
            out = []
            for a, x in zip(arrays, new):
                rest = (0,) * (x.ndim - 2)   # kv pages [P, row], key pages [page bytes]
                page = jax.lax.dynamic_slice(x, (src[i, 0], src[i, 1]) + rest, (1, 1) + x.shape[2:])
                page = page if page.dtype == a.dtype else as_bits(page)  # a mirror of bits (PinnedMirror)
                out.append(jax.lax.dynamic_update_slice(a, jax.device_put(page, host), (dst[i, 0], dst[i, 1]) + rest))
            return tuple(out)
        return jax.lax.fori_loop(0, src.shape[0], body, arrays)
    return jax.jit(write, donate_argnums=0, out_shardings=host)


def write_pages(arrays, new, rows, pages, device=None):
    """Store new [b, m, *page] (device or host arrays; floats stored as their bits, `as_bits`, when the
    array holds bits) at pages [b, m] (-1 = padding, skipped) of the mirror rows `rows` [b] of the pinned
    `arrays` (donated: use the returned arrays). The count of pages is padded to a power of two with
    repeats of the first page (rewriting a page with the same bytes), so few distinct shapes are compiled."""
    device = jax.devices()[0] if device is None else device
    pages = np.asarray(pages)
    src = np.argwhere(pages >= 0)
    if not src.size:
        return tuple(arrays)
    dst = np.stack([np.asarray(rows)[src[:, 0]], pages[src[:, 0], src[:, 1]]], axis=1)
    n = 1 << (len(src) - 1).bit_length()
    pad = np.zeros(n - len(src), np.int64)
    src, dst = np.concatenate([src, src[pad]]), np.concatenate([dst, dst[pad]])
    put = functools.partial(jax.device_put, device=device)
    new = tuple(put(x) for x in new)
    return _write_fn(device)(tuple(arrays), new, put(src.astype(np.int32)), put(dst.astype(np.int32)))


# ------------------------------------------------------------------------------------------ mirror
@dataclass
class PinnedMirror:
    """`kv_tiers.HostMirror`'s interface over pinned_host JAX arrays. `shards`: per data shard, (its rows
    of the batch, the device whose pinned memory holds them, {(layer, "kv" | "keys"): pinned
    [rows, n_pages, page_entries, row]}). With `verify`, page checksums (`kv_tiers.page_checksums`) are
    kept on the host and recall checks the recalled pages (a device -> host copy of them: opt-in)."""
    shards: list
    layers: tuple
    dtypes: dict          # (layer, "kv" | "keys") -> dtype of the rows (the pinned arrays hold their bits)
    verify: bool = False
    sums: dict = dataclasses.field(default_factory=dict)  # (layer, "kv" | "keys") -> uint64 [B, n_pages]

    @classmethod
    def from_arrays(cls, kv: dict, keys: dict, sharding: jax.sharding.Sharding | None = None,
                    verify: bool = False) -> PinnedMirror:
        """kv / keys: layer -> [B, n_pages, *page] (NumPy or device arrays); each data shard of the
        per-request `sharding` (default: one shard on device 0) goes to its first device's pinned memory."""
        b = next(iter(kv.values())).shape[0]
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if sharding is None else sharding
        named = {(l, name): src[l] for l in kv for name, src in (("kv", kv), ("keys", keys))}
        shards = [(rows, devs[0], {k: to_pinned(as_bits(a[rows]), devs[0]) for k, a in named.items()})
                  for rows, devs in batch_row_groups(sharding, b)]
        mirror = cls(shards, tuple(kv), {k: jnp.dtype(a.dtype) for k, a in named.items()})
        if verify:
            mirror.start_verifying()
        return mirror

    @classmethod
    def from_cache(cls, cache, config, layout, *, verify: bool = False, sharding=None) -> PinnedMirror:
        """The full CSA buffers of a prefilled cache, device -> pinned host (no NumPy copy)."""
        kv, keys = {}, {}
        for l in config.csa_layers:
            lc = cache["layers"][l]
            b = lc["comp_kv"].shape[0]
            kv[l] = lc["comp_kv"].reshape(b, layout.n_pages, layout.page_entries, -1)
            keys[l] = lc["index_keys"]   # already [B, n_pages, page bytes]
        return cls.from_arrays(kv, keys, sharding, verify)

    def to_numpy(self):
        """A `kv_tiers.HostMirror` copy (device -> host; for checks)."""
        from fm_jax.kv_tiers import HostMirror
        whole = {k: np.concatenate([np.asarray(arrs[k]) for _, _, arrs in self.shards]).view(t)
                 for k, t in self.dtypes.items()}
        return HostMirror({l: whole[(l, "kv")] for l in self.layers}, {l: whole[(l, "keys")] for l in self.layers})

    def start_verifying(self) -> None:
        from fm_jax.kv_tiers import page_checksums
        self.verify = True
        host = self.to_numpy()
        self.sums = {(l, name): page_checksums(src) for l, name, src in host._arrays()}

    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for _, _, arrs in self.shards for a in arrs.values())

    def _shard_of(self, rows: slice):
        for start, dev, arrs in self.shards:
            if start.start <= rows.start and rows.stop <= start.stop:
                return start, dev, arrs
        raise ValueError(f"requests {rows.start}..{rows.stop - 1} span more than one shard of the pinned mirror")

    def compile_recall(self, plan, sharding: jax.sharding.Sharding | None = None) -> None:
        """Run one recall of `plan`'s shape (its gather is compiled per shape), its result dropped."""
        jax.block_until_ready(self.recall_to_device(plan, sharding))

    def recall_to_device(self, plan, sharding: jax.sharding.Sharding | None = None):
        """As `HostMirror.recall_to_device`: {layer: (kv, keys)} arrays [B, M, *page] with `sharding`
        (default: device 0; copies may still be running). Each data shard's pages are gathered on the device
        whose pinned memory holds its requests, then copied to the shard's other devices."""
        from fm_jax.kv_tiers import check_pages, whole_array
        b, m = plan.pages.shape
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if sharding is None else sharding
        keys = list(self.shards[0][2])
        parts = {k: [] for k in keys}
        for rows, devs in batch_row_groups(sharding, b):
            home, dev, arrs = self._shard_of(rows)
            local = np.arange(rows.start, rows.stop) - home.start
            got = gather_pages([arrs[k] for k in keys], local, plan.pages[rows], dev,
                               dtypes=[self.dtypes[k] for k in keys])
            for k, x in zip(keys, got):
                if self.verify:
                    check_pages(np.asarray(x), self.sums[k], k, np.arange(b)[rows][:, None], plan.pages[rows])
                parts[k].extend(x if d == dev else jax.device_put(x, d) for d in devs)
        whole = {k: whole_array((b, m) + arrs[0].shape[2:], sharding, arrs) for k, arrs in parts.items()}
        return {l: (whole[(l, "kv")], whole[(l, "keys")]) for l in self.layers}

    def write_through(self, layer: int, slots_kv, slots_keys, pages: np.ndarray):
        """As `HostMirror.write_through` (slots_* [B, M, *page], device or host arrays; pages [B, M], -1 =
        padding): a donated in-place update of the pinned arrays, per shard on its own device."""
        self.write_layers({layer: (slots_kv, slots_keys)}, pages)

    def write_layers(self, new: dict, pages: np.ndarray):
        """`write_through` of every layer of new {layer: (slots_kv, slots_keys)} in one program per shard."""
        from fm_jax.kv_tiers import update_checksums
        keys = [(l, name) for l in new for name in ("kv", "keys")]
        vals = [x for pair in new.values() for x in pair]
        for i, (rows, dev, arrs) in enumerate(self.shards):
            out = write_pages([arrs[k] for k in keys], [x[rows] for x in vals], np.arange(rows.stop - rows.start),
                              pages[rows], dev)
            self.shards[i] = (rows, dev, {**arrs, **dict(zip(keys, out))})
        if self.verify:
            for k, x in zip(keys, vals):
                update_checksums(self.sums[k], np.asarray(x), pages)
