"""Mosaic GPU sparse-attention kernel (`pallas_kernels.sparse_attention_mgpu`) without a GPU, and on one.

* interpret mode (`InterpretGPUParams`, CPU): the kernel's variant for the interpreter (see its docstring: plain
  ref loads, k^T materialised in SMEM) against the float32 reference; this checks the per-row TMA gather, the
  staging ring and its barriers, the row list (window / top-k / padding), the masking, the online softmax, the
  output slices and the split-K merge;
* cross-lowering to CUDA: the GPU variant (register layouts, swizzled tiles, wgmma with a transposed view) lowers
  for the V4 shapes; this catches layout and tiling errors that the interpreter does not model;
* `gpu` marker (skipped on CPU): the compiled kernel against the reference at the V4 shapes.

Shapes are small (H = 64 is fixed by the kernel; D = 128 mostly): interpret mode runs each TMA and wgmma as a
host callback.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat
from pallas_kernels.reference import sparse_attention_reference
from pallas_kernels.sparse_attention_mgpu import plan, sparse_attention_mosaic
from tests.pallas_kernels.test_sparse_attention import RTOL_BF16, rel_err

H = 64


def _inputs(seed, b, d, n, k, w, wl, empty=(), window_only=()):
    """Random bf16 q / kv / window (never zeros), indices with -1 padding and duplicates, ragged window lengths.
    Requests in `window_only` gather nothing; those in `empty` attend to nothing at all."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    q = (2.0 * normal(b, H, d)).astype(jnp.bfloat16)
    kv = normal(b, n, d).astype(jnp.bfloat16)
    idx = rng.integers(0, n, size=(b, k))
    idx = np.where(rng.uniform(size=(b, k)) < 0.25, -1, idx)          # padding
    idx[0, : k // 4] = idx[0, k // 4]                                 # duplicates
    wl = np.asarray(wl)
    for r in (*empty, *window_only):
        idx[r] = -1
    for r in empty:
        wl[r] = 0
    win = normal(b, w, d).astype(jnp.bfloat16)
    return q, kv, jnp.asarray(idx, jnp.int32), win, jnp.asarray(wl, jnp.int32), normal(H)


@functools.cache
def _kernel(d, **cfg):
    return jax.jit(functools.partial(sparse_attention_mosaic, scale=d ** -0.5, interpret=True, **cfg))


def _check(args, **cfg):
    d = args[0].shape[-1]
    out, lse = _kernel(d, **cfg)(*args)
    ref_out, ref_lse = sparse_attention_reference(*args, scale=d ** -0.5)
    assert out.shape == ref_out.shape and out.dtype == jnp.float32 and lse.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(lse)).all()
    assert rel_err(out, ref_out) < RTOL_BF16, rel_err(out, ref_out)
    assert rel_err(lse, ref_lse) < RTOL_BF16, rel_err(lse, ref_lse)
    return np.asarray(out), np.asarray(lse)


@pytest.mark.parametrize("cfg", [dict(splits=1, stages=2), dict(splits=3, stages=1), {}],
                         ids=["one_cta_ring", "three_splits", "default_plan"])
def test_matches_reference(cfg):
    # W = 70, K = 100 with 64-row blocks: 2 window blocks and 2 gathered ones, both last ones partial
    args = _inputs(1, 4, 128, 90, 100, 70, [70, 23, 41, 0], window_only=(2,))
    _check(args, **cfg)


def test_empty_request_gives_zero_and_sink():
    args = _inputs(2, 2, 128, 40, 64, 64, [64, 9], empty=(1,))
    out, lse = _check(args, splits=2)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(lse[1], np.asarray(args[5]), rtol=0, atol=0)


def test_no_window():
    # W = 0: every block is a gathered one (the kernel gets a dummy window ref it never reads)
    _check(_inputs(6, 2, 128, 30, 70, 0, [0, 0]), splits=2)


def test_v4_head_dim_two_output_slices():
    # D = 512: two 256-column output slices per (request, split) and two TMA copies per row
    _check(_inputs(3, 1, 512, 50, 64, 10, [7]), splits=2)


def test_unsupported_inputs_raise():
    q, kv, idx, win, wl, sink = _inputs(4, 1, 128, 16, 8, 8, [8])
    with pytest.raises(ValueError, match="bf16"):
        sparse_attention_mosaic(q.astype(jnp.float32), kv, idx, win, wl, sink, scale=0.1)
    with pytest.raises(ValueError, match="bf16"):
        sparse_attention_mosaic(q, kv.astype(jnp.float32), idx, win, wl, sink, scale=0.1)
    packed = jnp.zeros((1, 16, 584), jnp.uint8)
    with pytest.raises(ValueError, match="packed"):
        sparse_attention_mosaic(jnp.zeros((1, H, 512), jnp.bfloat16), packed, idx, packed[:, :8], wl, sink,
                                scale=0.1, rope_dim=64)
    with pytest.raises(ValueError, match="heads"):
        plan(1, 32, 128, 8, 8)
    with pytest.raises(ValueError, match="head dim"):
        plan(1, H, 96, 8, 8)
    with pytest.raises(ValueError, match="block_k"):
        plan(1, H, 128, 8, 8, block_k=32)


def test_plan_v4_shapes():
    # batch 8: the 10 row blocks (2 window + 8 top-k) of a request, one per CTA: 80 CTAs
    cfg = plan(8, H, 512, 512, 128)
    assert cfg["splits"] == 10 and cfg["blocks_per_cta"] == 1 and cfg["stages"] == 1 and cfg["dv"] == 256
    cfg = plan(64, H, 512, 512, 128)             # 2 splits of 5 blocks: 128 CTAs
    assert cfg["splits"] == 2 and cfg["blocks_per_cta"] == 5


def _abstract(b, n=4096, k=512, w=128, d=512):
    s = jax.ShapeDtypeStruct
    return (s((b, H, d), jnp.bfloat16), s((b, n, d), jnp.bfloat16), s((b, k), jnp.int32),
            s((b, w, d), jnp.bfloat16), s((b,), jnp.int32), s((H,), jnp.float32))


@pytest.mark.parametrize("b,d,cfg", [(1, 512, {}), (8, 512, {}), (64, 512, {}), (8, 128, dict(splits=1, stages=3))],
                         ids=["b1", "b8", "b64", "d128_ring"])
def test_lowers_to_mosaic_gpu_for_v4_shapes(b, d, cfg):
    f = functools.partial(sparse_attention_mosaic, scale=d ** -0.5, **cfg)
    try:
        low = compat.lower_for_cuda(f, *_abstract(b, d=d))
    except TypeError as e:  # pragma: no cover - a jax without cross-platform lowering
        pytest.skip(f"no cross-platform lowering in this jax: {e}")
    assert low.as_text().count("custom_call @mosaic_gpu") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("b,d,cfg", [(1, 512, {}), (8, 512, {}), (64, 512, {}), (3, 128, dict(splits=1, stages=3))],
                         ids=["b1", "b8", "b64", "d128_ring"])
def test_compiled_kernel_matches_reference(b, d, cfg):
    wl = [128 - 17 * (i % 8) for i in range(b)]
    args = _inputs(11 + b, b, d, 4096, 512, 128, wl, empty=(1,) if b > 1 else (),
                   window_only=(2,) if b > 2 else ())
    out, lse = jax.jit(functools.partial(sparse_attention_mosaic, scale=d ** -0.5, **cfg))(*args)
    ref_out, ref_lse = sparse_attention_reference(*args, scale=d ** -0.5)
    assert rel_err(out, ref_out) < RTOL_BF16, rel_err(out, ref_out)
    assert rel_err(lse, ref_lse) < RTOL_BF16, rel_err(lse, ref_lse)


def test_dispatch_opt_in():
    from pallas_kernels import dispatch
    args = _inputs(5, 2, 128, 40, 64, 16, [16, 3])
    out, lse = dispatch.sparse_attention(*args, scale=128 ** -0.5, impl="mosaic", interpret=True)
    ref_out, ref_lse = sparse_attention_reference(*args, scale=128 ** -0.5)
    assert rel_err(out, ref_out) < RTOL_BF16 and rel_err(lse, ref_lse) < RTOL_BF16
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            dispatch.sparse_attention(*args, scale=0.1, impl="mosaic")
