"""Plain ``jax.numpy`` versions of the LSA hot loops (scoring, top-k, attention), plus the input checks shared
by every impl.

Two functions per op:

* ``*_reference``: the definition, written for clarity (float32, ``Precision.HIGHEST``, keys dequantised with
  :func:`fm_jax.layers.quant.dequantize_index_keys`). Tests compare every other impl against it.
* ``*_xla``: the XLA path the dispatch runs off-GPU (and the baseline the GPU benchmark compares with). Same
  function, written the way a JAX user would write it for speed: operands in bfloat16 where that is exact
  (fp8 and bf16 values are exact in bf16; a float32 query is split into two bf16 parts), float32 accumulation,
  the fp8 per-entry scale factored out of the relu (``relu(q . (s k)) = s relu(q . k)`` for ``s >= 0``).
  It materialises the ``[B, M, H, N]`` head scores in HBM; the Pallas kernel does not.

Shapes and semantics (SPEC sections 2-4):

``indexer_scores(q, weights, keys, lengths, act)``
    ``q [B, H, D]`` or ``[B, M, H, D]``; ``weights [B, H]`` / ``[B, M, H]``; ``keys`` uint8 ``[B, N, D + 4]``
    (fp8 e4m3 + float32 scale) or bf16/f32 ``[B, N, D]``, or with ``page_entries=P`` the page-blocked
    layout uint8 ``[B, n_pages, P * (D + 4)]`` (``fm_jax.layers.key_pages``; N = n_pages * P);
    ``lengths [B]`` (or ``[B, M]`` for multi-query).
    ``logit[s] = sum_h w[h] relu(q[h] . k[s])`` for ``s < length``; ``act="none"``: masked -> ``-inf``;
    ``act="sigmoid"``: ``sigmoid(logit)``, masked -> ``0``. Returns float32 ``[B, N]`` / ``[B, M, N]``.

``sparse_attention(q, kv, indices, window_kv, window_lengths, sink, scale, rope_dim=None)``
    One shared KV head (keys == values). ``kv [B, N, D]`` and ``window_kv [B, W, D]`` are bf16/f32, or either
    is V4's packed fp8 rows (uint8 ``[B, N | W, E]``, ``E = kv_fp8.entry_bytes(D, rope_dim)``, 584 for
    512 / 64; needs ``rope_dim``): the attended rows are dequantised (exact in bf16) after the gather.
    Attended set = window slots ``[0, window_lengths[b])`` plus
    ``kv[b, indices[b, j]]`` for every ``j`` with ``0 <= indices[b, j] < N`` (``-1`` = padding; duplicates count
    once per occurrence). ``lse = log(exp(sink) + sum_j exp(l_j))``, ``out = sum_j exp(l_j - lse) v_j``; a row with
    nothing valid gives ``out = 0`` and ``lse = sink``.

``topk(scores, k)``
    ``scores [..., N]`` float (no NaN; non-candidates are ``-inf``). The ``min(k, N)`` largest of each row:
    (values ``[..., k]`` descending, indices int32 ``[..., k]``), equal values in index order, ties at the k-th
    place kept by the lowest index, ``-0.0`` below ``+0.0`` (IEEE total order): exactly ``jax.lax.top_k``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fm_jax.layers import key_pages, kv_fp8
from fm_jax.layers.quant import unpack_index_keys

HIGHEST = jax.lax.Precision.HIGHEST
ACTS = ("none", "sigmoid")


# ----------------------------------------------------------------------------------------------------------
# input checks (shared by the reference, the XLA path and the Pallas wrappers)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class IndexerShapes:
    batch: int
    n_queries: int          # M (1 for the single-query form)
    heads: int
    dim: int
    n_entries: int          # N
    multi: bool             # q was [B, M, H, D]
    packed: bool            # keys are the uint8 fp8+scale layout
    page_entries: int | None = None   # packed keys are page-blocked [B, n_pages, P * (D + 4)]


def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def check_indexer_inputs(q, weights, keys, lengths, act: str = "none", page_entries: int | None = None
                         ) -> IndexerShapes:
    """Validates the ``indexer_scores`` arguments; raises ``ValueError`` with the offending shape/dtype.
    ``page_entries``: the keys are page-blocked (``fm_jax.layers.key_pages``), N = n_pages * page_entries."""
    if act not in ACTS:
        raise ValueError(f"indexer_scores: act must be one of {ACTS}, got {act!r}")
    for name, x in (("q", q), ("weights", weights), ("keys", keys), ("lengths", lengths)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"indexer_scores: {name} must be an array, got {type(x).__name__}")
    if q.ndim not in (3, 4):
        raise ValueError(f"indexer_scores: q must be [B, H, D] or [B, M, H, D], got shape {_shape(q)}")
    if not _is_float(q):
        raise ValueError(f"indexer_scores: q must be a float array, got {q.dtype}")
    multi = q.ndim == 4
    if multi:
        b, m, h, d = q.shape
    else:
        (b, h, d), m = q.shape, 1
    want_w = (b, m, h) if multi else (b, h)
    if _shape(weights) != want_w or not _is_float(weights):
        raise ValueError(f"indexer_scores: weights must be float {list(want_w)} for q {list(q.shape)}, "
                         f"got {weights.dtype} {list(_shape(weights))}")
    if keys.ndim != 3 or keys.shape[0] != b:
        raise ValueError(f"indexer_scores: keys must be [B={b}, N, D(+4)], got shape {_shape(keys)}")
    packed = keys.dtype == jnp.uint8
    n = keys.shape[1]
    if page_entries is not None:
        try:
            key_pages.check_index_pages("indexer_scores", keys, page_entries, d)
        except ValueError as err:
            raise ValueError(f"{err} (keys [B, n_pages, page_entries * (D + 4)] since page_entries was given)"
                             ) from None
        n = keys.shape[1] * page_entries
    elif packed:
        if keys.shape[2] != d + 4:
            raise ValueError(f"indexer_scores: packed uint8 keys must be [B, N, D+4={d + 4}] "
                             f"(fp8 e4m3 bytes + float32 scale) for D={d}, got shape {_shape(keys)}")
    elif keys.dtype in (jnp.bfloat16, jnp.float32):
        if keys.shape[2] != d:
            raise ValueError(f"indexer_scores: {keys.dtype} keys must be [B, N, D={d}], got shape {_shape(keys)}")
    else:
        raise ValueError(f"indexer_scores: keys must be uint8 (packed fp8), bfloat16 or float32, got {keys.dtype}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"indexer_scores: lengths must be an integer array, got {lengths.dtype}")
    ok_len = [(b,)] + ([(b, m)] if multi else [])
    if _shape(lengths) not in ok_len:
        raise ValueError(f"indexer_scores: lengths must have shape {' or '.join(str(list(s)) for s in ok_len)}, "
                         f"got {list(_shape(lengths))}")
    return IndexerShapes(b, m, h, d, n, multi, packed, page_entries)


def check_topk_inputs(scores, k) -> int:
    """Validates the ``topk`` arguments; returns the k used, ``min(k, N)``."""
    if not hasattr(scores, "shape") or not hasattr(scores, "dtype"):
        raise ValueError(f"topk: scores must be an array, got {type(scores).__name__}")
    if scores.ndim < 1 or not _is_float(scores):
        raise ValueError(f"topk: scores must be a float array [..., N], got {scores.dtype} {list(_shape(scores))}")
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"topk: k must be a static non-negative int, got {k!r}")
    return min(k, scores.shape[-1])


@dataclasses.dataclass(frozen=True)
class AttentionShapes:
    batch: int
    heads: int
    dim: int
    n_entries: int   # N (kv pool)
    topk: int        # K
    window: int      # W
    kv_packed: bool = False       # kv holds packed fp8 rows
    window_packed: bool = False   # window_kv holds packed fp8 rows
    rope_dim: int | None = None   # of the packed rows


def _check_kv_rows(name, x, b, d, rope_dim) -> bool:
    """True when x is packed fp8 rows; ValueError unless x is bf16/f32 [B, ., D] or uint8 [B, ., E]."""
    if x.dtype == jnp.uint8:
        if rope_dim is None:
            raise ValueError(f"sparse_attention: {name} is uint8 (packed fp8 KV) but rope_dim was not given")
        try:
            e = kv_fp8.entry_bytes(d, rope_dim)
        except ValueError as err:
            raise ValueError(f"sparse_attention: {err}") from None
        if x.ndim != 3 or x.shape[0] != b or x.shape[2] != e:
            raise ValueError(f"sparse_attention: packed {name} must be uint8 [B={b}, ., E={e}] for D={d}, "
                             f"rope_dim={rope_dim}, got {list(_shape(x))}")
        return True
    if x.ndim != 3 or x.shape[0] != b or x.shape[2] != d or x.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"sparse_attention: {name} must be bfloat16/float32 [B={b}, ., D={d}] or packed fp8 "
                         f"uint8 rows, got {x.dtype} {list(_shape(x))}")
    return False


def check_attention_inputs(q, kv, indices, window_kv, window_lengths, sink, rope_dim=None) -> AttentionShapes:
    """Validates the ``sparse_attention`` arguments; raises ``ValueError`` with the offending shape/dtype."""
    for name, x in (("q", q), ("kv", kv), ("indices", indices), ("window_kv", window_kv),
                    ("window_lengths", window_lengths), ("sink", sink)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"sparse_attention: {name} must be an array, got {type(x).__name__}")
    if q.ndim != 3 or not _is_float(q):
        raise ValueError(f"sparse_attention: q must be a float [B, H, D] array, got {q.dtype} {list(_shape(q))}")
    b, h, d = q.shape
    kv_packed = _check_kv_rows("kv", kv, b, d, rope_dim)
    if (indices.ndim != 2 or indices.shape[0] != b or not jnp.issubdtype(indices.dtype, jnp.integer)):
        raise ValueError(f"sparse_attention: indices must be an integer [B={b}, K] array, "
                         f"got {indices.dtype} {list(_shape(indices))}")
    window_packed = _check_kv_rows("window_kv", window_kv, b, d, rope_dim)
    if _shape(window_lengths) != (b,) or not jnp.issubdtype(window_lengths.dtype, jnp.integer):
        raise ValueError(f"sparse_attention: window_lengths must be an integer [B={b}] array, "
                         f"got {window_lengths.dtype} {list(_shape(window_lengths))}")
    if _shape(sink) != (h,) or not _is_float(sink):
        raise ValueError(f"sparse_attention: sink must be a float [H={h}] array, got {sink.dtype} {list(_shape(sink))}")
    return AttentionShapes(b, h, d, kv.shape[1], indices.shape[1], window_kv.shape[1], kv_packed, window_packed,
                           rope_dim if kv_packed or window_packed else None)


def _valid_entries(lengths, info: IndexerShapes):
    lens = lengths.astype(jnp.int32)
    lens = lens[:, None] if lens.ndim == 1 else lens                      # [B, 1] or [B, M]
    return jnp.arange(info.n_entries, dtype=jnp.int32)[None, None, :] < lens[:, :, None]   # [B, M|1, N]


def _finish_scores(logit, valid, act: str, info: IndexerShapes):
    if act == "sigmoid":
        out = jnp.where(valid, jax.nn.sigmoid(logit), 0.0)
    else:
        out = jnp.where(valid, logit, -jnp.inf)
    out = out.astype(jnp.float32)
    return out if info.multi else out[:, 0]


# ----------------------------------------------------------------------------------------------------------
# indexer scores
# ----------------------------------------------------------------------------------------------------------
def _fp8_keys(keys, info: IndexerShapes):
    """Packed keys (rows or page-blocked) -> (fp8 [B, N, D], scale float32 [B, N])."""
    if info.page_entries is not None:
        return key_pages.split_index_pages(keys, info.page_entries, info.dim)
    return unpack_index_keys(keys)


def indexer_scores_reference(q, weights, keys, lengths, *, act: str = "none", page_entries: int | None = None):
    """The definition, in float32 with HIGHEST precision. See the module docstring for shapes."""
    info = check_indexer_inputs(q, weights, keys, lengths, act, page_entries)
    if info.packed:
        fp8, scale = _fp8_keys(keys, info)
        k = fp8.astype(jnp.float32) * scale[..., None]                                  # [B, N, D]
    else:
        k = keys.astype(jnp.float32)
    q4 = (q if info.multi else q[:, None]).astype(jnp.float32)                          # [B, M, H, D]
    w3 = (weights if info.multi else weights[:, None]).astype(jnp.float32)              # [B, M, H]
    s = jnp.einsum("bmhd,bnd->bmhn", q4, k, precision=HIGHEST)
    logit = jnp.einsum("bmh,bmhn->bmn", w3, jax.nn.relu(s), precision=HIGHEST)
    return _finish_scores(logit, _valid_entries(lengths, info), act, info)


def split_bf16(x):
    """float32 -> (hi, lo) bfloat16 with x ~= hi + lo to 2^-18 relative (as the Pallas kernels split).

    ``hi`` is rounded to nearest-even with integer ops rather than a float32 -> bf16 -> float32 round trip,
    which XLA:GPU may drop (``xla_allow_excess_precision``), silently leaving ``lo = 0``.
    """
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
    hi32 = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return hi32.astype(jnp.bfloat16), (x - hi32).astype(jnp.bfloat16)


def indexer_scores_xla(q, weights, keys, lengths, *, act: str = "none", page_entries: int | None = None):
    """The XLA path (plain jnp, tensor-core friendly). Same function as the reference."""
    info = check_indexer_inputs(q, weights, keys, lengths, act, page_entries)
    q4 = q if info.multi else q[:, None]
    w3 = (weights if info.multi else weights[:, None]).astype(jnp.float32)
    scale = None
    if info.packed:
        fp8, scale = _fp8_keys(keys, info)
        k = fp8.astype(jnp.bfloat16)            # exact: e4m3 values are bf16 values
    else:
        k = keys

    def dot(a, b):
        return jnp.einsum("bmhd,bnd->bmhn", a, b, preferred_element_type=jnp.float32)

    if k.dtype == jnp.float32:
        s = jnp.einsum("bmhd,bnd->bmhn", q4.astype(jnp.float32), k, precision=HIGHEST)
    elif q4.dtype == jnp.bfloat16:
        s = dot(q4, k)
    else:
        hi, lo = split_bf16(q4)
        s = dot(hi, k) + dot(lo, k)
    logit = jnp.sum(w3[..., None] * jax.nn.relu(s), axis=2)                            # [B, M, N]
    if scale is not None:
        logit = logit * scale[:, None, :]
    return _finish_scores(logit, _valid_entries(lengths, info), act, info)


# ----------------------------------------------------------------------------------------------------------
# sparse attention
# ----------------------------------------------------------------------------------------------------------
def _attended(kv, indices, window_kv, window_lengths, info: AttentionShapes, packed_dtype=jnp.bfloat16):
    """-> (entries [B, W + K, D], valid [B, W + K]): in the promoted kv dtype, packed rows dequantised to
    `packed_dtype` after the gather (only attended rows are ever dequantised)."""
    idx = indices.astype(jnp.int32)
    valid_g = (idx >= 0) & (idx < info.n_entries)
    g = jnp.take_along_axis(kv, jnp.clip(idx, 0, info.n_entries - 1)[:, :, None], axis=1)
    valid_w = jnp.arange(info.window, dtype=jnp.int32)[None, :] < window_lengths.astype(jnp.int32)[:, None]
    rows = lambda x, packed: kv_fp8.unpack(x, info.dim, info.rope_dim, packed_dtype) if packed else x
    g, win = rows(g, info.kv_packed), rows(window_kv, info.window_packed)
    dt = jnp.promote_types(g.dtype, win.dtype)
    entries = jnp.concatenate([win.astype(dt), g.astype(dt)], axis=1)
    return entries, jnp.concatenate([valid_w, valid_g], axis=1)


def _softmax_with_sink(logits, valid, sink):
    """logits [B, H, J] f32, valid [B, J], sink [H] -> (p [B, H, J], lse [B, H])."""
    sink = sink.astype(jnp.float32)[None, :]
    logits = jnp.where(valid[:, None, :], logits, -jnp.inf)
    m = jnp.maximum(jnp.max(logits, axis=-1), sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(valid[:, None, :], jnp.exp(logits - m[..., None]), 0.0)
    denom = jnp.exp(sink - m) + jnp.sum(e, axis=-1)
    p = jnp.where(denom[..., None] > 0, e / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)
    return p, m + jnp.log(denom)


def sparse_attention_reference(q, kv, indices, window_kv, window_lengths, sink, *, scale, rope_dim=None):
    """The definition, in float32 with HIGHEST precision. Returns (out f32 [B, H, D], lse f32 [B, H])."""
    info = check_attention_inputs(q, kv, indices, window_kv, window_lengths, sink, rope_dim)
    entries, valid = _attended(kv, indices, window_kv, window_lengths, info, jnp.float32)
    entries = entries.astype(jnp.float32)
    logits = scale * jnp.einsum("bhd,bjd->bhj", q.astype(jnp.float32), entries, precision=HIGHEST)
    p, lse = _softmax_with_sink(logits, valid, sink)
    out = jnp.einsum("bhj,bjd->bhd", p, entries, precision=HIGHEST)
    return out.astype(jnp.float32), lse.astype(jnp.float32)


def sparse_attention_xla(q, kv, indices, window_kv, window_lengths, sink, *, scale, rope_dim=None):
    """The XLA path: gather (packed fp8 rows: then dequantise to bf16, exact), then two batched matmuls
    (bf16 operands when q and the kv are bf16)."""
    info = check_attention_inputs(q, kv, indices, window_kv, window_lengths, sink, rope_dim)
    entries, valid = _attended(kv, indices, window_kv, window_lengths, info)
    if q.dtype == jnp.bfloat16 and entries.dtype == jnp.bfloat16:
        logits = jnp.einsum("bhd,bjd->bhj", q, entries, preferred_element_type=jnp.float32)
        p, lse = _softmax_with_sink(scale * logits, valid, sink)
        out = jnp.einsum("bhj,bjd->bhd", p.astype(jnp.bfloat16), entries, preferred_element_type=jnp.float32)
    else:
        e32 = entries.astype(jnp.float32)
        logits = jnp.einsum("bhd,bjd->bhj", q.astype(jnp.float32), e32, precision=HIGHEST)
        p, lse = _softmax_with_sink(scale * logits, valid, sink)
        out = jnp.einsum("bhj,bjd->bhd", p, e32, precision=HIGHEST)
    return out.astype(jnp.float32), lse.astype(jnp.float32)


def topk_reference(scores, k: int):
    """The definition: one sort of each row by (value descending in IEEE total order, index ascending).
    Returns (values [..., k], indices int32 [..., k]), k clipped to N."""
    k = check_topk_inputs(scores, k)
    ids = jnp.broadcast_to(jnp.arange(scores.shape[-1], dtype=jnp.int32), scores.shape)
    bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
    desc = ~(bits ^ ((bits >> 31) & 0x7FFFFFFF))     # int32 key, ascending == value descending (total order)
    _, idx = jax.lax.sort((desc, ids), dimension=scores.ndim - 1, num_keys=2)
    idx = idx[..., :k]
    return jnp.take_along_axis(scores, idx, axis=-1), idx


def topk_xla(scores, k: int):
    """The XLA path: ``jax.lax.top_k`` with k clipped to N. Returns (values [..., k], indices int32 [..., k])."""
    k = check_topk_inputs(scores, k)
    vals, idx = jax.lax.top_k(scores, k)
    return vals, idx.astype(jnp.int32)
