"""YaRN rotary embedding with interleaved pairs (DeepSeek layout), on the last `rope_dim` dims.

The table is the per-pair inverse frequency, precomputed once per (base, config) in float32 exactly as
DeepSeek-V4's `precompute_freqs_cis`: window-only layers use `rope_base` without YaRN, compressed (CSA /
HCA) layers `compress_rope_base` with YaRN frequency rescaling, whatever `max_seq_len` (V4 passes
`original_seq_len = 0` to disable YaRN, not a length test as V3 did; no attention-temperature term).
Angles are `position * inv_freq` in float32. Storing the frequencies rather than `[max_seq_len, rope_dim]`
cos/sin keeps 1M-token tables out of device memory while giving the same angles. Positions must be
< `max_seq_len` (checked by callers before entering jit).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _correction_dim(num_rotations: float, dim: int, base: float, original_len: int) -> float:
    return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


@functools.lru_cache(maxsize=64)
def yarn_inv_freq(rope_dim: int, base: float, original_len: int, factor: float, beta_fast: float,
                  beta_slow: float) -> np.ndarray:
    """Per-pair inverse frequencies `[rope_dim // 2]` (float32), YaRN-scaled for `original_len > 0`
    (DeepSeek-V4's rule; `original_len = 0` gives the plain table)."""
    # The power in float64, rounded once to float32: numpy's float32 pow is not correctly rounded on
    # every CPU (AVX-512 hosts differ by an ulp), which would make tables machine-dependent.
    expo = (np.arange(0, rope_dim, 2, dtype=np.float32) / np.float32(rope_dim)).astype(np.float64)
    freqs = (1.0 / (np.float64(np.float32(base)) ** expo)).astype(np.float32)
    if original_len > 0:
        low = max(math.floor(_correction_dim(beta_fast, rope_dim, base, original_len)), 0)
        high = min(math.ceil(_correction_dim(beta_slow, rope_dim, base, original_len)), rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        smooth = (1 - ramp).astype(np.float32)
        freqs = (freqs / np.float32(factor) * (1 - smooth) + freqs * smooth).astype(np.float32)
    return freqs


def inv_freq_for_layer(config, layer: int) -> np.ndarray:
    """The frequency table of layer `layer`: `rope_base` without YaRN for window-only layers,
    `compress_rope_base` with YaRN for compressed layers (SPEC §9)."""
    yarn = config.compress_ratios[layer] != 0
    return yarn_inv_freq(config.rope_dim, float(config.rope_base_for(layer)),
                         config.rope_original_len if yarn else 0, float(config.rope_factor),
                         float(config.beta_fast), float(config.beta_slow))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq, *, inverse: bool = False,
               dtype=jnp.float32) -> jax.Array:
    """Rotate the last `2 * len(inv_freq)` dims of `x` in interleaved pairs `(x[2i], x[2i+1])`.

    x: [..., n, d] or [..., d] where `positions` broadcasts against `x.shape[:-1]` (e.g. positions
    [batch, seq] with x [batch, seq, heads, d] -> pass positions[..., None]). `inverse=True` rotates by
    the negative angle. `dtype` is the arithmetic dtype (float32 by default).
    """
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    rope_dim = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., rope_dim/2]
    cos, sin = jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)
    if inverse:
        sin = -sin
    nope, rot = x[..., :-rope_dim], x[..., -rope_dim:]
    pairs = rot.astype(dtype).reshape(*rot.shape[:-1], rope_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    y = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(rot.shape)
    return jnp.concatenate([nope, y.astype(x.dtype)], axis=-1)
