"""Sparse MoE (`moe_impl="sparse"`, fm_jax/layers/moe_sparse.py) against the dense path: the dispatch
(sort by expert, group sizes, other shards' experts last), the same outputs in float32 and bfloat16
(including skewed routing with empty and overfull experts), under jit + lax.scan, in the whole model, and
expert parallel on meshes of the 8 CPU devices of tests/conftest.py against one device.

The NumPy float64 transcription of SPEC §9 checks both implementations in test_ffn.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax import model
from fm_jax.config import get_config
from fm_jax.layers.ffn import ffn, init_ffn
from fm_jax.layers.moe_sparse import dispatch, routed_experts
from fm_jax.sharding import make_mesh, shard_params
from tests.fm_jax.helpers import random_params

E, K, D, I, V = 8, 3, 32, 16, 50
C = get_config("tiny", ffn="moe", d_model=D, n_routed_experts=E, moe_top_k=K, moe_inter_dim=I, vocab_size=V,
               n_shared_experts=1, swiglu_limit=10.0)
_ffn = jax.jit(ffn, static_argnums=1)


def make(seed, c=C, dtype=jnp.float32, hash_routed=False):
    """MoE params with init_ffn's structure, filled by NumPy (eager init_ffn compiles for seconds): weights
    N(0, 1 / fan_in), a router bias that changes choices, distinct random experts per token on hash layers."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = str(path[-1].key)
        if name == "tid2eid":
            return jnp.asarray(np.argsort(rng.random((V, E)), axis=-1)[:, :K], jnp.int32)
        scale = 0.3 if name == "router_bias" else x.shape[-2] ** -0.5
        return jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)

    shapes = jax.eval_shape(lambda k: init_ffn(k, c, dtype, hash_routed=hash_routed), jax.random.key(0))
    return jax.tree_util.tree_map_with_path(fill, shapes)


def inputs(seed, shape, dtype=jnp.float32, scale=3.0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((*shape, D)) * scale, dtype)
    return x, jnp.asarray(rng.integers(0, V, shape), jnp.int32)


def both(p, c, x, tokens):
    return (np.asarray(_ffn(p, c.replace(moe_impl="dense"), x, tokens), np.float64),
            np.asarray(_ffn(p, c.replace(moe_impl="sparse"), x, tokens), np.float64))


def close(got, want, rel):
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max())


# ---------------------------------------------------------------------------------------------- dispatch
def test_dispatch_sorts_by_expert_and_counts():
    ids = jnp.asarray([[3, 1], [1, 0], [3, 2], [1, 3]], jnp.int32)  # 4 tokens, top-2, experts 0..3
    order, sizes, mine = dispatch(ids, 4)
    np.testing.assert_array_equal(np.asarray(sizes), [1, 3, 1, 3])
    assert bool(mine.all())
    np.testing.assert_array_equal(np.asarray(ids).reshape(-1)[np.asarray(order)], [0, 1, 1, 1, 2, 3, 3, 3])
    np.testing.assert_array_equal(np.asarray(order), [3, 1, 2, 6, 5, 0, 4, 7])  # stable within an expert
    # a shard holding experts 2..3: the others' assignments sort last and are not its own
    order, sizes, mine = dispatch(ids, 2, first_expert=2)
    np.testing.assert_array_equal(np.asarray(sizes), [1, 3])
    np.testing.assert_array_equal(np.asarray(mine), [True] * 4 + [False] * 4)
    np.testing.assert_array_equal(np.asarray(order)[:4], [5, 0, 4, 7])


def test_routed_experts_of_one_shard_sum_to_all():
    """Expert parallel's arithmetic without a mesh: the shards' partial outputs add up to the whole."""
    p = make(1)
    x, _ = inputs(2, (12,))
    ids = jax.random.randint(jax.random.key(3), (12, K), 0, E)
    w = jax.random.uniform(jax.random.key(4), (12, K))
    run = jax.jit(routed_experts, static_argnums=4)
    whole = run(p["experts"], x, ids, w, 10.0)
    shards = [(s, jax.tree.map(lambda a, s=s: a[s:s + 2], p["experts"])) for s in range(0, E, 2)]
    parts = [run(e, x, ids, w, 10.0, first_expert=s) for s, e in shards]
    close(np.asarray(sum(parts)), np.asarray(whole), 1e-6)
    assert np.abs(np.asarray(parts[0])).max() > 0 and not np.allclose(parts[0], whole)


# ---------------------------------------------------------------------------------------------- vs dense
@pytest.mark.parametrize("hash_routed", [False, True], ids=["topk", "hash"])
def test_sparse_matches_dense_float32(hash_routed):
    p = make(5, hash_routed=hash_routed)
    x, tokens = inputs(6, (3, 7))
    dense, sparse = both(p, C, x, tokens)
    assert dense.shape == sparse.shape == (3, 7, D)
    close(sparse, dense, 1e-6)


def test_sparse_matches_dense_with_skewed_routing():
    """A large bias sends every token to experts 0 and 1: most experts get no rows, two get all of them."""
    p = make(7)
    p["router_bias"] = jnp.zeros(E, jnp.float32).at[0].set(100.0).at[1].set(100.0)
    x, tokens = inputs(8, (20,))
    dense, sparse = both(p, C, x, tokens)
    close(sparse, dense, 1e-6)


def test_sparse_matches_dense_bfloat16():
    c = C.replace(dtype="bfloat16")
    p = make(9, c, jnp.bfloat16)
    x, tokens = inputs(10, (4, 9), jnp.bfloat16)
    dense, sparse = both(p, c, x, tokens)
    assert _ffn(p, c.replace(moe_impl="sparse"), x, tokens).dtype == jnp.bfloat16
    close(sparse, dense, 2 ** -7)  # the two round the sum over experts differently (about 1 bf16 ulp)


def test_sparse_under_scan():
    """Token by token under lax.scan (static shapes, one token per step) = the whole sequence at once."""
    c = C.replace(moe_impl="sparse")
    p = make(11)
    x, tokens = inputs(12, (6, 2))

    @jax.jit
    def stepwise(p, x, tokens):
        return jax.lax.scan(lambda carry, xt: (carry, ffn(p, c, *xt)), None, (x, tokens))[1]

    close(np.asarray(stepwise(p, x, tokens)), np.asarray(_ffn(p, c, x, tokens)), 1e-6)


def test_sparse_model_matches_dense_model():
    """A two-layer tiny model (a hash-routed layer, then a top-k layer) with either implementation."""
    c = get_config("tiny", ffn="moe", n_layers=2, n_hash_layers=1)
    params = random_params(c, seed=3)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, c.vocab_size, (2, 12)), jnp.int32)
    dense = np.asarray(model.forward(params, c, tokens))
    sparse = np.asarray(model.forward(params, c.replace(moe_impl="sparse"), tokens))
    close(sparse, dense, 1e-5)


# ---------------------------------------------------------------------------------------------- mesh
@pytest.mark.parametrize("shape", [(2, 4), (1, 8), (8, 1), (2, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_expert_parallel_matches_one_device(shape):
    """Under `jax.set_mesh`, experts split over `model` (each device computes its own experts' rows, then
    a psum); (2, 3): 3 does not divide 8 experts, so the experts stay whole and nothing is split."""
    c = C.replace(moe_impl="sparse")
    p = make(13)
    x, tokens = inputs(14, (4, 5))
    want = np.asarray(_ffn(p, c, x, tokens))
    mesh = make_mesh(*shape)
    ps = shard_params({"layers": [{"ffn": p}]}, c, mesh)["layers"][0]["ffn"]
    split = shape[1] > 1 and E % shape[1] == 0
    assert ps["experts"]["w1"].addressable_shards[0].data.shape[0] == (E // shape[1] if split else E)
    with jax.set_mesh(mesh):
        f = jax.jit(ffn, static_argnums=1)
        hlo = f.lower(ps, c, x, tokens).as_text()
        got = np.asarray(f(ps, c, x, tokens))
    assert ("manual" in hlo) == split  # the shard_map (expert parallel) is taken exactly when it splits
    close(got, want, 1e-6)


def test_sharded_params_without_a_context_mesh():
    """Sharded expert weights but no `jax.set_mesh`: XLA's propagation places the sparse path; same result."""
    c = C.replace(moe_impl="sparse")
    p = make(15)
    x, tokens = inputs(16, (4, 5))
    ps = shard_params({"layers": [{"ffn": p}]}, c, make_mesh(2, 4))["layers"][0]["ffn"]
    close(np.asarray(_ffn(ps, c, x, tokens)), np.asarray(_ffn(p, c, x, tokens)), 1e-6)


# ---------------------------------------------------------------------------------------------- grouped matmuls
@pytest.mark.parametrize("sizes", [[3, 0, 5, 1], [0, 0, 9, 0], [2, 2, 2, 1]], ids=["mixed", "one", "short"])
def test_gathered_matmul_is_ragged_dot(sizes):
    """Same contract as `ragged_dot` on every row inside a group (the 'short' case leaves 2 rows outside)."""
    from fm_jax.layers.moe_sparse import gathered_matmul
    rng = np.random.default_rng(11)
    lhs = jnp.asarray(rng.standard_normal((9, 6)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((4, 6, 5)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    inside = int(sum(sizes))
    want = np.asarray(jax.lax.ragged_dot(lhs, rhs, gs, precision=jax.lax.Precision.HIGHEST))[:inside]
    got = np.asarray(gathered_matmul(lhs, rhs, gs))[:inside]
    expert = np.repeat(np.arange(4), sizes)
    np.testing.assert_allclose(got, np.einsum("mk,mkn->mn", np.asarray(lhs)[:inside], np.asarray(rhs)[expert]),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_default_grouped_matmul_by_shape():
    from fm_jax.layers.moe_sparse import default_grouped_matmul, gathered_matmul
    assert default_grouped_matmul(6, 256) is gathered_matmul       # one decode token of V4-Flash
    assert default_grouped_matmul(12, 256) is gathered_matmul      # two
    assert default_grouped_matmul(24, 256) is jax.lax.ragged_dot   # four: past the measured crossover
    if jax.default_backend() != "gpu":                              # the Hopper kernel is never chosen here
        assert default_grouped_matmul(49152, 256) is jax.lax.ragged_dot


def test_mosaic_grouped_matmul_falls_back_off_hopper():
    """Off a Hopper GPU (or with float32 operands) the Mosaic entry point is `ragged_dot`, bit for bit."""
    from fm_jax.layers.moe_sparse import mosaic_grouped_matmul, mosaic_suits
    rng = np.random.default_rng(12)
    lhs = jnp.asarray(rng.standard_normal((10, 64)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((3, 64, 128)), jnp.float32)
    gs = jnp.asarray([4, 0, 6], jnp.int32)
    assert not mosaic_suits(lhs, rhs)                                # float32 operands, whatever the device
    np.testing.assert_array_equal(np.asarray(mosaic_grouped_matmul(lhs, rhs, gs)),
                                  np.asarray(jax.lax.ragged_dot(lhs, rhs, gs)))


@pytest.mark.gpu
def test_mosaic_grouped_matmul_on_hopper():
    """On a Hopper GPU: bf16 rows (not a multiple of the 64-row tile) against an exact per-row product."""
    from fm_jax.layers.moe_sparse import mosaic_grouped_matmul, mosaic_suits
    rng = np.random.default_rng(13)
    sizes = [70, 0, 129, 100]
    m = sum(sizes) + 5                                               # 5 rows past the last group
    lhs = jnp.asarray(rng.standard_normal((m, 256)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((4, 256, 384)), jnp.bfloat16)
    if not mosaic_suits(lhs, rhs):
        pytest.skip("not a Hopper GPU")
    got = np.asarray(mosaic_grouped_matmul(lhs, rhs, jnp.asarray(sizes, jnp.int32), jnp.float32))[:m - 5]
    expert = np.repeat(np.arange(4), sizes)
    want = np.einsum("mk,mkn->mn", np.asarray(lhs, np.float32)[:m - 5], np.asarray(rhs, np.float32)[expert])
    # bf16 output rounding (relative 2^-8) over float32 accumulation
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


def test_sparse_matches_dense_at_decode_sizes():
    """One token x top-3 over 48 experts (3 <= 48 // 16): the gathered path, exact against the dense MoE."""
    from fm_jax.layers import moe_sparse
    c = C.replace(n_routed_experts=48)
    p = make(12, c)
    x, tokens = inputs(13, (1,))
    assert moe_sparse.default_grouped_matmul(K, 48) is moe_sparse.gathered_matmul
    dense, sparse = both(p, c, x, tokens)
    close(sparse, dense, 1e-6)
