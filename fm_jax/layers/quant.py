"""fp8 e4m3 index keys in the packed `[D + 4]`-byte layout (132 B for D = 128).

Bytes `[0, D)` are the fp8 e4m3fn values, bytes `[D, D + 4)` the entry's float32 scale (little endian),
so a PyTorch reader does `buf[..., :D].view(torch.float8_e4m3fn)` and `buf[..., D:].view(torch.float32)`.
Quantise: `scale = max|k| / 448`, `fp8 = round_to_nearest_even(k / scale)`; dequantise:
`k = fp8.astype(float32) * scale`. An all-zero key stores scale 0 and dequantises to zeros.
These rows are the per-entry format (the forward's aux output, the release's dumps); the decode cache, the
LSA reserve, the host mirrors and our dumps store them page-blocked (`fm_jax.layers.key_pages`).
"""
import jax
import jax.numpy as jnp

FP8_MAX = 448.0
FP8_DTYPE = jnp.float8_e4m3fn


def quantize_fp8(k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k: [..., D] float -> (fp8 values [..., D] float8_e4m3fn, scale [...] float32)."""
    k32 = k.astype(jnp.float32)
    amax = jnp.max(jnp.abs(k32), axis=-1)
    # A true division: XLA rewrites `x / 448` into `x * fl(1/448)`, 1 ulp off for about half the keys,
    # which would break byte compatibility with a NumPy/PyTorch writer. The barrier hides the constant.
    amax, denom = jax.lax.optimization_barrier((amax, jnp.full_like(amax, FP8_MAX)))
    scale = amax / denom
    safe = jnp.where(scale > 0, scale, 1.0)
    # k / scale can round to just above 448; e4m3fn has no inf, so clip instead of producing NaN.
    q = jnp.clip(k32 / safe[..., None], -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return q, scale


def pack_index_keys(k: jax.Array) -> jax.Array:
    """k: [..., D] float -> packed uint8 [..., D + 4]."""
    q, scale = quantize_fp8(k)
    q_bytes = jax.lax.bitcast_convert_type(q, jnp.uint8)
    s_bytes = jax.lax.bitcast_convert_type(scale, jnp.uint8)  # [..., 4], little endian on every backend
    return jnp.concatenate([q_bytes, s_bytes], axis=-1)


def unpack_index_keys(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """packed uint8 [..., D + 4] -> (fp8 values [..., D], scale float32 [...])."""
    if packed.dtype != jnp.uint8:
        raise ValueError(f"packed index keys must be uint8, got {packed.dtype}")
    d = packed.shape[-1] - 4
    q = jax.lax.bitcast_convert_type(packed[..., :d], FP8_DTYPE)
    scale = jax.lax.bitcast_convert_type(packed[..., d:], jnp.float32)
    return q, scale


def dequantize_index_keys(packed: jax.Array) -> jax.Array:
    """packed uint8 [..., D + 4] -> float32 keys [..., D] (`fp8 * scale`)."""
    q, scale = unpack_index_keys(packed)
    return q.astype(jnp.float32) * scale[..., None]


def fake_quantize_index_keys(k: jax.Array) -> jax.Array:
    """The float32 keys a reader of the packed cache sees: dequantise(pack(k)). [..., D] -> [..., D]."""
    q, scale = quantize_fp8(k)
    return q.astype(jnp.float32) * scale[..., None]
