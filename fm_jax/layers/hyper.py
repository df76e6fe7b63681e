"""Hyper-connections (SPEC §2, verify): the residual is widened to `hc_mult` streams.

Around every sub-layer `f` (attention, FFN): the input is a learned convex mix of the streams
(`softmax(pre)`), the streams are mixed by a Sinkhorn-normalised (doubly stochastic) matrix, and the
output is added to every stream with weight `post`. With `hc_mult = 1` the model uses the plain
residual and these functions are not called. Static (input-independent) mixing; the exact V4 form
(dynamic, input-dependent weights) is a pending verify item of the SPEC.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def init_hyper(key, n: int):
    k1, k2 = jax.random.split(key)
    return {"pre": jax.random.normal(k1, (n,), jnp.float32) * 0.1,
            "post": jnp.ones((n,), jnp.float32),
            "res": jnp.eye(n, dtype=jnp.float32) * 4.0 + jax.random.normal(k2, (n, n), jnp.float32) * 0.1}


def sinkhorn(logits: jax.Array, iters: int) -> jax.Array:
    m = jnp.exp(logits - jnp.max(logits))
    for _ in range(iters):
        m = m / jnp.sum(m, axis=-1, keepdims=True)
        m = m / jnp.sum(m, axis=-2, keepdims=True)
    return m


def hc_input(p, streams: jax.Array) -> jax.Array:
    """streams: [..., n, d] -> sub-layer input [..., d]."""
    w = jax.nn.softmax(p["pre"])
    return jnp.einsum("n,...nd->...d", w, streams.astype(jnp.float32)).astype(streams.dtype)


def hc_output(p, streams: jax.Array, out: jax.Array, iters: int) -> jax.Array:
    """Mix the streams and add the sub-layer output: [..., n, d], [..., d] -> [..., n, d]."""
    mixed = jnp.einsum("mn,...nd->...md", sinkhorn(p["res"], iters), streams.astype(jnp.float32))
    return (mixed + p["post"][:, None] * out[..., None, :].astype(jnp.float32)).astype(streams.dtype)
