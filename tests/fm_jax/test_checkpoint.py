"""Params checkpoints (orbax + config JSON): bit-exact round trips (float32, bfloat16, sharded), and clear
errors for a mismatched config (first differing tensor with both shapes, or the differing field)."""
from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from fm_jax import checkpoint as ck
from fm_jax.config import get_config
from fm_jax.sharding import make_mesh, param_shardings, shard_params
from tests.fm_jax.helpers import random_params, tree_bytes_equal


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One float32 and one bfloat16 checkpoint of tiny."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for dtype in ("float32", "bfloat16"):
        c = get_config("tiny", dtype=dtype)
        params = random_params(c, seed=11)
        out[dtype] = (c, params, ck.save_params(root / dtype, params, c))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(saved, dtype):
    c, params, path = saved[dtype]
    assert jax.tree_util.tree_leaves(params)[0].dtype == np.dtype(dtype)
    restored = ck.restore_params(path, c)
    assert tree_bytes_equal(params, restored)  # same treedef (layers stay a list), dtypes, bytes
    assert isinstance(restored["layers"], list)


def test_round_trip_with_int_and_float32_leaves_in_a_bf16_model(tmp_path):
    """V4-style params: int32 hash tables (tid2eid), float32 router / router_bias / mHC mixers beside bf16
    weights, all restored bit-exactly with their own dtypes."""
    c = get_config("tiny", dtype="bfloat16", ffn="moe", hc_mult=4, n_hash_layers=2)
    params = random_params(c, seed=12)
    assert params["layers"][1]["ffn"]["tid2eid"].dtype == np.int32 and "tid2eid" not in params["layers"][2]["ffn"]
    assert params["hc_head"]["fn"].dtype == np.float32 and params["layers"][2]["ffn"]["router_bias"].dtype == np.float32
    restored = ck.restore_params(ck.save_params(tmp_path / "v4", params, c), c)
    assert tree_bytes_equal(params, restored)
    meta = json.loads((tmp_path / "v4" / ck.CONFIG_FILE).read_text())
    assert ["['layers'][0]['ffn']['tid2eid']", [c.vocab_size, c.moe_top_k], "int32"] in meta["tensors"]


def test_config_json_beside_params(saved):
    c, _, path = saved["bfloat16"]
    meta = json.loads((path / ck.CONFIG_FILE).read_text())
    assert meta["format"] == ck.FORMAT
    assert meta["config"]["dtype"] == "bfloat16" and meta["config"]["compress_ratios"] == [0, 4, 16, 4]
    paths = [p for p, _, _ in meta["tensors"]]
    assert "['layers'][1]['attn']['indexer']['wq_b']" in paths
    assert ck.load_config(path) == c


def test_mismatched_shape_names_first_tensor_and_both_shapes(saved):
    c, _, path = saved["float32"]
    with pytest.raises(ValueError) as e:
        ck.restore_params(path, c.replace(d_model=96))
    msg = str(e.value)
    assert "['embed']" in msg and "(256, 64)" in msg and "(256, 96)" in msg and "`d_model`" in msg
    # pytree order: ['attn']['sink'] [n_heads] comes before ['attn']['wq_b'] [q_lora, n_heads * head_dim]
    with pytest.raises(ValueError, match=re.escape("['layers'][0]['attn']['sink']: checkpoint shape (4,) != "
                                                   "config shape (8,)")):
        ck.restore_params(path, c.replace(n_heads=8))


def test_structure_mismatch_names_the_missing_tensor(saved):
    c, _, path = saved["float32"]
    with pytest.raises(ValueError, match=re.escape("['layers'][4]") + ".*no such tensor"):
        ck.restore_params(path, get_config("tiny", n_layers=5))
    with pytest.raises(ValueError, match=re.escape("['layers'][0]['ffn']['experts']['w1']") + ".*`ffn`"):
        ck.restore_params(path, c.replace(ffn="moe"))
    with pytest.raises(ValueError, match=re.escape("['layers'][3]") + ".*no such tensor"):
        ck.restore_params(path, get_config("tiny", n_layers=3))  # checkpoint holds a tensor the config lacks


@pytest.mark.parametrize("field,value", [("window", 32), ("rope_base", 5000.0), ("dtype", "bfloat16"),
                                         ("compress_rope_position", "last")])
def test_differing_config_field_is_named(saved, field, value):
    c, _, path = saved["float32"]
    with pytest.raises(ValueError, match=re.escape(f"`{field}`")):
        ck.restore_params(path, c.replace(**{field: value}))


def test_preset_name_is_not_part_of_the_model(saved):
    _, params, path = saved["float32"]
    renamed = get_config("tiny").replace(name="renamed")
    assert tree_bytes_equal(params, ck.restore_params(path, renamed))


def test_topk_impl_is_not_part_of_the_model(saved, tmp_path):
    """The top-k implementation picks the same entries: a checkpoint restores under any, including one saved
    before the field existed (the shipped checkpoint's config has no `topk_impl`)."""
    c, params, path = saved["float32"]
    assert tree_bytes_equal(params, ck.restore_params(path, c.replace(topk_impl="xla")))
    old = tmp_path / "old"
    ck.save_params(old, params, c.replace(topk_impl="pallas"))
    meta = json.loads((old / ck.CONFIG_FILE).read_text())
    del meta["config"]["topk_impl"]
    (old / ck.CONFIG_FILE).write_text(json.dumps(meta))
    assert ck.load_config(old).topk_impl == "auto"
    assert tree_bytes_equal(params, ck.restore_params(old, c))


def test_sharded_save_and_restore(saved, tmp_path):
    c, params, _ = saved["bfloat16"]
    # saved from a (1, 4) mesh: params split over "model" (a (2, 4) save works the same, but orbax's
    # replica-parallel writer then compiles ~100 slicing programs: 3x slower on CPU)
    sharded = shard_params(params, c, make_mesh(1, 4))
    path = ck.save_params(tmp_path / "sharded", sharded, c)
    plain = ck.restore_params(path, c)  # sharded checkpoint -> one device
    assert tree_bytes_equal(params, plain)
    mesh = make_mesh(2, 4)
    back = ck.restore_params(path, c, shardings=mesh)  # -> a (2, 4) mesh, by the partition rules
    assert tree_bytes_equal(params, back)
    want = param_shardings(params, c, mesh)
    for x, s in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(want)):
        assert x.sharding.is_equivalent_to(s, x.ndim)


def test_save_refuses_wrong_params_and_existing_path(saved, tmp_path):
    c, params, path = saved["float32"]
    with pytest.raises(FileExistsError):
        ck.save_params(path, params, c)
    with pytest.raises(ValueError, match=re.escape("['embed']")):
        ck.save_params(tmp_path / "x", params, c.replace(d_model=96))
    with pytest.raises(ValueError, match=re.escape("['embed']") + ".*bfloat16"):  # params are float32
        ck.save_params(tmp_path / "x", params, c.replace(dtype="bfloat16"))
    assert not (tmp_path / "x").exists()
    ck.save_params(path, params, c, overwrite=True)
    assert tree_bytes_equal(params, ck.restore_params(path, c))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=ck.CONFIG_FILE):
        ck.restore_params(tmp_path, get_config("tiny"))


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler in the save path runs on it."""


@pytest.mark.parametrize("stage", ["orbax", "config", "commit"])
def test_save_killed_midway_is_never_half_read(saved, tmp_path, monkeypatch, stage):
    """A save killed while writing the tensors, the config, or between the overwrite's two renames
    leaves either the old checkpoint (bit-exact) or no checkpoint at `path`, never a partial one."""
    c, params, _ = saved["float32"]
    path = tmp_path / "ck"
    old_params = random_params(c, seed=12)
    ck.save_params(path, old_params, c)

    def die(*args, **kwargs):
        raise _Killed()

    if stage == "orbax":
        monkeypatch.setattr(ck, "_write_durable", die)  # tensors written, config not yet
    elif stage == "config":
        def half(file, data):  # half of the JSON reaches the disk, then the process dies
            file.write_bytes(data[: len(data) // 2])
            raise _Killed()
        monkeypatch.setattr(ck, "_write_durable", half)
    else:
        real_commit = ck._commit

        def commit(tmp, dst):  # dies after moving the old checkpoint aside, before the new one lands
            real_rename = ck.os.rename
            calls = []

            def rename(src, target):
                calls.append(target)
                real_rename(src, target)
                if len(calls) == 1:
                    raise _Killed()
            monkeypatch.setattr(ck.os, "rename", rename)
            real_commit(tmp, dst)
        monkeypatch.setattr(ck, "_commit", commit)
    with pytest.raises(_Killed):
        ck.save_params(path, params, c, overwrite=True)
    monkeypatch.undo()
    if stage == "commit":
        assert not path.exists()
        with pytest.raises(ValueError, match="not an fm_jax params checkpoint"):
            ck.restore_params(path, c)
    else:  # the old checkpoint is untouched
        assert tree_bytes_equal(old_params, ck.restore_params(path, c))
    # leftovers of the killed save do not get in the way of the next one
    ck.save_params(path, params, c, overwrite=True)
    assert tree_bytes_equal(params, ck.restore_params(path, c))


def test_first_save_killed_leaves_no_checkpoint(saved, tmp_path, monkeypatch):
    c, params, _ = saved["float32"]
    monkeypatch.setattr(ck, "_commit", lambda tmp, path: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        ck.save_params(tmp_path / "new", params, c)
    assert not (tmp_path / "new").exists()
