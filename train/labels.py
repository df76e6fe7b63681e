"""Golden labels for Memory Indexer training, built as the FlashMemory release builds them (SPEC §6, §9),
and their CSR container.

**Per decode step** ``u`` (the step that processes the token at position ``u``), each voting CSA layer's
Lightning Indexer picks its top-``index_topk`` entries; a softmax over those top-k logits, then
**top-p**, exactly as the release's ``deepseek_v4.py`` computes it: with ``cumsum`` the inclusive cumulative
softmax mass of the picks in descending order, keep the picks with ``cumsum <= top_p``, the first pick,
and the first pick ``j >= 1`` with ``cumsum > top_p``. Equivalently: picks 0 and 1 always (a quirk of
the release: when pick 0 alone exceeds ``top_p`` it still keeps pick 1), and pick ``j >= 2`` iff the mass
of picks ``0..j-1`` is ``<= top_p``.
An entry is **golden** for step ``u`` when at least ``min_layers`` voting layers kept it at that step; its
score is the number of layers that kept it.

**Per training sample** (query token at position ``s``, the token whose hidden state the Memory Indexer
reads): positives = the union of the golden sets of the ``tau`` steps of its window, restricted to the
sample's candidates; a positive's score is the **maximum** over the window of its per-step layer count
(the release's dataloader weights positives the same way). Candidates are the entries visible to the
query token, ``fm_jax.cache.n_visible_entries(s, ratio)`` (SPEC §9: ``c < (s + 1) // ratio``).

Which window a query takes is the caller's convention: ``train.dump`` follows the engine (query token
``s = t - 1``, the last token held at the cycle boundary ``t``; window ``[t, t + tau)``, see
``golden_labels``); ``train.pickle_import`` follows the release's dataloader (row ``s`` and the rows
``[s, s + tau)``, see ``window_union``).

Labels of all query positions of one document are stored as CSR:
``indices`` int32 [nnz] (entry ids, ascending within a row), ``scores`` float32 [nnz] (layer counts),
``pointers`` int64 [Q + 1] (row ``q`` is ``indices[pointers[q]:pointers[q + 1]]``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax.cache import n_visible_entries

DEFAULT_TOP_P = 0.6        # the release client's dump setting (its server default is 0.4)
DEFAULT_MIN_LAYERS = 3     # the release's default vote


@dataclass(frozen=True)
class CSR:
    indices: np.ndarray   # int32 [nnz]
    scores: np.ndarray    # float32 [nnz]
    pointers: np.ndarray  # int64 [Q + 1]

    @property
    def n_rows(self) -> int:
        return len(self.pointers) - 1

    def row(self, q: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.pointers[q]), int(self.pointers[q + 1])
        return self.indices[a:b], self.scores[a:b]

    def row_sizes(self) -> np.ndarray:
        return np.diff(self.pointers)


def default_min_layers(n_vote_layers: int) -> int:
    """The release's 3, or every voting layer when fewer vote (the tiny preset has 2 CSA layers)."""
    return min(DEFAULT_MIN_LAYERS, n_vote_layers)


def n_candidates(query_positions, ratio: int) -> np.ndarray:
    """Entries visible to a query token at ``query_positions`` (int [Q]) -> int64 [Q]."""
    return np.asarray(n_visible_entries(np.asarray(query_positions, np.int64), ratio), np.int64)


# ---------------------------------------------------------------------------------------------------
# per decode step: top-p per layer, vote across layers
# ---------------------------------------------------------------------------------------------------
def topp_keep(topk_logits, top_p: float) -> jax.Array:
    """Release top-p over one layer's top-k. topk_logits: float [..., k] sorted descending, -inf = no pick
    -> bool [..., k]: pick ``j`` is kept iff it is a pick and ``j < 2`` or the softmax mass of picks
    ``0..j-1`` is ``<= top_p`` (the release's rule, see the module docstring). Works under jit."""
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must lie in [0, 1], got {top_p}")
    x = jnp.asarray(topk_logits, jnp.float32)
    valid = x > -jnp.inf
    m = jnp.max(jnp.where(valid, x, -jnp.finfo(jnp.float32).max), axis=-1, keepdims=True)
    e = jnp.where(valid, jnp.exp(x - m), 0.0)
    p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    # the release keeps `cumsum <= top_p`, pick 0, and the first pick j >= 1 with `cumsum > top_p`: that is
    # picks 0 and 1 always, and j >= 2 iff the inclusive cumsum of pick j - 1 is <= top_p
    before = jnp.concatenate([jnp.zeros_like(p[..., :1]), jnp.cumsum(p, axis=-1)[..., :-1]], axis=-1)
    first_two = jnp.arange(x.shape[-1]) < 2
    return valid & (first_two | (before <= top_p))


def kept_picks(topk_ids, topk_logits, top_p: float) -> jax.Array:
    """Entry ids a layer keeps after top-p: int32 [..., k], -1 where not kept (works under jit)."""
    return jnp.where(topp_keep(topk_logits, top_p), jnp.asarray(topk_ids), -1).astype(jnp.int32)


def step_golden(kept_by_layer: Mapping[int, np.ndarray], min_layers: int) -> tuple[CSR, CSR]:
    """Per-step golden sets from the kept picks of every voting layer.

    ``kept_by_layer``: voting layer id -> int [T, k] (``kept_picks``; -1 = not kept). Returns
    ``(golden, kept_any)``: row ``u`` of ``golden`` holds the entries kept by >= ``min_layers`` layers at
    step ``u`` with their layer counts as scores; ``kept_any`` the same with ``min_layers = 1`` (the raw
    top-p union, for statistics). Rows are sorted by entry id.
    """
    if not kept_by_layer:
        raise ValueError("golden labels need the picks of at least one CSA layer")
    layers = sorted(kept_by_layer)
    if not 1 <= min_layers <= len(layers):
        raise ValueError(f"min_layers={min_layers} must lie in [1, {len(layers)}] (number of voting CSA layers)")
    kept = [np.asarray(kept_by_layer[lyr]) for lyr in layers]
    t_len = kept[0].shape[0]
    for lyr, k in zip(layers, kept):
        if k.ndim != 2 or k.shape[0] != t_len:
            raise ValueError(f"kept picks of layer {lyr} must be [T={t_len}, k], got shape {k.shape}")
    steps = np.concatenate([np.repeat(np.arange(t_len, dtype=np.int64), k.shape[1]) for k in kept])
    ids = np.concatenate([k.reshape(-1).astype(np.int64) for k in kept])
    ok = ids >= 0
    steps, ids = steps[ok], ids[ok]
    # a layer keeps an entry at most once per step, so counting (step, id) pairs counts layers
    n_ids = int(ids.max()) + 1 if len(ids) else 1
    pairs, counts = np.unique(steps * n_ids + ids, return_counts=True)
    p_step, p_id = pairs // n_ids, pairs % n_ids

    def rows(mask):
        ptr = np.zeros(t_len + 1, np.int64)
        np.cumsum(np.bincount(p_step[mask], minlength=t_len), out=ptr[1:])
        return CSR(p_id[mask].astype(np.int32), counts[mask].astype(np.float32), ptr)

    return rows(counts >= min_layers), rows(np.ones_like(counts, bool))


def window_union(rows: CSR, starts, ends, n_cand) -> CSR:
    """One sample per ``q``: the union of rows ``[starts[q], ends[q])`` of ``rows`` restricted to entries
    ``< n_cand[q]``, each with its maximum score over those rows. Rows of the result ascend by id."""
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    n_cand = np.asarray(n_cand, np.int64)
    if not (len(starts) == len(ends) == len(n_cand)):
        raise ValueError("starts, ends and n_cand must have one entry per query")
    if len(starts) and (starts.min() < 0 or ends.max() > rows.n_rows or np.any(ends < starts)):
        raise ValueError(f"query windows must lie inside the {rows.n_rows} rows")
    ptr = np.asarray(rows.pointers, np.int64)
    out_i, out_s, out_p = [], [], [0]
    for a, b, n in zip(starts, ends, n_cand):
        idx = rows.indices[ptr[a]:ptr[b]].astype(np.int64)
        sc = rows.scores[ptr[a]:ptr[b]]
        keep = idx < n
        idx, sc = idx[keep], sc[keep]
        uniq, inv = np.unique(idx, return_inverse=True)
        best = np.zeros(len(uniq), np.float32)
        np.maximum.at(best, inv, sc)
        out_i.append(uniq.astype(np.int32))
        out_s.append(best)
        out_p.append(out_p[-1] + len(uniq))
    return CSR(np.concatenate(out_i) if out_i else np.zeros(0, np.int32),
               np.concatenate(out_s) if out_s else np.zeros(0, np.float32), np.asarray(out_p, np.int64))


# ---------------------------------------------------------------------------------------------------
# query positions and the dump's labels
# ---------------------------------------------------------------------------------------------------
def query_grid(n_tokens: int, tau: int, ratio: int, min_candidates: int = 1) -> np.ndarray:
    """Query tokens of a plain document: ``s = t - 1`` for the boundaries ``t = k * tau`` (k >= 1) whose
    whole window ``[t, t + tau)`` lies inside the document and whose query sees at least
    ``min_candidates`` entries. int32 [Q]."""
    if tau <= 0 or ratio <= 0:
        raise ValueError(f"tau and ratio must be positive, got tau={tau} ratio={ratio}")
    s = np.arange(tau, n_tokens - tau + 1, tau, dtype=np.int64) - 1
    return s[n_candidates(s, ratio) >= max(1, min_candidates)].astype(np.int32)


def task_queries(prompt_len: int, n_tokens: int, tau: int, ratio: int, min_candidates: int = 1,
                 prompt_queries: int = 0) -> np.ndarray:
    """Query tokens of a task document (prompt ⧺ teacher-forced answer, ``n_tokens`` in all): the decode
    cycle boundaries ``t = prompt_len + k * tau < n_tokens`` (k >= 0, windows cut at the document's end)
    plus ``prompt_queries`` boundaries ``t = prompt_len - j * tau >= 1`` (j >= 1) inside the prompt, evenly
    spread over those available (the nearest and the farthest included). Only boundaries whose query sees
    at least ``min_candidates`` entries count. Returns the query tokens ``s = t - 1``, ascending, int32
    [Q]."""
    if tau <= 0 or ratio <= 0:
        raise ValueError(f"tau and ratio must be positive, got tau={tau} ratio={ratio}")
    if not 1 <= prompt_len <= n_tokens:
        raise ValueError(f"prompt_len={prompt_len} must lie in [1, n_tokens={n_tokens}]")
    def usable(t):  # boundaries whose query token sees enough entries
        return t[n_candidates(t - 1, ratio) >= max(1, min_candidates)]

    t = usable(np.arange(prompt_len, n_tokens, tau, dtype=np.int64))
    if prompt_queries > 0:
        inside = usable(prompt_len - tau * np.arange(1, (prompt_len - 1) // tau + 1, dtype=np.int64))
        if len(inside) > prompt_queries:
            inside = inside[np.unique(np.linspace(0, len(inside) - 1, prompt_queries).round().astype(np.int64))]
        t = np.concatenate([inside, t])
    return (np.sort(t) - 1).astype(np.int32)


def golden_labels(kept_by_layer: Mapping[int, np.ndarray], query_positions, tau: int, ratio: int,
                  min_layers: int) -> tuple[CSR, dict]:
    """The dump's CSR labels (engine convention): query token ``s`` takes the golden sets of the steps
    ``[s + 1, s + 1 + tau)`` (cut at the last step), restricted to the entries visible to ``s``.

    ``kept_by_layer``: voting layer id -> int [T, k], the top-p kept picks of every step (``kept_picks``).
    Returns ``(csr, stats)`` with stats ``{"kept_union_mean", "positives_mean", "candidates_mean"}``: the
    mean size of the raw union of every layer's top-p picks over the window vs what survives the vote, and
    the mean number of candidates.
    """
    golden, kept_any = step_golden(kept_by_layer, min_layers)
    t_len = golden.n_rows
    s = np.asarray(query_positions, np.int64)
    if s.size and (s.min() < 0 or s.max() + 1 >= t_len):
        raise ValueError(f"query tokens must lie in [0, {t_len - 1}) so that their window has a step")
    starts, ends, n_cand = s + 1, np.minimum(s + 1 + tau, t_len), n_candidates(s, ratio)
    csr = window_union(golden, starts, ends, n_cand)
    raw = window_union(kept_any, starts, ends, n_cand)

    def mean(x):
        return float(np.mean(x)) if len(x) else 0.0

    stats = {"kept_union_mean": mean(raw.row_sizes()), "positives_mean": mean(csr.row_sizes()),
             "candidates_mean": mean(n_cand)}
    return csr, stats


def validate_csr(csr: CSR, n_candidates: np.ndarray, where: str) -> None:
    """Structural checks; ``n_candidates`` int [Q] = entries visible to each query. Raises ``ValueError``
    naming ``where`` (usually the file)."""
    p = np.asarray(csr.pointers)
    q = len(n_candidates)
    if p.ndim != 1 or len(p) != q + 1:
        raise ValueError(f"{where}: label_pointers must have Q+1={q + 1} entries, got shape {p.shape}")
    if p[0] != 0 or np.any(np.diff(p) < 0) or p[-1] != len(csr.indices):
        raise ValueError(f"{where}: label_pointers must start at 0, be non-decreasing and end at "
                         f"len(label_indices)={len(csr.indices)}")
    if len(csr.scores) != len(csr.indices):
        raise ValueError(f"{where}: label_scores has {len(csr.scores)} entries, label_indices {len(csr.indices)}")
    if len(csr.indices):
        row_of = np.repeat(np.arange(q), np.diff(p))
        idx = np.asarray(csr.indices, np.int64)
        if idx.min() < 0 or np.any(idx >= np.asarray(n_candidates, np.int64)[row_of]):
            raise ValueError(f"{where}: a label index is negative or not visible to its query position")
        if not np.all(np.isfinite(csr.scores)):
            raise ValueError(f"{where}: label_scores holds non-finite values")
