"""Checkpoint interop (fm_jax.interop): DeepSeek-V4 checkpoints in the reference format (fp8 blocks, fp4
experts, hash-layer tables, mHC tensors, HF naming, shards), their bad-checkpoint errors and the fp8 / fp4
codecs against a NumPy transcription of the format; FlashMemory Memory-Indexer joint checkpoints.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from fm_jax import interop
from tests.fm_jax.helpers import random_indexer_params as random_params
from tests.fm_jax.helpers import release_indexer_tensors
from tests.fm_jax.helpers import small_indexer_config as small_config


# ---------------------------------------------------------------------------------------------------
# FlashMemory Memory-Indexer joint checkpoints (moved here with the functions from memory_indexer)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_checkpoint_round_trip_bit_exact(tmp_path, param_dtype):
    from safetensors import safe_open

    c = small_config(param_dtype=param_dtype, rope_dtype="float32", threshold=0.25, ensemble="mean")
    params = random_params(c, seed=11)
    path = tmp_path / "fm.safetensors"
    interop.save_flashmemory_checkpoint(path, c, params)
    # PyTorch [out, in] layout under the release's key names
    with safe_open(str(path), framework="numpy") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert shapes["retrievers.l3.wq_a.weight"] == (c.q_lora_rank, c.d_model)
    assert shapes["retrievers.l3.wq_b.weight"] == (c.n_heads * c.head_dim, c.q_lora_rank)
    assert shapes["retrievers.l3.q_norm_weight"] == (c.q_lora_rank,)
    assert shapes["retrievers.l3.weights_proj.weight"] == (c.n_heads, c.d_model)
    assert len(shapes) == 4 * len(c.target_layers)
    c2, p2 = interop.load_flashmemory_checkpoint(path)
    assert c2 == c
    for name in params:
        for k, v in params[name].items():
            assert p2[name][k].dtype == v.dtype and p2[name][k].shape == v.shape
            np.testing.assert_array_equal(np.asarray(p2[name][k]).view(np.uint8), np.asarray(v).view(np.uint8))
    c3, p3 = interop.load_flashmemory_checkpoint(path, layers=["l5", 1])
    assert c3.target_layers == (5, 1) and list(p3) == ["l5", "l1"]


def _write_release_style(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


def test_load_release_style_file_without_metadata(tmp_path):
    t = release_indexer_tensors()
    _write_release_style(tmp_path / "r.safetensors", t)
    c, p = interop.load_flashmemory_checkpoint(tmp_path / "r.safetensors")
    assert (c.d_model, c.q_lora_rank, c.n_heads, c.head_dim, c.target_layers) == (40, 24, 3, 128, (10, 12))
    assert (c.rope_dim, c.rope_base, c.max_seq_len, c.rope_dtype) == (64, 160000.0, 1048576, "bfloat16")
    np.testing.assert_array_equal(np.asarray(p["l12"]["wq_b"]), t["retrievers.l12.wq_b.weight"].T)
    np.testing.assert_array_equal(np.asarray(p["l10"]["weights_proj"]), t["retrievers.l10.weights_proj.weight"].T)
    # head_dim from metadata
    t64 = release_indexer_tensors(layers=(10,), hd=64, h=4)
    _write_release_style(tmp_path / "m.safetensors", t64, metadata={"head_dim": "64"})
    c64, _ = interop.load_flashmemory_checkpoint(tmp_path / "m.safetensors")
    assert (c64.head_dim, c64.n_heads) == (64, 4)


def test_bad_checkpoints(tmp_path, monkeypatch):
    good = release_indexer_tensors()
    p = tmp_path / "a.safetensors"
    _write_release_style(p, good)
    with pytest.raises(ValueError, match=r"'l11'"):  # missing layer
        interop.load_flashmemory_checkpoint(p, layers=[10, 11])

    t = dict(good)
    del t["retrievers.l12.q_norm_weight"]
    _write_release_style(p, t)
    with pytest.raises(ValueError, match=r"retrievers\.l12\.q_norm_weight"):  # missing tensor
        interop.load_flashmemory_checkpoint(p)

    t = dict(good)
    t["retrievers.l12.weights_proj.weight"] = t["retrievers.l12.weights_proj.weight"][:, :-1]
    _write_release_style(p, t)
    with pytest.raises(ValueError, match=r"retrievers\.l12\.weights_proj\.weight"):  # misshaped
        interop.load_flashmemory_checkpoint(p)

    t = dict(good)
    t["retrievers.l10.wq_b.weight"] = t["retrievers.l10.wq_b.weight"][:-3]
    _write_release_style(p, t)
    with pytest.raises(ValueError, match=r"retrievers\.l10\.wq_b\.weight.*head_dim"):  # rows % head_dim
        interop.load_flashmemory_checkpoint(p)

    t = {k.replace("retrievers.", "retriever."): v for k, v in good.items()}
    _write_release_style(p, t)
    with pytest.raises(ValueError, match="retrievers"):  # wrong key prefix
        interop.load_flashmemory_checkpoint(p)

    t = {k.replace("wq_a.weight", "wq_a.weights"): v for k, v in good.items()}
    _write_release_style(p, t)
    with pytest.raises(ValueError, match=r"retrievers\.l10\.wq_a\.weight"):  # misnamed tensor
        interop.load_flashmemory_checkpoint(p)

    t = {k.replace("retrievers.l12", "retrievers.layer12"): v for k, v in good.items()}
    _write_release_style(p, t)
    with pytest.raises(ValueError, match="layer12"):
        interop.load_flashmemory_checkpoint(p)

    with pytest.raises(ValueError, match="extension"):
        interop.load_flashmemory_checkpoint(tmp_path / "a.npz")
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not importable -> .pt refused clearly
    with pytest.raises(ImportError, match="torch"):
        interop.load_flashmemory_checkpoint(tmp_path / "a.pt")


def test_save_rejects_bad_params(tmp_path):
    c = small_config()
    params = random_params(c)
    with pytest.raises(ValueError, match="'l5'"):
        interop.save_flashmemory_checkpoint(tmp_path / "x.safetensors", c, {k: params[k] for k in ("l1", "l3")})
    params["l3"]["wq_b"] = params["l3"]["wq_b"][:, :-1]
    with pytest.raises(ValueError, match="wq_b"):
        interop.save_flashmemory_checkpoint(tmp_path / "x.safetensors", c, params)
    with pytest.raises(ValueError, match="safetensors"):
        interop.save_flashmemory_checkpoint(tmp_path / "x.pt", c, random_params(c))



def test_metadata_config_survives_release_loader_view(tmp_path):
    """Our metadata is plain strings; the config JSON round-trips through it."""
    from safetensors import safe_open

    c = small_config(rope_dtype="float32", max_seq_len=65536)
    interop.save_flashmemory_checkpoint(tmp_path / "m.safetensors", c, random_params(c))
    with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
        meta = f.metadata()
    assert meta["head_dim"] == str(c.head_dim)
    assert json.loads(meta["fm_jax.indexer_config"])["max_seq_len"] == 65536
