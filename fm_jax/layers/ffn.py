"""Feed-forward: dense SwiGLU, and DeepSeek MoE (routed top-k experts + shared experts).

The MoE computes every routed expert densely and combines with zero weight for unrouted ones: exact
and sharding-friendly (experts split over the `model` axis), at E/top_k times the FLOPs of a
dispatching implementation. Fine for `tiny`/`small`; `v4_flash` benchmarks time the attention stack.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fm_jax.layers.init import dense_init


def init_swiglu(key, d_model: int, inter: int, dtype=jnp.float32, lead: tuple = ()):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": dense_init(k1, (*lead, d_model, inter), dtype),
            "w3": dense_init(k3, (*lead, d_model, inter), dtype),
            "w2": dense_init(k2, (*lead, inter, d_model), dtype)}


def swiglu(p, x: jax.Array) -> jax.Array:
    """x: [..., d_model] -> [..., d_model]."""
    return (jax.nn.silu(x @ p["w1"]) * (x @ p["w3"])) @ p["w2"]


def init_ffn(key, c, dtype=jnp.float32, *, hash_routed: bool = False):
    if c.ffn == "dense":
        return {"dense": init_swiglu(key, c.d_model, c.dense_inter_dim, dtype)}
    kr, ke, ks = jax.random.split(key, 3)
    p = {"router": dense_init(kr, (c.d_model, c.n_routed_experts), jnp.float32),
         "experts": init_swiglu(ke, c.d_model, c.moe_inter_dim, dtype, lead=(c.n_routed_experts,))}
    if c.n_shared_experts:
        p["shared"] = init_swiglu(ks, c.d_model, c.moe_inter_dim * c.n_shared_experts, dtype)
    return p


def moe_gates(p, c, x: jax.Array) -> jax.Array:
    """Routing weights [..., n_routed_experts]: softmax over experts, top-k kept and renormalised."""
    probs = jax.nn.softmax((x.astype(jnp.float32) @ p["router"]), axis=-1)
    vals, idx = jax.lax.top_k(probs, c.moe_top_k)
    vals = vals / jnp.sum(vals, axis=-1, keepdims=True)
    return jnp.sum(jax.nn.one_hot(idx, c.n_routed_experts, dtype=jnp.float32) * vals[..., None], axis=-2)


def ffn(p, c, x: jax.Array, token_ids=None) -> jax.Array:
    """x: [..., d_model] (normed) -> [..., d_model]."""
    if c.ffn == "dense":
        return swiglu(p["dense"], x)
    e = p["experts"]
    h = jax.nn.silu(jnp.einsum("...d,edi->...ei", x, e["w1"])) * jnp.einsum("...d,edi->...ei", x, e["w3"])
    y = jnp.einsum("...ei,eid->...ed", h, e["w2"])
    out = jnp.einsum("...ed,...e->...d", y.astype(jnp.float32), moe_gates(p, c, x)).astype(x.dtype)
    if "shared" in p:
        out = out + swiglu(p["shared"], x)
    return out
