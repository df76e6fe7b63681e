"""Import of the FlashMemory release's own dumps: pickles laid out as its ``_flush_one_training_state``
writes them (``pickle.dump`` of a dict of torch tensors, one row per decode token) become our shards with
the release dataloader's window union; anything else is refused without executing code.

torch is not installed here, so the tests write torch's pickle stream themselves: a tensor reduces to
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())`` and its
storage to ``torch.storage._load_from_bytes(<torch's legacy serialisation of the storage>)``, as torch's
``Tensor.__reduce_ex__`` / ``TypedStorage.__reduce__`` / ``serialization._legacy_save`` do."""
from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import sys
import types

import ml_dtypes
import numpy as np
import pytest

from fm_jax.layers.quant import pack_index_keys
from train import data as D
from train import fit
from train.pickle_import import RefusedPickle, import_pickles, safe_load_pickle

STORAGE_NAMES = {np.dtype(np.uint8): "ByteStorage", np.dtype(np.int32): "IntStorage",
                 np.dtype(np.int64): "LongStorage", np.dtype(np.float32): "FloatStorage",
                 np.dtype(ml_dtypes.bfloat16): "BFloat16Storage"}


def _global(module, name):
    def f(*a):
        raise AssertionError("a stand-in for pickling only")
    f.__module__, f.__qualname__, f.__name__ = module, name, name
    return f


@contextlib.contextmanager
def _torch_names():
    """Importable stand-ins for the torch globals the stream names, so pickle can write references."""
    torch = types.ModuleType("torch")
    utils, storage = types.ModuleType("torch._utils"), types.ModuleType("torch.storage")
    utils._rebuild_tensor_v2 = _global("torch._utils", "_rebuild_tensor_v2")
    storage._load_from_bytes = _global("torch.storage", "_load_from_bytes")
    for name in STORAGE_NAMES.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils", "torch.storage")}
    sys.modules.update({"torch": torch, "torch._utils": utils, "torch.storage": storage})
    try:
        yield torch
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _legacy_storage_bytes(arr: np.ndarray, torch) -> bytes:
    """torch.save(typed_storage, _use_new_zipfile_serialization=False): serialization._legacy_save."""
    f = io.BytesIO()
    for head in (0x1950A86A20F9469CFC6C, 1001,
                 {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}):
        pickle.dump(head, f, protocol=2)
    marker, key = object(), "94087346112416"  # str(storage._cdata)
    p = pickle.Pickler(f, protocol=2)
    p.persistent_id = lambda obj: (("storage", getattr(torch, STORAGE_NAMES[arr.dtype]), key, "cpu", arr.size, None)
                                   if obj is marker else None)
    p.dump(marker)
    pickle.dump([key], f, protocol=2)
    f.write(np.int64(arr.size).tobytes() + np.ascontiguousarray(arr).tobytes())
    return f.getvalue()


class _RawStorage:
    """Pickles like torch's TypedStorage: ``_load_from_bytes(payload)``."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def __reduce__(self):
        return (sys.modules["torch.storage"]._load_from_bytes, (self.payload,))


class _Tensor:
    """Pickles like a contiguous CPU torch.Tensor."""

    def __init__(self, arr, torch):
        self.arr, self.torch = np.ascontiguousarray(arr), torch

    def __reduce_ex__(self, proto):
        a = self.arr
        stride = tuple(s // a.itemsize for s in a.strides)
        storage = _RawStorage(_legacy_storage_bytes(a.reshape(-1), self.torch))
        return (sys.modules["torch._utils"]._rebuild_tensor_v2,
                (storage, 0, tuple(a.shape), stride, False, collections.OrderedDict()))


def write_release_pickle(path, doc: dict, protocol=pickle.DEFAULT_PROTOCOL):
    """The release's writer: ``pickle.dump(tensors, f)`` of a dict of torch tensors (other values as is)."""
    with _torch_names() as torch, open(path, "wb") as f:
        pickle.dump({k: _Tensor(v, torch) if isinstance(v, np.ndarray) else v for k, v in doc.items()}, f,
                    protocol=protocol)


def release_doc(rng, n_prompt_blocks=40, n_decode=90, d=32, head_dim=16, layers=(10, 12), ratio=4):
    """One request as the release dumps it: decode rows after a prompt of n_prompt_blocks * ratio tokens;
    labels per decode token among every chunk visible to it (prompt and generated), sorted by layer count
    descending like ``token_golden``; some rows empty, the last three too (their windows hold no label)."""
    prompt_len = n_prompt_blocks * ratio + 2
    positions = prompt_len + np.arange(n_decode, dtype=np.int64)
    idx, sc, ptr = [], [], [0]
    for u in range(n_decode):
        n_vis = (int(positions[u]) + 1) // ratio
        m = 0 if u % 7 == 3 or u >= n_decode - 3 else int(rng.integers(1, 6))  # the last rows: nothing
        ids = rng.choice(n_vis, m, replace=False)
        if u % 11 == 0 and m:
            ids[0] = n_vis - 1                      # a generated chunk: not a prompt block
        cnt = rng.integers(3, 22, m)
        order = np.argsort(-cnt, kind="stable")
        idx += ids[order].tolist()
        sc += cnt[order].tolist()
        ptr.append(len(idx))
    doc = {}
    for lyr in layers:
        doc[f"hidden_layer_{lyr}"] = rng.normal(size=(n_decode, d)).astype(ml_dtypes.bfloat16)
        doc[f"positions_layer_{lyr}"] = positions
        doc[f"compk_layer_{lyr}"] = np.asarray(pack_index_keys(rng.normal(size=(n_prompt_blocks, head_dim))
                                                               .astype(np.float32)))
        for j in range(3):
            doc[f"logits_layer_{lyr}_token_{j}"] = rng.normal(size=n_prompt_blocks).astype(ml_dtypes.bfloat16)
            doc[f"q_layer_{lyr}_token_{j}"] = rng.normal(size=(1, 4 * head_dim)).astype(ml_dtypes.bfloat16)
            doc[f"weights_layer_{lyr}_token_{j}"] = rng.normal(size=(1, 4)).astype(ml_dtypes.bfloat16)
    doc["label_indices"] = np.asarray(idx, np.int32)
    doc["label_scores"] = np.asarray(sc, np.int32)
    doc["label_pointers"] = np.asarray(ptr, np.int32)
    return doc


def _expected_samples(doc, tau, n_blocks):
    """The release dataloader: row t's positives = union of label rows [t, t + tau) below n_blocks, each
    with its best layer count; rows without one are dropped."""
    ptr, idx, sc = doc["label_pointers"], doc["label_indices"], doc["label_scores"]
    n_decode = len(ptr) - 1
    out = []
    for t in range(n_decode):
        best = {}
        for u in range(t, min(t + tau, n_decode)):
            for i, s in zip(idx[ptr[u]:ptr[u + 1]], sc[ptr[u]:ptr[u + 1]]):
                if i < n_blocks:
                    best[int(i)] = max(best.get(int(i), 0), int(s))
        if best:
            out.append((t, best))
    return out


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_release_dumps_import_with_the_window_union(tmp_path, protocol):
    rng = np.random.default_rng(protocol)
    docs, paths = [], []
    for i in range(3):
        docs.append(release_doc(rng, n_decode=90 + 10 * i))
        paths.append(str(tmp_path / f"doc_{i:05d}.pkl"))
        write_release_pickle(paths[-1], docs[-1], protocol)
    loaded = safe_load_pickle(paths[0])
    assert sorted(loaded) == sorted(docs[0])
    for k, v in docs[0].items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        np.testing.assert_array_equal(loaded[k].view(np.uint8), v.view(np.uint8), err_msg=k)

    tau = 16
    out = str(tmp_path / "imported")
    m = import_pickles(paths, out, tau=tau, progress=False)
    assert m["target_layers"] == [10, 12] and m["hidden_rows"] == "queries" and m["candidates"] == "stored"
    assert m["label_score_max"] == 21 and m["tau"] == tau
    assert m["key_layout"] == "pages" and m["key_page_entries"] == 64
    ds = D.IndexerDataset(out)
    assert ds.n_docs == 3
    for di, doc in enumerate(docs):
        got = ds.doc(di)
        exp = _expected_samples(doc, tau, n_blocks=40)
        assert len(exp) <= len(doc["label_pointers"]) - 1 - 3  # rows whose window has no prompt label are dropped
        rows = [t for t, _ in exp]
        np.testing.assert_array_equal(got.positions, doc["positions_layer_10"][rows])
        np.testing.assert_array_equal(got.n_candidates, 40)
        for lyr in (10, 12):
            np.testing.assert_array_equal(got.hidden[lyr], doc[f"hidden_layer_{lyr}"][rows])
            np.testing.assert_array_equal(got.keys[lyr], doc[f"compk_layer_{lyr}"])
            stored, _ = D.load_shard(ds.path(di), keys=[f"compk_layer_{lyr}"])   # on disk: 64-entry pages
            np.testing.assert_array_equal(stored[f"compk_layer_{lyr}"], D.stored_keys(doc[f"compk_layer_{lyr}"], 64))
            assert stored[f"compk_layer_{lyr}"].shape == (1, 64 * 20)          # 40 entries, zero padded
        for q, (_, best) in enumerate(exp):
            ids, sc = got.labels.row(q)
            assert ids.tolist() == sorted(best)
            assert sc.tolist() == [float(best[i]) for i in sorted(best)]
    b = D.BatchStream(ds, D.SamplerConfig(batch_size=4, buckets=(64,), soft_labels=True)).batch(0)
    assert b["keys"].shape == (4, 2, 64, 20) and b["hidden"].shape == (4, 2, 32)
    assert 0 < b["labels"].max() <= 1  # layer counts / 21
    # rerun skips; other settings are refused; the scorer config comes from the manifest
    assert import_pickles(paths, out, tau=tau, progress=False)["totals"] == m["totals"]
    with pytest.raises(SystemExit, match="different settings"):
        import_pickles(paths, out, tau=64, progress=False)
    c = fit.indexer_config_for(out, m, "random", {"q_lora_rank": 16, "n_heads": 2})
    assert (c.d_model, c.head_dim, c.target_layers, c.n_heads) == (32, 16, (10, 12), 2)


def test_inconsistent_release_dumps_fail_naming_the_file(tmp_path):
    rng = np.random.default_rng(7)
    path = str(tmp_path / "doc_00000.pkl")
    for change, msg in ((lambda d: d.pop("positions_layer_12"), "positions_layer_12"),
                        (lambda d: d.update(label_pointers=d["label_pointers"][:-3]), "n_decode=87"),
                        (lambda d: d.update(positions_layer_12=d["positions_layer_12"] + 1), "differ"),
                        (lambda d: d.update(hidden_layer_10=d["hidden_layer_10"][:5]), "hidden_layer_10")):
        doc = release_doc(rng)
        change(doc)
        write_release_pickle(path, doc)
        with pytest.raises(ValueError, match=msg) as e:
            import_pickles([path], str(tmp_path / f"out{len(msg)}"), progress=False)
        assert "doc_00000.pkl" in str(e.value)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalPayload:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


class _TensorOver:
    def __init__(self, storage):
        self.storage = storage

    def __reduce_ex__(self, proto):
        return (sys.modules["torch._utils"]._rebuild_tensor_v2,
                (self.storage, 0, (1,), (1,), False, collections.OrderedDict()))


def test_malicious_pickles_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "doc_00000.pkl"
    doc = release_doc(np.random.default_rng(0))
    doc["label_scores"] = _Evil(marker)  # a payload among real tensors
    write_release_pickle(path, doc)
    with pytest.raises(RefusedPickle, match=r"doc_00000\.pkl.*(system|posix)"):
        safe_load_pickle(str(path))
    with pytest.raises(RefusedPickle):
        import_pickles([str(path)], str(tmp_path / "out"), progress=False)
    # a payload inside a tensor's storage bytes (torch.load would run it)
    evil = io.BytesIO()
    for head in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(head, evil, protocol=2)
    pickle.dump(_Evil(marker), evil, protocol=2)
    with _torch_names(), open(path, "wb") as f:
        pickle.dump({"hidden_layer_10": _TensorOver(_RawStorage(evil.getvalue()))}, f)
    with pytest.raises(RefusedPickle, match="storage references.*(system|posix)"):
        safe_load_pickle(str(path))
    # top-level payloads and builtins.eval
    for obj in (_Evil(marker), {"x": _EvalPayload()}):
        with open(path, "wb") as f:
            pickle.dump(obj, f)
        with pytest.raises(RefusedPickle, match="refused"):
            safe_load_pickle(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("value, what", [("a string", "str"), ({"nested": 1}, "dict"), ([1, "x"], "non-numeric")])
def test_non_array_values_are_refused(tmp_path, value, what):
    doc = release_doc(np.random.default_rng(1))
    doc["extra"] = value
    path = tmp_path / "doc_x.pkl"
    write_release_pickle(path, doc)
    with pytest.raises(RefusedPickle, match="'extra'"):
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
    write_release_pickle(path, release_doc(np.random.default_rng(2)))
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match=r"doc_t\.pkl"):
        safe_load_pickle(str(path))


RELEASE_FIXTURE = os.path.join(os.path.dirname(__file__), "data", "release_doc_00000.pkl")
FIXTURE_ROWS = [[(2, 5), (0, 3)], [], [(5, 4)], [(1, 3), (7, 3)], [(3, 21)], [], [(0, 4), (4, 3)], [(8, 6)], [],
                [(2, 3)], [], [(1, 9)]]


def test_a_pickle_written_by_real_torch_imports(tmp_path):
    """tests/train/data/release_doc_00000.pkl was written by torch 2.13 (CPU) with ``pickle.dump`` of a dict
    built as the release's ``_flush_one_training_state`` builds it (torch.cat of per-token bf16 rows,
    torch.tensor of Python lists, compk from a torch.cat of two column slices): 12 decode rows, d = 8,
    6 prompt blocks of 132 bytes, labels FIXTURE_ROWS (chunks 7 and 8 were generated, not prompt)."""
    a = safe_load_pickle(RELEASE_FIXTURE)
    n, d = 12, 8
    ptr = np.cumsum([0] + [len(r) for r in FIXTURE_ROWS])
    doc = {"label_indices": np.array([b for r in FIXTURE_ROWS for b, _ in r], np.int32),
           "label_scores": np.array([s for r in FIXTURE_ROWS for _, s in r], np.int32),
           "label_pointers": ptr.astype(np.int32)}
    for lyr in (10, 12):
        doc[f"hidden_layer_{lyr}"] = (np.arange(n * d, dtype=np.float32).reshape(n, d) / 16 + lyr).astype(
            ml_dtypes.bfloat16)
        doc[f"positions_layer_{lyr}"] = 29 + np.arange(n, dtype=np.int64)
        doc[f"compk_layer_{lyr}"] = ((np.arange(6 * 132) * 7 + lyr) % 256).astype(np.uint8).reshape(6, 132)
    for k, v in doc.items():
        assert a[k].dtype == v.dtype, k
        np.testing.assert_array_equal(a[k], v, err_msg=k)
    assert a["logits_layer_12_token_2"].shape == (8,) and a["logits_layer_12_token_2"].dtype.name == "bfloat16"
    for tau, rows in ((4, list(range(12))), (1, [0, 2, 3, 4, 6, 9, 11])):  # tau 1: row 7 has only chunk 8
        out = str(tmp_path / f"real{tau}")
        m = import_pickles([RELEASE_FIXTURE], out, tau=tau, progress=False)
        assert m["index_key_bytes"] == 132 and m["d_model"] == d
        got = D.IndexerDataset(out).doc(0)
        exp = _expected_samples(doc, tau, n_blocks=6)
        assert [t for t, _ in exp] == rows
        np.testing.assert_array_equal(got.positions, 29 + np.array(rows))
        np.testing.assert_array_equal(got.hidden[12], doc["hidden_layer_12"][rows])
        for q, (_, best) in enumerate(exp):
            ids, sc = got.labels.row(q)
            assert ids.tolist() == sorted(best) and sc.tolist() == [float(best[i]) for i in sorted(best)]
