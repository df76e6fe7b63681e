"""fp8 e4m3 index keys (SPEC §3): error bound, the exact [D + 4]-byte layout, byte compatibility with
ml_dtypes' float8_e4m3fn (= PyTorch's float8_e4m3fn) and little-endian float32, extremes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fm_jax.layers.quant import (
    FP8_MAX,
    dequantize_index_keys,
    fake_quantize_index_keys,
    pack_index_keys,
    quantize_fp8,
    unpack_index_keys,
)

E4M3 = ml_dtypes.float8_e4m3fn
SETTINGS = settings(max_examples=20, deadline=None)

_pack = jax.jit(pack_index_keys)
_deq = jax.jit(dequantize_index_keys)


def half_ulp_e4m3(v: np.ndarray) -> np.ndarray:
    """Half a unit in the last place of e4m3 around |v| (3 mantissa bits; min normal exponent -6, below
    which the subnormal spacing 2**-9 applies)."""
    a = np.abs(v.astype(np.float64))
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.maximum(np.where(a > 0, e, -6), -6)
    return 2.0 ** (e - 4)


def keys_strategy(rows: int = 3):
    dims = st.sampled_from([16, 32, 128])  # few distinct shapes: each one is a compile
    shape = st.tuples(st.just(rows), dims)
    elems = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
    return st.tuples(hnp.arrays(np.float32, shape, elements=elems), st.integers(-25, 25))


@SETTINGS
@given(keys_strategy())
def test_dequantised_error_within_half_ulp(case):
    k, exp10 = case
    k = (k.astype(np.float64) * 10.0 ** exp10).astype(np.float32)
    amax = np.abs(k).max(-1)
    # scales below the float32 normal range flush to zero on XLA:CPU; real keys are RMS-normalised
    assume(np.all(amax >= 1e-30) and np.all(np.isfinite(k)))
    deq = np.asarray(_deq(_pack(jnp.asarray(k)))).astype(np.float64)
    scale = amax.astype(np.float64) / FP8_MAX
    v = k / scale[:, None]
    bound = scale[:, None] * half_ulp_e4m3(v) + 2.0 ** -22 * (np.abs(k) + np.abs(deq))
    err = np.abs(k.astype(np.float64) - deq)
    assert np.all(err <= bound), float(np.max(err / bound))
    # the largest element is (up to the scale's rounding) exactly representable: 448 * scale
    idx = np.argmax(np.abs(k), axis=-1)
    top = np.take_along_axis(err, idx[:, None], -1)[:, 0]
    assert np.all(top <= 2.0 ** -21 * amax)


def test_layout_is_132_bytes_fp8_then_le_float32_scale():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, 5, 128)).astype(np.float32) * np.float32(7.5)
    packed = np.asarray(_pack(jnp.asarray(k)))
    assert packed.dtype == np.uint8 and packed.shape == (3, 5, 132)
    q, scale = quantize_fp8(jnp.asarray(k))
    q, scale = np.asarray(q), np.asarray(scale)
    # bytes [0, 128): the fp8 values exactly as a float8_e4m3fn view sees them
    assert np.array_equal(packed[..., :128], q.view(np.uint8))
    assert np.array_equal(packed[..., :128].view(E4M3), q.astype(E4M3))
    # bytes [128, 132): the scale as little-endian float32 (what torch's .view(torch.float32) reads)
    le = np.frombuffer(scale.astype("<f4").tobytes(), np.uint8).reshape(3, 5, 4)
    assert np.array_equal(packed[..., 128:], le)
    row = packed[1, 2].tobytes()
    assert np.frombuffer(row[128:], "<f4")[0] == scale[1, 2]
    # unpack inverts pack; dequantise = fp8 * scale
    uq, us = unpack_index_keys(jnp.asarray(packed))
    assert np.array_equal(np.asarray(uq).view(np.uint8), q.view(np.uint8))
    assert np.array_equal(np.asarray(us), scale)
    want = q.astype(np.float32) * scale[..., None]
    assert np.array_equal(np.asarray(_deq(jnp.asarray(packed))), want)
    assert np.array_equal(np.asarray(fake_quantize_index_keys(jnp.asarray(k))), want)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from([16, 128]), st.floats(-20, 20))
def test_fp8_bytes_match_ml_dtypes_rounding(seed, d, log_scale):
    """With the stored scale, the fp8 payload equals ml_dtypes' round-to-nearest-even conversion of
    clip(k / scale, ±448) (ml_dtypes is what PyTorch's float8_e4m3fn matches bit for bit)."""
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal((8, d)) * np.exp(log_scale)).astype(np.float32)
    k[rng.random((8, d)) < 0.1] *= np.float32(1e-3)  # a few values deep in the subnormal range
    packed = np.asarray(_pack(jnp.asarray(k)))
    scale = packed[:, d:].copy().view("<f4")[:, 0]
    want = np.clip(k / scale[:, None], -FP8_MAX, FP8_MAX).astype(E4M3).view(np.uint8)
    assert np.array_equal(packed[:, :d], want)
    # scale = max|k| / 448, an IEEE division (test_scale_bytes_equal_numpy_division checks the bytes)
    exact = np.abs(k).max(-1) / np.float32(FP8_MAX)
    assert np.array_equal(scale, exact)


def test_scale_bytes_equal_numpy_division():
    rng = np.random.default_rng(1)
    k = (rng.standard_normal((256, 128)) * np.exp(rng.uniform(-10, 10, (256, 1)))).astype(np.float32)
    packed = np.asarray(_pack(jnp.asarray(k)))
    want = (np.abs(k).max(-1) / np.float32(FP8_MAX)).astype("<f4")
    assert np.array_equal(packed[:, 128:], want.view(np.uint8).reshape(-1, 4))


def test_extremes_are_exact():
    """±448 sets scale 1; e4m3 normals and subnormals (multiples of 2**-9 below 2**-6) survive exactly."""
    sub = [m * 2.0 ** -9 for m in range(1, 8)]
    vals = [448.0, -448.0, 240.0, -256.0, 1.0, 0.5, 2.0 ** -6, -(2.0 ** -6), 0.0, *sub, *[-s for s in sub]]
    k = np.zeros((1, 32), np.float32)
    k[0, : len(vals)] = vals
    packed = np.asarray(_pack(jnp.asarray(k)))
    assert packed[0, 32:].view("<f4")[0] == 1.0
    assert np.array_equal(np.asarray(_deq(jnp.asarray(packed))), k)
    assert np.array_equal(packed[0, :32], k[0].astype(E4M3).view(np.uint8))
    # scaled by a power of two the same keys stay exact (scale = 2**j)
    for j in (-12, 5):
        kj = k * np.float32(2.0 ** j)
        assert np.array_equal(np.asarray(_deq(_pack(jnp.asarray(kj)))), kj)
    # ties round to even (normal spacing 1 in [8, 16); subnormal spacing 2**-9); 447 rounds up to 448
    k2 = np.array([[448.0, 447.0, 9.5, 10.5, 2.0 ** -10, 3 * 2.0 ** -10]], np.float32)
    assert np.array_equal(np.asarray(_deq(_pack(jnp.asarray(k2)))), [[448.0, 448.0, 10.0, 10.0, 0.0, 2.0 ** -8]])


def test_all_zero_key_and_mixed_rows():
    rng = np.random.default_rng(2)
    k = rng.standard_normal((3, 16)).astype(np.float32)
    k[1] = 0.0  # an all-zero row among non-zero ones
    packed = np.asarray(_pack(jnp.asarray(k)))
    assert np.all(packed[1] == 0)  # fp8 zeros and a zero scale
    deq = np.asarray(_deq(jnp.asarray(packed)))
    assert np.all(np.isfinite(deq)) and np.all(deq[1] == 0)
    assert np.all(np.abs(deq[[0, 2]] - k[[0, 2]]) <= np.abs(k[[0, 2]]).max(-1, keepdims=True) / 448 * 16)


def test_unpack_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        unpack_index_keys(jnp.ones((2, 20), jnp.float32))
