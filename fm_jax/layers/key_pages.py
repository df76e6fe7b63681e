"""Page-blocked byte layouts (issue 12): the index keys as the V3.2/V4 serving stacks store them.

One page of `page_entries = P` index keys (D = index_head_dim, 128 in V4) is one contiguous blob of
`P * (D + 4)` bytes: first the P entries' fp8 e4m3fn values (`P * D` bytes, entry `i` at `i * D`), then
their P float32 scales (`4 * P` bytes, little endian, entry `i` at `P * D + 4 * i`). The same bytes as P
packed `[D + 4]` rows (`fm_jax.layers.quant`), reordered so that every entry's fp8 values start 16-byte
aligned within the page whenever `D % 16 == 0`, and the scale region too when additionally
`P % 4 == 0` (every preset: P in {8, 16, 64}); other P keep working but lose that alignment, which only
GPU kernels care about (vector loads / TMA). A buffer of pages is `[..., n_pages, P * (D + 4)]`; an
empty (all-zero) page holds zero keys with scale 0, which dequantise to zeros as packed rows do.

`rows_to_pages` / `pages_to_rows` are the generic reorder (rows of `row_bytes` split at `split` bytes
into a data and a tail part); `kv_fp8.to_page_blocks` uses them for the attention KV's release order.
Everything here is reshapes, slices, concatenations and bitcasts: XLA fuses them into their consumer.
`rows_to_pages`, `pages_to_rows`, `block_index_keys` and `unblock_index_keys` also take NumPy arrays and
then return NumPy arrays (the training data reader converts dumps on the host, without per-shape compiles).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax.layers.quant import FP8_DTYPE

SCALE_BYTES = 4   # one float32 scale per index key


def _xp(x):
    """The array module of x: NumPy for NumPy arrays (host-side readers), else jax.numpy."""
    return np if isinstance(x, np.ndarray) else jnp


def _check_uint8(name: str, x, rank_min: int):
    if x.dtype != jnp.uint8 or x.ndim < rank_min:
        raise ValueError(f"{name}: need uint8 of rank >= {rank_min}, got {x.dtype} {list(x.shape)}")


def _check_page_entries(name: str, page_entries) -> int:
    if not isinstance(page_entries, int) or isinstance(page_entries, bool) or page_entries <= 0:
        raise ValueError(f"{name}: page_entries must be a positive int, got {page_entries!r}")
    return page_entries


def rows_to_pages(rows: jax.Array, page_entries: int, split: int) -> jax.Array:
    """[..., N, E] -> [..., N // P, P * E]: per page, every row's first `split` elements, then every row's
    remaining `E - split`. N must be a multiple of P (see `block_index_keys` for padding)."""
    n, e = rows.shape[-2], rows.shape[-1]
    if n % page_entries or not 0 < split < e:
        raise ValueError(f"rows_to_pages: need [..., N, E] with N a multiple of page_entries={page_entries} and "
                         f"0 < split={split} < E, got {list(rows.shape)}")
    pages = rows.reshape(*rows.shape[:-2], n // page_entries, page_entries, e)
    flat = lambda x: x.reshape(*x.shape[:-2], -1)
    return _xp(rows).concatenate([flat(pages[..., :split]), flat(pages[..., split:])], axis=-1)


def pages_to_rows(pages: jax.Array, page_entries: int, split: int, row: int) -> jax.Array:
    """Inverse of `rows_to_pages`: [..., n_pages, P * row] -> [..., n_pages * P, row]."""
    if pages.shape[-1] != page_entries * row or not 0 < split < row:
        raise ValueError(f"pages_to_rows: need [..., n_pages, page_entries * row = {page_entries * row}] "
                         f"(0 < split={split} < row={row}), got {list(pages.shape)}")
    lead = pages.shape[:-1]
    data = pages[..., :page_entries * split].reshape(*lead, page_entries, split)
    tail = pages[..., page_entries * split:].reshape(*lead, page_entries, row - split)
    return _xp(pages).concatenate([data, tail], axis=-1).reshape(*lead[:-1], lead[-1] * page_entries, row)


# ------------------------------------------------------------------------------------------ index keys
def index_page_bytes(page_entries: int, d: int) -> int:
    """Bytes of one page of index keys: `page_entries * (d + 4)`."""
    return page_entries * (d + SCALE_BYTES)


def n_pages_for(n_entries: int, page_entries: int) -> int:
    """Pages needed for `n_entries` entries (the last one zero padded)."""
    return -(-n_entries // page_entries)


def block_index_keys(rows: jax.Array, page_entries: int) -> jax.Array:
    """Packed index-key rows uint8 [..., N, D + 4] -> pages uint8 [..., n_pages, page_entries * (D + 4)],
    n_pages = ceil(N / page_entries); the last page is padded with zero rows (empty entries)."""
    _check_uint8("block_index_keys", rows, 2)
    _check_page_entries("block_index_keys", page_entries)
    d = rows.shape[-1] - SCALE_BYTES
    if d <= 0:
        raise ValueError(f"block_index_keys: rows must be [..., N, D + 4] with D > 0, got {list(rows.shape)}")
    n = rows.shape[-2]
    pad = n_pages_for(n, page_entries) * page_entries - n
    if pad:
        rows = _xp(rows).pad(rows, [(0, 0)] * (rows.ndim - 2) + [(0, pad), (0, 0)])
    return rows_to_pages(rows, page_entries, d)


def unblock_index_keys(pages: jax.Array, page_entries: int, d: int) -> jax.Array:
    """Inverse of `block_index_keys`: uint8 [..., n_pages, page_entries * (D + 4)] ->
    rows uint8 [..., n_pages * page_entries, D + 4] (padding rows included)."""
    check_index_pages("unblock_index_keys", pages, page_entries, d)
    return pages_to_rows(pages, page_entries, d, d + SCALE_BYTES)


def check_index_pages(name: str, pages, page_entries: int, d: int) -> None:
    """ValueError unless `pages` is uint8 [..., n_pages, page_entries * (d + 4)]."""
    _check_page_entries(name, page_entries)
    _check_uint8(name, pages, 2)
    if pages.shape[-1] != index_page_bytes(page_entries, d):
        raise ValueError(f"{name}: page-blocked index keys must be uint8 [..., n_pages, page_entries * (D + 4) "
                         f"= {index_page_bytes(page_entries, d)}] for page_entries={page_entries}, D={d}, "
                         f"got {list(pages.shape)}")


def split_index_pages(pages: jax.Array, page_entries: int, d: int) -> tuple[jax.Array, jax.Array]:
    """uint8 [..., n_pages, page_entries * (D + 4)] -> (fp8 values [..., N, D], scale float32 [..., N]),
    N = n_pages * page_entries (as `quant.unpack_index_keys` of the rows)."""
    check_index_pages("split_index_pages", pages, page_entries, d)
    lead, n_pages = pages.shape[:-2], pages.shape[-2]
    n = n_pages * page_entries
    q = jax.lax.bitcast_convert_type(pages[..., :page_entries * d].reshape(*lead, n, d), FP8_DTYPE)
    s = pages[..., page_entries * d:].reshape(*lead, n, SCALE_BYTES)
    return q, jax.lax.bitcast_convert_type(s, jnp.float32)


def dequantize_index_pages(pages: jax.Array, page_entries: int, d: int) -> jax.Array:
    """uint8 [..., n_pages, page_entries * (D + 4)] -> float32 keys [..., n_pages * page_entries, D]
    (bit-identical to `quant.dequantize_index_keys` of the same keys as rows)."""
    q, scale = split_index_pages(pages, page_entries, d)
    return q.astype(jnp.float32) * scale[..., None]


def write_index_keys(pages: jax.Array, entries: jax.Array, rows: jax.Array, page_entries: int, mask=None):
    """pages[b] gets packed row `rows[b]` (uint8 [B, D + 4]) as entry `entries[b]` (int [B]), where
    mask[b] (bool [B], default all). pages: uint8 [B, n_pages, page_entries * (D + 4)]. Entries past the
    buffer are dropped (as `backbone._write_rows` drops rows past a row buffer). One scatter of D + 4
    bytes per request: the fp8 bytes into the page's value region, the scale into its scale region."""
    d = rows.shape[-1] - SCALE_BYTES
    check_index_pages("write_index_keys", pages, page_entries, d)
    b = pages.shape[0]
    if rows.shape != (b, d + SCALE_BYTES) or rows.dtype != jnp.uint8 or entries.shape != (b,):
        raise ValueError(f"write_index_keys: need rows uint8 [B={b}, D + 4] and entries [B], got rows "
                         f"{rows.dtype} {list(rows.shape)}, entries {list(entries.shape)}")
    entries = entries.astype(jnp.int32)
    page, off = entries // page_entries, entries % page_entries
    col = jnp.concatenate([off[:, None] * d + jnp.arange(d)[None, :],
                           page_entries * d + off[:, None] * SCALE_BYTES + jnp.arange(SCALE_BYTES)[None, :]], axis=1)
    if mask is not None:   # a masked-off write goes past the buffer and is dropped: no read of the old bytes
        page = jnp.where(mask, page, pages.shape[1])
    # an entry past the buffer has page >= n_pages: dropped whole (never wrapped into the scale region)
    return pages.at[jnp.arange(b)[:, None], page[:, None], col].set(rows, mode="drop")


def write_index_pages(pages: jax.Array, rows: jax.Array, first_entry, page_entries: int) -> jax.Array:
    """pages[:, first_entry / P : ...] = the rows uint8 [B, n, D + 4] blocked (n and `first_entry`, a
    traced int, multiples of P: a chunked prefill writes whole pages)."""
    if rows.shape[-2] % page_entries:
        raise ValueError(f"write_index_pages: {rows.shape[-2]} rows are not whole pages of {page_entries}")
    blocked = block_index_keys(rows, page_entries)
    check_index_pages("write_index_pages", pages, page_entries, rows.shape[-1] - SCALE_BYTES)
    return jax.lax.dynamic_update_slice(pages, blocked, (0, first_entry // page_entries, 0))
