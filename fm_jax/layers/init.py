"""Parameter initialisers (plain arrays; params are nested dicts)."""
import jax
import jax.numpy as jnp


def dense_init(key, shape, dtype=jnp.float32, fan_in: int | None = None):
    """Normal(0, 1/fan_in) weights; fan_in defaults to the second-to-last dim (JAX `[in, out]` layout)."""
    fan_in = shape[-2] if fan_in is None else fan_in
    return (jax.random.normal(key, shape, jnp.float32) * fan_in ** -0.5).astype(dtype)


def ones(shape, dtype=jnp.float32):
    return jnp.ones(shape, dtype)
