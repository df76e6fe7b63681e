"""YaRN RoPE with interleaved pairs: relative-position invariance, inverse, the frequency table against a
float64 re-statement of DeepSeek-V4's `precompute_freqs_cis`, the layout (pairs, nope dims untouched), and
the per-layer tables (window-only layers: `rope_base` without YaRN; compressed layers: `compress_rope_base`
with YaRN, SPEC §9)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fm_jax.config import get_config
from fm_jax.layers.rope import apply_rope, inv_freq_for_layer, yarn_inv_freq

SETTINGS = settings(max_examples=20, deadline=None)
EPS32 = 2.0 ** -24
_rope = jax.jit(apply_rope, static_argnames=("inverse",))  # the table travels as an array argument

# (rope_dim, base, original_len, factor, beta_fast, beta_slow); original_len 0 = no YaRN
V4_COMPRESSED = (64, 160000.0, 65536, 16.0, 32, 1)   # YaRN (V4-Flash compressed layers)
V4_WINDOW = (64, 10000.0, 0, 16.0, 32, 1)             # plain (V4-Flash window-only layers)
TINY = (8, 10000.0, 0, 16.0, 32, 1)
SHORT_ORIG = (16, 160000.0, 1024, 8.0, 32, 1)         # YaRN with a short original length
TABLES = [V4_COMPRESSED, V4_WINDOW, TINY, SHORT_ORIG]
MAX_POS = 1048576  # positions drawn below this


def deepseek_freqs_f64(dim, base, original_seq_len, factor, beta_fast, beta_slow) -> np.ndarray:
    """DeepSeek-V4 `precompute_freqs_cis` (model.py; YaRN iff `original_seq_len > 0`), restated in
    float64; returns the per-pair frequencies (the angle of pair i at position t is t * freqs[i])."""
    def find_correction_dim(num_rotations, dim, base, max_seq_len):
        return dim * math.log(max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    def find_correction_range(low_rot, high_rot, dim, base, max_seq_len):
        low = math.floor(find_correction_dim(low_rot, dim, base, max_seq_len))
        high = math.ceil(find_correction_dim(high_rot, dim, base, max_seq_len))
        return max(low, 0), min(high, dim - 1)

    def linear_ramp_factor(lo, hi, dim):
        if lo == hi:
            hi += 0.001
        return np.clip((np.arange(dim, dtype=np.float64) - lo) / (hi - lo), 0, 1)

    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if original_seq_len > 0:
        low, high = find_correction_range(beta_fast, beta_slow, dim, base, original_seq_len)
        smooth = 1 - linear_ramp_factor(low, high, dim // 2)
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


def rope_f64(x: np.ndarray, pos: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Interleaved-pair rotation of the last 2 * len(freqs) dims, as DeepSeek's complex `apply_rotary_emb`."""
    r = 2 * len(freqs)
    xc = x[..., -r:][..., 0::2] + 1j * x[..., -r:][..., 1::2]
    yc = xc * np.exp(1j * np.asarray(pos, np.float64)[..., None] * freqs)
    y = np.stack([yc.real, yc.imag], -1).reshape(*x.shape[:-1], r)
    return np.concatenate([x[..., :-r], y], -1)


@pytest.mark.parametrize("table", TABLES, ids=["v4_compressed", "v4_window", "tiny", "short_orig"])
def test_yarn_table_matches_deepseek_float64(table):
    got = yarn_inv_freq(*table)
    assert got.dtype == np.float32 and got.shape == (table[0] // 2,)
    want = deepseek_freqs_f64(*table)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=8 * EPS32, atol=0)
    if table[2] > 0:  # YaRN really changes the low frequencies
        plain = deepseek_freqs_f64(table[0], table[1], 0, *table[3:])
        assert np.any(np.abs(want / plain - 1) > 0.5)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from(TABLES), st.integers(0, 2**20 - 1))
def test_rotation_matches_float64_complex_rotation(seed, table, pos_bound):
    freqs32 = yarn_inv_freq(*table)
    freqs = deepseek_freqs_f64(*table)
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, min(pos_bound, MAX_POS - 1) + 1, size=(6,))
    x = rng.standard_normal((6, 3, table[0] + 8)).astype(np.float32)
    got = np.asarray(_rope(jnp.asarray(x), jnp.asarray(pos)[:, None], freqs32), np.float64)
    want = rope_f64(x.astype(np.float64), pos[:, None], freqs)
    # float32 angle t * f carries ~3 ulps of relative error; cos/sin add ~1e-6 absolute
    pair_norm = np.repeat(np.hypot(x[..., -table[0]:][..., 0::2], x[..., -table[0]:][..., 1::2]), 2, -1)
    tol = pair_norm * (6 * EPS32 * pos[:, None, None] * np.repeat(freqs, 2) + 2e-6)
    assert np.all(np.abs(got[..., -table[0]:] - want[..., -table[0]:]) <= tol)
    assert np.array_equal(got[..., : -table[0]], x[..., : -table[0]])  # nope dims untouched


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(0, 4000), st.integers(0, 4000), st.integers(-2000, 2000))
def test_relative_position_invariance(seed, m, n, shift):
    """<rope(q, m), rope(k, n)> depends only on m - n."""
    c = get_config("tiny", rope_dim=16, head_dim=32, index_head_dim=32)
    inv = inv_freq_for_layer(c, 1)
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 32)).astype(np.float32)
    m2, n2 = max(m + shift, 0), max(n + shift, 0)
    shift = min(m2 - m, n2 - n)
    m2, n2 = m + shift, n + shift

    def dot(a, b):
        r = np.asarray(_rope(jnp.asarray(np.stack([q, k])), jnp.asarray([a, b]), inv), np.float64)
        return float(np.dot(r[0], r[1]))

    freqs = np.asarray(inv, np.float64)
    want = float(np.dot(rope_f64(q.astype(np.float64), m, freqs), rope_f64(k.astype(np.float64), n, freqs)))
    scale = float(np.linalg.norm(q) * np.linalg.norm(k))
    tol = scale * (8 * EPS32 * max(m, n, m2, n2) * freqs.max() + 1e-5)
    assert abs(dot(m, n) - want) <= tol
    assert abs(dot(m2, n2) - want) <= tol


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from(TABLES))
def test_inverse_undoes_rotation(seed, table):
    inv = yarn_inv_freq(*table)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 2, table[0] + 4)).astype(np.float32)
    pos = jnp.asarray(rng.integers(0, MAX_POS, size=(4, 1)))
    y = _rope(jnp.asarray(x), pos, inv)
    back = np.asarray(_rope(y, pos, inv, inverse=True))
    np.testing.assert_allclose(back, x, atol=2e-6 * np.abs(x).max())
    # the inverse is a rotation by the negative angle: apply_rope(x, p, inverse) == apply_rope(x, -p)
    np.testing.assert_allclose(np.asarray(_rope(jnp.asarray(x), pos, inv, inverse=True)),
                               np.asarray(_rope(jnp.asarray(x), -pos, inv)), atol=1e-6 * np.abs(x).max())


def test_interleaved_pairs_not_neox_halves():
    inv = yarn_inv_freq(*TINY)  # rope_dim 8
    x = np.zeros((12,), np.float32)
    x[4] = 1.0  # first element of the first rope pair (dims 4, 5)
    y = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(3), inv))
    assert np.count_nonzero(y) == 2 and y[4] == pytest.approx(math.cos(3.0)) and y[5] == pytest.approx(math.sin(3.0))
    # bf16 inputs keep their dtype
    assert apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(3), inv).dtype == jnp.bfloat16


@pytest.mark.parametrize("preset", ["tiny", "small", "v4_flash"])
def test_layer_tables_window_plain_compressed_yarn(preset):
    """SPEC §9: window-only layers use rope_base WITHOUT YaRN (even where max_seq_len exceeds the original
    length), CSA and HCA layers compress_rope_base WITH YaRN (even where it does not)."""
    c = get_config(preset)
    kinds = c.layer_kinds
    plain = deepseek_freqs_f64(c.rope_dim, c.rope_base, 0, c.rope_factor, c.beta_fast, c.beta_slow)
    yarn = deepseek_freqs_f64(c.rope_dim, c.compress_rope_base, c.rope_original_len, c.rope_factor,
                              c.beta_fast, c.beta_slow)
    assert {"window", "csa", "hca"} <= set(kinds)
    for layer, kind in enumerate(kinds):
        want = plain if kind == "window" else yarn
        np.testing.assert_allclose(inv_freq_for_layer(c, layer).astype(np.float64), want, rtol=8 * EPS32, atol=0)
    # the window table is the plain base-10000 one: pair i has frequency 10000 ** (-2i / rope_dim)
    np.testing.assert_allclose(plain, 10000.0 ** (-np.arange(0, c.rope_dim, 2) / c.rope_dim), rtol=1e-12)
    # YaRN really rescales the lowest frequency of compressed layers (by rope_factor itself at V4's dims)
    lowest = c.compress_rope_base ** (-(c.rope_dim - 2) / c.rope_dim)
    assert yarn[-1] < 0.9 * lowest
    if preset == "v4_flash":
        assert yarn[-1] * c.rope_factor == pytest.approx(lowest, rel=1e-12)


def test_jit_matches_eager():
    inv = yarn_inv_freq(*V4_COMPRESSED)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 4, 72)), jnp.float32)
    pos = jnp.asarray([[0], [70000], [1048575]])
    np.testing.assert_allclose(np.asarray(_rope(x, pos, inv)), np.asarray(apply_rope(x, pos, inv)), atol=1e-6)
