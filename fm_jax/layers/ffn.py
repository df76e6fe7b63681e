"""Feed-forward: dense SwiGLU, and DeepSeek-V4 MoE (routed top-k experts + shared experts, SPEC §9).

Routing (V4's `Gate`), per token with `x` the normed FFN input:

    scores  = sqrt(softplus(x_f32 @ router))                            [n_routed_experts]  float32
    ids     = top-k of (scores + router_bias)      (the bias only chooses; no group-limited routing)
            = tid2eid[token_id]                     on hash layers (the first n_hash_layers; no bias)
    weights = scores[ids] / sum(scores[ids]) * routed_scaling_factor
    out     = sum_k weights[k] * expert_{ids[k]}(x) + shared(x)

Every SwiGLU (routed and shared experts, and the dense option) computes `w1` (gate) and `w3` (up) in
float32, clamps `up` to [-swiglu_limit, swiglu_limit] and `gate` to <= swiglu_limit (0 = no clamp), and
casts `silu(gate) * up` to the compute dtype before `w2`. The clamp on the shared expert follows the
current official revision of V4's `model.py` (its first revision left the shared expert unclamped; see
V4-REFERENCE "TWO HF revisions").

Overall routed / shared scale: pinned against the official `MoE.forward` (`y = sum_k experts(x, weights)
+ shared_experts(x)`, with `Gate` renormalising the chosen scores and multiplying by `route_scale`):
routed weights sum to `routed_scaling_factor` (1.5 in V4-Flash), the shared expert has weight 1, and the
routing weight multiplies the expert's activation before `w2` (in float32). The FlashMemory sglang fork
fuses the shared expert as one more "expert" of weight 1/1.5 next to the renormalised routed weights and
scales the sum by 1.5: the same function.

The MoE computes every routed expert densely and gives unrouted ones weight zero: exact and
sharding-friendly (experts split over the `model` axis), at E/top_k times the FLOPs of a dispatching
implementation. Fine for `tiny`/`small`; `v4_flash` benchmarks time the attention stack.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fm_jax.layers.init import dense_init

_HIGHEST = jax.lax.Precision.HIGHEST


def init_swiglu(key, d_model: int, inter: int, dtype=jnp.float32, lead: tuple = ()):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": dense_init(k1, (*lead, d_model, inter), dtype),
            "w3": dense_init(k3, (*lead, d_model, inter), dtype),
            "w2": dense_init(k2, (*lead, inter, d_model), dtype)}


def init_ffn(key, c, dtype=jnp.float32, *, hash_routed: bool = False):
    """Dense: {"dense": SwiGLU}. MoE: {"router" f32 [d_model, E], "experts" {w1, w3 [E, d, inter],
    w2 [E, inter, d]}, "shared" (n_shared_experts > 0) {w1, w3 [d, inter * n_shared], w2}} plus
    "router_bias" f32 [E] (zeros), or on hash-routed layers "tid2eid" int32 [vocab_size, moe_top_k]: a
    fixed random table of `moe_top_k` distinct experts per token."""
    if c.ffn == "dense":
        return {"dense": init_swiglu(key, c.d_model, c.dense_inter_dim, dtype)}
    kr, ke, ks, kt = jax.random.split(key, 4)
    p = {"router": dense_init(kr, (c.d_model, c.n_routed_experts), jnp.float32),
         "experts": init_swiglu(ke, c.d_model, c.moe_inter_dim, dtype, lead=(c.n_routed_experts,))}
    if hash_routed:
        order = jnp.argsort(jax.random.uniform(kt, (c.vocab_size, c.n_routed_experts)), axis=-1)
        p["tid2eid"] = order[:, :c.moe_top_k].astype(jnp.int32)
    else:
        p["router_bias"] = jnp.zeros((c.n_routed_experts,), jnp.float32)
    if c.n_shared_experts:
        p["shared"] = init_swiglu(ks, c.d_model, c.moe_inter_dim * c.n_shared_experts, dtype)
    return p


def _swiglu_hidden(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """silu(gate) * up in float32, with V4's clamp (limit 0 = none)."""
    gate, up = gate.astype(jnp.float32), up.astype(jnp.float32)
    if limit > 0:
        up = jnp.clip(up, -limit, limit)
        gate = jnp.minimum(gate, limit)
    return jax.nn.silu(gate) * up


def swiglu(p, x: jax.Array, limit: float = 0.0) -> jax.Array:
    """x: [..., d_model] -> [..., d_model]."""
    return _swiglu_hidden(x @ p["w1"], x @ p["w3"], limit).astype(x.dtype) @ p["w2"]


def moe_route(p, c, x: jax.Array, token_ids=None) -> tuple[jax.Array, jax.Array]:
    """The experts of every token and their weights: (ids int32 [..., moe_top_k], weights float32
    [..., moe_top_k]). x: [..., d_model]; token_ids: int [...] (needed on hash-routed layers)."""
    scores = jnp.sqrt(jax.nn.softplus(jnp.matmul(x.astype(jnp.float32), p["router"], precision=_HIGHEST)))
    if "tid2eid" in p:
        if token_ids is None:
            raise ValueError("a hash-routed MoE layer (params with `tid2eid`) needs the token ids")
        ids = p["tid2eid"][token_ids]
    else:
        _, ids = jax.lax.top_k(scores + p["router_bias"], c.moe_top_k)
    w = jnp.take_along_axis(scores, ids, axis=-1)
    return ids.astype(jnp.int32), w / jnp.sum(w, axis=-1, keepdims=True) * c.routed_scaling_factor


def moe_gates(p, c, x: jax.Array, token_ids=None) -> jax.Array:
    """Routing weights over all experts [..., n_routed_experts] float32 (zero for unrouted experts)."""
    ids, w = moe_route(p, c, x, token_ids)
    return jnp.sum(jax.nn.one_hot(ids, c.n_routed_experts, dtype=jnp.float32) * w[..., None], axis=-2)


def ffn(p, c, x: jax.Array, token_ids=None) -> jax.Array:
    """x: [..., d_model] (normed), token_ids: int [...] (hash-routed layers) -> [..., d_model]."""
    if c.ffn == "dense":
        return swiglu(p["dense"], x, c.swiglu_limit)
    e = p["experts"]
    h = _swiglu_hidden(jnp.einsum("...d,edi->...ei", x, e["w1"]), jnp.einsum("...d,edi->...ei", x, e["w3"]),
                       c.swiglu_limit)
    h = (h * moe_gates(p, c, x, token_ids)[..., None]).astype(x.dtype)  # weight before w2, as V4
    out = jnp.einsum("...ei,eid->...d", h, e["w2"])
    if "shared" in p:
        out = out + swiglu(p["shared"], x, c.swiglu_limit)
    return out
