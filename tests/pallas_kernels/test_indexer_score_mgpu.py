"""Mosaic GPU indexer-scoring kernel (`pallas_kernels.indexer_score_mgpu`) without a GPU, and on one.

* interpret mode (`InterpretGPUParams`, CPU): the kernel's variant for the interpreter (see its docstring: plain
  ref loads, the wgmma operands staged in SMEM) against the float32 reference; this checks the TMA ring, the
  barriers, the page / block indexing, the tail clamp, the masking and the epilogue;
* cross-lowering to CUDA: the GPU variant (register layouts, swizzled TMA, wgmma from registers) lowers for the
  V4 shapes; this catches layout and tiling errors that the interpreter does not model;
* `gpu` marker (skipped on CPU): the compiled kernel against the reference.

Shapes are small (2-3 key blocks): interpret mode runs each TMA and wgmma as a host callback.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax.layers.key_pages import block_index_keys
from pallas_kernels import compat
from pallas_kernels.indexer_score_mgpu import indexer_scores_mosaic, plan
from pallas_kernels.reference import indexer_scores_reference
from tests.pallas_kernels.test_indexer_score import RTOL_F32, assert_scores_close, packed_keys


def _inputs(seed, b, h, d, p, n_pages, lens, qdtype=jnp.bfloat16, extremes=False):
    """Random q (never zeros), weights of both signs, page-blocked random fp8 keys, the given lengths."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, h, d)).astype(np.float32) * 2.0).astype(qdtype)
    w = jnp.asarray(rng.normal(size=(b, h)).astype(np.float32))
    pages = block_index_keys(packed_keys(seed + 1, b, n_pages * p, d, extremes=extremes), p)
    return q, w, pages, jnp.asarray(lens, jnp.int32)


def _check(args, p, act="none", **cfg):
    out = indexer_scores_mosaic(*args, page_entries=p, act=act, interpret=True, **cfg)
    ref = indexer_scores_reference(*args, page_entries=p, act=act)
    logits = indexer_scores_reference(*args, page_entries=p) if act == "sigmoid" else None
    assert_scores_close(out, ref, RTOL_F32, act=act, ref_logits=logits)
    return np.asarray(out)


@pytest.mark.parametrize("case", [
    # (b, h, d, p, n_pages, lengths, cfg): block_n = 128 unless given
    (2, 32, 128, 32, 5, [160, 123], {}),                                   # 2 blocks, the last one clamped
    (3, 64, 128, 64, 3, [192, 0, 100], dict(blocks_per_cta=2, stages=2)),  # empty request, ragged, 1 CTA/row
    (1, 32, 128, 64, 4, [250], dict(block_n=64, blocks_per_cta=2, stages=1)),   # 1-page blocks, no overlap
    (2, 32, 64, 32, 6, [192, 65], dict(block_n=64, blocks_per_cta=3, stages=2)),  # D = 64, 2-page blocks
    (2, 32, 128, 32, 8, [70, 256], dict(block_n=64, blocks_per_cta=4, stages=2)),  # dead blocks skip their TMA
    (2, 32, 128, 32, 10, [320, 200], dict(blocks_per_cta=2, stages=2)),  # 3 blocks on 2 CTAs: an idle step
], ids=["tail_clamp", "empty_ragged_bpc2", "one_page_blocks", "d64", "dead_blocks", "idle_step"])
def test_matches_reference(case):
    b, h, d, p, n_pages, lens, cfg = case
    out = _check(_inputs(sum(case[:5]), b, h, d, p, n_pages, lens), p, **cfg)
    assert out.shape == (b, n_pages * p)
    for i, ln in enumerate(lens):
        assert np.all(np.isfinite(out[i, :ln])) and np.all(out[i, ln:] == -np.inf)


def test_float32_query_sigmoid_extremes():
    # f32 q: hi + lo bf16 parts into one accumulator; fp8 extreme codes and scales over 1e-6 .. 1e3
    args = _inputs(7, 2, 32, 128, 32, 4, [128, 77], qdtype=jnp.float32, extremes=True)
    _check(args, 32, act="sigmoid")
    _check(args, 32)


def test_unsupported_shapes_raise():
    q, w, pages, lens = _inputs(3, 1, 32, 128, 32, 4, [128])
    with pytest.raises(ValueError, match="heads"):
        plan(1, 16, 128, 4, 32)
    with pytest.raises(ValueError, match="page_entries"):
        plan(1, 32, 128, 8, 16)                      # 4 * 16 bytes of scales: not whole 128-byte rows
    with pytest.raises(ValueError, match="head dim"):
        plan(1, 32, 96, 8, 32)
    with pytest.raises(ValueError, match="page-blocked"):
        indexer_scores_mosaic(q, w, packed_keys(4, 1, 128, 128), lens, page_entries=None)   # row layout
    with pytest.raises(ValueError, match="one query"):
        indexer_scores_mosaic(q[:, None], w[:, None], pages, lens[:, None], page_entries=32)


def test_plan_v4_shapes():
    cfg = plan(1, 64, 128, 1024, 64)                 # batch 1, N = 64K: 512 blocks of 128 over ~256 CTAs
    assert cfg["block_n"] == 128 and cfg["blocks_per_cta"] == 2 and cfg["chunks"] == 256
    cfg = plan(8, 64, 128, 4096, 64)                 # batch 8, N = 256K
    assert cfg["chunks"] * cfg["blocks_per_cta"] >= cfg["n_blocks"] and cfg["stages"] == 4


def _abstract(b, h, d, p, n, qdtype=jnp.bfloat16):
    return (jax.ShapeDtypeStruct((b, h, d), qdtype), jax.ShapeDtypeStruct((b, h), jnp.float32),
            jax.ShapeDtypeStruct((b, n // p, p * (d + 4)), jnp.uint8), jax.ShapeDtypeStruct((b,), jnp.int32))


@pytest.mark.parametrize("b,n,qdtype,act", [(1, 65536, jnp.bfloat16, "none"), (8, 65536, jnp.bfloat16, "none"),
                                            (1, 262144, jnp.bfloat16, "sigmoid"), (1, 65536, jnp.float32, "none"),
                                            (8, 65536, jnp.float32, "none")],
                         ids=["b1_64k", "b8_64k", "b1_256k_sigmoid", "b1_64k_q_f32", "b8_64k_q_f32"])
def test_lowers_to_mosaic_gpu_for_v4_shapes(b, n, qdtype, act):
    f = functools.partial(indexer_scores_mosaic, page_entries=64, act=act)
    try:
        low = compat.lower_for_cuda(f, *_abstract(b, 64, 128, 64, n, qdtype))
    except TypeError as e:  # pragma: no cover - a jax without cross-platform lowering
        pytest.skip(f"no cross-platform lowering in this jax: {e}")
    assert low.as_text().count("custom_call @mosaic_gpu") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("b,n_pages,qdtype,act", [(1, 1024, jnp.bfloat16, "none"), (8, 64, jnp.bfloat16, "none"),
                                                  (3, 5, jnp.bfloat16, "sigmoid"), (2, 33, jnp.float32, "none")])
def test_compiled_kernel_matches_reference(b, n_pages, qdtype, act):
    n = n_pages * 64
    lens = [n, 0, n - 37][:b] if b <= 3 else [n - 7 * i for i in range(b)]
    args = _inputs(11 + b, b, 64, 128, 64, n_pages, lens, qdtype=qdtype, extremes=qdtype == jnp.float32)
    out = jax.jit(functools.partial(indexer_scores_mosaic, page_entries=64, act=act))(*args)
    ref = indexer_scores_reference(*args, page_entries=64, act=act)
    logits = indexer_scores_reference(*args, page_entries=64) if act == "sigmoid" else None
    assert_scores_close(out, ref, RTOL_F32, act=act, ref_logits=logits)


def test_dispatch_opt_in():
    from pallas_kernels import dispatch
    args = _inputs(5, 2, 32, 128, 32, 4, [128, 50])
    out = dispatch.indexer_scores(*args, impl="mosaic", interpret=True, page_entries=32)
    assert_scores_close(out, indexer_scores_reference(*args, page_entries=32), RTOL_F32)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            dispatch.indexer_scores(*args, impl="mosaic", page_entries=32)
