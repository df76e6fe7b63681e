"""Decode cache: fixed-capacity buffers and per-request lengths, one pytree (SPEC §3).

```
cache = {"lengths": int32 [batch],          # tokens held per request = position of the next token
         "capacity": int32 [],              # max_len: positions must stay below it
         "layers": ( per layer:
             {"window":   [batch, window, kv_row]                  ring buffer, slot = position % window
              # compressed layers (ratio r):
              "comp_kv":    [batch, n_entries, kv_row]             complete entries only (entry i holds
                                                                   tokens i*r .. i*r + r - 1)
              "comp_state": {"kv", "score"} [batch, coff*r, coff*head_dim]  partial window (compressor)
              # CSA layers:
              "index_keys":  uint8 [batch, n_entries // page_entries,      page-blocked fp8 + scales
                                    page_entries * (index_head_dim + 4)]
              "index_state": {"kv", "score"} [batch, 2r, 2*index_head_dim]} ) }
```
Attention KV rows (`window`, `comp_kv`) are `kv_row = head_dim` values of the compute dtype, or with
`config.kv_fp8` packed uint8 rows of `kv_entry_bytes` (584 B for V4-Flash; `fm_jax.layers.kv_fp8`):
`store_kv` / `load_kv` convert, `round_kv` is the forward's view of the same values.
`n_entries = entry_capacity(config, layer, max_len)`: `max_len // r`, rounded up to whole pages of
`page_entries` for CSA layers (LSA moves CSA entries in pages, and an LSA reserve that holds every page
then has exactly the full cache's shape). Index keys are stored per page as the V3.2/V4 serving stacks
do (`fm_jax.layers.key_pages`): a page is `page_entries * index_head_dim` fp8 bytes (entry i at
i * index_head_dim) then `page_entries` float32 scales, so every entry starts 16-byte aligned (when
page_entries % 4 == 0) and a page moves as one contiguous blob; `key_pages.write_index_keys` writes one
entry, `indexer_scores(..., page_entries=)` reads them. Every array keeps its shape for the whole
generation, so a jitted `decode_step` compiles once.
"""
from __future__ import annotations

import jax.numpy as jnp

from fm_jax.config import KIND_CSA, KIND_WINDOW
from fm_jax.layers import compressor, kv_fp8


def entry_capacity(c, layer: int, max_len: int) -> int:
    """Compressed entries a layer's cache holds for `max_len` tokens (see module doc)."""
    n = max_len // c.compress_ratios[layer]
    if c.layer_kind(layer) == KIND_CSA:
        n = -(-n // c.page_entries) * c.page_entries
    return n


def round_kv(c, kv):
    """The forward's attention KV [..., head_dim]: with `kv_fp8` the nope dims fp8-rounded in the compute
    dtype (exactly what `load_kv(store_kv(kv))` returns), else `kv` unchanged."""
    if not c.kv_fp8:
        return kv
    return kv_fp8.round_kv(kv.astype(c.compute_dtype), c.rope_dim)


def store_kv(c, kv):
    """Attention KV [..., head_dim] -> the cache's rows: packed uint8 [..., kv_entry_bytes] with `kv_fp8`,
    else the compute dtype."""
    if not c.kv_fp8:
        return kv.astype(c.compute_dtype)
    return kv_fp8.pack(kv.astype(c.compute_dtype), c.rope_dim)


def load_kv(c, rows):
    """The cache's rows -> attention KV [..., head_dim] in the compute dtype (inverse of `store_kv` up to
    `round_kv`)."""
    if not c.kv_fp8:
        return rows
    return kv_fp8.unpack(rows, c.head_dim, c.rope_dim, c.compute_dtype)


def kv_row(c):
    """(width, dtype) of one stored attention-KV row: (kv_entry_bytes, uint8) with `kv_fp8`, else
    (head_dim, compute dtype)."""
    if c.kv_fp8:
        return c.kv_entry_bytes, jnp.dtype(jnp.uint8)
    return c.head_dim, c.compute_dtype


def kv_zeros(c, *lead: int):
    """Empty cache rows [*lead, kv_row width] (zero bytes unpack to zeros in both formats)."""
    width, dtype = kv_row(c)
    return jnp.zeros((*lead, width), dtype)


def init_layer_cache(c, layer: int, batch: int, max_len: int):
    kind = c.layer_kind(layer)
    lc = {"window": kv_zeros(c, batch, c.window)}
    if kind == KIND_WINDOW:
        return lc
    r = c.compress_ratios[layer]
    overlap = kind == KIND_CSA
    n = entry_capacity(c, layer, max_len)
    lc["comp_kv"] = kv_zeros(c, batch, n)
    lc["comp_state"] = compressor.init_state(batch, r, overlap, c.head_dim)
    if kind == KIND_CSA:
        lc["index_keys"] = jnp.zeros((batch, n // c.page_entries, c.index_page_bytes), jnp.uint8)
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
