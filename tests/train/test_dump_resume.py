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
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    dump.main(["--out", out] + ARGS)
    return _docs(out)[0]


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
