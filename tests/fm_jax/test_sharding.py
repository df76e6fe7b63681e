"""Sharding (SPEC §7): the ("data", "model") mesh, the partition rules (with their replication fallback),
and prefill + decode under a (2, 4) mesh of 8 CPU devices giving the logits of one device.

The model is tiny with MoE (one hash-routed layer) + hyper-connections (experts split over "model") and
the prompts / lengths of test_model, so the single-device reference reuses that module's compiled programs
when both run."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from fm_jax import model
from fm_jax.cache import init_cache
from fm_jax.config import get_config
from fm_jax.sharding import (
    batch_sharding,
    cache_shardings,
    make_mesh,
    param_shardings,
    shard_batch,
    shard_cache,
    shard_params,
)
from tests.fm_jax.helpers import (
    LENGTHS,
    MAX_LEN,
    STEPS,
    abstract_params,
    random_params,
    sequences,
    step_tokens,
)

CONFIG = {"ffn": "moe", "hc_mult": 4, "n_hash_layers": 1}  # = test_model's "moe_hc4" variant


def spec_of(shardings, *path):
    x = shardings
    for k in path:
        x = x[k]
    return tuple(x.spec)


def norm(spec):
    """PartitionSpec -> tuple without trailing Nones (P('a') == P('a', None))."""
    s = tuple(spec)
    while s and s[-1] is None:
        s = s[:-1]
    return s


# ---------------------------------------------------------------------------------------------- mesh
def test_make_mesh():
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 host devices"
    mesh = make_mesh(2, 4)
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 2, "model": 4}
    assert len(set(mesh.devices.flat)) == 8
    assert list(mesh.devices[1]) == jax.devices()[4:8]
    assert dict(make_mesh(1, 1, devices=jax.devices()[3:4]).shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match="16 devices"):
        make_mesh(4, 4)
    with pytest.raises(ValueError, match="`model`"):
        make_mesh(2, 0)


# ---------------------------------------------------------------------------------------------- rules
def test_param_rules_on_a_2x4_mesh():
    c = get_config("tiny", **CONFIG)
    sh = param_shardings(abstract_params(c), c, make_mesh(2, 4))
    a1 = ("layers", 1, "attn")  # a CSA layer: attention + indexer + compressors
    assert norm(spec_of(sh, *a1, "wq_b")) == (None, "model")                       # query heads
    assert norm(spec_of(sh, *a1, "sink")) == ("model",)
    assert norm(spec_of(sh, *a1, "indexer", "wq_b")) == (None, "model")            # indexer heads
    assert norm(spec_of(sh, *a1, "indexer", "weights_proj")) == (None, "model")
    for name in ("wkv", "kv_norm", "wq_a", "q_norm"):                               # the shared KV head etc.
        assert norm(spec_of(sh, *a1, name)) == ()
    for comp in (("compressor",), ("indexer", "compressor")):
        for name in ("wkv_gate", "ape", "norm"):
            assert norm(spec_of(sh, *a1, *comp, name)) == ()
    # o_groups = 2 does not divide model = 4: the grouped output projection falls back to replication
    assert c.o_groups == 2
    assert norm(spec_of(sh, *a1, "wo_a")) == () and norm(spec_of(sh, *a1, "wo_b")) == ()
    f = ("layers", 2, "ffn")
    for w in ("w1", "w2", "w3"):
        assert norm(spec_of(sh, *f, "experts", w)) == ("model",)                   # experts
    assert norm(spec_of(sh, *f, "shared", "w1")) == (None, "model")
    assert norm(spec_of(sh, *f, "shared", "w2")) == ("model",)
    assert norm(spec_of(sh, *f, "router")) == () and norm(spec_of(sh, *f, "router_bias")) == ()
    assert norm(spec_of(sh, "layers", 0, "ffn", "tid2eid")) == ()                  # hash table, int32
    for name in ("fn", "base", "scale"):                                            # mHC mixers
        assert norm(spec_of(sh, "layers", 0, "hc_attn", name)) == ()
        assert norm(spec_of(sh, "hc_head", name)) == ()
    assert norm(spec_of(sh, "embed")) == ("model",) and norm(spec_of(sh, "lm_head")) == (None, "model")
    # nothing is ever split over "data"
    assert all("data" not in tuple(s.spec) for s in jax.tree_util.tree_leaves(sh))


def test_param_rules_on_a_4x2_mesh_and_fallbacks():
    c = get_config("tiny", **CONFIG)
    sh = param_shardings(abstract_params(c), c, make_mesh(4, 2))
    assert norm(spec_of(sh, "layers", 1, "attn", "wo_a")) == ("model",)  # 2 groups on 2 devices
    assert norm(spec_of(sh, "layers", 1, "attn", "wo_b")) == ("model",)
    # 2 heads / 2 indexer heads / 2 experts on a model axis of 4: replicated, never split mid-head
    c2 = get_config("tiny", n_heads=2, o_groups=1, n_index_heads=2, n_routed_experts=2, vocab_size=250, **CONFIG)
    sh2 = param_shardings(abstract_params(c2), c2, make_mesh(2, 4))
    for path in (("attn", "wq_b"), ("attn", "sink"), ("attn", "indexer", "wq_b"), ("ffn", "experts", "w1")):
        assert norm(spec_of(sh2, "layers", 1, *path)) == (), path
    assert norm(spec_of(sh2, "embed")) == () and norm(spec_of(sh2, "lm_head")) == ()  # 250 % 4 != 0
    # a (8, 1) mesh: pure data parallel, every parameter whole on every device
    sh3 = param_shardings(abstract_params(c), c, make_mesh(8, 1))
    for s in jax.tree_util.tree_leaves(sh3):
        assert s.is_fully_replicated


def test_cache_rules():
    c = get_config("tiny", **CONFIG)
    mesh = make_mesh(2, 4)
    cache = init_cache(c, 4, MAX_LEN)
    sh = cache_shardings(cache, c, mesh)
    assert tuple(sh["capacity"].spec) == ()
    flat = jax.tree_util.tree_flatten_with_path(sh)[0]
    for path, s in flat:
        if jax.tree_util.keystr(path) != "['capacity']":
            assert norm(s.spec) == ("data",), path                     # by request; whole over "model"
    odd = cache_shardings(init_cache(c, 3, MAX_LEN), c, mesh)            # 3 requests on data = 2
    assert all(s.is_fully_replicated for s in jax.tree_util.tree_leaves(odd))
    assert norm(batch_sharding(mesh, (4, 21)).spec) == ("data",)
    assert batch_sharding(mesh, (3,)).is_fully_replicated


# ---------------------------------------------------------------------------------------------- numerics
@pytest.fixture(scope="module")
def single_and_sharded():
    c = get_config("tiny", **CONFIG)
    params = random_params(c, seed=7)
    seqs, prompt = sequences(c)
    lengths = jnp.asarray(LENGTHS)

    # one device
    lp1, cache1 = model.prefill(params, c, jnp.asarray(prompt), MAX_LEN, lengths=lengths)
    out1 = []
    for i in range(STEPS):
        logits, cache1 = model.decode_step(params, c, cache1, step_tokens(seqs, LENGTHS + i))
        out1.append(np.asarray(logits))

    # (2, 4) mesh: sharded inputs into the same public (internally jitted) functions
    mesh = make_mesh(2, 4)
    params_s = shard_params(params, c, mesh)
    lp8, cache8 = model.prefill(params_s, c, shard_batch(jnp.asarray(prompt), mesh), MAX_LEN,
                                lengths=shard_batch(lengths, mesh))
    prefill_sharding = lp8.sharding
    cache8 = shard_cache(cache8, c, mesh)
    out8, shardings_ok = [], True
    want_cache_sh = cache_shardings(cache8, c, mesh)
    for i in range(STEPS):
        logits, cache8 = model.decode_step(params_s, c, cache8, shard_batch(step_tokens(seqs, LENGTHS + i), mesh))
        out8.append(np.asarray(logits))
        for x, s in zip(jax.tree_util.tree_leaves(cache8), jax.tree_util.tree_leaves(want_cache_sh)):
            shardings_ok &= x.sharding.is_equivalent_to(s, x.ndim)
    return {"c": c, "params_s": params_s, "mesh": mesh, "lp1": np.asarray(lp1), "lp8": np.asarray(lp8),
            "d1": np.stack(out1, 1), "d8": np.stack(out8, 1), "prefill_sharding": prefill_sharding,
            "last_logits": logits, "shardings_ok": shardings_ok}


def test_params_really_are_split(single_and_sharded):
    r = single_and_sharded
    c, p = r["c"], r["params_s"]
    wq_b = p["layers"][1]["attn"]["wq_b"]
    assert len(wq_b.sharding.device_set) == 8
    assert wq_b.addressable_shards[0].data.shape == (c.q_lora_rank, c.n_heads * c.head_dim // 4)
    e = p["layers"][1]["ffn"]["experts"]["w1"]
    assert e.addressable_shards[0].data.shape[0] == c.n_routed_experts // 4


def test_sharded_prefill_matches_one_device(single_and_sharded):
    r = single_and_sharded
    assert len(r["prefill_sharding"].device_set) == 8
    scale = np.abs(r["lp1"]).max()
    for b in range(len(LENGTHS)):
        n = LENGTHS[b]  # positions past a request's length are padding
        np.testing.assert_allclose(r["lp8"][b, :n], r["lp1"][b, :n], rtol=0, atol=1e-5 * scale)


def test_sharded_decode_matches_one_device(single_and_sharded):
    r = single_and_sharded
    assert r["d8"].shape == r["d1"].shape == (len(LENGTHS), STEPS, r["c"].vocab_size)
    np.testing.assert_allclose(r["d8"], r["d1"], rtol=0, atol=1e-5 * np.abs(r["d1"]).max())
    assert len(r["last_logits"].sharding.device_set) == 8


def test_decode_keeps_cache_sharding(single_and_sharded):
    """Every step returns the cache with the partition rules' shardings (split over data, whole over
    model), so the next step sees the same input shardings."""
    assert single_and_sharded["shardings_ok"]


def test_shard_batch_splits_requests():
    mesh = make_mesh(2, 4)
    tok = shard_batch(jnp.arange(4, dtype=jnp.int32), mesh)
    assert isinstance(tok.sharding, NamedSharding) and tuple(tok.sharding.spec) == ("data",)
    assert tok.addressable_shards[0].data.shape == (2,)  # 2 requests per data slice, whole over "model"
    assert len(tok.sharding.device_set) == 8
