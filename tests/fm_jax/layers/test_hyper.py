"""Dynamic hyper-connections (mHC) against a plain-NumPy float64 transcription of SPEC §9 written here
(hc_pre / Sinkhorn / hc_post / hc_head), with hc_mult = 4 and 20 Sinkhorn iterations; the init is the
plain residual; a block with hc_mult = 4 reduces to mean-of-streams algebra at init."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax.config import get_config
from fm_jax.layers.hyper import hc_head, hc_post, hc_pre, init_hc_head, init_hyper, sinkhorn

HC, D = 4, 24
C = get_config("tiny", hc_mult=HC, d_model=D, hc_sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)
RTOL = 2e-5  # float32 against float64


# ---------------------------------------------------------------- SPEC §9, transcribed in NumPy float64
def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_mixes(fn, x, rms_eps):
    """x [T, hc, d] -> mixes = (xf @ fn^T) * rsqrt(mean(xf^2) + rms_eps), xf = x.reshape(T, hc*d)."""
    xf = x.reshape(x.shape[0], -1)
    return (xf @ fn.T) / np.sqrt(np.mean(xf ** 2, axis=-1, keepdims=True) + rms_eps)


def np_sinkhorn(logits, iters, eps):
    """logits [T, hc, hc]: softmax over k (row) + eps; divide by column sums + eps; then iters - 1 times
    rows / (row sum + eps), columns / (column sum + eps)."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    comb = e / e.sum(axis=-1, keepdims=True) + eps
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    return comb


def np_hc_pre(fn, base, scale, x, hc, iters, hc_eps, rms_eps):
    mixes = np_mixes(fn, x, rms_eps)
    t = x.shape[0]
    pre = np.zeros((t, hc))
    post = np.zeros((t, hc))
    comb_logits = np.zeros((t, hc, hc))
    for j in range(hc):
        pre[:, j] = np_sigmoid(mixes[:, j] * scale[0] + base[j]) + hc_eps
        post[:, j] = 2 * np_sigmoid(mixes[:, hc + j] * scale[1] + base[hc + j])
        for k in range(hc):
            comb_logits[:, j, k] = mixes[:, 2 * hc + j * hc + k] * scale[2] + base[2 * hc + j * hc + k]
    comb = np_sinkhorn(comb_logits, iters, hc_eps)
    y = sum(pre[:, j, None] * x[:, j] for j in range(hc))
    return y, post, comb


def np_hc_post(f, x, post, comb):
    """X'[:, k] = post[k] * f + sum_j comb[j, k] * X[:, j]."""
    hc = x.shape[1]
    out = np.zeros_like(x)
    for k in range(hc):
        out[:, k] = post[:, k, None] * f + sum(comb[:, j, k, None] * x[:, j] for j in range(hc))
    return out


def np_hc_head(fn, base, scale, x, hc_eps, rms_eps):
    mixes = np_mixes(fn, x, rms_eps)
    pre = np_sigmoid(mixes * scale[0] + base) + hc_eps
    return sum(pre[:, j, None] * x[:, j] for j in range(x.shape[1]))


# ---------------------------------------------------------------- data
def random_mixer(rng, rows):
    """Parameters large enough that pre / post / comb are far from their init values."""
    return {"fn": (rng.standard_normal((rows, HC * D)) * 2.0 * (HC * D) ** -0.5).astype(np.float32),
            "base": rng.standard_normal(rows).astype(np.float32),
            "scale": (1.0 + 0.5 * rng.standard_normal(3 if rows > HC else 1)).astype(np.float32)}


def streams(rng, t=7):
    return (rng.standard_normal((t, HC, D)) * 3.0).astype(np.float32)


def f64(p):
    return {k: np.asarray(v, np.float64) for k, v in p.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hc_pre_matches_spec(seed):
    rng = np.random.default_rng(seed)
    p, x = random_mixer(rng, (2 + HC) * HC), streams(rng)
    y, post, comb = jax.jit(hc_pre, static_argnums=2)(jax.tree.map(jnp.asarray, p), jnp.asarray(x), C)
    q = f64(p)
    y_w, post_w, comb_w = np_hc_pre(q["fn"], q["base"], q["scale"], x.astype(np.float64), HC, 20, 1e-6, 1e-6)
    assert y.dtype == jnp.float32 and post.dtype == jnp.float32 and comb.dtype == jnp.float32
    assert y.shape == (7, D) and post.shape == (7, HC) and comb.shape == (7, HC, HC)
    np.testing.assert_allclose(np.asarray(post), post_w, rtol=RTOL, atol=0)
    np.testing.assert_allclose(np.asarray(comb), comb_w, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(np.asarray(y), y_w, rtol=0, atol=RTOL * np.abs(y_w).max())
    # Sinkhorn ran: columns (normalised last) sum to 1, rows nearly (20 rounds need not fully converge)
    np.testing.assert_allclose(comb_w.sum(-2), 1, atol=1e-5)
    np.testing.assert_allclose(comb_w.sum(-1), 1, atol=0.05)
    assert np.abs(post_w - 1).max() > 0.3 and np.abs(comb_w - 0.25).max() > 0.1


def test_sinkhorn_iterations_and_eps():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((9, HC, HC)) * 3).astype(np.float32)
    for iters in (1, 2, 20):
        got = np.asarray(sinkhorn(jnp.asarray(logits), iters, 1e-6))
        np.testing.assert_allclose(got, np_sinkhorn(logits.astype(np.float64), iters, 1e-6), rtol=RTOL, atol=1e-7)
    one, twenty = (np_sinkhorn(logits.astype(np.float64), n, 1e-6) for n in (1, 20))
    assert np.abs(one - twenty).max() > 1e-3  # the iteration count matters (so the test can see it)
    # eps enters as written: a large eps changes the result by the formula's amount
    np.testing.assert_allclose(np.asarray(sinkhorn(jnp.asarray(logits), 3, 0.1)),
                               np_sinkhorn(logits.astype(np.float64), 3, 0.1), rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hc_post_matches_spec(dtype):
    rng = np.random.default_rng(3)
    x, f = streams(rng), rng.standard_normal((7, D)).astype(np.float32)
    post = rng.uniform(0, 2, (7, HC)).astype(np.float32)
    comb = np_sinkhorn(rng.standard_normal((7, HC, HC)), 20, 1e-6).astype(np.float32)
    dt = jnp.dtype(dtype)
    got = hc_post(jnp.asarray(f, dt), jnp.asarray(x, dt), jnp.asarray(post), jnp.asarray(comb))
    assert got.dtype == dt and got.shape == (7, HC, D)
    seen_x, seen_f = (np.asarray(jnp.asarray(a, dt), np.float64) for a in (x, f))
    want = np_hc_post(seen_f, seen_x, post.astype(np.float64), comb.astype(np.float64))
    tol = RTOL if dtype == "float32" else 2 ** -8  # bf16: one rounding of the float32 result
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=tol * np.abs(want).max())
    # the transpose: output stream k mixes input streams j by comb[j, k], not comb[k, j]
    wrong = np_hc_post(seen_f, seen_x, post.astype(np.float64), comb.swapaxes(-1, -2).astype(np.float64))
    assert np.abs(wrong - want).max() > 1e-2


def test_hc_head_matches_spec():
    rng = np.random.default_rng(4)
    p, x = random_mixer(rng, HC), streams(rng)
    got = hc_head(jax.tree.map(jnp.asarray, p), jnp.asarray(x), C)
    q = f64(p)
    want = np_hc_head(q["fn"], q["base"], q["scale"], x.astype(np.float64), 1e-6, 1e-6)
    assert got.shape == (7, D) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=RTOL * np.abs(want).max())


def test_batched_leading_dims_and_bf16_streams():
    """[B, T, hc, d] works like a flat batch of tokens; bf16 streams keep their dtype, math stays f32."""
    rng = np.random.default_rng(6)
    p, x = jax.tree.map(jnp.asarray, random_mixer(rng, (2 + HC) * HC)), streams(rng, 6)
    y, post, comb = hc_pre(p, jnp.asarray(x).reshape(2, 3, HC, D), C)
    y1, post1, comb1 = hc_pre(p, jnp.asarray(x), C)
    np.testing.assert_array_equal(np.asarray(post).reshape(6, HC), np.asarray(post1))
    np.testing.assert_array_equal(np.asarray(comb).reshape(6, HC, HC), np.asarray(comb1))
    np.testing.assert_array_equal(np.asarray(y).reshape(6, D), np.asarray(y1))
    yb, postb, combb = hc_pre(p, jnp.asarray(x, jnp.bfloat16), C)
    assert yb.dtype == jnp.bfloat16 and postb.dtype == jnp.float32 and combb.dtype == jnp.float32


def test_init_is_the_plain_residual():
    """init_hyper / init_hc_head: pre ~ 1/hc, post ~ 1, comb ~ identity; identical streams stay identical
    and equal to the plain residual h + f(h) (up to the small random fn)."""
    c = get_config("tiny", hc_mult=HC, d_model=D)
    p, ph = init_hyper(jax.random.key(0), c), init_hc_head(jax.random.key(1), c)
    assert {k: (v.shape, v.dtype) for k, v in p.items()} == {
        "fn": (((2 + HC) * HC, HC * D), jnp.float32), "base": (((2 + HC) * HC,), jnp.float32),
        "scale": ((3,), jnp.float32)}
    assert {k: (v.shape, v.dtype) for k, v in ph.items()} == {
        "fn": ((HC, HC * D), jnp.float32), "base": ((HC,), jnp.float32), "scale": ((1,), jnp.float32)}
    rng = np.random.default_rng(7)
    h = rng.standard_normal((5, D)).astype(np.float32)
    x = jnp.repeat(jnp.asarray(h)[:, None], HC, axis=1)
    y, post, comb = hc_pre(p, x, c)
    np.testing.assert_allclose(np.asarray(y), h, atol=0.05 * np.abs(h).max())
    np.testing.assert_allclose(np.asarray(post), 1.0, atol=0.1)
    assert np.all(np.diagonal(np.asarray(comb), axis1=-2, axis2=-1) > 0.9)
    f = rng.standard_normal((5, D)).astype(np.float32)
    new = np.asarray(hc_post(jnp.asarray(f), x, post, comb))
    np.testing.assert_allclose(new, np.broadcast_to((h + f)[:, None], new.shape), atol=0.1 * np.abs(h + f).max())
    np.testing.assert_allclose(np.asarray(hc_head(ph, x, c)), h, atol=0.05 * np.abs(h).max())


def test_hc_mult_one_has_no_mixer():
    with pytest.raises(ValueError, match="hc_mult"):
        init_hyper(jax.random.key(0), get_config("tiny"))
