"""FlashMemory doc_*.pkl import: valid array pickles convert to our shards; anything else is refused
without executing code."""
from __future__ import annotations

import os
import pickle

import ml_dtypes
import numpy as np
import pytest

from fm_jax.layers.quant import pack_index_keys
from train import data as D
from train import fit
from train.pickle_import import RefusedPickle, import_pickles, safe_load_pickle


def flashmemory_doc(rng, n_tokens=512, d=32, head_dim=16, ratio=4, tau=16, layers=(10, 12), positions=True,
                    bf16=False):
    """A dict shaped like the public FlashMemory dumps, filled with random data."""
    n = n_tokens // ratio
    pos = np.arange(tau * 4, n_tokens - tau + 1, tau)
    idx, ptr = [], [0]
    for t in pos:
        row = np.sort(rng.choice(t // ratio, size=min(5, t // ratio), replace=False))
        idx.append(row)
        ptr.append(ptr[-1] + len(row))
    doc = {"label_indices": np.concatenate(idx).astype(np.int64), "label_scores": rng.random(ptr[-1]),
           "label_pointers": np.asarray(ptr, np.int64)}
    if positions:
        doc["query_positions"] = pos
    for lyr in layers:
        h = rng.normal(size=(n_tokens, d)).astype(np.float32)
        doc[f"hidden_layer_{lyr}"] = h.astype(ml_dtypes.bfloat16) if bf16 else h
        doc[f"compk_layer_{lyr}"] = np.asarray(pack_index_keys(rng.normal(size=(n, head_dim)).astype(np.float32)))
    return doc


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    doc = flashmemory_doc(np.random.default_rng(0))
    doc["label_scores"] = _Evil(marker)  # a payload among real arrays
    path = tmp_path / "doc_000.pkl"
    with open(path, "wb") as f:
        pickle.dump(doc, f)
    with pytest.raises(RefusedPickle, match=r"doc_000\.pkl.*(system|posix)"):
        safe_load_pickle(str(path))
    with pytest.raises(RefusedPickle):
        import_pickles([str(path)], str(tmp_path / "out"), progress=False)
    assert not marker.exists()
    # a top-level payload, and builtins.eval
    for obj in (_Evil(marker), {"x": _EvalPayload()}):
        with open(path, "wb") as f:
            pickle.dump(obj, f)
        with pytest.raises(RefusedPickle, match="refused"):
            safe_load_pickle(str(path))
    assert not marker.exists()


class _EvalPayload:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("value, what", [("a string", "str"), ({"nested": np.ones(3)}, "dict"),
                                         (np.array(["a", 1], dtype=object), "object"),
                                         ([1, "x"], "non-numeric")])
def test_non_array_values_are_refused(tmp_path, value, what):
    doc = flashmemory_doc(np.random.default_rng(1))
    doc["extra"] = value
    path = tmp_path / "doc_x.pkl"
    with open(path, "wb") as f:
        pickle.dump(doc, f)
    with pytest.raises(RefusedPickle, match=f"'extra'.*{what}|{what}.*'extra'|'extra'"):
        safe_load_pickle(str(path))


def test_persistent_ids_and_truncation(tmp_path):
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage0" if isinstance(obj, np.ndarray) else None

    path = tmp_path / "doc_t.pkl"
    with open(path, "wb") as f:
        P(f).dump({"a": np.arange(3)})
    with pytest.raises(RefusedPickle, match="persistent"):
        safe_load_pickle(str(path))
    good = pickle.dumps(flashmemory_doc(np.random.default_rng(2)))
    with open(path, "wb") as f:
        f.write(good[: len(good) // 3])
    with pytest.raises(ValueError, match=r"doc_t\.pkl"):
        safe_load_pickle(str(path))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_valid_pickles_import_and_train_batches(tmp_path, protocol):
    rng = np.random.default_rng(protocol)
    paths = []
    for i in range(3):
        # document 1 carries no positions: they come from the --tau grid starting at --first-query
        doc = flashmemory_doc(rng, positions=(i != 1), bf16=(i == 2))
        p = tmp_path / f"doc_{i:03d}.pkl"
        with open(p, "wb") as f:
            pickle.dump(doc, f, protocol=protocol)
        paths.append(str(p))
    out = str(tmp_path / "imported")
    m = import_pickles(paths, out, ratio=4, tau=16, first_query=64, progress=False)
    assert m["target_layers"] == [10, 12] and m["hidden_rows"] == "positions"
    ds = D.IndexerDataset(out)
    assert ds.n_docs == 3
    ref = safe_load_pickle(paths[0])
    d0 = ds.doc(0)
    np.testing.assert_array_equal(d0.keys[12], ref["compk_layer_12"])
    np.testing.assert_array_equal(d0.labels.indices, ref["label_indices"])
    np.testing.assert_array_equal(ds.doc(1).positions, d0.positions)
    b = D.BatchStream(ds, D.SamplerConfig(batch_size=4, buckets=(64,))).batch(0)
    assert b["keys"].shape == (4, 2, 64, 20)
    # rerun skips; the scorer config for imported data (no li_init) comes from the manifest
    again = import_pickles(paths, out, ratio=4, tau=16, first_query=64, progress=False)
    assert again["totals"] == m["totals"]
    c = fit.indexer_config_for(out, m, "random", {"q_lora_rank": 16, "n_heads": 2})
    assert (c.d_model, c.head_dim, c.target_layers, c.n_heads) == (32, 16, (10, 12), 2)
