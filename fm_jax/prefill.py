"""Chunked prefill (issue 10): the prompt runs `chunk` tokens at a time, so no array grows with T x T.

Every chunk runs the layers one by one (one jitted call per layer; layers of the same kind share the
compiled program) against a carried per-layer state that is exactly the decode cache of
`fm_jax.cache` with capacity `max_len`: the window ring buffer (the keys of the previous `window`
tokens), the compressors' shift registers (the previous `coff * r` token projections, so an
overlapping CSA window can reach into the previous chunk), and the compressed entries / packed index
keys written so far. A chunk's queries attend to the window (carried ring + the chunk's own keys) and
to the compressed entries visible to them (`n_visible_entries`); CSA queries score the index keys so
far one key block of `chunk // csa_ratio` entries at a time inside a `while_loop`, keeping a running
top-k (never a `[chunk, T / 4]` array, and no work on keys past the chunk).

Ragged prompts: every request runs the same chunk positions; writes to the state are masked by each
request's length, so after the last chunk the state *is* the decode cache after `lengths[b]` tokens,
and positions past a request's length (padding) never reach its real positions (causality).

Shapes are bucketed: the prompt is padded to a multiple of `chunk`, `max_len` is rounded up to one, and
the chunk index is a traced scalar, so every prompt length with the same (batch, chunk, capacity) reuses
one compilation per layer kind. `chunk` must be a multiple of every compress ratio and of
`csa_ratio * page_entries` (chunks then complete whole entries and whole LSA pages).

The CSA entries of a layer can live elsewhere than the state (LSA: the host mirror): `csa_store`
supplies, per CSA layer and chunk, the buffers the layer reads and writes, and receives them back
(`serve.prefill` streams them from / to the host mirror).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax.backbone import _attend_sequence, block, embed_residual, lm_logits
from fm_jax.cache import init_cache, load_kv, n_visible_entries, round_kv, store_kv
from fm_jax.config import KIND_CSA, KIND_WINDOW
from fm_jax.layers import compressor
from fm_jax.layers.attention import output_projection, project_kv, project_q
from fm_jax.layers.indexer import index_query, pack_entry_keys
from fm_jax.layers.key_pages import write_index_pages
from fm_jax.layers.rope import inv_freq_for_layer
from pallas_kernels import indexer_scores


# ---------------------------------------------------------------- geometry
def chunk_multiple(config) -> int:
    """The granularity of `chunk`: every compress ratio and one LSA page of CSA entries."""
    m = 1
    for r in set(config.compress_ratios) - {0}:
        m = np.lcm(m, r)
    if config.csa_layers:
        m = np.lcm(m, config.csa_ratio * config.page_entries)
    return int(m)


def check_chunk(config, chunk) -> int:
    m = chunk_multiple(config)
    if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk <= 0 or chunk % m:
        raise ValueError(f"chunk must be a positive multiple of {m} (the compress ratios and csa_ratio * "
                         f"page_entries of this config), got {chunk!r}")
    return int(chunk)


def bucket(n: int, chunk: int) -> int:
    """n rounded up to a multiple of chunk (the shape bucket of a prompt or a cache capacity)."""
    return -(-int(n) // chunk) * chunk


def kind_layer(config, layer: int) -> int:
    """The first layer computed like `layer` (same compress ratio and MoE routing): layers are compiled
    once per kind, with this representative as the static layer index."""
    key = (config.compress_ratios[layer], config.is_hash_layer(layer))
    return next(l for l in range(config.n_layers)
                if (config.compress_ratios[l], config.is_hash_layer(l)) == key)


# ---------------------------------------------------------------- one layer's attention over one chunk
def _chunk_entries(cp, x, positions, state, start, ratio: int, overlap: bool, inv, c):
    """The compressed entries completed by the chunk and the compressor's new state.

    x [B, C, d] (normed chunk input), state {"kv", "score"} [B, coff*r, coff*D] (projections of the
    `coff * r` positions before `start`). Returns (entries [B, C // r, D] float32, projections
    (kv, score) [B, C, coff*D])."""
    b, n_tok, _ = x.shape
    n = n_tok // ratio
    kv, score = compressor.project(cp, x, positions, ratio)
    ch = kv.shape[-1]
    kvb, sb = kv.reshape(b, n, ratio, ch), score.reshape(b, n, ratio, ch)
    if overlap:  # previous block of every entry: the carried state for the chunk's first entry
        def prev(blocks, carried):
            return jnp.concatenate([carried[:, -ratio:][:, None], blocks[:, :-1]], axis=1)
        kvb = jnp.concatenate([prev(kvb, state["kv"]), kvb], axis=2)
        sb = jnp.concatenate([prev(sb, state["score"]), sb], axis=2)
    ids = start // ratio + jnp.arange(n)
    pooled = compressor.pool_window(kvb, sb, jnp.broadcast_to(ids == 0, (b, n)), overlap)
    entries = compressor.finish_entry(cp, pooled, ids, ratio, inv, c.compress_rope_position, c.norm_eps)
    return entries, (kv, score)


def _next_state(state, proj, start, lengths):
    """Compressor state after min(lengths[b], start + C) tokens (unchanged for requests already done)."""
    ns = state["kv"].shape[1]
    n_tok = proj[0].shape[1]
    end = jnp.minimum(lengths, start + n_tok)
    idx = (end - start)[:, None] + jnp.arange(ns)[None, :]  # into [state; chunk] (positions start - ns ..)
    live = (lengths > start)[:, None, None]
    out = {}
    for name, new in zip(("kv", "score"), proj):
        ext = jnp.concatenate([state[name], new], axis=1)
        out[name] = jnp.where(live, jnp.take_along_axis(ext, jnp.clip(idx, 0, ns + n_tok - 1)[..., None], axis=1),
                              state[name])
    return out


def _complete_only(entries, start, ratio: int, lengths, dtype):
    """The chunk's entries [B, n, ...] in `dtype`, zero where the entry is not complete for the request."""
    n = entries.shape[1]
    ids = start // ratio + jnp.arange(n)
    complete = (ids[None, :] + 1) * ratio <= lengths[:, None]
    vals = jnp.where(complete.reshape(*complete.shape, *([1] * (entries.ndim - 2))), entries.astype(dtype), 0)
    return vals.astype(dtype)


def _write_entries(buf, entries, start, ratio: int, lengths):
    """buf[:, start/r : start/r + n] = entries, zero where the entry is not complete for the request."""
    vals = _complete_only(entries, start, ratio, lengths, buf.dtype)
    return jax.lax.dynamic_update_slice(buf, vals, (0, start // ratio, 0))


def _running_topk(q_i, w_i, keys, n_vis, n_blocks, block_entries: int, k: int, impl, page_entries: int):
    """Top-k entries per query over the first n_blocks * block_entries entries, one key block at a time.

    q_i [B, C, H, D], w_i [B, C, H], keys page-blocked uint8 [B, N // P, P * (D + 4)] (a block is whole
    pages: block_entries is a multiple of P = page_entries), n_vis [C] (entries each query sees).
    Returns int32 [B, C, k] (-1 = none), ordered as `select_topk` over all keys orders them (score
    descending, ties to the lower entry: `lax.top_k` keeps the earlier of equal values, and the running
    set always precedes the new block)."""
    b, n_q = q_i.shape[:2]

    def body(j, carry):
        vals, idx = carry
        pages = block_entries // page_entries
        blk = jax.lax.dynamic_slice_in_dim(keys, j * pages, pages, axis=1)
        lens = jnp.broadcast_to(jnp.clip(n_vis - j * block_entries, 0, block_entries), (b, n_q)).astype(jnp.int32)
        s = indexer_scores(q_i, w_i, blk, lens, act="none", impl=impl, page_entries=page_entries)  # [B, C, block]
        ids = jnp.broadcast_to(j * block_entries + jnp.arange(block_entries, dtype=jnp.int32), s.shape)
        v, pos = jax.lax.top_k(jnp.concatenate([vals, s], axis=-1), k)
        return v, jnp.take_along_axis(jnp.concatenate([idx, ids], axis=-1), pos, axis=-1)

    init = (jnp.full((b, n_q, k), -jnp.inf, jnp.float32), jnp.full((b, n_q, k), -1, jnp.int32))
    vals, idx = jax.lax.fori_loop(0, n_blocks, body, init)
    return jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)


def attention_chunk(p, c, layer: int, x, lc, start, lengths, impl):
    """Causal attention of one layer over one chunk against the carried state.

    x [B, C, d_model] (normed) at positions start .. start + C - 1; lc: the layer's state (decode-cache
    layout, capacity N entries); start: int32 scalar (a multiple of C); lengths [B].
    Returns (out [B, C, d_model], new state)."""
    b, n_tok, _ = x.shape
    kind, r = c.layer_kind(layer), c.compress_ratios[layer]
    inv = inv_freq_for_layer(c, layer)
    positions = start + jnp.arange(n_tok)
    q, q_lora = project_q(p, c, x, positions, inv)
    kv = project_kv(p, c, x, positions, inv)
    w = c.window
    ring = lc["window"]
    prev = load_kv(c, ring[:, (start - w + jnp.arange(w)) % w])         # positions start - W .. start - 1
    ext = jnp.concatenate([prev, round_kv(c, kv).astype(prev.dtype)], axis=1)   # [B, W + C, D]
    window_kv = ext[:, w + jnp.arange(n_tok)[:, None] - jnp.arange(w)[None, :]]  # newest first
    window_len = jnp.minimum(positions + 1, w).astype(jnp.int32)
    # the ring after min(lengths, start + C) tokens: each slot's newest position, if inside this chunk
    last = jnp.minimum(lengths, start + n_tok) - 1
    slot_pos = last[:, None] - jnp.mod(last[:, None] - jnp.arange(w)[None, :], w)
    fresh = (slot_pos >= start) & (lengths > start)[:, None]
    new_slot = jnp.take_along_axis(kv, jnp.clip(slot_pos - start, 0, n_tok - 1)[..., None], axis=1)
    lc = {**lc, "window": jnp.where(fresh[..., None], store_kv(c, new_slot), ring)}
    if kind == KIND_WINDOW:
        pool, sel = jnp.zeros((b, 1, c.head_dim), kv.dtype), jnp.full((b, n_tok, 1), -1, jnp.int32)
    else:
        overlap = kind == KIND_CSA
        entries, proj = _chunk_entries(p["compressor"], x, positions, lc["comp_state"], start, r, overlap, inv, c)
        lc["comp_state"] = _next_state(lc["comp_state"], proj, start, lengths)
        lc["comp_kv"] = _write_entries(lc["comp_kv"], store_kv(c, entries.astype(kv.dtype)), start, r, lengths)
        pool = lc["comp_kv"]   # packed rows with kv_fp8: the attention dequantises the rows it gathers
        n_cap = pool.shape[1]
        n_vis = n_visible_entries(positions, r)
        if kind == KIND_CSA:
            ientries, iproj = _chunk_entries(p["indexer"]["compressor"], x, positions, lc["index_state"], start, r,
                                             True, inv, c)
            lc["index_state"] = _next_state(lc["index_state"], iproj, start, lengths)
            # the chunk's entries are whole pages (`check_chunk`): written as pages, scored as pages
            lc["index_keys"] = write_index_pages(lc["index_keys"], _complete_only(
                pack_entry_keys(ientries), start, r, lengths, jnp.uint8), start // r, c.page_entries)
            q_i, w_i = index_query(p["indexer"], c, x, q_lora, positions, inv)
            block_entries = n_tok // r
            sel = _running_topk(q_i, w_i, lc["index_keys"], n_vis, start // n_tok + 1, block_entries,
                                min(c.index_topk, n_cap), impl, c.page_entries)
        else:
            ids = jnp.arange(n_cap)
            sel = jnp.broadcast_to(jnp.where(ids[None, :] < n_vis[:, None], ids[None, :], -1), (b, n_tok, n_cap))
    o = _attend_sequence(q, pool, sel.astype(jnp.int32), window_kv, window_len, p["sink"], c.head_dim ** -0.5,
                         impl, rope_dim=c.rope_dim if c.kv_fp8 else None)
    return output_projection(p, c, o, positions, inv), lc


# ---------------------------------------------------------------- jitted pieces
@functools.partial(jax.jit, static_argnames=("config",))
def _embed(embed, config, tokens):
    return embed_residual(config, embed[tokens])


@functools.partial(jax.jit, static_argnames=("config", "layer", "impl"), donate_argnames=("lc", "hidden"))
def layer_chunk(lp, config, layer: int, h, tokens, lc, start, lengths, hidden, impl="auto"):
    """One layer over one chunk. h: residual [B, C, (hc_mult,) d], tokens [B, C], lc: the layer state
    (donated), hidden [B, d] (donated): the normed attention input at each request's last prompt token,
    updated where that token lies in this chunk. Returns (h, lc, hidden)."""
    attend = functools.partial(attention_chunk, lp["attn"], config, layer, lc=lc, start=start, lengths=lengths,
                               impl=impl)
    h, x_in, lc = block(lp, config, h, attend, tokens)
    idx = lengths - 1 - start
    mine = (idx >= 0) & (idx < tokens.shape[1])
    at_last = jnp.take_along_axis(x_in, jnp.clip(idx, 0, tokens.shape[1] - 1)[:, None, None], axis=1)[:, 0]
    return h, lc, jnp.where(mine[:, None], at_last.astype(hidden.dtype), hidden)


@functools.partial(jax.jit, static_argnames=("config",))
def _logits_all(params, config, h):
    return lm_logits(params, config, h)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("last",))
def _logits_last(params, config, h, start, lengths, last):
    idx = lengths - 1 - start
    mine = (idx >= 0) & (idx < h.shape[1])
    h_last = jnp.take_along_axis(h, jnp.clip(idx, 0, h.shape[1] - 1).reshape(-1, *([1] * (h.ndim - 1))), axis=1)
    return jnp.where(mine[:, None], lm_logits(params, config, h_last[:, 0]), last)


# ---------------------------------------------------------------- driver
def commit(tree):
    """Every leaf committed to the default device (as jitted outputs are)."""
    dev = jax.devices()[0]
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, dev), tree)


def prefill_chunked(params, config, tokens, max_len: int, *, chunk: int, lengths=None, impl: str = "auto",
                    logits: str = "all", csa_store=None, on_chunk=None):
    """Prefill `tokens` [B, T] (right-padded when `lengths` [B] is given) `chunk` tokens at a time.

    Returns (logits, cache, hidden): logits float32 [B, T, V] (`logits="all"`; positions >= lengths[b]
    are padding) or [B, V] at each request's last token (`logits="last"`); the decode cache of
    capacity `bucket(max_len, chunk)`; hidden: per layer [B, d_model], the normed attention input at
    the last prompt token (the Memory Indexer's first query).

    `csa_store` (optional) owns the CSA entries instead of the state: `csa_store.take(layer, start)`
    returns (comp_kv [B, N, kv_row], index_keys [B, N // P, P * (D + 4)]) buffers holding every entry before
    `start`, and `csa_store.give(layer, start, comp_kv, index_keys)` receives them after the layer wrote the chunk's
    entries. The cache then holds what `csa_store.finish(layers)` leaves in the CSA layers.
    `on_chunk(start, h)` (optional) is called after every chunk with its output residual (benchmarks).
    """
    from fm_jax.model import check_prefill_inputs  # model imports backbone; keep this module importable first

    chunk = check_chunk(config, chunk)
    if logits not in ("all", "last"):
        raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
    if not isinstance(max_len, (int, np.integer)) or max_len <= 0:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    capacity = bucket(max_len, chunk)
    if lengths is not None and not isinstance(lengths, jax.Array):
        lengths = jax.device_put(np.asarray(lengths), jax.devices()[0])  # (jnp.asarray compiles a program)
    lengths = commit(check_prefill_inputs(config, tokens, capacity, lengths))
    b, t = tokens.shape
    t_pad = bucket(t, chunk)
    # padded and sliced on the host: eager device ops would compile once per prompt length
    tokens = np.pad(np.asarray(tokens, np.int32), ((0, 0), (0, t_pad - t)))
    # one buffer per leaf (init_cache shares its zero arrays between leaves; donation needs distinct ones)
    # Committed to the device like every jitted output: jit keys its cache on committedness, so an
    # uncommitted first chunk would compile every program twice.
    layers = list(commit(jax.tree_util.tree_map(jnp.copy, init_cache(config, b, capacity)["layers"])))
    if csa_store is not None:
        for l in config.csa_layers:  # the store owns these buffers: no capacity-sized copy here
            layers[l] = {k: v for k, v in layers[l].items() if k not in ("comp_kv", "index_keys")}
    hidden = commit([jnp.zeros((b, config.d_model), config.compute_dtype) for _ in range(config.n_layers)])
    last = commit(jnp.zeros((b, config.vocab_size), jnp.float32))
    out = []
    for start in range(0, t_pad, chunk):
        s = jnp.asarray(start, jnp.int32)
        tok = jax.device_put(tokens[:, start:start + chunk], jax.devices()[0])
        h = _embed(params["embed"], config, tok)
        for l, lp in enumerate(params["layers"]):
            lc = layers[l]
            if csa_store is not None and l in config.csa_layers:
                kv, keys = csa_store.take(l, start)
                lc = {**lc, "comp_kv": kv, "index_keys": keys}
            h, lc, hidden[l] = layer_chunk(lp, config, kind_layer(config, l), h, tok, lc, s, lengths, hidden[l],
                                           impl)
            if csa_store is not None and l in config.csa_layers:
                csa_store.give(l, start, lc.pop("comp_kv"), lc.pop("index_keys"))
            layers[l] = lc
        if on_chunk is not None:
            on_chunk(start, h)
        if logits == "all":
            out.append(np.asarray(_logits_all(params, config, h)))
        else:
            last = _logits_last(params, config, h, s, lengths, last)
    if csa_store is not None:
        layers = csa_store.finish(layers)
    cache = {"lengths": lengths, "capacity": jnp.asarray(capacity, jnp.int32), "layers": tuple(layers)}
    result = jax.device_put(np.concatenate(out, axis=1)[:, :t]) if logits == "all" else last  # no per-shape program
    return result, cache, hidden

