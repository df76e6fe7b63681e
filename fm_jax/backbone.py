"""The DeepSeek-V4 backbone layers: one attention+FFN block over a sequence (uncached) or one token
(decode against the cache). Public entry points are in `fm_jax.model`."""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from fm_jax.cache import entry_capacity, kv_zeros, n_visible_entries, round_kv, store_kv
from fm_jax.config import KIND_CSA, KIND_WINDOW
from fm_jax.layers import compressor
from fm_jax.layers.attention import output_projection, project_kv, project_q
from fm_jax.layers.ffn import ffn
from fm_jax.layers.hyper import hc_head, hc_post, hc_pre
from fm_jax.layers.indexer import index_query, pack_entry_keys, select_topk
from fm_jax.layers.key_pages import block_index_keys, write_index_keys
from fm_jax.layers.norm import rms_norm
from fm_jax.layers.rope import inv_freq_for_layer
from pallas_kernels import indexer_scores, sparse_attention

QUERY_CHUNK = 256  # uncached attention processes queries in chunks of this size to bound memory
# ... and at most this many (query, selected entry) pairs per chunk: an HCA layer selects every visible
# entry (8192 at 1M tokens), and the XLA path gathers [queries, entries, head_dim] (4 GB at 256 x 8192 x 512
# in float32), which made a 1M-token prefill's working set grow with the context (issue 10)
QUERY_CHUNK_PAIRS = QUERY_CHUNK * 512


def query_chunk(t: int, n_selected: int) -> int:
    """Queries per chunk for `t` queries selecting `n_selected` entries each: QUERY_CHUNK, halved until
    chunk x n_selected <= QUERY_CHUNK_PAIRS (a power of two, at least 1)."""
    qc = QUERY_CHUNK
    while qc > 1 and qc * n_selected > QUERY_CHUNK_PAIRS:
        qc //= 2
    return min(qc, t)


# ---------------------------------------------------------------- matmul precision
def matmul_precision(c):
    """Context that gives every matmul traced inside it without an explicit precision the config's
    `dot_precision` (float32 configs: IEEE float32 rather than XLA:GPU's TF32; see `ModelConfig`).
    Entered by `block` and `lm_logits`, through which every model computation runs (prefill, decode,
    chunked prefill, training); matmuls that name their precision (mHC, router, Memory Indexer,
    the Pallas kernels' float32 mode) keep it."""
    p = c.dot_precision
    return contextlib.nullcontext() if p is None else jax.default_matmul_precision(p)


# ---------------------------------------------------------------- residual / hyper-connections
def embed_residual(c, h: jax.Array) -> jax.Array:
    """Embedding [..., d] -> residual state ([..., d], or the embedding repeated into [..., hc_mult, d]
    streams with hyper-connections)."""
    return h if c.hc_mult == 1 else jnp.repeat(h[..., None, :], c.hc_mult, axis=-2)


def _sublayer(lp, c, name: str, h, f):
    """Residual around one sub-layer (`f(x_normed) -> (out, aux)`), plain or mHC (SPEC §9).
    Returns (new residual state, the normed sub-layer input, aux)."""
    norm_w = lp[f"{name}_norm"]
    if c.hc_mult == 1:
        x = rms_norm(h, norm_w, c.norm_eps)
        out, aux = f(x)
        return h + out.astype(h.dtype), x, aux
    y, post, comb = hc_pre(lp[f"hc_{name}"], h, c)
    x = rms_norm(y, norm_w, c.norm_eps)
    out, aux = f(x)
    return hc_post(out, h, post, comb), x, aux


def block(lp, c, h, attend, token_ids):
    """One pre-norm layer: attention (`attend(x_normed) -> (out, aux)`) then FFN, each with its residual.
    h: residual state [..., d] or [..., hc_mult, d]; token_ids: int [...] (the tokens of h's positions;
    hash-routed MoE layers read them). Returns (new residual state, the layer's normed attention input,
    aux). The normed input is what the Lightning Indexer reads, hence the Memory Indexer's query input
    ("hidden")."""
    with matmul_precision(c):
        h, x, aux = _sublayer(lp, c, "attn", h, attend)
        h, _, _ = _sublayer(lp, c, "ffn", h, lambda xf: (ffn(lp["ffn"], c, xf, token_ids), None))
    return h, x, aux


def lm_logits(params, c, h) -> jax.Array:
    """Residual state -> logits float32 [..., vocab]: hc_head collapses the streams (hc_mult > 1), then the
    final norm and the LM head."""
    hf = h if c.hc_mult == 1 else hc_head(params["hc_head"], h, c)
    with matmul_precision(c):
        return (rms_norm(hf, params["final_norm"], c.norm_eps) @ params["lm_head"]).astype(jnp.float32)


# ---------------------------------------------------------------- uncached (whole sequence)
def _window_gather(kv: jax.Array, window: int):
    """kv: [B, T, D] -> (window keys of every query [B, T, W, D], newest first; valid lengths [T])."""
    t = kv.shape[1]
    pos = jnp.arange(t)[:, None] - jnp.arange(window)[None, :]  # [T, W]
    return kv[:, jnp.clip(pos, 0, t - 1)], jnp.minimum(jnp.arange(t) + 1, window).astype(jnp.int32)


def _attend_sequence(q, kv_pool, sel, window_kv, window_len, sink, scale, impl, rope_dim=None):
    """Per-query sparse attention over a sequence, chunked over queries.
    q [B,T,H,D], kv_pool [B,N,D] (or packed fp8 rows [B,N,E] with `rope_dim`), sel [B,T,K],
    window_kv [B,T,W,D], window_len [T] -> [B,T,H,D] f32."""
    b, t = q.shape[:2]
    qc = query_chunk(t, sel.shape[-1])
    n_chunks = -(-t // qc)
    pad = n_chunks * qc - t

    def padt(x, axis=1, value=0):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        return jnp.pad(x, widths, constant_values=value)

    wl = jnp.broadcast_to(window_len[None, :], (b, t))
    args = (padt(q), padt(sel, value=-1), padt(window_kv), padt(wl))
    args = [a.reshape(b, n_chunks, qc, *a.shape[2:]).swapaxes(0, 1) for a in args]  # [n_chunks, B, qc, ...]

    def one_chunk(xs):
        qq, ss, ww, ll = xs
        f = lambda q1, s1, w1, l1: sparse_attention(q1, kv_pool, s1, w1, l1, sink, scale=scale, rope_dim=rope_dim,
                                                    impl=impl)[0]
        return jax.vmap(f, in_axes=(1, 1, 1, 1), out_axes=1)(qq, ss, ww, ll)

    out = jax.lax.map(one_chunk, args)  # [n_chunks, B, qc, H, D]
    return out.swapaxes(0, 1).reshape(b, n_chunks * qc, *out.shape[3:])[:, :t]


def attention_sequence(p, c, layer: int, x: jax.Array, lengths, max_len, impl):
    """Causal attention of one layer over a whole sequence. x: [B, T, d_model] (normed).

    Returns (out [B, T, d_model], aux) with aux = {"cache": the layer's decode cache after `lengths[b]`
    tokens (only when `max_len` is given, else None), "index_keys": packed keys [B, T // r, D + 4] (rows,
    not the cache's pages: a per-sequence training output, as the dumps and the Memory Indexer read it),
    "topk": the Lightning Indexer's picks int32 [B, T, k] (-1 = none) and "topk_logits": their logits
    float32 [B, T, k] (sorted descending, -inf = none) for CSA layers, k = min(index_topk, T // r) (index_topk
    when T < r)}.
    """
    b, t, _ = x.shape
    kind, r = c.layer_kind(layer), c.compress_ratios[layer]
    inv = inv_freq_for_layer(c, layer)
    positions = jnp.arange(t)
    q, q_lora = project_q(p, c, x, positions, inv)
    kv = project_kv(p, c, x, positions, inv)
    window_kv, window_len = _window_gather(round_kv(c, kv), c.window)
    entries = keys = None
    if kind != KIND_WINDOW:
        entries = compressor.compress_sequence(p["compressor"], x, r, kind == KIND_CSA, inv,
                                               c.compress_rope_position, c.norm_eps).astype(kv.dtype)
    n = 0 if entries is None else entries.shape[1]
    if n == 0:  # nothing compressed yet: an empty (all-padding) selection over a dummy pool
        pool, sel = jnp.zeros((b, 1, c.head_dim), kv.dtype), jnp.full((b, t, 1), -1, jnp.int32)
    else:
        pool, n_vis, ids = round_kv(c, entries), n_visible_entries(positions, r), jnp.arange(n)
        if kind == KIND_CSA:
            keys = pack_entry_keys(compressor.compress_sequence(
                p["indexer"]["compressor"], x, r, True, inv, c.compress_rope_position, c.norm_eps))
            q_i, w_i = index_query(p["indexer"], c, x, q_lora, positions, inv)
            scores = indexer_scores(q_i, w_i, keys, jnp.broadcast_to(n_vis, (b, t)).astype(jnp.int32),
                                    act="none", impl=impl)
            sel, sel_logits = select_topk(scores, c.index_topk, with_values=True, impl=c.topk_impl)
        else:
            sel = jnp.broadcast_to(jnp.where(ids[None, :] < n_vis[:, None], ids[None, :], -1), (b, t, n))
    o = _attend_sequence(q, pool, sel.astype(jnp.int32), window_kv, window_len, p["sink"],
                         c.head_dim ** -0.5, impl)
    out = output_projection(p, c, o, positions, inv)
    aux = {"cache": None if max_len is None else
           _layer_cache_after_prefill(p, c, layer, x, kv, entries, keys, lengths, max_len)}
    if kind == KIND_CSA:
        aux["index_keys"] = keys if keys is not None else jnp.zeros((b, 0, c.index_key_bytes), jnp.uint8)
        aux["topk"] = sel if n else jnp.full((b, t, c.index_topk), -1, jnp.int32)
        aux["topk_logits"] = sel_logits if n else jnp.full((b, t, c.index_topk), -jnp.inf, jnp.float32)
    return out, aux


def _layer_cache_after_prefill(p, c, layer, x, kv, entries, keys, lengths, max_len):
    """The decode cache of one layer after `lengths[b]` tokens. entries / keys: all compressed entries
    and packed index keys of the sequence ([B, T // r, ...]; None where the layer has none)."""
    b, t, _ = x.shape
    kind, r = c.layer_kind(layer), c.compress_ratios[layer]
    last = lengths[:, None] - 1
    pos = last - jnp.mod(last - jnp.arange(c.window)[None, :], c.window)  # newest p < length, p % W == slot
    window = jnp.take_along_axis(kv, jnp.clip(pos, 0, t - 1)[..., None], axis=1)
    lc = {"window": jnp.where((pos >= 0)[..., None], store_kv(c, window), 0)}
    if kind == KIND_WINDOW:
        return lc
    n_cap = entry_capacity(c, layer, max_len)
    complete = (jnp.arange(n_cap)[None, :] + 1) * r <= lengths[:, None]  # [B, n_cap]

    def place(e):  # pad [B, n, ...] to capacity and keep only entries complete for each request
        e = jnp.pad(e, [(0, 0), (0, n_cap - e.shape[1])] + [(0, 0)] * (e.ndim - 2))
        return jnp.where(complete.reshape(b, n_cap, *([1] * (e.ndim - 2))), e, 0).astype(e.dtype)

    lc["comp_kv"] = place(store_kv(c, entries))
    lc["comp_state"] = compressor.state_from_sequence(p["compressor"], x, lengths, r, kind == KIND_CSA)
    if kind == KIND_CSA:
        if keys is None:  # fewer than r tokens: no entry exists yet
            keys = jnp.zeros((b, 0, c.index_key_bytes), jnp.uint8)
        lc["index_keys"] = block_index_keys(place(keys), c.page_entries)
        lc["index_state"] = compressor.state_from_sequence(p["indexer"]["compressor"], x, lengths, r, True)
    return lc


def run_sequence(params, c, tokens, lengths=None, max_len=None, impl="auto"):
    """tokens [B, T] -> (logits [B, T, V] float32, tuple of layer caches or None, aux per layer).
    aux[l] holds "hidden" (layer l's normed attention input, [B, T, d_model]) and, for CSA
    layers, "index_keys" and "topk" (see `attention_sequence`); unused outputs are removed by jit."""
    h = embed_residual(c, params["embed"][tokens])
    caches, aux = [], []
    for layer, lp in enumerate(params["layers"]):
        attend = functools.partial(attention_sequence, lp["attn"], c, layer, lengths=lengths, max_len=max_len,
                                   impl=impl)
        h, x_in, a = block(lp, c, h, attend, tokens)
        caches.append(a.pop("cache"))
        aux.append({"hidden": x_in, **a})
    return lm_logits(params, c, h), (tuple(caches) if max_len is not None else None), aux


# ---------------------------------------------------------------- decode (one token per request)
def _write_rows(buf, rows, values, mask=None):
    """buf[b, rows[b]] = values[b] (where mask[b]); rows past the buffer are dropped."""
    if mask is not None:   # a masked-off row goes past the buffer and is dropped: no read of the old row
        rows = jnp.where(mask, rows, buf.shape[1])
    return buf.at[jnp.arange(buf.shape[0]), rows].set(values.astype(buf.dtype), mode="drop")


def _entry_cells(tier, entry_ids, page_entries: int, n_cells: int):
    """Reserve cell of each entry [B] (n_cells = dropped when its page is not resident)."""
    slot = jnp.take_along_axis(tier["page_slot"], (entry_ids // page_entries)[:, None], axis=1)[:, 0]
    return jnp.where(slot >= 0, slot * page_entries + entry_ids % page_entries, n_cells)


def _cell_entries(tier, page_entries: int):
    """Entry held by every reserve cell [B, n_slots * page_entries] (-1 = empty)."""
    sp = tier["slot_page"]
    e = sp[:, :, None] * page_entries + jnp.arange(page_entries)[None, None, :]
    return jnp.where(sp[:, :, None] >= 0, e, -1).reshape(sp.shape[0], -1)


def attention_step(p, c, layer: int, lc, x, positions, tier, impl):
    """One decode step of one layer's attention. x: [B, d_model] (normed), positions: [B].

    `tier` (CSA layers under LSA, else None): {"page_slot" [B, n_pages], "slot_page" [B, n_slots],
    "cell_entry" [B, n_cells] (derived once per step by `run_step`)} maps
    pages of `page_entries` entries to reserve slots; then `comp_kv`/`index_keys` are the reserve
    (cell = slot * page_entries + offset) and the Lightning Indexer picks among resident entries only.
    Returns (out [B, d_model], new layer cache)."""
    kind, r = c.layer_kind(layer), c.compress_ratios[layer]
    inv = inv_freq_for_layer(c, layer)
    q, q_lora = project_q(p, c, x, positions, inv)
    kv = project_kv(p, c, x, positions, inv)
    lc = dict(lc)
    lc["window"] = _write_rows(lc["window"], positions % c.window, store_kv(c, kv))
    window_len = jnp.minimum(positions + 1, c.window).astype(jnp.int32)
    if kind == KIND_WINDOW:
        pool = kv_zeros(c, x.shape[0], 1)
        sel = jnp.full((x.shape[0], 1), -1, jnp.int32)
    else:
        overlap = kind == KIND_CSA
        lc["comp_state"], entry, eid, emit = compressor.decode_update(
            p["compressor"], lc["comp_state"], x, positions, r, overlap, inv, c.compress_rope_position, c.norm_eps)
        n_cells = lc["comp_kv"].shape[1]
        cell = eid if tier is None else _entry_cells(tier, eid, c.page_entries, n_cells)
        lc["comp_kv"] = _write_rows(lc["comp_kv"], cell, store_kv(c, entry), emit)
        pool = lc["comp_kv"]
        n_vis = n_visible_entries(positions, r).astype(jnp.int32)
        if kind == KIND_CSA:
            lc["index_state"], ientry, _, _ = compressor.decode_update(
                p["indexer"]["compressor"], lc["index_state"], x, positions, r, True, inv,
                c.compress_rope_position, c.norm_eps)
            lc["index_keys"] = write_index_keys(lc["index_keys"], cell, pack_entry_keys(ientry), c.page_entries,
                                                emit)
            q_i, w_i = index_query(p["indexer"], c, x, q_lora, positions, inv)
            if tier is None:  # entry-indexed cache: visible entries are a prefix
                scores = indexer_scores(q_i, w_i, lc["index_keys"], n_vis, act="none", impl=impl,
                                        page_entries=c.page_entries)
            else:
                scores = indexer_scores(q_i, w_i, lc["index_keys"], jnp.full_like(n_vis, n_cells),
                                        act="none", impl=impl, page_entries=c.page_entries)
                held = tier["cell_entry"]
                scores = jnp.where((held >= 0) & (held < n_vis[:, None]), scores, -jnp.inf)
            sel = select_topk(scores, c.index_topk, impl=c.topk_impl)
        else:
            ids = jnp.arange(pool.shape[1])
            sel = jnp.where(ids[None, :] < n_vis[:, None], ids[None, :], -1).astype(jnp.int32)
    o, _ = sparse_attention(q, pool, sel, lc["window"], window_len, p["sink"], scale=c.head_dim ** -0.5,
                            rope_dim=c.rope_dim if c.kv_fp8 else None, impl=impl)
    return output_projection(p, c, o, positions, inv), lc


def run_step(params, c, cache, tokens, impl="auto"):
    """tokens [B] at positions cache["lengths"] -> (logits [B, V] float32, new cache, hidden per layer
    [B, d_model] (the normed attention input)). With cache["tier"], CSA layers read their reserve."""
    positions = cache["lengths"]
    tier = cache.get("tier")
    if tier is not None:  # shared by every CSA layer: derive the cell -> entry map once per step
        tier = {**tier, "cell_entry": _cell_entries(tier, c.page_entries)}
    h = embed_residual(c, params["embed"][tokens])
    new_layers, hidden = [], []
    for layer, lp in enumerate(params["layers"]):
        attend = functools.partial(attention_step, lp["attn"], c, layer, cache["layers"][layer], positions=positions,
                                   tier=tier if c.layer_kind(layer) == KIND_CSA else None, impl=impl)
        h, x_in, lc = block(lp, c, h, attend, tokens)
        new_layers.append(lc)
        hidden.append(x_in)
    logits = lm_logits(params, c, h)
    # Past capacity the cache cannot hold the token: poison the logits instead of returning garbage
    # (the eager wrapper raises before this; this covers user-jitted loops).
    logits = jnp.where((positions < cache["capacity"])[:, None], logits, jnp.nan)
    new_cache = {**cache, "lengths": positions + 1, "layers": tuple(new_layers)}
    return logits, new_cache, hidden
