"""Golden labels (SPEC §6): lookahead window, cross-layer voting, completeness rule, CSR checks."""
from __future__ import annotations

import numpy as np
import pytest

from train.labels import CSR, default_min_layers, golden_labels, query_grid, validate_csr


def _random_picks(rng, t_len, k, ratio, n_layers):
    """Picks like the Lightning Indexer's: at step t, k distinct ids among the t // ratio visible entries
    (-1 padding when fewer exist), plus some out-of-range ids to check the filter."""
    out = {}
    for layer in range(n_layers):
        tk = np.full((t_len, k), -1, np.int64)
        for t in range(t_len):
            n_vis = t // ratio
            m = min(k, n_vis)
            if m:
                tk[t, :m] = rng.choice(n_vis, m, replace=False)
        out[2 * layer + 1] = tk
    return out


def _naive(picks, positions, tau, ratio, min_layers):
    rows = []
    for t in positions:
        votes = {}
        for tk in picks.values():
            chosen = set()
            for s in range(t, t + tau):
                chosen |= {int(i) for i in tk[s] if 0 <= i and (i + 1) * ratio <= t}
            for i in chosen:
                votes[i] = votes.get(i, 0) + 1
        rows.append({i: v / len(picks) for i, v in votes.items() if v >= min_layers})
    return rows


@pytest.mark.parametrize("min_layers", [1, 2, 3])
def test_golden_labels_match_set_reference(min_layers):
    rng = np.random.default_rng(min_layers)
    ratio, tau, k, t_len = 4, 8, 6, 400
    picks = _random_picks(rng, t_len, k, ratio, n_layers=3)
    positions = query_grid(t_len, tau, ratio, min_candidates=k)
    csr, stats = golden_labels(picks, positions, tau, ratio, min_layers)
    ref = _naive(picks, positions, tau, ratio, min_layers)
    assert csr.n_rows == len(positions)
    for q, row in enumerate(ref):
        idx, sc = csr.row(q)
        assert list(idx) == sorted(row), q
        np.testing.assert_allclose(sc, [row[i] for i in sorted(row)])
    validate_csr(csr, positions // ratio, "test")
    assert stats["positives_mean"] <= stats["union_mean"] <= stats["candidates_mean"]


def test_entries_completing_inside_the_window_are_not_candidates():
    # every step picks the newest entries, which complete during the window: none may become a label
    ratio, tau, t_len = 4, 8, 64
    tk = np.stack([np.arange(t // ratio - 2, t // ratio + 6) for t in range(t_len)])
    csr, _ = golden_labels({1: tk}, np.array([32]), tau, ratio, 1)
    idx, _ = csr.row(0)
    assert idx.max() == 32 // ratio - 1  # entry 7 holds tokens 28..31: complete before t = 32
    assert set(idx) == {6, 7}


def test_query_grid_and_defaults():
    g = query_grid(100, 8, 4, min_candidates=5)
    assert list(g) == [24, 32, 40, 48, 56, 64, 72, 80, 88]  # window inside, >= 5 entries
    assert [default_min_layers(n) for n in (1, 2, 3, 4, 21)] == [1, 2, 2, 3, 11]
    with pytest.raises(ValueError, match="min_layers"):
        golden_labels({1: np.zeros((10, 2), np.int64) - 1}, np.array([4]), 2, 4, 2)


def test_validate_csr_rejects_bad_rows():
    good = CSR(np.array([0, 2, 1], np.int32), np.array([0.5, 1.0, 1.0], np.float32), np.array([0, 2, 3]))
    validate_csr(good, np.array([3, 2]), "f.safetensors")
    with pytest.raises(ValueError, match="f.safetensors"):
        validate_csr(CSR(good.indices, good.scores, np.array([0, 3, 2])), np.array([3, 2]), "f.safetensors")
    with pytest.raises(ValueError, match="not complete"):
        validate_csr(good, np.array([2, 2]), "f.safetensors")
