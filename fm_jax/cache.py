"""Decode cache: fixed-capacity buffers and per-request lengths, one pytree (SPEC §3).

```
cache = {"lengths": int32 [batch],          # tokens held per request = position of the next token
         "capacity": int32 [],              # max_len: positions must stay below it
         "layers": ( per layer:
             {"window":   [batch, window, head_dim]                ring buffer, slot = position % window
              # compressed layers (ratio r):
              "comp_kv":    [batch, n_entries, head_dim]           complete entries only (entry i holds
                                                                   tokens i*r .. i*r + r - 1)
              "comp_state": {"kv", "score"} [batch, coff*r, coff*head_dim]  partial window (compressor)
              # CSA layers:
              "index_keys":  uint8 [batch, n_entries, index_head_dim + 4]   fp8 + scale layout
              "index_state": {"kv", "score"} [batch, 2r, 2*index_head_dim]} ) }
```
`n_entries = entry_capacity(config, layer, max_len)`: `max_len // r`, rounded up to whole pages of
`page_entries` for CSA layers (LSA moves CSA entries in pages, and an LSA reserve that holds every page
then has exactly the full cache's shape). Every array keeps its shape for the whole generation, so a
jitted `decode_step` compiles once.
"""
from __future__ import annotations

import jax.numpy as jnp

from fm_jax.config import KIND_CSA, KIND_WINDOW
from fm_jax.layers import compressor


def entry_capacity(c, layer: int, max_len: int) -> int:
    """Compressed entries a layer's cache holds for `max_len` tokens (see module doc)."""
    n = max_len // c.compress_ratios[layer]
    if c.layer_kind(layer) == KIND_CSA:
        n = -(-n // c.page_entries) * c.page_entries
    return n


def init_layer_cache(c, layer: int, batch: int, max_len: int):
    kind = c.layer_kind(layer)
    lc = {"window": jnp.zeros((batch, c.window, c.head_dim), c.compute_dtype)}
    if kind == KIND_WINDOW:
        return lc
    r = c.compress_ratios[layer]
    overlap = kind == KIND_CSA
    n = entry_capacity(c, layer, max_len)
    lc["comp_kv"] = jnp.zeros((batch, n, c.head_dim), c.compute_dtype)
    lc["comp_state"] = compressor.init_state(batch, r, overlap, c.head_dim)
    if kind == KIND_CSA:
        lc["index_keys"] = jnp.zeros((batch, n, c.index_key_bytes), jnp.uint8)
        lc["index_state"] = compressor.init_state(batch, r, True, c.index_head_dim)
    return lc


def init_cache(c, batch: int, max_len: int):
    """An empty cache for `batch` requests of up to `max_len` tokens."""
    return {"lengths": jnp.zeros((batch,), jnp.int32), "capacity": jnp.asarray(max_len, jnp.int32),
            "layers": tuple(init_layer_cache(c, l, batch, max_len) for l in range(c.n_layers))}


def n_visible_entries(positions, ratio: int):
    """Compressed entries a query at `positions` may read: entry `i` once its last token `(i+1)*r - 1`
    exists, i.e. `i < (t + 1) // r` — the token that completes an entry already sees it (SPEC §9, V4's
    `get_compress_topk_idxs`). The decode step writes that entry before its attention reads."""
    return (positions + 1) // ratio
