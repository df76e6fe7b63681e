"""An interrupted `train.dump` resumes without duplicating or losing documents (issue 14 item 5): a
dump killed while writing a shard, or between a shard and its sidecar, is rerun with the same command
and ends with exactly the documents, and the tensors, of an uninterrupted dump."""
from __future__ import annotations

import os

import numpy as np
import pytest

from train import data as D
from train import dump

N_DOCS = 6
ARGS = ["--preset", "tiny", "--synthetic", str(N_DOCS), "--length", "256", "--tau", "8", "--min-layers", "2",
        "--pad-multiple", "256", "--impl", "xla", "--no-progress"]


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler in dump runs on it."""


def _docs(out):
    """{doc id: (manifest entry without the file hash, tensors)} and the manifest's id list. Shards are
    compared by tensors: safetensors writes its metadata keys in a random order, so equal content
    need not give equal bytes."""
    from safetensors.numpy import load_file

    m = D.read_manifest(out)
    docs = {d["id"]: ({k: v for k, v in d.items() if k not in ("sha256", "bytes")},
                      load_file(os.path.join(out, d["file"]))) for d in m["docs"]}
    return docs, [d["id"] for d in m["docs"]]


def _assert_same(docs, reference):
    assert docs.keys() == reference.keys()
    for i, (entry, tensors) in docs.items():
        assert entry == reference[i][0]
        assert tensors.keys() == reference[i][1].keys()
        for k, v in tensors.items():
            np.testing.assert_array_equal(v.view(np.uint8), reference[i][1][k].view(np.uint8))


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    dump.main(["--out", out] + ARGS)
    return out


@pytest.fixture(scope="module")
def reference(reference_dir):
    return _docs(reference_dir)[0]


def test_keys_stored_page_blocked_and_row_dumps_still_read(reference_dir, tmp_path):
    """The dump stores keys as the decode cache's pages (manifest key_layout / key_page_entries); the reader
    hands out rows; a dump in the row layout of before (same documents) reads to the same Docs."""
    import shutil

    from safetensors.numpy import load_file

    from fm_jax import get_config
    from fm_jax.layers.key_pages import block_index_keys, unblock_index_keys

    m = D.read_manifest(reference_dir)
    p, kb = get_config("tiny").page_entries, m["index_key_bytes"]
    assert m["key_layout"] == "pages" and m["key_page_entries"] == p
    ds = D.IndexerDataset(reference_dir)
    old = str(tmp_path / "rows")
    shutil.copytree(reference_dir, old)
    docs = []
    for di, e in enumerate(m["docs"]):
        t = load_file(os.path.join(reference_dir, e["file"]))
        doc = ds.doc(di)
        for lyr in m["target_layers"]:
            k = t[f"compk_layer_{lyr}"]
            assert k.shape == (-(-e["n_entries"] // p), p * kb) and k.any()
            rows = doc.keys[lyr]
            assert rows.shape == (e["n_entries"], kb)
            np.testing.assert_array_equal(np.asarray(block_index_keys(rows, p)), k)          # exact round trip
            np.testing.assert_array_equal(unblock_index_keys(k, p, kb - 4)[:e["n_entries"]], rows)
            t[f"compk_layer_{lyr}"] = rows
        docs.append({**e, **D.save_shard(os.path.join(old, e["file"]), t)})
    m_old = {k: v for k, v in m.items() if k not in ("key_layout", "key_page_entries")}
    D.atomic_write_json(os.path.join(old, D.MANIFEST), {**m_old, "docs": docs})
    ds_old = D.IndexerDataset(old)
    for di in range(len(docs)):
        a, b = ds.doc(di), ds_old.doc(di)
        assert a.n_entries == b.n_entries
        for lyr in m["target_layers"]:
            np.testing.assert_array_equal(a.keys[lyr], b.keys[lyr])


def test_killed_while_writing_a_shard(tmp_path, monkeypatch, reference):
    out = str(tmp_path / "d")
    real, calls = D.save_shard, []

    def dies_on_the_fourth(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 4:  # half of the shard reaches the disk under its temporary name
            with open(f"{path}.tmp.{os.getpid()}", "wb") as f:
                f.write(b"\0" * 100)
            raise _Killed()
        return real(path, tensors, metadata)
    monkeypatch.setattr(D, "save_shard", dies_on_the_fourth)
    with pytest.raises(_Killed):
        dump.main(["--out", out] + ARGS)
    monkeypatch.undo()
    summary = dump.main(["--out", out] + ARGS)
    assert summary["docs_skipped"] == 3 and summary["docs_written"] == N_DOCS - 3
    docs, ids = _docs(out)
    assert len(ids) == len(set(ids)) == N_DOCS  # nothing duplicated, nothing lost
    _assert_same(docs, reference)
    assert not [f for f in os.listdir(out) if ".tmp." in f and not f.startswith("doc_syn0-000003")]


def test_killed_between_shard_and_sidecar(tmp_path, monkeypatch, reference):
    out = str(tmp_path / "d")
    real, sidecars = D.atomic_write_json, []

    def dies_before_the_second_sidecar(path, obj):
        name = os.path.basename(path)
        if name.startswith("doc_") and name.endswith(".json"):
            sidecars.append(name)
            if len(sidecars) == 2:
                raise _Killed()
        return real(path, obj)
    monkeypatch.setattr(D, "atomic_write_json", dies_before_the_second_sidecar)
    with pytest.raises(_Killed):
        dump.main(["--out", out] + ARGS)
    monkeypatch.undo()
    summary = dump.main(["--out", out] + ARGS)
    assert summary["docs_skipped"] == 1 and summary["docs_written"] == N_DOCS - 1  # the shard without sidecar is redone
    docs, ids = _docs(out)
    assert len(ids) == len(set(ids)) == N_DOCS
    _assert_same(docs, reference)
