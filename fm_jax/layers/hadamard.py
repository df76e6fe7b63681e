"""Normalised Walsh-Hadamard transform (Sylvester ordering), as `fast_hadamard_transform(x, d**-0.5)`.

A butterfly of adds and subtracts rather than a matmul: exact in any precision mode (a float32 matmul
on a GPU may silently run in TF32) and O(d log d).
"""
import jax
import jax.numpy as jnp


def hadamard(x: jax.Array) -> jax.Array:
    """`x @ H_d / sqrt(d)` over the last axis, `d` a power of two. `x`: [..., d]. Orthogonal and symmetric,
    so it is its own inverse."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"hadamard needs a power-of-two last dim, got {d}")
    lead = x.shape[:-1]
    y = x.astype(jnp.float32)
    h = 1
    while h < d:
        y = y.reshape(*lead, d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return (y.reshape(*lead, d) * (d ** -0.5)).astype(x.dtype)
