"""Lightning Indexer of CSA layers (SPEC §2): per-step scores over compressed index keys, top-k.

`q_I = Hadamard(RoPE(q_lora @ wq_b))` -> [n_index_heads, index_head_dim];
`w = (x @ weights_proj) * index_head_dim**-0.5 * n_index_heads**-0.5`;
`I[s] = sum_h w[h] * relu(q_I[h] . K[s])` over the fp8 index keys (`pallas_kernels.indexer_scores`).
Index keys come from the layer's second compressor, Hadamard-rotated and packed to fp8.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fm_jax.layers.compressor import init_compressor
from fm_jax.layers.hadamard import hadamard
from fm_jax.layers.init import dense_init
from fm_jax.layers.quant import pack_index_keys
from fm_jax.layers.rope import apply_rope
from pallas_kernels import topk


def init_indexer(key, c, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "wq_b": dense_init(k1, (c.q_lora_rank, c.n_index_heads * c.index_head_dim), dtype),
        "weights_proj": dense_init(k2, (c.d_model, c.n_index_heads), dtype),
        "compressor": init_compressor(k3, c.d_model, c.index_head_dim, c.csa_ratio, overlap=True, dtype=dtype),
    }


def index_query(p, c, x: jax.Array, q_lora: jax.Array, positions: jax.Array, inv_freq):
    """x: [..., d_model] (normed), q_lora: [..., q_lora_rank] ->
    (q_I [..., n_index_heads, index_head_dim] float32, w [..., n_index_heads] float32)."""
    q = (q_lora @ p["wq_b"]).astype(jnp.float32).reshape(*x.shape[:-1], c.n_index_heads, c.index_head_dim)
    q = hadamard(apply_rope(q, positions[..., None], inv_freq))
    w = (x @ p["weights_proj"]).astype(jnp.float32) * (c.index_head_dim ** -0.5 * c.n_index_heads ** -0.5)
    return q, w


def pack_entry_keys(entries: jax.Array) -> jax.Array:
    """Finished index-compressor entries [..., D] -> packed fp8 keys uint8 [..., D + 4]."""
    return pack_index_keys(hadamard(entries))


def select_topk(scores: jax.Array, k: int, with_values: bool = False, impl: str = "auto"):
    """Top-k over the last axis of masked scores (-inf = not a candidate). [..., N] -> int32 [..., k],
    -1 where fewer than k candidates exist. `with_values`: also their logits float32 [..., k], sorted
    descending, -inf where no pick (the golden-label dump's top-p reads them). `impl`: as
    `pallas_kernels.dispatch.topk`; the model passes its config's `topk_impl`, not the scoring/attention `impl`,
    so the top-k kernel is opted into on its own."""
    vals, idx = topk(scores, k, impl=impl)
    idx = jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)
    return (idx, vals.astype(jnp.float32)) if with_values else idx
