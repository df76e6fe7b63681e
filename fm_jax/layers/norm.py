"""RMSNorm, computed in float32 and cast back to the input dtype."""
import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array | None = None, eps: float = 1e-6) -> jax.Array:
    """`x / rms(x) * weight` over the last axis. `x`: [..., d]; `weight`: [d] or None (no weight)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)
