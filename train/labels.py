"""Golden labels for Memory Indexer training (SPEC §6) and their CSR container.

For a query position ``t`` on the ``tau`` grid, the candidates are the compressed entries complete
before ``t`` (entry ``i`` with ``(i + 1) * r <= t``, i.e. ``i < t // r``). An entry is a *positive* when
the backbone's native Lightning Indexer puts it in its top-k at some step of the lookahead window
``[t, t + tau - 1]`` in at least ``min_layers`` of the voting CSA layers (cross-layer majority voting).
Its label score is the fraction of voting layers that picked it (``votes / n_vote_layers``).

Labels of all query positions of one document are stored as CSR:
``indices`` int32 [nnz] (entry ids, ascending within a row), ``scores`` float32 [nnz],
``pointers`` int64 [Q + 1] (row ``q`` is ``indices[pointers[q]:pointers[q + 1]]``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


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
    """A strict majority of the voting layers (1 of 1, 2 of 2, 3 of 4, 11 of 21)."""
    return n_vote_layers // 2 + 1


def query_grid(n_tokens: int, tau: int, ratio: int, min_candidates: int = 1) -> np.ndarray:
    """Query positions ``t = k * tau`` (k >= 1) whose whole window ``[t, t + tau - 1]`` lies inside the
    document and that have at least ``min_candidates`` complete entries (``t // ratio``). int32 [Q]."""
    if tau <= 0 or ratio <= 0:
        raise ValueError(f"tau and ratio must be positive, got tau={tau} ratio={ratio}")
    t = np.arange(tau, n_tokens - tau + 1, tau, dtype=np.int64)
    t = t[t // ratio >= max(1, min_candidates)]
    return t.astype(np.int32)


def golden_labels(topk_by_layer: Mapping[int, np.ndarray], positions: np.ndarray, tau: int, ratio: int,
                  min_layers: int) -> tuple[CSR, dict]:
    """CSR labels for ``positions`` from the Lightning Indexer's picks.

    ``topk_by_layer``: voting layer id -> int [T, k] (entry ids picked at every step, -1 = none).
    Returns ``(csr, stats)`` with stats ``{"union_mean", "positives_mean", "candidates_mean"}`` (the raw
    union of all layers' picks over the window vs what survives the vote).
    """
    if not topk_by_layer:
        raise ValueError("golden_labels needs the picks of at least one CSA layer")
    layers = sorted(topk_by_layer)
    n_vote = len(layers)
    if not 1 <= min_layers <= n_vote:
        raise ValueError(f"min_layers={min_layers} must lie in [1, {n_vote}] (number of voting CSA layers)")
    topks = [np.asarray(topk_by_layer[lyr]) for lyr in layers]
    t_len = topks[0].shape[0]
    for lyr, tk in zip(layers, topks):
        if tk.ndim != 2 or tk.shape[0] != t_len:
            raise ValueError(f"picks of layer {lyr} must be [T={t_len}, k], got shape {tk.shape}")
    positions = np.asarray(positions, np.int64)
    if positions.size and (positions.min() < 0 or positions.max() + tau > t_len):
        raise ValueError(f"query windows [t, t+tau) must lie inside the {t_len} dumped steps")
    indices, scores, pointers = [], [], [0]
    unions, n_pos, n_cand = [], [], []
    for t in positions:
        n_vis = int(t) // ratio
        votes = np.zeros(n_vis, np.int32)
        union = np.zeros(n_vis, bool)
        for tk in topks:
            ids = tk[t:t + tau].ravel()
            ids = ids[(ids >= 0) & (ids < n_vis)]
            picked = np.zeros(n_vis, bool)
            picked[ids] = True
            votes += picked
            union |= picked
        pos = np.flatnonzero(votes >= min_layers).astype(np.int32)
        indices.append(pos)
        scores.append((votes[pos] / n_vote).astype(np.float32))
        pointers.append(pointers[-1] + len(pos))
        unions.append(int(union.sum()))
        n_pos.append(len(pos))
        n_cand.append(n_vis)
    csr = CSR(np.concatenate(indices).astype(np.int32) if indices else np.zeros(0, np.int32),
              np.concatenate(scores).astype(np.float32) if scores else np.zeros(0, np.float32),
              np.asarray(pointers, np.int64))
    stats = {"union_mean": float(np.mean(unions)) if unions else 0.0,
             "positives_mean": float(np.mean(n_pos)) if n_pos else 0.0,
             "candidates_mean": float(np.mean(n_cand)) if n_cand else 0.0}
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
            raise ValueError(f"{where}: a label index is negative or not complete before its query position")
        if not np.all(np.isfinite(csr.scores)):
            raise ValueError(f"{where}: label_scores holds non-finite values")
