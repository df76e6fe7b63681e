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

Two implementations of the routed experts, chosen by the config field `moe_impl` (same routing, same
function; they differ only in the rounding of the final sum over experts, see `moe_sparse`):

* "dense": every routed expert on every token, unrouted ones weighted zero (E / top_k times the FLOPs of
  dispatching; the cheaper one for a few experts, and on CPU, where `ragged_dot` expands to dense).
* "sparse" (`fm_jax.layers.moe_sparse`): assignments sorted by expert and grouped matmuls
  (`jax.lax.ragged_dot`) over exactly the routed rows; expert parallel over the mesh axis `model`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fm_jax.layers.init import dense_init
from fm_jax.layers.moe_sparse import sparse_moe
from fm_jax.layers.swiglu import init_swiglu, swiglu, swiglu_hidden

_HIGHEST = jax.lax.Precision.HIGHEST


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


def dense_moe(experts, x: jax.Array, gates: jax.Array, limit: float) -> jax.Array:
    """Every routed expert on every token, weighted by `gates` float32 [..., n_routed_experts] (zero for
    unrouted experts). x: [..., d_model] -> [..., d_model] (x's dtype promoted with the weights')."""
    e = experts
    h = swiglu_hidden(jnp.einsum("...d,edi->...ei", x, e["w1"]), jnp.einsum("...d,edi->...ei", x, e["w3"]),
                      limit)
    h = (h * gates[..., None]).astype(x.dtype)  # weight before w2, as V4
    return jnp.einsum("...ei,eid->...d", h, e["w2"])


def ffn(p, c, x: jax.Array, token_ids=None) -> jax.Array:
    """x: [..., d_model] (normed), token_ids: int [...] (hash-routed layers) -> [..., d_model]."""
    if c.ffn == "dense":
        return swiglu(p["dense"], x, c.swiglu_limit)
    e = p["experts"]
    if c.moe_impl == "dense":
        out = dense_moe(e, x, moe_gates(p, c, x, token_ids), c.swiglu_limit)
    elif c.moe_impl == "sparse":
        ids, w = moe_route(p, c, x, token_ids)
        out = sparse_moe(e, x, ids, w, c.swiglu_limit).astype(jnp.result_type(x.dtype, e["w2"].dtype))
    else:  # the config validates this; a hand-built config object could still get here
        raise ValueError(f"unknown moe_impl {c.moe_impl!r}; choose 'dense' or 'sparse'")
    if "shared" in p:
        out = out + swiglu(p["shared"], x, c.swiglu_limit)
    return out
