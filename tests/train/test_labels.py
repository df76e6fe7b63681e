"""Golden labels as the FlashMemory release builds them (SPEC §9): per-step top-p over each layer's top-k
softmax, a vote of >= min_layers layers at the same step, union over the tau window (score = max layer
count), candidates = entries visible to the query token; CSR checks."""
from __future__ import annotations

import numpy as np
import pytest

from train.labels import (
    CSR,
    default_min_layers,
    golden_labels,
    kept_picks,
    n_candidates,
    query_grid,
    step_golden,
    task_queries,
    topp_keep,
    validate_csr,
    window_union,
)


def _release_topp(values, top_p):
    """NumPy transcription of the release's top-p (deepseek_v4.py, dump_training): values sorted
    descending, all finite."""
    e = np.exp(values - values.max())
    cumsum = np.cumsum((e / e.sum()).astype(np.float32))
    mask = cumsum <= top_p
    mask[0] = True
    over = np.flatnonzero(~mask)
    if len(over):
        mask[over[0]] = True
    return mask


def _logits_for(probs):
    return np.log(np.asarray(probs, np.float64)).astype(np.float32)


@pytest.mark.parametrize("probs, top_p, kept", [
    ([0.3, 0.25, 0.2, 0.15, 0.1], 0.6, 3),    # 0.3, 0.55 <= 0.6, then the pick that crosses 0.6
    ([0.5, 0.3, 0.2], 0.6, 2),
    ([0.9, 0.05, 0.05], 0.6, 2),              # pick 0 alone crosses top_p: the release still keeps pick 1
    ([0.2, 0.15, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05], 0.6, 5),
    ([0.3, 0.25, 0.2, 0.15, 0.1], 1.0, 5),
])
def test_topp_keep_constructed(probs, top_p, kept):
    got = np.asarray(topp_keep(_logits_for(probs), top_p))
    assert got.tolist() == [True] * kept + [False] * (len(probs) - kept)


def test_topp_keep_matches_the_release_code_and_ignores_padding():
    rng = np.random.default_rng(0)
    vals = -np.sort(-rng.normal(0, 3, (300, 16)).astype(np.float32), axis=1)
    for p in (0.4, 0.6, 0.9):
        got = np.asarray(topp_keep(vals, p))
        ref = np.stack([_release_topp(v, p) for v in vals])
        np.testing.assert_array_equal(got, ref)
    # -inf = no pick (fewer visible entries than k): the softmax runs over the real picks only
    padded = np.concatenate([vals[:, :5], np.full((300, 3), -np.inf, np.float32)], axis=1)
    got = np.asarray(topp_keep(padded, 0.6))
    assert not got[:, 5:].any()
    np.testing.assert_array_equal(got[:, :5], np.stack([_release_topp(v, 0.6) for v in vals[:, :5]]))
    assert not np.asarray(topp_keep(np.full((2, 4), -np.inf, np.float32), 0.6)).any()
    ids = np.tile(np.arange(8, dtype=np.int32), (300, 1))
    kp = np.asarray(kept_picks(ids, padded, 0.6))
    np.testing.assert_array_equal(kp, np.where(got, ids, -1))
    with pytest.raises(ValueError, match="top_p"):
        topp_keep(vals, 1.5)


def test_step_golden_votes_at_the_same_step():
    # 3 layers, 3 steps. Step 0: entry 5 kept by all three, 2 by two, 9 by one.
    # Step 1: entry 7 kept by two layers. Step 2: entry 4 by layer 0 only, yet it is kept at *other* steps
    # by the other layers: it must not add up across steps.
    kept = {
        10: np.array([[5, 2, 9], [7, -1, -1], [4, -1, -1]]),
        12: np.array([[2, 5, -1], [7, 4, -1], [-1, -1, -1]]),
        20: np.array([[5, -1, -1], [-1, -1, -1], [-1, -1, -1]]),
    }
    golden, anyk = step_golden(kept, min_layers=2)
    assert golden.n_rows == 3
    assert golden.row(0)[0].tolist() == [2, 5] and golden.row(0)[1].tolist() == [2.0, 3.0]
    assert golden.row(1)[0].tolist() == [7] and golden.row(1)[1].tolist() == [2.0]
    assert golden.row(2)[0].tolist() == []
    assert anyk.row(0)[0].tolist() == [2, 5, 9] and anyk.row(1)[0].tolist() == [4, 7]
    assert step_golden(kept, min_layers=3)[0].row(0)[0].tolist() == [5]
    with pytest.raises(ValueError, match="min_layers"):
        step_golden(kept, min_layers=4)


def test_window_union_takes_max_score_and_cuts_candidates():
    rows = CSR(np.array([1, 3, 3, 8, 1], np.int32), np.array([3, 4, 6, 5, 9], np.float32),
               np.array([0, 2, 4, 5], np.int64))  # row 0: {1:3, 3:4}, row 1: {3:6, 8:5}, row 2: {1:9}
    out = window_union(rows, [0, 1, 2], [2, 3, 3], [8, 9, 1])
    assert out.row(0)[0].tolist() == [1, 3] and out.row(0)[1].tolist() == [3.0, 6.0]  # 8 is not a candidate
    assert out.row(1)[0].tolist() == [1, 3, 8] and out.row(1)[1].tolist() == [9.0, 6.0, 5.0]
    assert out.row(2)[0].tolist() == []
    with pytest.raises(ValueError, match="inside"):
        window_union(rows, [2], [4], [9])


def _release_reference(ids_by_layer, logits_by_layer, queries, tau, ratio, top_p, min_layers):
    """Labels from the SPEC §9 text, with Python sets: per step, each layer's release top-p; golden =
    kept by >= min_layers layers at that step (score = count); query s unions steps [s+1, s+1+tau) over
    the entries visible to s, each with its best count."""
    t_len = next(iter(ids_by_layer.values())).shape[0]
    per_step = []
    for u in range(t_len):
        counts = {}
        for lyr in ids_by_layer:
            ids, vals = ids_by_layer[lyr][u], logits_by_layer[lyr][u]
            real = ids >= 0
            if not real.any():
                continue
            for i in ids[real][_release_topp(vals[real], top_p)]:
                counts[int(i)] = counts.get(int(i), 0) + 1
        per_step.append({i: c for i, c in counts.items() if c >= min_layers})
    rows = []
    for s in queries:
        n = int(n_candidates(np.array([s]), ratio)[0])
        best = {}
        for u in range(s + 1, min(s + 1 + tau, t_len)):
            for i, c in per_step[u].items():
                if i < n:
                    best[i] = max(best.get(i, 0), c)
        rows.append(best)
    return rows


def _indexer_picks(rng, t_len, k, ratio, n_layers):
    """Picks like the Lightning Indexer's: at step u, the top-k (by a random logit, sorted descending) of
    the entries visible to u; -1 / -inf padding when fewer exist."""
    ids_by, logits_by = {}, {}
    for layer in range(n_layers):
        ids = np.full((t_len, k), -1, np.int32)
        lg = np.full((t_len, k), -np.inf, np.float32)
        for u in range(t_len):
            n_vis = int(n_candidates(np.array([u]), ratio)[0])
            m = min(k, n_vis)
            if m:
                cand = rng.choice(n_vis, m, replace=False)
                v = np.sort(rng.normal(0, 2, m).astype(np.float32))[::-1]
                ids[u, :m], lg[u, :m] = cand, v
        ids_by[2 * layer + 1], logits_by[2 * layer + 1] = ids, lg
    return ids_by, logits_by


@pytest.mark.parametrize("min_layers, top_p", [(1, 0.6), (2, 0.6), (3, 0.4), (2, 0.95)])
def test_golden_labels_match_the_spec_reference(min_layers, top_p):
    rng = np.random.default_rng(min_layers * 10 + int(top_p * 10))
    ratio, tau, k, t_len = 4, 8, 6, 300
    ids, logits = _indexer_picks(rng, t_len, k, ratio, n_layers=3)
    kept = {lyr: np.asarray(kept_picks(ids[lyr], logits[lyr], top_p)) for lyr in ids}
    queries = np.concatenate([query_grid(t_len, tau, ratio, min_candidates=k), [t_len - 3]])  # last: cut window
    csr, stats = golden_labels(kept, queries, tau, ratio, min_layers)
    ref = _release_reference(ids, logits, queries, tau, ratio, top_p, min_layers)
    assert csr.n_rows == len(queries)
    for q, row in enumerate(ref):
        idx, sc = csr.row(q)
        assert idx.tolist() == sorted(row), q
        assert sc.tolist() == [float(row[i]) for i in sorted(row)], q
    validate_csr(csr, n_candidates(queries, ratio), "test")
    assert stats["positives_mean"] <= stats["kept_union_mean"] <= stats["candidates_mean"]
    if min_layers > 1:
        assert stats["positives_mean"] < stats["kept_union_mean"]


def test_window_follows_the_query_token_and_the_visibility_boundary():
    ratio, tau, t_len = 4, 4, 40
    s = 19                                         # query token; window = steps 20..23
    n_vis = int(n_candidates(np.array([s]), ratio)[0])
    kept = np.full((t_len, 4), -1, np.int32)
    kept[s] = [0, -1, -1, -1]                      # the query's own step is not in its window
    kept[20] = [1, n_vis - 1, -1, -1]              # the last entry visible to s
    kept[23] = [2, n_vis, -1, -1]                  # an entry the window completes: not a candidate
    kept[24] = [3, -1, -1, -1]                     # after the window
    csr, _ = golden_labels({1: kept}, [s], tau, ratio, 1)
    assert csr.row(0)[0].tolist() == sorted({1, 2, n_vis - 1})
    with pytest.raises(ValueError, match="query tokens"):
        golden_labels({1: kept}, [t_len - 1], tau, ratio, 1)


def test_query_positions():
    # plain documents: query tokens t - 1 of the boundaries t = k * tau with the whole window inside
    g = query_grid(100, 8, 4, min_candidates=5)
    assert g.tolist() == [t - 1 for t in range(24, 93, 8)]
    assert np.all(n_candidates(g, 4) >= 5)
    # task documents: decode boundaries len(prompt) + k * tau inside the document (last window cut),
    # plus prompt boundaries len(prompt) - j * tau spread over the prompt
    assert task_queries(50, 70, 8, 4).tolist() == [49, 57, 65]
    assert task_queries(50, 53, 8, 4).tolist() == [49]   # answer shorter than tau: one cut window
    # prompt boundaries 42 (nearest) and 10 (farthest usable: the query token 1 of boundary 2 sees no entry)
    assert task_queries(50, 70, 8, 4, min_candidates=1, prompt_queries=2).tolist() == [9, 41, 49, 57, 65]
    assert task_queries(50, 70, 8, 4, min_candidates=1, prompt_queries=100).tolist() == \
        [9, 17, 25, 33, 41, 49, 57, 65]
    assert task_queries(50, 70, 8, 4, min_candidates=10, prompt_queries=100)[0] == 41  # 9..33 see < 10
    assert [default_min_layers(n) for n in (1, 2, 3, 21)] == [1, 2, 3, 3]
    with pytest.raises(ValueError, match="prompt_len"):
        task_queries(0, 70, 8, 4)


def test_validate_csr_rejects_bad_rows():
    good = CSR(np.array([0, 2, 1], np.int32), np.array([3, 4, 3], np.float32), np.array([0, 2, 3]))
    validate_csr(good, np.array([3, 2]), "f.safetensors")
    with pytest.raises(ValueError, match="f.safetensors"):
        validate_csr(CSR(good.indices, good.scores, np.array([0, 3, 2])), np.array([3, 2]), "f.safetensors")
    with pytest.raises(ValueError, match="not visible"):
        validate_csr(good, np.array([2, 2]), "f.safetensors")
