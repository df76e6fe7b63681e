"""The backbone's attention against naive float64 loops written in this file.

1. `pallas_kernels.sparse_attention(impl="xla")` (what the backbone runs off-GPU): one shared KV head over
   window slots `[0, window_len)` plus the picked compressed entries (-1 = padding, duplicates counted per
   occurrence), a per-head sink logit in the softmax denominator, scale `head_dim**-0.5`.
2. A whole layer of the uncached backbone (`attention_sequence`) for a window-only, a CSA and an HCA layer:
   per query position, keys = the causal window of raw kv + the visible compressed entries (HCA: every
   entry whose tokens are all <= t, so the token completing an entry sees it (SPEC §9); CSA: the Lightning
   Indexer's top-k among those, recomputed here from the fp8 keys).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fm_jax import backbone
from fm_jax.config import get_config
from fm_jax.layers import compressor
from fm_jax.layers.attention import output_projection, project_kv, project_q
from fm_jax.layers.indexer import index_query, pack_entry_keys
from fm_jax.layers.norm import rms_norm
from fm_jax.layers.quant import dequantize_index_keys
from fm_jax.layers.rope import inv_freq_for_layer
from pallas_kernels import sparse_attention
from tests.fm_jax.helpers import random_params

SETTINGS = settings(max_examples=20, deadline=None)


def naive_attention(q, kv, indices, window_kv, window_len, sink, scale):
    """float64 loops: softmax over {window slots < window_len} ∪ {kv[i] : i in indices, 0 <= i < N}
    with exp(sink[h]) added to the denominator. Returns out [B, H, D]."""
    q, kv, window_kv, sink = (np.asarray(a, np.float64) for a in (q, kv, window_kv, sink))
    b_, h_, d_ = q.shape
    out = np.zeros((b_, h_, d_))
    for b in range(b_):
        keys = [window_kv[b, s] for s in range(int(window_len[b]))]
        keys += [kv[b, i] for i in np.asarray(indices[b]) if 0 <= i < kv.shape[1]]
        for h in range(h_):
            logits = np.array([scale * q[b, h] @ k for k in keys])
            m = max([sink[h], *logits])
            e = np.exp(logits - m)
            denom = np.exp(sink[h] - m) + e.sum()
            out[b, h] = sum((ei / denom) * k for ei, k in zip(e, keys)) if keys else 0.0
    return out


@functools.partial(jax.jit, static_argnames=("scale",))
def _xla_attention(q, kv, idx, wkv, wl, sink, scale):
    return sparse_attention(q, kv, idx, wkv, wl, sink, scale=scale, impl="xla")


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from(["float32", "bfloat16"]))
def test_sparse_attention_xla_matches_naive(seed, dtype):
    rng = np.random.default_rng(seed)
    b, h, d, n, k, w = 3, 4, 32, 12, 6, 8
    q = rng.standard_normal((b, h, d)) * 2
    kv = rng.standard_normal((b, n, d))
    wkv = rng.standard_normal((b, w, d))
    idx = rng.integers(-1, n, size=(b, k))             # -1 padding and duplicates occur
    idx[0] = -1                                          # a row with no compressed entry
    idx[1, :2] = [n, n + 5]                              # out of range = padding
    wl = rng.integers(0, w + 1, size=(b,))
    wl[0] = 0 if seed % 2 else wl[0]                     # sometimes nothing at all: out = 0
    sink = rng.standard_normal((h,)) * 2
    dt = jnp.dtype(dtype)
    args = (jnp.asarray(q, dt), jnp.asarray(kv, dt), jnp.asarray(idx, jnp.int32), jnp.asarray(wkv, dt),
            jnp.asarray(wl, jnp.int32), jnp.asarray(sink, jnp.float32))
    out, lse = _xla_attention(*args, scale=d ** -0.5)
    # compare against the naive loop on the values the kernel saw (rounded to dtype)
    seen = [np.asarray(a, np.float64) for a in args]
    want = naive_attention(seen[0], seen[1], idx, seen[3], wl, seen[5], d ** -0.5)
    atol = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=atol * max(1.0, np.abs(want).max()))
    assert out.dtype == jnp.float32 and lse.shape == (b, h)


# ----------------------------------------------------------------------------- one layer of the backbone
@pytest.fixture(scope="module")
def tiny():
    c = get_config("tiny", compress_rope_position="last")
    params = random_params(c, seed=3)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 41, c.d_model)), jnp.float32)  # 41: not 4k/16k
    return c, params, x


@functools.partial(jax.jit, static_argnames=("c", "layer"))
def _layer(p, c, layer, x):
    """The backbone's layer output and top-k picks, and what the naive loop consumes: q, kv, compressed
    entries, index queries / keys (CSA), from the layer's projection functions."""
    got, aux = backbone.attention_sequence(p, c, layer, x, None, None, "xla")
    inv = inv_freq_for_layer(c, layer)
    kind, r = c.layer_kind(layer), c.compress_ratios[layer]
    pos = jnp.arange(x.shape[1])
    q, q_lora = project_q(p, c, x, pos, inv)
    kv = project_kv(p, c, x, pos, inv)
    out = {"q": q, "kv": kv}
    if kind != "window":
        out["entries"] = compressor.compress_sequence(p["compressor"], x, r, kind == "csa", inv,
                                                      c.compress_rope_position, c.norm_eps)
    if kind == "csa":
        out["keys"] = dequantize_index_keys(pack_entry_keys(compressor.compress_sequence(
            p["indexer"]["compressor"], x, r, True, inv, c.compress_rope_position, c.norm_eps)))
        out["q_i"], out["w_i"] = index_query(p["indexer"], c, x, q_lora, pos, inv)
    return got, aux.get("topk"), out


@functools.partial(jax.jit, static_argnames=("c", "layer"))
def _out_proj(p, c, layer, o):
    return output_projection(p, c, o, jnp.arange(o.shape[1]), inv_freq_for_layer(c, layer))


@pytest.mark.parametrize("layer", [0, 1, 2], ids=["window", "csa", "hca"])
def test_layer_attention_matches_naive(tiny, layer):
    c, params, x = tiny
    p = params["layers"][layer]["attn"]
    xn = rms_norm(x, params["layers"][layer]["attn_norm"], c.norm_eps)
    kind, r = c.layer_kind(layer), c.compress_ratios[layer]
    got, topk, pieces = _layer(p, c, layer, xn)
    pieces = {k: np.asarray(v, np.float64) for k, v in pieces.items()}
    topk = np.asarray(topk) if topk is not None else None
    b_, t_ = x.shape[:2]
    sink = np.asarray(p["sink"], np.float64)
    o = np.zeros((b_, t_, c.n_heads, c.head_dim))
    n_topk_checked = 0
    for b in range(b_):
        for t in range(t_):
            keys = [pieces["kv"][b, s] for s in range(max(0, t - c.window + 1), t + 1)]  # causal window
            if kind != "window":
                visible = (t + 1) // r  # entries whose r tokens are all <= t (SPEC §9)
                if kind == "hca":
                    chosen = list(range(visible))
                else:  # Lightning Indexer: I[s] = sum_h w[h] relu(q_I[h] . K[s]); top-k
                    w_i, q_i = pieces["w_i"][b, t], pieces["q_i"][b, t]
                    scores = np.array([np.sum(w_i * np.maximum(q_i @ pieces["keys"][b, s], 0)) for s in range(visible)])
                    chosen = sorted(np.argsort(-scores, kind="stable")[: c.index_topk].tolist())
                    assert sorted(s for s in topk[b, t].tolist() if s >= 0) == chosen
                    n_topk_checked += visible > c.index_topk
                keys += [pieces["entries"][b, i] for i in chosen]
            keys = np.stack(keys)
            for h in range(c.n_heads):
                logits = keys @ pieces["q"][b, t, h] * c.head_dim ** -0.5
                m = max(logits.max(), sink[h])
                e = np.exp(logits - m)
                o[b, t, h] = (e / (e.sum() + np.exp(sink[h] - m))) @ keys
    want = np.asarray(_out_proj(p, c, layer, jnp.asarray(o, jnp.float32)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * np.abs(want).max())
    if kind == "csa":
        assert n_topk_checked > 0  # the top-k really dropped entries somewhere


# ----------------------------------------------------------------------------- visibility of compressed entries
@functools.partial(jax.jit, static_argnames=("c", "layer"))
def _sequence_out(p, c, layer, x):
    return backbone.attention_sequence(p, c, layer, x, None, None, "xla")[0]


@functools.partial(jax.jit, static_argnames=("c", "layer"))
def _decode_out(p, c, layer, x, t):
    """Prefill x[:, :t] into a cache, then one decode step of the token at position t."""
    b = x.shape[0]
    lengths = jnp.full((b,), t, jnp.int32)
    _, aux = backbone.attention_sequence(p, c, layer, x, lengths, x.shape[1], "xla")
    out, _ = backbone.attention_step(p, c, layer, aux["cache"], x[jnp.arange(b), lengths], lengths, None, "xla")
    return out


@pytest.mark.parametrize("layer", [1, 2], ids=["csa", "hca"])
def test_entry_visible_at_the_token_completing_it(tiny, layer):
    """SPEC §9 (V4's `get_compress_topk_idxs`): entry i is visible at position t iff i < (t + 1) // r, so
    entry 0 is read by token r - 1 (which completes it) and not by token r - 2, in prefill and in a decode
    step (which writes the entry before attending). Probed by scaling the entries (compressor norm x 2):
    an output moves exactly where an entry is read."""
    c, params, x = tiny
    p = params["layers"][layer]["attn"]
    r = c.compress_ratios[layer]
    xn = rms_norm(x, params["layers"][layer]["attn_norm"], c.norm_eps)[:, :2 * r]
    bumped = {**p, "compressor": {**p["compressor"], "norm": p["compressor"]["norm"] * 2}}
    seq, seq_b = np.asarray(_sequence_out(p, c, layer, xn)), np.asarray(_sequence_out(bumped, c, layer, xn))
    reads_entry = np.abs(seq - seq_b).max(axis=(0, 2)) > 0  # [T]
    assert reads_entry.tolist() == [t >= r - 1 for t in range(2 * r)]
    for t in (r - 2, r - 1, 2 * r - 2, 2 * r - 1):
        dec, dec_b = (np.asarray(_decode_out(q, c, layer, xn, t)) for q in (p, bumped))
        assert (np.abs(dec - dec_b).max() > 0) == (t >= r - 1)
        np.testing.assert_allclose(dec, seq[:, t], rtol=0, atol=1e-5 * np.abs(seq[:, t]).max())
