"""The backbone's training-time forward: next-token loss plus the Lightning Indexer's KL loss.

Same parameters, projections, compressors, hyper-connections and MoE as `fm_jax.backbone.run_sequence`
(it calls the same layer functions and `backbone.block`); only the attention core differs. Inference
gathers the picked entries per query (`pallas_kernels.sparse_attention`); training computes the same
softmax densely and masked, which is differentiable and exposes the main attention's distribution over
compressed entries, the indexer's KL target:

* window: each query attends its `window` newest raw tokens (itself included), computed in blocks of
  `window` queries against `2 * window` keys, so memory is `O(T * window)`, not `O(T^2)`;
* compressed entries (CSA / HCA): logits `[B, T, H, N]` over every entry, masked to the visible ones
  (`fm_jax.cache.n_visible_entries`) and, for CSA in the sparse stage, to the Lightning Indexer's top-k;
* the per-head sink logit joins the softmax denominator.

The Lightning Indexer is trained as DeepSeek-V3.2 / V4 train theirs: its input (the normed attention
input and the query LoRA) is detached from the main graph, and its loss is
`KL(p_attn || softmax(I))` per query, where `p_attn` is the main attention's probability on each
compressed entry summed over heads and renormalised over the candidate set (stop-gradient), and `I` the
indexer logits over the same set. Stage `"dense"` (warm-up): CSA attends every visible entry and the
KL runs over all of them. Stage `"sparse"`: CSA attends the indexer's top-`index_topk` (as at inference)
and the KL runs over the picked entries. The index keys go through the fp8 round trip of the cache with
a straight-through gradient, so the indexer trains on the keys it will read at inference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fm_jax import backbone
from fm_jax.cache import n_visible_entries
from fm_jax.config import KIND_CSA, KIND_WINDOW
from fm_jax.layers import compressor
from fm_jax.layers.attention import output_projection, project_kv, project_q
from fm_jax.layers.hadamard import hadamard
from fm_jax.layers.indexer import index_query
from fm_jax.layers.quant import fake_quantize_index_keys
from fm_jax.layers.rope import inv_freq_for_layer
from train import tasks

STAGES = ("dense", "sparse")
_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(spec: str, a, b):
    """einsum with float32 accumulation: bf16 operands stay bf16, float32 operands use full precision (on
    the GPU float32 would otherwise run as TF32)."""
    if a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32), precision=_HIGHEST)


def _window_blocks(x, window: int):
    """[B, T, ...] -> [B, nb, window, ...] zero-padded to whole blocks."""
    b, t = x.shape[:2]
    nb = -(-t // window)
    x = jnp.pad(x, [(0, 0), (0, nb * window - t)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, nb, window, *x.shape[2:])


def window_logits(q, kv, window: int, scale: float):
    """Logits of every query against its raw-token window.

    q [B, T, H, D], kv [B, T, D] -> (logits f32 [B, T, H, 2W], valid bool [T, 2W], keys [B, nb, 2W, D]):
    query `t` in block `n = t // W` sees the keys of blocks `n - 1` and `n` (key slot `k` holds position
    `(n - 1) * W + k`); valid where `0 <= t - pos < W`."""
    b, t, h, _ = q.shape
    qb = _window_blocks(q, window)                                   # [B, nb, W, H, D]
    kb = _window_blocks(kv, window)                                  # [B, nb, W, D]
    keys = jnp.concatenate([jnp.pad(kb, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1], kb], axis=2)
    logits = _dot("bnqhd,bnkd->bnqhk", qb, keys) * scale             # [B, nb, W, H, 2W]
    logits = logits.reshape(b, -1, h, 2 * window)[:, :t]
    tq = jnp.arange(t)[:, None]
    pos = (tq // window - 1) * window + jnp.arange(2 * window)[None, :]
    valid = (pos >= 0) & (tq - pos >= 0) & (tq - pos < window)
    return logits, valid, keys


def _window_values(p_w, keys, t: int):
    """p_w [B, T, H, 2W] x keys [B, nb, 2W, D] -> [B, T, H, D] f32."""
    window = keys.shape[2] // 2
    pb = _window_blocks(p_w, window)                                 # [B, nb, W, H, 2W]
    out = _dot("bnqhk,bnkd->bnqhd", pb.astype(keys.dtype), keys)
    return out.reshape(out.shape[0], -1, *out.shape[3:])[:, :t]


def indexer_logits(p, c, x, q_lora, positions, inv, ratio: int):
    """Lightning Indexer logits of a whole sequence, differentiable in the indexer's parameters.

    x [B, T, d_model], q_lora [B, T, q_lora_rank] (both already detached by the caller) ->
    float32 [B, T, N] with N = T // ratio (not yet masked)."""
    keys = compressor.compress_sequence(p["compressor"], x, ratio, True, inv, c.compress_rope_position, c.norm_eps)
    keys = hadamard(keys)
    keys = keys + jax.lax.stop_gradient(fake_quantize_index_keys(keys) - keys)  # fp8 cache values, STE grad
    q_i, w_i = index_query(p, c, x, q_lora, positions, inv)          # [B, T, HI, Di], [B, T, HI]
    s = jax.nn.relu(_dot("bthd,bnd->bthn", q_i, keys))
    return jnp.einsum("bthn,bth->btn", s, w_i)


def topk_mask(scores, valid, k: int):
    """bool [B, T, N]: the top-`k` of `scores` among `valid` entries per query (all valid ones when fewer),
    ties to the lower index exactly as `lax.top_k` (inference's `select_topk`) breaks them: relu makes
    exact ties (zero scores) common."""
    b, t, n = scores.shape
    k = min(k, n)
    idx = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), k)[1]
    picked = jnp.zeros((b, t, n), bool).at[jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None], idx].set(True)
    return valid & picked


def indexer_kl(attn_probs, index_logits, candidates):
    """Mean over queries with at least one candidate of KL(p_attn || softmax(I)) over `candidates`.

    attn_probs f32 [B, T, H, N] (the main attention's probabilities on the entries), index_logits
    [B, T, N], candidates bool [B, T, N]. The target is summed over heads, renormalised over the
    candidates and stop-gradient."""
    a = jnp.where(candidates, jnp.sum(attn_probs, axis=2), 0.0)
    total = jnp.sum(a, axis=-1, keepdims=True)
    has = jnp.any(candidates, axis=-1)
    target = jax.lax.stop_gradient(a / jnp.where(total > 0, total, 1.0))
    logq = jax.nn.log_softmax(jnp.where(candidates, index_logits, -jnp.inf), axis=-1)
    logq = jnp.where(candidates, logq, 0.0)
    logt = jnp.log(jnp.where(target > 0, target, 1.0))
    kl = jnp.sum(jnp.where(target > 0, target * (logt - logq), 0.0), axis=-1)
    return jnp.sum(jnp.where(has, kl, 0.0)) / jnp.maximum(jnp.sum(has), 1)


def _sparse_flag(stage):
    """'dense' -> False, 'sparse' -> True; a traced bool (True = sparse) passes through, so one compiled
    step serves both stages."""
    if isinstance(stage, str):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        return stage == "sparse"
    return jnp.asarray(stage, bool)


def attention_train(p, c, layer: int, x, stage):
    """One layer's causal attention over a sequence for training. x [B, T, d_model] (normed); `stage`
    'dense' | 'sparse' or a traced bool (True = sparse).

    Returns (out [B, T, d_model], aux) with aux["kl"] the indexer KL (CSA layers) and aux["n_attended"]
    the mean number of compressed entries a query attends (compressed layers)."""
    sparse = _sparse_flag(stage)
    b, t, _ = x.shape
    kind, r = c.layer_kind(layer), c.compress_ratios[layer]
    inv = inv_freq_for_layer(c, layer)
    positions = jnp.arange(t)
    scale = c.head_dim ** -0.5
    q, q_lora = project_q(p, c, x, positions, inv)
    kv = project_kv(p, c, x, positions, inv)
    lw, valid_w, wkeys = window_logits(q, kv, c.window, scale)
    parts, aux = [jnp.where(valid_w[None, :, None, :], lw, -jnp.inf)], {}
    n = 0 if kind == KIND_WINDOW else t // r
    if n:
        pool = compressor.compress_sequence(p["compressor"], x, r, kind == KIND_CSA, inv, c.compress_rope_position,
                                            c.norm_eps).astype(kv.dtype)
        vis = (jnp.arange(n)[None, :] < n_visible_entries(positions, r)[:, None])[None]  # [1, T, N]
        attended = jnp.broadcast_to(vis, (b, t, n))
        if kind == KIND_CSA:
            ilog = indexer_logits(p["indexer"], c, jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_lora),
                                  positions, inv, r)
            if sparse is True:
                attended = topk_mask(jax.lax.stop_gradient(ilog), attended, c.index_topk)
            elif sparse is not False:  # traced: a cond, so the dense stage does not pay for the top-k
                attended = jax.lax.cond(sparse, lambda a: topk_mask(jax.lax.stop_gradient(ilog), a, c.index_topk),
                                        lambda a: a, attended)
        lc = _dot("bthd,bnd->bthn", q, pool) * scale
        parts.append(jnp.where(attended[:, :, None, :], lc, -jnp.inf))
        aux["n_attended"] = jnp.mean(jnp.sum(attended, axis=-1).astype(jnp.float32))
    sink = jnp.broadcast_to(p["sink"].astype(jnp.float32)[None, None, :, None], (b, t, c.n_heads, 1))
    probs = jax.nn.softmax(jnp.concatenate([*parts, sink], axis=-1), axis=-1)
    o = _window_values(probs[..., :2 * c.window], wkeys, t)
    if n:
        pc = probs[..., 2 * c.window:2 * c.window + n]
        o = o + _dot("bthn,bnd->bthd", pc.astype(pool.dtype), pool)
        if kind == KIND_CSA:
            aux["kl"] = indexer_kl(pc, ilog, attended)
    return output_projection(p, c, o, positions, inv), aux


def forward_train(params, c, tokens, stage, remat: bool = True):
    """tokens int [B, T] -> (logits f32 [B, T, V], per-layer aux dicts (see `attention_train`)).
    `stage`: 'dense' | 'sparse' | a traced bool (True = sparse)."""
    _sparse_flag(stage)
    h = backbone.embed_residual(c, params["embed"][tokens])
    auxes = []
    for layer, lp in enumerate(params["layers"]):
        def layer_fn(lp, h, layer=layer):
            attend = functools.partial(attention_train, lp["attn"], c, layer, stage=stage)
            h, _, aux = backbone.block(lp, c, h, attend, tokens)
            return h, aux
        if remat:
            layer_fn = jax.checkpoint(layer_fn)
        h, aux = layer_fn(lp, h)
        auxes.append(aux)
    return backbone.lm_logits(params, c, h), auxes


def next_token_nll(logits, tokens):
    """[B, T - 1]: -log p(tokens[i + 1]) at position i."""
    lg, tgt = logits[:, :-1], tokens[:, 1:]
    return -jnp.take_along_axis(jax.nn.log_softmax(lg, axis=-1), tgt[..., None], axis=-1)[..., 0]


def lm_loss(logits, tokens, loss_mask, nll=None):
    """Masked next-token cross-entropy: position i predicts tokens[i + 1] where loss_mask[i].
    Returns (mean loss, accuracy of the argmax on the masked positions, that accuracy per row [B]).
    `nll`: `next_token_nll(logits, tokens)` when the caller has it already (the prompt loss shares it)."""
    lg, tgt, m = logits[:, :-1], tokens[:, 1:], loss_mask[:, :-1].astype(jnp.float32)
    nll = next_token_nll(logits, tokens) if nll is None else nll
    denom = jnp.maximum(jnp.sum(m), 1.0)
    hits = jnp.sum((jnp.argmax(lg, axis=-1) == tgt) * m, axis=-1)
    return jnp.sum(nll * m) / denom, jnp.sum(hits) / denom, hits / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def prompt_loss(nll, tokens, loss_mask):
    """Mean next-token cross-entropy over the prompt, from `nll = next_token_nll(logits, tokens)` [B, T - 1]:
    positions whose next token is neither supervised by `loss_mask` (the answer) nor padding. The answer
    alone gives one key -> value lookup per row; the prompt's own structure (filler words, item grammar,
    repeated keys and restated needles) is what grows the previous-token and induction heads that lookup is
    built from, as in ordinary LM pretraining."""
    m = ((loss_mask[:, :-1] == 0) & (tokens[:, 1:] != tasks.PAD)).astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def first_hit(logits, tokens, loss_mask):
    """Per row [B]: 1.0 if the argmax is right at the row's first masked position, else 0.0 (-1.0 for a row
    with no masked position). For the needle tasks that position predicts the first answer token: the
    key -> value match itself, which the mean over the answer hides (later answer tokens continue a
    value that, once chosen, is a copy)."""
    m = loss_mask[:, :-1] > 0
    first = jnp.argmax(m, axis=-1)                                              # first True (0 if none)
    # one row of logits per example: the argmax over the vocabulary at that position only
    pred = jnp.argmax(jnp.take_along_axis(logits, first[:, None, None], axis=1)[:, 0], axis=-1)
    hit = (pred == jnp.take_along_axis(tokens, first[:, None] + 1, axis=1)[:, 0]).astype(jnp.float32)
    return jnp.where(jnp.any(m, axis=-1), hit, -1.0)
