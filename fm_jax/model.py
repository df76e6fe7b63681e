"""Public API of the backbone: `init_params`, `forward`, `prefill`, `decode_step`.

Parameters and caches are plain pytrees; `config` is a hashable `ModelConfig` (a static argument).
Inputs are checked before entering jit and bad ones raise `ValueError` naming the limit; when called
with traced values (inside a user's `jax.jit`) the checks that need concrete values are skipped and a
decode step past the cache capacity returns NaN logits for that request rather than garbage.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax import backbone
from fm_jax.cache import init_cache
from fm_jax.config import KIND_CSA, KIND_WINDOW, ModelConfig
from fm_jax.layers.attention import init_attention
from fm_jax.layers.compressor import init_compressor
from fm_jax.layers.ffn import init_ffn
from fm_jax.layers.hyper import init_hc_head, init_hyper
from fm_jax.layers.indexer import init_indexer
from fm_jax.layers.init import dense_init, ones


def init_params(config: ModelConfig, key: jax.Array):
    """Random parameters: {"embed" [V, d], "layers": [per-layer dict], "final_norm" [d], "lm_head" [d, V]}
    and, with hyper-connections (hc_mult > 1), "hc_head" and per layer "hc_attn" / "hc_ffn" (float32).
    MoE layers hold float32 router leaves and, on hash layers, the int32 table "tid2eid"."""
    c, dt = config, config.compute_dtype
    k_emb, k_head, *k_layers = jax.random.split(key, 2 + c.n_layers)
    k_hc = jax.random.fold_in(key, c.n_layers)  # a key of its own, leaving the others as without mHC
    layers = []
    for layer, kl in enumerate(k_layers):
        ka, kf, kc, ki, kh1, kh2 = jax.random.split(kl, 6)
        attn = init_attention(ka, c, dt)
        kind = c.layer_kind(layer)
        if kind != KIND_WINDOW:
            attn["compressor"] = init_compressor(kc, c.d_model, c.head_dim, c.compress_ratios[layer],
                                                 overlap=kind == KIND_CSA, dtype=dt)
        if kind == KIND_CSA:
            attn["indexer"] = init_indexer(ki, c, dt)
        lp = {"attn_norm": ones((c.d_model,), dt), "attn": attn, "ffn_norm": ones((c.d_model,), dt),
              "ffn": init_ffn(kf, c, dt, hash_routed=c.is_hash_layer(layer))}
        if c.hc_mult > 1:
            lp["hc_attn"], lp["hc_ffn"] = init_hyper(kh1, c), init_hyper(kh2, c)
        layers.append(lp)
    params = {"embed": (jax.random.normal(k_emb, (c.vocab_size, c.d_model), jnp.float32)).astype(dt),
              "layers": layers, "final_norm": ones((c.d_model,), dt),
              "lm_head": dense_init(k_head, (c.d_model, c.vocab_size), dt)}
    if c.hc_mult > 1:
        params["hc_head"] = init_hc_head(k_hc, c)
    return params


# ---------------------------------------------------------------- input checks (outside jit)
def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_tokens(config, tokens, rank: int, name: str = "tokens"):
    if not hasattr(tokens, "dtype") or not hasattr(tokens, "ndim"):
        raise ValueError(f"{name} must be an integer array, got {type(tokens).__name__}")
    if tokens.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} ({'[batch, seq]' if rank == 2 else '[batch]'}), "
                         f"got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {tokens.dtype}")
    if _concrete(tokens) and tokens.size:
        t = np.asarray(tokens)
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"{name} must lie in [0, vocab_size={config.vocab_size}), got values in [{lo}, {hi}]")


def _check_lengths(config, lengths, batch: int, seq: int):
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an int array of shape [{batch}], got {lengths.dtype}{lengths.shape}")
    if _concrete(lengths):
        ln = np.asarray(lengths)
        if ln.min() < 1 or ln.max() > seq:
            raise ValueError(f"lengths must lie in [1, seq={seq}], got [{ln.min()}, {ln.max()}]")
    return lengths.astype(jnp.int32)


def _check_positions(config, last_position: int, what: str):
    if last_position >= config.max_seq_len:
        raise ValueError(f"{what}: position {last_position} is past the RoPE table "
                         f"(max_seq_len={config.max_seq_len})")


# ---------------------------------------------------------------- public entry points
@functools.partial(jax.jit, static_argnames=("config", "impl"))
def _forward(params, config, tokens, impl):
    return backbone.run_sequence(params, config, tokens, impl=impl)[0]


def forward(params, config: ModelConfig, tokens: jax.Array, *, impl: str = "auto") -> jax.Array:
    """Uncached causal forward. tokens int [B, T] -> logits float32 [B, T, vocab_size]."""
    _check_tokens(config, tokens, 2)
    _check_positions(config, tokens.shape[1] - 1, "forward")
    return _forward(params, config, tokens, impl)


def check_prefill_inputs(config, tokens, max_len, lengths=None) -> jax.Array:
    """Validate prefill inputs (ValueError naming the limit); returns int32 lengths [B]."""
    _check_tokens(config, tokens, 2)
    b, t = tokens.shape
    if not isinstance(max_len, (int, np.integer)) or max_len <= 0:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if t > max_len:
        raise ValueError(f"prompt length {t} exceeds max_len={max_len}")
    if max_len > config.max_seq_len:
        raise ValueError(f"max_len={max_len} is past the RoPE table (max_seq_len={config.max_seq_len})")
    return jnp.full((b,), t, jnp.int32) if lengths is None else _check_lengths(config, lengths, b, t)


@functools.partial(jax.jit, static_argnames=("config", "max_len", "impl"))
def prefill_with_hidden(params, config, tokens, lengths, max_len, impl="auto"):
    """`prefill` without input checks, also returning every layer's normed attention input at each request's
    last prompt token ([B, d_model] per layer; the engine's first Memory Indexer query)."""
    logits, layer_caches, aux = backbone.run_sequence(params, config, tokens, lengths, max_len, impl)
    cache = init_cache(config, tokens.shape[0], max_len)
    last = [jnp.take_along_axis(a["hidden"], (lengths - 1)[:, None, None], axis=1)[:, 0] for a in aux]
    return logits, {**cache, "lengths": lengths, "layers": layer_caches}, last


def prefill(params, config: ModelConfig, tokens: jax.Array, max_len: int, *, lengths=None, impl: str = "auto"):
    """Run the prompt and build the decode cache.

    tokens int [B, T] (right-padded when `lengths` [B] is given: request b holds `lengths[b]` tokens).
    Returns (logits float32 [B, T, vocab_size] — positions >= lengths[b] are padding —, cache) where the
    cache has room for `max_len` tokens per request.
    """
    lengths = check_prefill_inputs(config, tokens, max_len, lengths)
    return prefill_with_hidden(params, config, tokens, lengths, int(max_len), impl)[:2]


@functools.partial(jax.jit, static_argnames=("config", "impl"), donate_argnames=("cache",))
def _decode_step(params, config, cache, tokens, impl):
    logits, cache, _ = backbone.run_step(params, config, cache, tokens, impl=impl)
    return logits, cache


def decode_step(params, config: ModelConfig, cache, tokens: jax.Array, *, impl: str = "auto"):
    """Decode one token per request. tokens int [B] at positions cache["lengths"] ->
    (logits float32 [B, vocab_size], new cache). The input cache's buffers are donated."""
    _check_tokens(config, tokens, 1)
    if tokens.shape[0] != cache["lengths"].shape[0]:
        raise ValueError(f"tokens has batch {tokens.shape[0]} but the cache holds {cache['lengths'].shape[0]}")
    if _concrete(cache["lengths"]):
        last, cap = int(jnp.max(cache["lengths"])), int(cache["capacity"])
        if last >= cap:
            raise ValueError(f"decode past cache capacity: position {last} >= max_len={cap}")
        _check_positions(config, last, "decode_step")
    else:  # traced (inside the caller's jit): delegate to the NaN poisoning in run_step
        return backbone.run_step(params, config, cache, tokens, impl=impl)[:2]
    return _decode_step(params, config, cache, tokens, impl)
