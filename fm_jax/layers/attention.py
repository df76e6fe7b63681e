"""Shared-KV multi-query attention projections (SPEC §2).

q: `q_lora = RMSNorm(x @ wq_a)`, `q = q_lora @ wq_b` -> [n_heads, head_dim], each head RMS-normalised
without weight, RoPE on the last rope_dim dims. kv: `RMSNorm(x @ wkv)` -> [head_dim], one shared head,
RoPE on its last rope_dim dims (keys == values). Output: inverse RoPE on the rope dims of every head
(values carry rotated dims), then the grouped low-rank projection `wo_a[g]`, `wo_b`.
The attention itself (softmax over window + compressed entries + sink) is `pallas_kernels.sparse_attention`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fm_jax.layers.init import dense_init, ones
from fm_jax.layers.norm import rms_norm
from fm_jax.layers.rope import apply_rope


def init_attention(key, c, dtype=jnp.float32):
    ks = jax.random.split(key, 6)
    hd, h, g = c.head_dim, c.n_heads, c.o_groups
    return {
        "wq_a": dense_init(ks[0], (c.d_model, c.q_lora_rank), dtype),
        "q_norm": ones((c.q_lora_rank,), dtype),
        "wq_b": dense_init(ks[1], (c.q_lora_rank, h * hd), dtype),
        "wkv": dense_init(ks[2], (c.d_model, hd), dtype),
        "kv_norm": ones((hd,), dtype),
        "sink": jax.random.normal(ks[3], (h,), jnp.float32),
        "wo_a": dense_init(ks[4], (g, (h // g) * hd, c.o_lora_rank), dtype),
        "wo_b": dense_init(ks[5], (g * c.o_lora_rank, c.d_model), dtype),
    }


def project_q(p, c, x: jax.Array, positions: jax.Array, inv_freq):
    """x: [..., d_model] (normed), positions: [...] -> (q [..., n_heads, head_dim], q_lora [..., q_lora_rank])."""
    q_lora = rms_norm(x @ p["wq_a"], p["q_norm"], c.norm_eps)
    q = (q_lora @ p["wq_b"]).reshape(*x.shape[:-1], c.n_heads, c.head_dim)
    q = rms_norm(q, None, c.norm_eps)
    return apply_rope(q, positions[..., None], inv_freq), q_lora


def project_kv(p, c, x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
    """x: [..., d_model] (normed) -> shared kv [..., head_dim] with RoPE at `positions`."""
    kv = rms_norm(x @ p["wkv"], p["kv_norm"], c.norm_eps)
    return apply_rope(kv, positions, inv_freq)


def output_projection(p, c, o: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
    """o: [..., n_heads, head_dim] -> [..., d_model]: inverse RoPE, then per-group low rank, then wo_b."""
    o = apply_rope(o, positions[..., None], inv_freq, inverse=True).astype(p["wo_a"].dtype)
    lead = o.shape[:-2]
    o = o.reshape(*lead, c.o_groups, c.heads_per_group * c.head_dim)
    o = jnp.einsum("...gi,gir->...gr", o, p["wo_a"]).reshape(*lead, c.o_groups * c.o_lora_rank)
    return o @ p["wo_b"]
