"""Normalised Walsh-Hadamard transform: equals x @ H_d / sqrt(d) for the explicit Sylvester matrix,
is orthogonal (norm- and inner-product preserving) and its own inverse."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fm_jax.layers.hadamard import hadamard

SETTINGS = settings(max_examples=20, deadline=None)
DIMS = [1, 2, 4, 16, 64, 128]
_had = jax.jit(hadamard)


def sylvester(d: int) -> np.ndarray:
    """H_1 = [1]; H_2n = [[H, H], [H, -H]] (float64, unnormalised)."""
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("d", DIMS)
def test_matches_explicit_sylvester_matrix(d):
    x = np.random.default_rng(d).standard_normal((3, 5, d))
    want = x @ sylvester(d) / np.sqrt(d)
    got = np.asarray(_had(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-7 * np.abs(x).sum(-1, keepdims=True).max())


@pytest.mark.parametrize("d", [16, 128])
def test_orthogonal_and_symmetric(d):
    m = np.asarray(_had(jnp.eye(d, dtype=jnp.float32)), np.float64)  # rows: H e_i = H[i] / sqrt(d)
    np.testing.assert_allclose(m @ m.T, np.eye(d), atol=1e-6)
    np.testing.assert_allclose(m, m.T, atol=0)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from([16, 64, 128]), st.floats(-10, 10))
def test_involution_and_isometry(seed, d, log_scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, d)) * np.exp(log_scale)).astype(np.float32)
    y = rng.standard_normal((4, d)).astype(np.float32)
    hx, hy = np.asarray(_had(jnp.asarray(x))), np.asarray(_had(jnp.asarray(y)))
    scale = np.abs(x).max()
    np.testing.assert_allclose(np.asarray(_had(jnp.asarray(hx))), x, atol=1e-5 * scale)
    np.testing.assert_allclose(np.linalg.norm(hx, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    dots = np.abs((hx * hy).sum(-1) - (x * y).sum(-1))
    assert np.all(dots <= 1e-5 * np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))


def test_bfloat16_keeps_dtype_and_is_close():
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    out = _had(jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), x @ sylvester(64) / 8, atol=0.05)


@pytest.mark.parametrize("d", [3, 24, 96])
def test_non_power_of_two_raises(d):
    with pytest.raises(ValueError, match=str(d)):
        hadamard(jnp.ones((2, d)))
