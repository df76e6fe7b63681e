"""V4's fp8 attention-KV entries (SPEC §3, §9; V4-REFERENCE Q3): the forward's rounding and the packed layout.

**Rounding** (the reference's `act_quant(kv[..., :-rope_dim], 64, "ue8m0", inplace=True)` on the window KV
and on the KV compressor's output): the first `nope = head_dim - rope_dim` dims, in blocks of 64 values,
`scale = 2^ceil(log2(max(amax, 1e-4) / 448))` (a power of two: one ue8m0 byte), `value = e4m3(clip(x /
scale, -448, 448)) * scale` with round-to-nearest-even. The RoPE dims are stored as bf16 (the reference's KV
is bf16), so with a float32 compute dtype they are rounded to bf16 too; with bf16 that is a no-op.

**Packed entry** (uint8 `[..., entry_bytes]`, one row per entry, 584 B for V4-Flash's 512 = 448 + 64):
```
[0, nope)                       fp8 e4m3fn values of the nope dims
[nope, nope + 2 * rope_dim)     rope dims, bf16, little endian
[nope + 2 * rope_dim, ...)      one ue8m0 byte per 64-value block (exponent + 127), zero padded to 8 bytes
```
The first `nope + 2 * rope_dim` bytes (576 for V4-Flash) are the data row of the release's paged layout and
the last 8 its scale row (`to_page_blocks` gives the release's page order: every data row of a page, then
every scale row). Buffers of packed rows are paged like the index keys (`[..., n_pages * page_entries, ...]`).
`unpack(pack(kv))` equals `round_kv(kv)` bit for bit (both dequantise the same `quantize`); an all-zero row
(an empty cache slot) unpacks to zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fm_jax.layers.key_pages import pages_to_rows, rows_to_pages

BLOCK = 64            # values per ue8m0 scale
FP8_MAX = 448.0       # largest e4m3fn value
AMAX_MIN = 1e-4       # the reference clamps each block's amax from below (no zero / subnormal scales)
SCALE_ALIGN = 8       # the scale bytes are padded to a multiple of this (V4-Flash: 7 scales + 1 pad)
FP8 = jnp.float8_e4m3fn


def check_layout(head_dim: int, rope_dim: int) -> int:
    """The nope width `head_dim - rope_dim`; ValueError unless it is a positive multiple of 64."""
    nope = head_dim - rope_dim
    if nope <= 0 or nope % BLOCK or rope_dim <= 0:
        raise ValueError(f"fp8 KV entries need head_dim - rope_dim to be a positive multiple of {BLOCK} and "
                         f"rope_dim > 0, got head_dim={head_dim}, rope_dim={rope_dim}")
    return nope


def scale_bytes(head_dim: int, rope_dim: int) -> int:
    """Bytes of an entry's scale row: one per 64 nope values, padded to a multiple of 8."""
    n_blocks = check_layout(head_dim, rope_dim) // BLOCK
    return -(-n_blocks // SCALE_ALIGN) * SCALE_ALIGN


def entry_bytes(head_dim: int, rope_dim: int) -> int:
    """Bytes of one packed entry: nope fp8 + rope bf16 + scale row (584 for 512 / 64)."""
    return head_dim + rope_dim + scale_bytes(head_dim, rope_dim)


def scale_from_byte(e: jax.Array) -> jax.Array:
    """ue8m0 byte -> float32 2^(e - 127), exactly (the scale bits; the Pallas kernel does the same)."""
    return jax.lax.bitcast_convert_type(e.astype(jnp.uint32) << 23, jnp.float32)


def quantize(kv: jax.Array, rope_dim: int):
    """kv [..., D] float -> (fp8 [..., nope // 64, 64] e4m3fn, scale exponent bytes uint8 [..., nope // 64],
    rope bf16 [..., rope_dim])."""
    d = kv.shape[-1]
    nope = check_layout(d, rope_dim)
    x = kv[..., :nope].astype(jnp.float32).reshape(*kv.shape[:-1], nope // BLOCK, BLOCK)
    amax = jnp.maximum(jnp.max(jnp.abs(x), axis=-1), AMAX_MIN)
    # ceil(log2(amax * (1/448))) from the float bits, as the reference's fast_round_scale does
    bits = jax.lax.bitcast_convert_type(amax * jnp.float32(1.0 / FP8_MAX), jnp.uint32)
    exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)   # biased: 2^(exp - 127)
    scale = scale_from_byte(exp)
    q = jnp.clip(x / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8)     # e4m3fn has no inf: clip, not NaN
    return q, exp.astype(jnp.uint8), kv[..., nope:].astype(jnp.bfloat16)


def _dequantize(q, exp, rope, dtype) -> jax.Array:
    nope_vals = (q.astype(jnp.float32) * scale_from_byte(exp)[..., None]).reshape(*q.shape[:-2], -1)
    return jnp.concatenate([nope_vals.astype(dtype), rope.astype(dtype)], axis=-1)


def round_kv(kv: jax.Array, rope_dim: int) -> jax.Array:
    """The forward's fp8 rounding (module doc). [..., D] -> [..., D], same dtype."""
    return _dequantize(*quantize(kv, rope_dim), kv.dtype)


def pack(kv: jax.Array, rope_dim: int) -> jax.Array:
    """kv [..., D] float -> packed uint8 [..., entry_bytes(D, rope_dim)] (module doc)."""
    q, exp, rope = quantize(kv, rope_dim)
    lead = kv.shape[:-1]
    pad = scale_bytes(kv.shape[-1], rope_dim) - exp.shape[-1]
    parts = [jax.lax.bitcast_convert_type(q, jnp.uint8).reshape(*lead, -1),
             jax.lax.bitcast_convert_type(rope, jnp.uint8).reshape(*lead, -1),   # [..., R, 2] little endian
             exp, jnp.zeros((*lead, pad), jnp.uint8)]
    return jnp.concatenate(parts, axis=-1)


def split_packed(packed: jax.Array, head_dim: int, rope_dim: int):
    """packed uint8 [..., E] -> (fp8 [..., nope // 64, 64], exponent bytes [..., nope // 64], rope bf16
    [..., rope_dim]). ValueError when E does not match (head_dim, rope_dim)."""
    e = entry_bytes(head_dim, rope_dim)
    if packed.dtype != jnp.uint8 or packed.shape[-1] != e:
        raise ValueError(f"packed fp8 KV must be uint8 [..., {e}] for head_dim={head_dim}, rope_dim={rope_dim}, "
                         f"got {packed.dtype} {list(packed.shape)}")
    nope = head_dim - rope_dim
    lead = packed.shape[:-1]
    q = jax.lax.bitcast_convert_type(packed[..., :nope], FP8).reshape(*lead, nope // BLOCK, BLOCK)
    rope = jax.lax.bitcast_convert_type(packed[..., nope:nope + 2 * rope_dim].reshape(*lead, rope_dim, 2),
                                        jnp.bfloat16)
    exp = packed[..., nope + 2 * rope_dim:nope + 2 * rope_dim + nope // BLOCK]
    return q, exp, rope


def unpack(packed: jax.Array, head_dim: int, rope_dim: int, dtype=jnp.float32) -> jax.Array:
    """packed uint8 [..., E] -> kv [..., head_dim] in `dtype` (exact for float32 and bfloat16)."""
    return _dequantize(*split_packed(packed, head_dim, rope_dim), dtype)


def to_page_blocks(packed: jax.Array, head_dim: int, rope_dim: int, page_entries: int) -> jax.Array:
    """The release's paged byte order: [..., N, E] -> [..., N // P, P * E] with every data row of a page
    (nope + 2 * rope_dim bytes each) followed by every scale row (`key_pages.rows_to_pages`)."""
    e = entry_bytes(head_dim, rope_dim)
    if packed.shape[-1] != e or packed.shape[-2] % page_entries:
        raise ValueError(f"to_page_blocks: need [..., N, {e}] with N a multiple of {page_entries}, "
                         f"got {list(packed.shape)}")
    return rows_to_pages(packed, page_entries, head_dim + rope_dim)


def from_page_blocks(blocks: jax.Array, head_dim: int, rope_dim: int, page_entries: int) -> jax.Array:
    """Inverse of `to_page_blocks`: [..., N // P, P * E] -> [..., N, E]."""
    e = entry_bytes(head_dim, rope_dim)
    if blocks.shape[-1] != page_entries * e:
        raise ValueError(f"from_page_blocks: need [..., n_pages, {page_entries * e}], got {list(blocks.shape)}")
    return pages_to_rows(blocks, page_entries, head_dim + rope_dim, e)
