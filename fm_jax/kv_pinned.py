"""The host mirror as JAX arrays in `pinned_host` memory (SPEC §5; the mission's "host-offloaded KV arrays
via `jax.device_put` memory kinds"): the alternative to `kv_tiers.HostMirror`'s NumPy arrays.

Each (CSA layer, kv | keys) array [B, n_pages, page_entries, row] lives in the pinned host memory of one
device per data shard (the first device of the shard, `sharding.batch_row_groups`). Recall is one jitted
program per shard that reads the pinned arrays and writes device arrays: a loop over the recalled
(request, page) pairs whose body is a `dynamic_slice` of the pinned array moved to the device
(`jax.device_put` inside jit, XLA's MoveToDevice) and a `dynamic_update_slice` into the device result, so no
host thread copies a byte (on a GPU the copy is XLA's, from pinned memory). The other devices of a shard get
a device-to-device copy. Write-through is a jitted `dynamic_update_slice` into the donated pinned array of
the page moved to the host inside the program (MoveToHost), so the mirror is updated in place.

Which of this and the NumPy mirror is faster is measured by `benchmarks/bench_recall.py`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

HOST_KIND = "pinned_host"


def host_sharding(device) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(device, memory_kind=HOST_KIND)


def to_pinned(x, device=None) -> jax.Array:
    """A host or device array -> a JAX array in the pinned host memory of `device` (default: device 0)."""
    return jax.device_put(x, host_sharding(jax.devices()[0] if device is None else device))


@functools.cache
def _gather_fn(device, unroll: int):
    dev = jax.sharding.SingleDeviceSharding(device)

    def gather(arrays, rows, pages):
        """arrays: tuple of pinned [B, n_pages, P, row]; rows int32 [b] (mirror rows of the requests);
        pages int32 [b, M] -> tuple of device arrays [b, M, P, row]."""
        b, m = pages.shape
        outs = tuple(jnp.zeros((b, m) + a.shape[2:], a.dtype, device=dev) for a in arrays)

        def body(i, outs):
            r, j = i // m, i % m
            new = []
            for a, out in zip(arrays, outs):
                page = jax.lax.dynamic_slice(a, (rows[r], pages[r, j], 0, 0), (1, 1) + a.shape[2:])
                new.append(jax.lax.dynamic_update_slice(out, jax.device_put(page, dev), (r, j, 0, 0)))
            return tuple(new)
        return jax.lax.fori_loop(0, b * m, body, outs, unroll=unroll)
    return jax.jit(gather, out_shardings=dev)


def gather_pages(arrays, rows, pages, device=None, unroll: int = 1):
    """Recall on `device` (default: device 0, whose pinned memory holds `arrays`): tuple of pinned
    [B, n_pages, P, row] arrays, rows [b], pages [b, M] (NumPy ints) -> tuple of device [b, M, P, row]
    (the copies may still be running)."""
    device = jax.devices()[0] if device is None else device
    put = functools.partial(jax.device_put, device=device)
    return _gather_fn(device, unroll)(tuple(arrays), put(np.asarray(rows, np.int32)),
                                      put(np.asarray(pages, np.int32)))


@functools.cache
def _write_fn(device):
    host = host_sharding(device)

    def write(arrays, new, src, dst):
        """arrays: tuple of pinned [B, n_pages, P, row] (donated); new: tuple of [b, m, P, row];
        src int32 [n, 2] (request, index in new), dst int32 [n, 2] (mirror row, page)."""
        def body(i, arrays):
            out = []
            for a, x in zip(arrays, new):
                page = jax.lax.dynamic_slice(x, (src[i, 0], src[i, 1], 0, 0), (1, 1) + x.shape[2:])
                out.append(jax.lax.dynamic_update_slice(a, jax.device_put(page.astype(a.dtype), host),
                                                        (dst[i, 0], dst[i, 1], 0, 0)))
            return tuple(out)
        return jax.lax.fori_loop(0, src.shape[0], body, arrays)
    return jax.jit(write, donate_argnums=0, out_shardings=host)


def write_pages(arrays, new, rows, pages, device=None):
    """Store new [b, m, P, row] (device or host arrays) at pages [b, m] (-1 = padding, skipped) of the
    mirror rows `rows` [b] of the pinned `arrays` (donated: use the returned arrays). The count of pages
    is padded to a power of two with repeats of the first page (rewriting a page with the same bytes), so
    few distinct shapes are compiled."""
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
