"""Quantised weight formats of the DeepSeek-V4 checkpoints (SPEC §9), in NumPy on the host.

Every weight is in PyTorch ``[out, in]`` layout; blocks are taken over that layout.

* **fp8 e4m3 blocks** (most linears): ``q`` float8_e4m3fn ``[out, in]`` and one scale per 128 x 128 block,
  ``scale [ceil(out / 128), ceil(in / 128)]`` (edge blocks are partial);
  ``w[i, j] = float(q[i, j]) * scale[i // 128, j // 128]``.
* **fp4 e2m1** (routed experts, the reference's ``expert_dtype: fp4``): two codes per byte, stored as int8
  ``[out, in / 2]``; element ``2k`` of a row is the **low** nibble of byte ``k``, element ``2k + 1`` the high
  nibble; a code maps to a value by :data:`FP4_TABLE` (bit 3 the sign, bits 0-2 the magnitude
  0, 0.5, 1, 1.5, 2, 3, 4, 6); one scale per 32 consecutive inputs, ``scale [out, in / 32]``;
  ``w[i, j] = FP4_TABLE[code[i, j]] * scale[i, j // 32]``. (The reference's ``convert.py``: ``FP4_TABLE``,
  ``low = x & 0x0F; high = (x >> 4) & 0x0F; stack([low, high], -1).flatten``.)
* **ue8m0 scales** (float8_e8m0fnu): byte ``b`` is ``2 ** (b - 127)``; ``b = 255`` is NaN (rejected).
  Readers also accept float32 / bfloat16 scales (older DeepSeek checkpoints store ``weight_scale_inv`` so).

The quantisers (used to write checkpoints) pick the power-of-two scale ``2 ** ceil(log2(amax / max_code))``
per block (``max_code`` 448 for e4m3, 6 for e2m1; an all-zero block gets scale 1) and round codes to nearest
even. How DeepSeek itself rounded its released weights is not known; dequantisation does not depend on it.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

FP8_BLOCK = (128, 128)
FP4_BLOCK = 32
FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                      -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fp8_scale_shape(shape: tuple, block: tuple = FP8_BLOCK) -> tuple[int, int]:
    """Shape of the block-scale grid of an ``[out, in]`` fp8 weight."""
    return _ceil_div(shape[0], block[0]), _ceil_div(shape[1], block[1])


def fp4_shapes(shape: tuple) -> tuple[tuple[int, int], tuple[int, int]]:
    """(packed shape, scale shape) of an ``[out, in]`` fp4 weight; ``in`` must be a multiple of 32."""
    out, inn = shape
    if inn % FP4_BLOCK:
        raise ValueError(f"fp4 weights need in_features % {FP4_BLOCK} == 0, got shape {tuple(shape)}")
    return (out, inn // 2), (out, inn // FP4_BLOCK)


def scale_to_float32(scale: np.ndarray) -> np.ndarray:
    """ue8m0 (or float) scales -> float32; NaN scales raise ValueError."""
    s = np.asarray(scale).astype(np.float32)
    if not np.all(np.isfinite(s)):
        raise ValueError("scale tensor holds NaN/inf (ue8m0 byte 255)")
    return s


def dequantize_fp8_blocks(q: np.ndarray, scale: np.ndarray, block: tuple = FP8_BLOCK) -> np.ndarray:
    """fp8 e4m3 ``[out, in]`` + block scales ``[ceil(out/b0), ceil(in/b1)]`` -> float32 ``[out, in]``."""
    out, inn = q.shape
    if tuple(scale.shape) != fp8_scale_shape(q.shape, block):
        raise ValueError(f"fp8 block scale has shape {tuple(scale.shape)}, expected "
                         f"{fp8_scale_shape(q.shape, block)} for a weight of shape {tuple(q.shape)}")
    s = scale_to_float32(scale)
    s = np.repeat(np.repeat(s, block[0], axis=0)[:out], block[1], axis=1)[:, :inn]
    return np.asarray(q).view(E4M3).astype(np.float32) * s


def dequantize_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Packed e2m1 int8/uint8 ``[out, in/2]`` + scales ``[out, in/32]`` -> float32 ``[out, in]``."""
    out, half = packed.shape
    shape = (out, 2 * half)
    if tuple(scale.shape) != fp4_shapes(shape)[1]:
        raise ValueError(f"fp4 scale has shape {tuple(scale.shape)}, expected {fp4_shapes(shape)[1]} for "
                         f"packed codes of shape {tuple(packed.shape)}")
    b = np.asarray(packed).view(np.uint8)
    codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(shape)
    return FP4_TABLE[codes] * np.repeat(scale_to_float32(scale), FP4_BLOCK, axis=1)


def _pow2_scale(amax: np.ndarray, max_code: float) -> np.ndarray:
    """Smallest power of two ``s`` with ``amax / s <= max_code`` (1 where amax == 0), float32."""
    x = np.asarray(amax, np.float64) / max_code
    m, e = np.frexp(np.where(x > 0, x, 1.0))  # x = m * 2**e, m in [0.5, 1)
    e = np.where(m == 0.5, e - 1, e)
    return np.ldexp(1.0, np.clip(e, -127, 127)).astype(np.float32)


def _check_finite(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError("cannot quantise a weight holding NaN/inf")
    return w


def quantize_fp8_blocks(w: np.ndarray, block: tuple = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """float ``[out, in]`` -> (float8_e4m3fn ``[out, in]``, ue8m0 scales ``[ceil(out/b0), ceil(in/b1)]``)."""
    w = _check_finite(w)
    out, inn = w.shape
    bo, bi = fp8_scale_shape(w.shape, block)
    padded = np.zeros((bo * block[0], bi * block[1]), np.float32)
    padded[:out, :inn] = np.abs(w)
    amax = padded.reshape(bo, block[0], bi, block[1]).max(axis=(1, 3))
    scale = _pow2_scale(amax, FP8_MAX)
    full = np.repeat(np.repeat(scale, block[0], axis=0)[:out], block[1], axis=1)[:, :inn]
    q = np.clip(w / full, -FP8_MAX, FP8_MAX).astype(E4M3)
    return q, scale.astype(E8M0)


def quantize_fp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float ``[out, in]`` -> (packed int8 ``[out, in/2]``, ue8m0 scales ``[out, in/32]``)."""
    w = _check_finite(w)
    out, inn = w.shape
    _, scale_shape = fp4_shapes(w.shape)
    scale = _pow2_scale(np.abs(w).reshape(*scale_shape, FP4_BLOCK).max(axis=-1), FP4_MAX)
    x = np.clip(w / np.repeat(scale, FP4_BLOCK, axis=1), -FP4_MAX, FP4_MAX)
    codes = x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x0F  # bit 3 sign, bits 0-2 magnitude
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed.view(np.int8), scale.astype(E8M0)
