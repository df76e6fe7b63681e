"""Dynamic hyper-connections (mHC) of DeepSeek-V4 (SPEC §9): the residual is `hc_mult` streams
`X [..., hc, d]`, mixed around every sub-layer with weights computed per token from the streams.

Per sub-layer (parameters `fn [(2+hc)*hc, hc*d]`, `base [(2+hc)*hc]`, `scale [3]`, float32), with
`xf = X` flattened to `[..., hc*d]` in float32:

    mixes     = (xf @ fn.T) * rsqrt(mean(xf**2) + norm_eps)
    pre[j]    = sigmoid(mixes[j] * scale[0] + base[j]) + hc_eps                       j < hc
    post[j]   = 2 * sigmoid(mixes[hc + j] * scale[1] + base[hc + j])
    comb[j,k] = Sinkhorn(mixes[2hc + j*hc + k] * scale[2] + base[2hc + j*hc + k])
    y         = sum_j pre[j] * X[j]                      (the sub-layer computes f(norm(y)))
    X'[k]     = post[k] * f + sum_j comb[j, k] * X[j]    (note the transpose: comb's rows are inputs)

Sinkhorn (V4's `hc_split_sinkhorn`): softmax over each row + hc_eps, divide by column sums + hc_eps,
then `hc_sinkhorn_iters - 1` more rounds of (rows / (row sums + eps), columns / (column sums + eps)).
After the last layer `hc_head` (`fn [hc, hc*d]`, `base [hc]`, `scale [1]`) collapses the streams with
sigmoid weights only. All mixing math runs in float32 (the matmuls at HIGHEST precision, as V4's fp32
linears); results are cast back to the residual's dtype. With `hc_mult = 1` the model uses the plain
residual and nothing here is called.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
_COMB_INIT = 4.0  # diagonal logit of comb at init: after Sinkhorn ~0.95 on the diagonal for hc = 4
_FN_INIT = 0.01   # std of the initial mixes (fn scaled by 1/sqrt(hc*d) against the RMS-normalised streams)


def _pre_logit(hc: int) -> float:
    """Logit whose sigmoid is 1/hc: at init the sub-layer input is the mean of the streams."""
    if hc < 2:
        raise ValueError(f"hyper-connection parameters need hc_mult >= 2, got hc_mult={hc}")
    return math.log(1.0 / (hc - 1))


def init_hyper(key, c):
    """One sub-layer's mixer: {"fn" [(2+hc)*hc, hc*d], "base" [(2+hc)*hc], "scale" [3]} (float32).

    Initialised for training from scratch to the plain residual: pre ~ 1/hc, post ~ 1, comb ~ identity,
    plus small input-dependent terms (random `fn`)."""
    hc, d = c.hc_mult, c.d_model
    fn = jax.random.normal(key, ((2 + hc) * hc, hc * d), jnp.float32) * (_FN_INIT * (hc * d) ** -0.5)
    base = jnp.concatenate([jnp.full((hc,), _pre_logit(hc), jnp.float32), jnp.zeros((hc,), jnp.float32),
                            (_COMB_INIT * jnp.eye(hc, dtype=jnp.float32)).reshape(-1)])
    return {"fn": fn, "base": base, "scale": jnp.ones((3,), jnp.float32)}


def init_hc_head(key, c):
    """The final collapse: {"fn" [hc, hc*d], "base" [hc], "scale" [1]} (float32); at init ~ the mean."""
    hc, d = c.hc_mult, c.d_model
    fn = jax.random.normal(key, (hc, hc * d), jnp.float32) * (_FN_INIT * (hc * d) ** -0.5)
    return {"fn": fn, "base": jnp.full((hc,), _pre_logit(hc), jnp.float32), "scale": jnp.ones((1,), jnp.float32)}


def _mixes(fn: jax.Array, x: jax.Array, norm_eps: float) -> tuple[jax.Array, jax.Array]:
    """x [..., hc, d] -> (mixes [..., rows of fn] float32, the streams as float32 [..., hc, d])."""
    xs = x.astype(jnp.float32)
    xf = xs.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
    rsqrt = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + norm_eps)
    return jnp.matmul(xf, fn.T, precision=_HIGHEST) * rsqrt, xs


def _collapse(pre: jax.Array, xs: jax.Array, dtype) -> jax.Array:
    """sum_j pre[..., j] * X[..., j, :] in float32 -> [..., d] in `dtype`."""
    return jnp.sum(pre[..., None] * xs, axis=-2).astype(dtype)


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """V4's Sinkhorn normalisation of `logits [..., hc, hc]` (rows j, columns k), float32."""
    comb = jax.nn.softmax(logits, axis=-1) + eps
    comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)

    def round_(comb, _):
        comb = comb / (jnp.sum(comb, axis=-1, keepdims=True) + eps)
        return comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps), None

    # a scan, not a Python loop: unrolled, the 19 rounds x 2 sub-layers x every layer (x remat and the
    # backward pass) were a third of the training step's HLO and of its compile time
    return jax.lax.scan(round_, comb, None, length=iters - 1)[0] if iters > 1 else comb


def hc_pre(p, x: jax.Array, config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: streams [..., hc, d] -> (sub-layer input y [..., d] in x's dtype, post [..., hc] float32,
    comb [..., hc, hc] float32)."""
    hc = config.hc_mult
    mixes, xs = _mixes(p["fn"], x, config.norm_eps)
    base, scale = p["base"], p["scale"]
    pre = jax.nn.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + config.hc_eps
    post = 2.0 * jax.nn.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb_logits = mixes[..., 2 * hc:] * scale[2] + base[2 * hc:]
    comb = sinkhorn(comb_logits.reshape(*comb_logits.shape[:-1], hc, hc), config.hc_sinkhorn_iters, config.hc_eps)
    return _collapse(pre, xs, x.dtype), post, comb


def hc_post(out: jax.Array, residual: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """New streams [..., hc, d] = post[k] * out + sum_j comb[j, k] * residual[j], in float32, cast to
    the residual's dtype. out: [..., d], residual: [..., hc, d], post: [..., hc], comb: [..., hc, hc]."""
    mixed = jnp.einsum("...jk,...jd->...kd", comb, residual.astype(jnp.float32), precision=_HIGHEST)
    return (post[..., None] * out[..., None, :].astype(jnp.float32) + mixed).astype(residual.dtype)


def hc_head(p, x: jax.Array, config) -> jax.Array:
    """Collapse the streams after the last layer: [..., hc, d] -> [..., d] (x's dtype), sigmoid weights."""
    mixes, xs = _mixes(p["fn"], x, config.norm_eps)
    pre = jax.nn.sigmoid(mixes * p["scale"][0] + p["base"]) + config.hc_eps
    return _collapse(pre, xs, x.dtype)
