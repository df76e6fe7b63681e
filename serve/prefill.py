"""Chunked prefill for the engine (issue 10): `fm_jax.prefill.prefill_chunked`, and with a tiered CSA
cache (modes lsa / recency / random) the CSA entries stream to the host mirror while the prompt runs.

With the mirror (`MirrorStore`), the device holds during prefill: the window ring buffers, the HCA
entries, the compressors' states, the index keys of the Memory Indexer's target layers (the indexer
scores all of them at every cycle boundary), and *one* CSA layer's entry buffers (`scratch`, reused by
every CSA layer in turn). Before a CSA layer runs a chunk, the entries it wrote in earlier chunks are
copied from the mirror into the scratch (the chunk's queries pick their top-k among all of them, so
prefill attention is exactly that of the full cache); after it, the chunk's pages (every page the
chunk completes, and the request's last partial page) are copied to the mirror. The first resident
set is then chosen by the engine's first cycle boundary, right after prefill.

Transfers per chunk and CSA layer: the layer's history up in whole chunks (in at most log2(chunks)
pieces of 2^j chunks, a handful of shapes -> a handful of compilations), and one chunk's entries down.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax import kv_tiers as kt
from fm_jax.cache import entry_capacity, kv_row, kv_zeros
from fm_jax.prefill import bucket, check_chunk, commit, prefill_chunked


@functools.partial(jax.jit, donate_argnames=("buf",))
def _put_rows(buf, rows, offset):
    """buf[:, offset : offset + M] = rows ([B, M, ...])."""
    return jax.lax.dynamic_update_slice(buf, rows.astype(buf.dtype), (0, offset, 0))


@functools.partial(jax.jit, static_argnames=("size",))
def _get_rows(buf, offset, size: int):
    return jax.lax.dynamic_slice_in_dim(buf, offset, size, axis=1)


class MirrorStore:
    """The `csa_store` of `prefill_chunked` that keeps every CSA entry in a `kv_tiers.HostMirror`.

    After prefill: `mirror` holds every CSA entry (as `HostMirror.from_cache` of the full cache would),
    and the cache's CSA layers hold no entry buffer ([B, 0, ...]) except the target layers' index keys."""

    def __init__(self, config, batch: int, capacity: int, chunk: int, target_layers=()):
        self.c, self.chunk = config, chunk
        self.r = config.csa_ratio
        self.block = chunk // self.r                     # entries one chunk writes
        n = entry_capacity(config, config.csa_layers[0], capacity)
        p = config.page_entries
        self.n_entries = n
        width, dtype = kv_row(config)   # the cache's KV rows: packed fp8 bytes or the compute dtype
        self.p = p
        keys_shape = (batch, n // p, config.index_page_bytes)   # page-blocked, as in the cache
        self.mirror = kt.HostMirror(
            kv={l: np.zeros((batch, n // p, p, width), dtype) for l in config.csa_layers},
            keys={l: np.zeros(keys_shape, np.uint8) for l in config.csa_layers})
        self.targets = tuple(target_layers)
        self.target_keys = commit({l: jnp.zeros(keys_shape, jnp.uint8) for l in self.targets})
        self.scratch_kv = commit(kv_zeros(config, batch, n))
        self.scratch_keys = commit(jnp.zeros(keys_shape, jnp.uint8))
        self.pending = {}                                  # layer -> [(host view, device rows)] in flight
        self.h2d_bytes = self.d2h_bytes = 0

    def _rows(self, arr):
        """A host mirror array as the device buffer's units along axis 1 (a view): kv [B, pages, P, D] ->
        entries [B, entries, D]; page-blocked keys [B, pages, page bytes] stay pages."""
        return arr.reshape(arr.shape[0], -1, arr.shape[-1])

    def _unit(self, host) -> int:
        """Entries per unit of axis 1 of the device buffer of `host`: 1 for kv rows, P for key pages."""
        return 1 if host.ndim == 4 else self.p

    def _flush(self, layer=None):
        for l in list(self.pending) if layer is None else [layer]:
            for view, rows in self.pending.pop(l, []):
                view[...] = np.asarray(rows)

    def _upload(self, buf, host, n_prev: int):
        """Copy host entries [0, n_prev) into buf, in pieces of 2^j chunks (n_prev is a whole number of
        chunks, a chunk whole pages)."""
        unit = self._unit(host)
        host = self._rows(host)
        k, off = n_prev // self.block, 0
        for j in reversed(range(k.bit_length())):
            if k >> j & 1:
                size = (self.block << j) // unit
                buf = _put_rows(buf, kt.to_device(np.ascontiguousarray(host[:, off:off + size])),
                                jnp.asarray(off, jnp.int32))
                self.h2d_bytes += host[:, off:off + size].nbytes
                off += size
        return buf

    def take(self, layer: int, start: int):
        self._flush(layer)  # the previous chunk's rows of this layer must be in the mirror before they go up
        n_prev = start // self.r
        kv = self._upload(self.scratch_kv, self.mirror.kv[layer], n_prev)
        self.scratch_kv = None
        if layer in self.target_keys:
            keys = self.target_keys.pop(layer)
        else:
            keys = self._upload(self.scratch_keys, self.mirror.keys[layer], n_prev)
            self.scratch_keys = None
        return kv, keys

    def give(self, layer: int, start: int, kv, keys):
        for host, buf in ((self.mirror.kv[layer], kv), (self.mirror.keys[layer], keys)):
            unit = self._unit(host)
            off, size = start // self.r // unit, self.block // unit
            rows = _get_rows(buf, jnp.asarray(off, jnp.int32), size)
            rows.copy_to_host_async()
            self.pending.setdefault(layer, []).append((self._rows(host)[:, off:off + size], rows))
            self.d2h_bytes += rows.size * rows.dtype.itemsize
        self.scratch_kv = kv
        if layer in self.targets:
            self.target_keys[layer] = keys
        else:
            self.scratch_keys = keys

    def finish(self, layers):
        self._flush()
        self.scratch_kv = self.scratch_keys = None
        out = list(layers)
        b = next(iter(self.mirror.kv.values())).shape[0]
        for l in self.c.csa_layers:
            out[l] = {**out[l], "comp_kv": kv_zeros(self.c, b, 0),
                      "index_keys": self.target_keys.pop(l) if l in self.targets
                      else jnp.zeros((b, 0, self.c.index_page_bytes), jnp.uint8)}
        return out


def chunked_prefill(params, config, prompt, lengths, max_len: int, chunk: int, *, tiered: bool,
                    target_layers=(), impl: str = "auto"):
    """Prefill for `serve.engine.generate`: returns (last-token logits [B, V], cache of capacity
    `bucket(max_len, chunk)`, hidden per layer [B, d_model], HostMirror or None). With `tiered`, CSA
    entries live in the returned mirror (see module doc) and only `target_layers` keep index keys
    on the device."""
    chunk = check_chunk(config, chunk)
    store = None
    if tiered:
        store = MirrorStore(config, prompt.shape[0], bucket(max_len, chunk), chunk, target_layers)
    logits, cache, hidden = prefill_chunked(params, config, prompt, max_len, chunk=chunk, lengths=lengths,
                                            impl=impl, logits="last", csa_store=store)
    return logits, cache, hidden, None if store is None else store.mirror
