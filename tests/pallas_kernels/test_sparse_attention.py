"""Pallas sparse-attention kernel (interpret mode on CPU) against the jnp reference.

Fixed small shapes per test (each jitted kernel compiles once); hypothesis varies the values: indices with
padding (-1) and duplicates, ragged window lengths (0 .. W), sink logits.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.reference import sparse_attention_reference, sparse_attention_xla
from pallas_kernels.sparse_attention import sparse_attention_pallas

RTOL_F32 = 1e-5     # float32 math, or bf16 kv with a float32 query (hi/lo split products)
RTOL_BF16 = 1e-2    # bf16 q and kv: p is rounded to bf16 for p . v, as in flash attention

B, H, D, N, K, W = 3, 16, 32, 40, 24, 12
CFG = dict(block_k=8)    # W + K = 36 entries -> 2 window blocks + 3 gathered blocks, last ones partial


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


def _inputs(seed, dtype=jnp.float32, qdtype=None, h=H):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q = normal(B, h, D).astype(qdtype or dtype)
    kv = normal(B, N, D).astype(dtype)
    idx = rng.integers(0, N, size=(B, K))
    idx = np.where(rng.uniform(size=(B, K)) < 0.25, -1, idx)          # padding
    idx[0, :6] = idx[0, 7]                                            # duplicates
    idx[0, 7] = 3
    idx[2] = -1                                                       # request 2: nothing gathered
    win = normal(B, W, D).astype(dtype)
    wl = jnp.array([W, 5, 0], jnp.int32)                              # full, ragged, empty window
    sink = normal(h)
    return q, kv, jnp.asarray(idx, jnp.int32), win, wl, sink


@functools.cache
def _kernel(**cfg):
    return jax.jit(functools.partial(sparse_attention_pallas, scale=D ** -0.5, interpret=True, **cfg))


_reference = jax.jit(functools.partial(sparse_attention_reference, scale=D ** -0.5))


def _check(args, rtol, **cfg):
    out, lse = _kernel(**cfg)(*args)
    ref_out, ref_lse = _reference(*args)
    assert out.shape == ref_out.shape and out.dtype == jnp.float32 and lse.dtype == jnp.float32
    assert not np.isnan(np.asarray(out)).any() and not np.isnan(np.asarray(lse)).any()
    assert rel_err(out, ref_out) < rtol, rel_err(out, ref_out)
    assert rel_err(lse, ref_lse) < rtol, rel_err(lse, ref_lse)
    return out, lse


@pytest.mark.parametrize("n_splits,fused", [(1, True), (3, True), (3, False)])
def test_bf16(n_splits, fused):
    # fused: the last split to arrive merges the partials in-kernel; else a separate XLA epilogue does
    out, lse = _check(_inputs(1, jnp.bfloat16), RTOL_BF16, n_splits=n_splits, fused_combine=fused, **CFG)
    # request 2 attends to nothing: out = 0 and lse = sink exactly
    np.testing.assert_array_equal(np.asarray(out)[2], 0.0)
    np.testing.assert_allclose(np.asarray(lse)[2], np.asarray(_inputs(1)[5]), rtol=0, atol=0)


@pytest.mark.parametrize("n_splits", [1, 2])
def test_f32(n_splits):
    _check(_inputs(2, jnp.float32), RTOL_F32, n_splits=n_splits, **CFG)


def test_f32_query_bf16_kv_split_products():
    _check(_inputs(3, jnp.bfloat16, qdtype=jnp.float32), RTOL_F32, n_splits=2, **CFG)


def test_heads_not_a_multiple_of_the_head_block():
    # H = 20 is padded to 32 (two blocks of 16) inside the wrapper
    _check(_inputs(4, jnp.float32, h=20), RTOL_F32, n_splits=1, **CFG)


def test_duplicates_count_per_occurrence():
    # three copies of one row must weigh like three entries, not one
    q, kv, idx, win, wl, sink = _inputs(5, jnp.float32)
    idx = jnp.full((B, K), -1, jnp.int32).at[:, :3].set(7).at[:, 3].set(9)
    wl = jnp.zeros((B,), jnp.int32)
    _, lse = _check((q, kv, idx, win, wl, sink), RTOL_F32, n_splits=1, **CFG)
    l7 = jnp.einsum("bhd,bd->bh", q, kv[:, 7], precision="highest") * D ** -0.5
    l9 = jnp.einsum("bhd,bd->bh", q, kv[:, 9], precision="highest") * D ** -0.5
    want = jnp.logaddexp(jnp.logaddexp(sink[None], l9), l7 + jnp.log(3.0))
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want), rtol=1e-5, atol=1e-5)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), wl=st.lists(st.integers(0, W), min_size=B, max_size=B),
       pad=st.floats(0.0, 1.0), dup=st.integers(0, K), sink_scale=st.sampled_from([0.0, 1.0, 30.0]))
def test_random_values_hypothesis(seed, wl, pad, dup, sink_scale):
    q, kv, _, win, _, sink = _inputs(seed % 997, jnp.float32)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, N, size=(B, K))
    idx = np.where(rng.uniform(size=(B, K)) < pad, -1, idx)
    idx[:, :dup] = idx[:, :1]
    _check((q, kv, jnp.asarray(idx, jnp.int32), win, jnp.array(wl, jnp.int32), sink * sink_scale), RTOL_F32,
           n_splits=2, **CFG)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_path_matches_reference(dtype):
    args = _inputs(6, dtype)
    out, lse = jax.jit(functools.partial(sparse_attention_xla, scale=D ** -0.5))(*args)
    ref_out, ref_lse = _reference(*args)
    rtol = RTOL_F32 if dtype == jnp.float32 else RTOL_BF16
    assert rel_err(out, ref_out) < rtol and rel_err(lse, ref_lse) < rtol
    assert not np.isnan(np.asarray(out)).any()


def test_all_heads_in_one_program():
    # the batch > 8 GPU default puts every head in one program (heads_per_program = H)
    _check(_inputs(7, jnp.bfloat16, h=32), RTOL_BF16, heads_per_program=32, n_splits=2, **CFG)
