"""Shard format, corruption detection, fixed-shape deterministic batches, hard negatives, prefetch, and
the evaluation metrics, on small random datasets written directly in the train.data format."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import ml_dtypes
import numpy as np
import pytest

from fm_jax import memory_indexer as mi
from fm_jax.layers.quant import pack_index_keys
from train import data as D
from train import evaluate as E
from train.labels import query_grid

LAYERS, D_MODEL, HEAD_DIM, RATIO, TAU = (1, 3), 32, 16, 4, 8


def make_dataset(root, n_docs=4, length=512, seed=0, pos_rate=0.15):
    """Random hidden states / keys and random labels, written like train.dump does."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        n = length // RATIO
        pos = query_grid(length, TAU, RATIO, min_candidates=8)
        idx, ptr = [], [0]
        for t in pos:
            nv = t // RATIO
            row = np.flatnonzero(rng.random(nv) < pos_rate).astype(np.int32)
            idx.append(row)
            ptr.append(ptr[-1] + len(row))
        ind = np.concatenate(idx)
        tensors = {"query_positions": pos, "label_indices": ind,
                   "label_scores": rng.uniform(0.5, 1.0, len(ind)).astype(np.float32),
                   "label_pointers": np.asarray(ptr, np.int64)}
        for lyr in LAYERS:
            tensors[f"hidden_layer_{lyr}"] = rng.normal(size=(length, D_MODEL)).astype(ml_dtypes.bfloat16)
            keys = rng.normal(size=(n, HEAD_DIM)).astype(np.float32)
            tensors[f"compk_layer_{lyr}"] = np.asarray(pack_index_keys(keys))
        fname = f"doc_d{i}.safetensors"
        info = D.save_shard(os.path.join(root, fname), tensors)
        docs.append({"id": f"d{i}", "file": fname, **info, "n_tokens": length, "n_entries": n,
                     "n_queries": len(pos), "n_positives": len(ind)})
    manifest = {"format": D.FORMAT, "version": D.VERSION, "target_layers": list(LAYERS), "ratio": RATIO,
                "d_model": D_MODEL, "index_key_bytes": HEAD_DIM + 4, "hidden_rows": "positions", "tau": TAU,
                "docs": docs}
    D.atomic_write_json(os.path.join(root, D.MANIFEST), manifest)
    return str(root)


@pytest.mark.parametrize("p", [5, 8])
def test_page_blocked_keys_read_as_the_rows(tmp_path, p):
    """A dataset whose keys are stored page-blocked (the dump's layout; 128 entries: P=5 pads the last
    page) gives the same documents as the row layout of older dumps; bad layout fields are refused."""
    os.makedirs(tmp_path / "rows")
    rows_root = make_dataset(tmp_path / "rows")
    m = D.read_manifest(rows_root)
    pages_root = str(tmp_path / "pages")
    os.makedirs(pages_root)
    docs = []
    for e in m["docs"]:
        t, _ = D.load_shard(os.path.join(rows_root, e["file"]))
        for lyr in LAYERS:
            t[f"compk_layer_{lyr}"] = D.stored_keys(t[f"compk_layer_{lyr}"], p)
        docs.append({**e, **D.save_shard(os.path.join(pages_root, e["file"]), t), **D.key_layout_fields(p)})
    D.atomic_write_json(os.path.join(pages_root, D.MANIFEST), {**m, **D.key_layout_fields(p), "docs": docs})
    a, b = D.IndexerDataset(rows_root), D.IndexerDataset(pages_root)
    for di in range(len(docs)):
        da, db = a.doc(di), b.doc(di)
        assert da.n_entries == db.n_entries == m["docs"][di]["n_entries"]
        for lyr in LAYERS:
            np.testing.assert_array_equal(da.keys[lyr], db.keys[lyr])
    t, _ = D.load_shard(os.path.join(pages_root, docs[0]["file"]))
    mp = D.read_manifest(pages_root)
    D.doc_from_tensors(t, mp, "d0", "here")          # the entry count comes from the manifest
    with pytest.raises(D.ShardError, match="key_page_entries"):
        D.doc_from_tensors(t, {**mp, "key_page_entries": None}, "d0", "here")
    with pytest.raises(D.ShardError, match="key_layout 'pages'"):
        D.doc_from_tensors(t, {**mp, "key_page_entries": p * 2}, "d0", "here")
    with pytest.raises(D.ShardError, match="does not fit"):
        D.doc_from_tensors(t, mp, "d0", "here", n_entries=docs[0]["n_entries"] + p)
    with pytest.raises(D.ShardError, match="key_layout 'rows'"):
        D.doc_from_tensors(t, {k: v for k, v in mp.items() if k != "key_layout"}, "d0", "here")


def small_indexer():
    return mi.IndexerConfig(d_model=D_MODEL, q_lora_rank=16, n_heads=4, head_dim=HEAD_DIM, rope_dim=8,
                            max_seq_len=4096, target_layers=LAYERS, rope_dtype="float32")


# ---------------------------------------------------------------------------------------------------
# corruption
# ---------------------------------------------------------------------------------------------------
def test_truncated_shard_fails_naming_the_file(tmp_path):
    root = make_dataset(tmp_path)
    path = os.path.join(root, "doc_d2.safetensors")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(D.ShardError, match="doc_d2.safetensors"):
        D.IndexerDataset(root)
    # even without the manifest's size / checksum, safetensors itself refuses the truncated file
    with pytest.raises(D.ShardError, match="doc_d2.safetensors"):
        D.load_shard(path)


def test_corrupted_shard_fails_naming_the_file(tmp_path):
    root = make_dataset(tmp_path)
    path = os.path.join(root, "doc_d1.safetensors")
    with open(path, "r+b") as f:  # flip bytes in the tensor data (the header stays valid)
        f.seek(os.path.getsize(path) - 100)
        f.write(bytes(b ^ 0xFF for b in f.read(8)))
    with pytest.raises(D.ShardError, match=r"doc_d1\.safetensors.*sha256"):
        D.IndexerDataset(root)
    # garbage header
    with open(path, "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(D.ShardError, match="doc_d1.safetensors"):
        D.load_shard(path)


def test_inconsistent_labels_fail_naming_the_file(tmp_path):
    root = make_dataset(tmp_path, n_docs=2)
    path = os.path.join(root, "doc_d0.safetensors")
    t, _ = D.load_shard(path)
    t["label_indices"] = t["label_indices"].copy()
    t["label_indices"][-1] = 10_000  # not complete before its query
    info = D.save_shard(path, t)
    with open(os.path.join(root, D.MANIFEST)) as f:
        m = json.load(f)
    m["docs"][0].update(info)
    D.atomic_write_json(os.path.join(root, D.MANIFEST), m)
    ds = D.IndexerDataset(root)
    with pytest.raises(D.ShardError, match="doc_d0.safetensors"):
        ds.doc(0)


# ---------------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------------
def test_batches_fixed_shapes_deterministic_and_consistent(tmp_path):
    root = make_dataset(tmp_path)
    cfg = D.SamplerConfig(batch_size=8, neg_ratio=2.0, min_neg=4, buckets=(32, 64, 128), seed=3)
    s1, s2 = D.BatchStream(D.IndexerDataset(root), cfg), D.BatchStream(D.IndexerDataset(root), cfg)
    n_epoch = len(s1)
    assert n_epoch > 2
    shapes = set()
    for step in (0, 1, n_epoch - 1, n_epoch, n_epoch + 3):  # also across the epoch boundary
        b1, b2 = s1.batch(step), s2.batch(step)
        for k in b1:
            np.testing.assert_array_equal(b1[k], b2[k])
        m = b1["keys"].shape[2]
        shapes.add(m)
        assert m in cfg.buckets
        assert b1["hidden"].shape == (8, 2, D_MODEL) and b1["keys"].shape == (8, 2, m, HEAD_DIM + 4)
        assert b1["labels"].shape == b1["mask"].shape == (8, m)
        # valid entries first; labels / keys / hidden are the sample's own
        epoch, i = s1.locate(step)
        _, ids = s1.epoch_plan(epoch).batches[i]
        for j, s in enumerate(ids):
            di, q = s1.ds.samples[s]
            doc = s1.ds.doc(int(di))
            k = b1["lengths"][j]
            assert b1["mask"][j, :k].all() and not b1["mask"][j, k:].any()
            e = b1["entry_ids"][j, :k]
            assert len(set(e.tolist())) == k and e.max() < doc.n_candidates[q]
            pos = set(doc.labels.row(q)[0].tolist())
            assert [bool(x) for x in b1["labels"][j, :k] > 0] == [x in pos for x in e]
            n_pos = len(pos)
            n_neg = k - n_pos
            assert n_neg == min(doc.n_candidates[q] - n_pos, max(4, int(np.ceil(2.0 * n_pos))))
            np.testing.assert_array_equal(b1["keys"][j, 1, :k], doc.keys[3][e])
            np.testing.assert_array_equal(b1["hidden"][j, 0], doc.hidden[1][doc.positions[q]])
    # another seed gives another order
    s3 = D.BatchStream(D.IndexerDataset(root), dataclasses.replace(cfg, seed=4))
    assert not np.array_equal(s3.batch(0)["positions"], s1.batch(0)["positions"])


def test_eval_stream_pads_with_weight_zero(tmp_path):
    root = make_dataset(tmp_path, n_docs=1)
    ds = D.IndexerDataset(root)
    st = D.BatchStream(ds, D.SamplerConfig(batch_size=7, buckets=(256,)), shuffle=False, drop_remainder=False)
    total = sum(len(ids) for _, ids in st.epoch_plan(0).batches)
    assert total == len(ds)
    last = st.batch(len(st) - 1)
    n_real = len(ds) % 7 or 7
    assert last["weight"][:n_real].all() and not last["weight"][n_real:].any()
    assert not last["mask"][n_real:].any()


def test_hard_negatives_are_mined_and_used(tmp_path):
    root = make_dataset(tmp_path, n_docs=2)
    c = small_indexer()
    params = mi.init_params(c, jax.random.PRNGKey(1))
    ds = D.IndexerDataset(root)
    path = D.mine_hard_negatives(ds, c, params, 3, str(tmp_path / "hard.safetensors"), impl="xla", progress=False)
    ds_h = D.IndexerDataset(root, hard_negatives=path)
    doc = ds_h.doc(0)
    scores = E.score_document(params, c, doc, impl="xla")
    for q in (0, 5):
        hard = ds_h.hard_row(0, q)
        pos = doc.labels.row(q)[0]
        s = scores[q, : doc.n_candidates[q]].copy()
        s[pos] = -np.inf
        assert len(hard) == 3 and not set(hard) & set(pos)
        assert np.all(s[hard] >= np.sort(s)[-3])
    st = D.BatchStream(ds_h, D.SamplerConfig(batch_size=4, n_hard=3, neg_ratio=0.0, min_neg=0, buckets=(128,)))
    b = st.batch(0)
    epoch, i = st.locate(0)
    _, ids = st.epoch_plan(epoch).batches[i]
    for j, s in enumerate(ids):
        di, q = ds_h.samples[s]
        hard = set(ds_h.hard_row(int(di), int(q)).tolist())
        e = set(b["entry_ids"][j, : b["lengths"][j]].tolist())
        assert hard <= e


@pytest.mark.parametrize("workers", [1, 3])
def test_prefetcher_order_and_errors(workers):
    rng = np.random.default_rng(workers)
    delays = rng.uniform(0, 0.004, 40)

    def slow_square(s):  # random delays: workers finish out of order, results must not
        time.sleep(delays[s])
        return s * s

    with D.Prefetcher(slow_square, range(5, 35), depth=3, workers=workers) as pf:
        assert [(s, v) for s, v in pf] == [(s, s * s) for s in range(5, 35)]

    def boom(s):
        if s == 3:
            raise RuntimeError("bad batch 3")
        return s

    with pytest.raises(RuntimeError, match="bad batch 3"), D.Prefetcher(boom, range(10), workers=workers) as pf:
        list(pf)


def test_batches_from_threads_equal_sequential(tmp_path):
    root = make_dataset(tmp_path, n_docs=3)
    cfg = D.SamplerConfig(batch_size=4, buckets=(64, 128), seed=9)
    seq = D.BatchStream(D.IndexerDataset(root, cache_docs=1), cfg)
    par = D.BatchStream(D.IndexerDataset(root, cache_docs=1), cfg)
    with D.Prefetcher(par.batch, range(12), workers=4) as pf:
        for s, b in pf:
            ref = seq.batch(s)
            for k in ref:
                np.testing.assert_array_equal(b[k], ref[k])


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------
def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = np.round(rng.random(300), 2)  # with ties
    y = rng.random(300) < 0.3
    pos, neg = s[y], s[~y]
    ref = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert E.roc_auc(s, y) == pytest.approx(ref, abs=1e-12)


def test_metric_accumulator_against_brute_force(tmp_path):
    root = make_dataset(tmp_path, n_docs=1)
    doc = D.IndexerDataset(root).doc(0)
    rng = np.random.default_rng(5)
    q, n = len(doc.positions), doc.n_entries
    scores = rng.random((q, n)).astype(np.float32)
    acc = E.MetricAccumulator(0.5, keep_grid=(0.1, 0.5, 1.0))
    acc.add(scores, doc)
    r = acc.result()
    tp = kept = npos = cand = 0
    rand = rec = 0.0
    curve = np.zeros(3)
    q_recalls, q_keeps = [], []
    for qi in range(q):
        m = int(doc.n_candidates[qi])
        pos = set(doc.labels.row(qi)[0].tolist())
        s = scores[qi, :m]
        keep = set(np.flatnonzero(s >= 0.5).tolist())
        tp += len(keep & pos)
        kept += len(keep)
        npos += len(pos)
        cand += m
        rand += len(pos) * len(keep) / m
        rec += len(pos & set(range(m - len(keep), m)))
        if pos:
            q_recalls.append(len(keep & pos) / len(pos))
        if m:
            q_keeps.append(len(keep) / m)
        for gi, rho in enumerate((0.1, 0.5, 1.0)):
            k = int(np.ceil(rho * m - 1e-9))
            top = set(np.argsort(-s, kind="stable")[:k].tolist())
            curve[gi] += len(top & pos)
    assert r["recall"] == pytest.approx(tp / npos) and r["precision"] == pytest.approx(tp / kept)
    assert r["keep_ratio"] == pytest.approx(kept / cand)
    assert r["query_recall"] == pytest.approx(np.mean(q_recalls))
    assert r["query_keep_ratio"] == pytest.approx(np.mean(q_keeps))
    assert r["baselines_at_same_keep"]["random"] == pytest.approx(rand / npos)
    assert r["baselines_at_same_keep"]["recency"] == pytest.approx(rec / npos)
    np.testing.assert_allclose(r["curve"]["indexer"], curve / npos)
    assert r["curve"]["indexer"][-1] == pytest.approx(1.0)


def test_plot_needs_matplotlib_with_a_clear_error(tmp_path, monkeypatch):
    res = {"curve": {"keep_ratio": [0.5, 1.0], "indexer": [0.7, 1.0], "recency": [0.5, 1.0],
                     "random": [0.5, 1.0]}, "keep_ratio": 0.4, "recall": 0.6, "threshold": 0.5, "auc": 0.7}
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="--no-plot"):
        E.plot_curve(res, str(tmp_path / "x.png"))


def test_metric_accumulator_chunks_and_histogram_auc(tmp_path):
    root = make_dataset(tmp_path, n_docs=2, pos_rate=0.3)
    ds = D.IndexerDataset(root)
    rng = np.random.default_rng(8)
    whole, chunked, hist = E.MetricAccumulator(), E.MetricAccumulator(), E.MetricAccumulator(max_auc_pairs=10)
    all_s, all_y = [], []
    for di in range(ds.n_docs):
        doc = ds.doc(di)
        q, n = len(doc.positions), doc.n_entries
        y = np.zeros((q, n), bool)
        y[np.repeat(np.arange(q), doc.labels.row_sizes()), doc.labels.indices] = True
        scores = (1 / (1 + np.exp(-(rng.normal(size=(q, n)) + 1.5 * y)))).astype(np.float32)  # informative
        whole.add(scores, doc)
        hist.add(scores, doc)
        for a in range(0, q, 7):
            chunked.add(scores[a:a + 7], doc, a)
        cand = np.arange(n)[None] < doc.n_candidates[:, None]
        all_s.append(scores[cand])
        all_y.append(y[cand])
    rw, rc, rh = whole.result(), chunked.result(), hist.result()
    assert json.dumps(rw["counts"]) == json.dumps(rc["counts"])
    for k in E.METRICS:
        assert rw[k] == pytest.approx(rc[k], rel=1e-12)
    for k in ("random", "recency"):
        assert rw["baselines_at_same_keep"][k] == pytest.approx(rc["baselines_at_same_keep"][k], rel=1e-12)
    for k in ("indexer", "recency", "random"):
        np.testing.assert_allclose(rw["curve"][k], rc["curve"][k], rtol=1e-12)
    exact = E.roc_auc(np.concatenate(all_s), np.concatenate(all_y))
    assert rw["auc"] == pytest.approx(exact, abs=1e-12) and 0.75 < exact < 0.95
    assert rh["auc"] == pytest.approx(exact, abs=2e-3)
    np.testing.assert_allclose(rh["curve"]["indexer"], rw["curve"]["indexer"], rtol=1e-12)


def test_tensorboard_degrades_to_a_notice(tmp_path, monkeypatch, capsys):
    from train import fit

    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert fit.open_tensorboard(str(tmp_path / "tb"), None) is None
    assert "TensorBoard scalars are off" in capsys.readouterr().err
