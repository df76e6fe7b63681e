"""SwiGLU with V4's clamp (SPEC §9): one definition for the dense FFN, the shared expert and the routed
experts (dense and sparse MoE paths).

`w1` (gate) and `w3` (up) outputs go to float32, `up` is clamped to [-limit, limit] and `gate` to <= limit
(limit 0 = no clamp), and `silu(gate) * up` is cast to the compute dtype before `w2`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fm_jax.layers.init import dense_init


def init_swiglu(key, d_model: int, inter: int, dtype=jnp.float32, lead: tuple = ()):
    """{"w1", "w3": [*lead, d_model, inter], "w2": [*lead, inter, d_model]}."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": dense_init(k1, (*lead, d_model, inter), dtype),
            "w3": dense_init(k3, (*lead, d_model, inter), dtype),
            "w2": dense_init(k2, (*lead, inter, d_model), dtype)}


def swiglu_hidden(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """silu(gate) * up in float32, with V4's clamp (limit 0 = none). gate, up: [..., inter]."""
    gate, up = gate.astype(jnp.float32), up.astype(jnp.float32)
    if limit > 0:
        up = jnp.clip(up, -limit, limit)
        gate = jnp.minimum(gate, limit)
    return jax.nn.silu(gate) * up


def swiglu(p, x: jax.Array, limit: float = 0.0) -> jax.Array:
    """x: [..., d_model] -> [..., d_model]."""
    return swiglu_hidden(x @ p["w1"], x @ p["w3"], limit).astype(x.dtype) @ p["w2"]
