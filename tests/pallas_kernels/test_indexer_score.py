"""Pallas indexer-scoring kernel (interpret mode on CPU) against the jnp reference.

Shapes are small and fixed per test so every jitted kernel compiles once; hypothesis varies the values
(lengths, weight signs, key bytes), not the shapes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fm_jax.layers.key_pages import block_index_keys, unblock_index_keys
from fm_jax.layers.quant import pack_index_keys
from pallas_kernels import compat
from pallas_kernels.indexer_score import indexer_scores_pallas
from pallas_kernels.reference import indexer_scores_reference, indexer_scores_xla

# relative tolerance on ||out - ref|| / ||ref|| by compute path (see the kernel docstrings):
#   float32 math (or bf16 operands whose products are exact in float32): 1e-5
#   bf16 operands with a bf16-rounded softmax weight (attention p . v):   1e-2
RTOL_F32 = 1e-5
RTOL_BF16 = 1e-2

# e4m3fn byte codes: +-448 (max), +-2^-9 (min subnormal), 0x07 (max subnormal), 0x08 (min normal), +-0.
FP8_EXTREME_CODES = np.array([0x7E, 0xFE, 0x01, 0x81, 0x07, 0x87, 0x08, 0x88, 0x00, 0x80], np.uint8)


_pack = jax.jit(pack_index_keys)


def packed_keys(seed, b, n, d, extremes=False):
    """Random packed keys [B, N, D+4] (numpy RNG: no per-shape compiles). With ``extremes`` a third of the
    fp8 bytes are extreme codes and the scales span 1e-6 .. 1e3; fp8 NaN codes 0x7F / 0xFF never appear."""
    rng = np.random.default_rng(seed)
    if not extremes:
        return _pack(jnp.asarray(rng.normal(size=(b, n, d)).astype(np.float32) * 3.0))
    by = rng.integers(0, 256, size=(b, n, d), dtype=np.uint8)
    by = np.where((by & 0x7F) == 0x7F, by ^ 1, by).astype(np.uint8)
    ext = FP8_EXTREME_CODES[rng.integers(0, len(FP8_EXTREME_CODES), size=(b, n, d))]
    by = np.where(rng.uniform(size=(b, n, d)) < 0.33, ext, by).astype(np.uint8)
    scale = (10.0 ** rng.uniform(-6.0, 3.0, size=(b, n))).astype(np.float32)
    return jnp.asarray(np.concatenate([by, scale[..., None].view(np.uint8)], axis=-1))


def rel_err(out, ref):
    """||out - ref|| / ||ref|| over the entries where ref is finite (float64 on the host)."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    fin = np.isfinite(ref)
    num = np.linalg.norm(np.where(fin, out, 0.0) - np.where(fin, ref, 0.0))
    return num / max(np.linalg.norm(np.where(fin, ref, 0.0)), 1e-30)


def assert_scores_close(out, ref, rtol, act="none", ref_logits=None):
    """Scores: same shape, no NaN, masked entries identical (-inf / 0), the rest within rtol.

    For ``act="sigmoid"`` the tolerance is carried through the sigmoid: |d sigmoid| <= |d logit| / 4, and the
    logit error is bounded by rtol * max|logit| (``ref_logits``: the reference's act="none" output).
    """
    out = np.asarray(out)
    ref = np.asarray(ref)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert not np.isnan(out).any()
    if act == "none":
        np.testing.assert_array_equal(np.isfinite(out), np.isfinite(ref))
        np.testing.assert_array_equal(out[~np.isfinite(ref)], ref[~np.isfinite(ref)])
        assert rel_err(out, ref) < rtol, rel_err(out, ref)
    else:
        logits = np.asarray(ref_logits, np.float64)
        masked = ~np.isfinite(logits)
        np.testing.assert_array_equal(out[masked], 0.0)
        scale = np.max(np.abs(np.where(masked, 0.0, logits)))
        atol = 0.25 * rtol * scale + 1e-7
        err = np.max(np.abs(np.where(masked, 0.0, out.astype(np.float64) - ref)))
        assert err <= atol, (err, atol)
        assert np.all((out >= 0) & (out <= 1))


B, H, D, N = 3, 16, 32, 77          # N is not a multiple of the 32-entry block
BLOCK = dict(block_n=32, blocks_per_program=2)


def _inputs(seed, qdtype=jnp.float32, keys="packed", extremes=False, multi=0, neg_weights=False):
    rng = np.random.default_rng(seed)
    qshape = (B, multi, H, D) if multi else (B, H, D)
    q = jnp.asarray(rng.normal(size=qshape).astype(np.float32) * 2.0).astype(qdtype)
    w = rng.normal(size=qshape[:-1]).astype(np.float32)
    if neg_weights:
        w = -np.abs(w) - 0.1
    if keys == "packed":
        kk = packed_keys(seed + 1, B, N, D, extremes=extremes)
    else:
        kk = jnp.asarray(rng.normal(size=(B, N, D)).astype(np.float32) * 3.0).astype(keys)
    lens = jnp.array([N, 0, 41], jnp.int32)                      # full, empty, ragged
    if multi:
        lens = jnp.array([[N, 5, 70, 1][:multi], [0, 77, 3, 9][:multi], [41, 40, 76, 2][:multi]], jnp.int32)
    return q, jnp.asarray(w), kk, lens


@functools.cache
def _kernel(act, **cfg):
    return jax.jit(functools.partial(indexer_scores_pallas, act=act, interpret=True, **cfg))


@functools.cache
def _ref(act, impl="reference"):
    fn = indexer_scores_reference if impl == "reference" else indexer_scores_xla
    return jax.jit(functools.partial(fn, act=act))


def _check(q, w, k, lens, act, **cfg):
    out = _kernel(act, **cfg)(q, w, k, lens)
    ref = _ref(act)(q, w, k, lens)
    logits = _ref("none")(q, w, k, lens) if act == "sigmoid" else None
    assert_scores_close(out, ref, RTOL_F32, act=act, ref_logits=logits)
    return out


@pytest.mark.parametrize("qdtype", [jnp.float32, jnp.bfloat16], ids=["q_f32", "q_bf16"])
@pytest.mark.parametrize("act", ["none", "sigmoid"])
def test_packed_fp8_keys(qdtype, act):
    out = _check(*_inputs(1, qdtype), act, **BLOCK)
    assert out.shape == (B, N)
    if act == "none":
        assert np.all(np.asarray(out)[1] == -np.inf)          # length 0: everything masked
        assert np.all(np.asarray(out)[2, 41:] == -np.inf) and np.all(np.isfinite(np.asarray(out)[2, :41]))


def test_fp8_extremes_negative_weights():
    # +-448, subnormals, +-0 in the fp8 bytes, scales over 9 decades, every head weight negative
    q, w, k, lens = _inputs(2, jnp.float32, extremes=True, neg_weights=True)
    out = _check(q, w, k, lens, "none", **BLOCK)
    finite = np.asarray(out)[np.isfinite(np.asarray(out))]
    assert np.all(finite <= 0.0)                                # sum of w<0 times relu >= 0
    _check(q, w, k, lens, "sigmoid", **BLOCK)


@pytest.mark.parametrize("kdtype,qdtype", [(jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32),
                                           (jnp.float32, jnp.float32)], ids=["bf16_bf16", "bf16_f32", "f32_f32"])
def test_float_keys(kdtype, qdtype):
    _check(*_inputs(3, qdtype, keys=kdtype), "none", **BLOCK)


def test_heads_major_and_single_block_program():
    q, w, k, lens = _inputs(4, jnp.bfloat16)
    _check(q, w, k, lens, "none", block_n=16, blocks_per_program=1, heads_major=True)


@pytest.mark.parametrize("per_query_len", [True, False])
def test_multi_query(per_query_len):
    q, w, k, lens = _inputs(5, jnp.float32, multi=3)
    if not per_query_len:
        lens = lens[:, 0]
    out = _check(q, w, k, lens, "sigmoid", block_n=32, blocks_per_program=1, queries_per_program=2)
    assert out.shape == (B, 3, N)


def test_padded_heads():
    # H = 5 is padded to 16 zero heads with zero weight inside the wrapper
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.normal(size=(2, 5, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    keys = packed_keys(7, 2, 40, D)
    lens = jnp.array([40, 13], jnp.int32)
    _check(q, w, keys, lens, "none", block_n=16, blocks_per_program=2)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), lens=st.lists(st.integers(0, N), min_size=B, max_size=B),
       extremes=st.booleans(), neg=st.booleans())
def test_random_values_hypothesis(seed, lens, extremes, neg):
    q, w, k, _ = _inputs(seed % 1000, jnp.float32, extremes=extremes, neg_weights=neg)
    _check(q, w, k, jnp.array(lens, jnp.int32), "none", **BLOCK)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(shape=st.sampled_from([(1, 0, 3, 8, 17), (2, 2, 5, 16, 40)]), seed=st.integers(0, 1000),
       bf16=st.booleans(), extremes=st.booleans())
def test_xla_path_matches_reference(shape, seed, bf16, extremes):
    act = "sigmoid" if shape[1] else "none"
    b, m, h, d, n = shape
    rng = np.random.default_rng(seed)
    qshape = (b, m, h, d) if m else (b, h, d)
    q = jnp.asarray(rng.normal(size=qshape), jnp.float32).astype(jnp.bfloat16 if bf16 else jnp.float32)
    w = jnp.asarray(rng.normal(size=qshape[:-1]), jnp.float32)
    keys = packed_keys(seed + 1, b, n, d, extremes=extremes)
    lens = jnp.asarray(rng.integers(0, n + 1, size=(b, m) if m else (b,)), jnp.int32)
    ref = _ref(act)(q, w, keys, lens)
    out = _ref(act, "xla")(q, w, keys, lens)
    logits = _ref("none")(q, w, keys, lens) if act == "sigmoid" else None
    assert_scores_close(out, ref, RTOL_F32, act=act, ref_logits=logits)


# ---------------------------------------------------------------------------- page-blocked keys (issue 12)
def _paged(keys, p):
    """Packed rows [B, N, D+4] -> (page-blocked [B, n_pages, P*(D+4)], the same keys as rows padded to
    n_pages * P): the reference reads the rows, the kernel the pages."""
    pages = block_index_keys(keys, p)
    return pages, unblock_index_keys(pages, p, keys.shape[-1] - 4)


@pytest.mark.parametrize("p,cfg", [(4, dict(block_n=32, blocks_per_program=2)),     # blocks of 8 pages
                                   (8, dict(block_n=16, blocks_per_program=1)),     # 2 pages
                                   (16, dict(block_n=16, blocks_per_program=3)),    # 1 page
                                   (64, dict(block_n=32, blocks_per_program=1)),    # half a page
                                   (64, dict(block_n=16, blocks_per_program=2, heads_major=True)),
                                   (12, dict(block_n=32, blocks_per_program=1))],   # -> blocks of 4
                         ids=["p4", "p8", "p16", "p64", "p64_heads_major", "p12"])
@pytest.mark.parametrize("qdtype", [jnp.float32, jnp.bfloat16], ids=["q_f32", "q_bf16"])
def test_page_blocked_keys(p, cfg, qdtype):
    q, w, k, lens = _inputs(10 + p, qdtype)
    pages, rows = _paged(k, p)
    out = _kernel("none", page_entries=p, **cfg)(q, w, pages, lens)
    ref = _ref("none")(q, w, rows, lens)
    assert_scores_close(out, ref, RTOL_F32)
    assert out.shape == (B, rows.shape[1])
    assert np.all(np.asarray(out)[2, 41:] == -np.inf) and np.all(np.isfinite(np.asarray(out)[2, :41]))


@pytest.mark.parametrize("p,cfg", [(8, dict(block_n=16, blocks_per_program=2)), (64, dict(block_n=32)),
                                   (16, dict(block_n=16, heads_major=True))], ids=["p8", "p64_half_page", "p16_hm"])
@pytest.mark.parametrize("act", ["none", "sigmoid"])
def test_page_blocked_nan_bytes_past_the_length_stay_out(p, cfg, act):
    # the paged loads read a page part whole once its first entry is live (the kernel's docstring): entries past
    # a request's length are then read too. Fill them with NaN codes (fp8 0xFF, scale bytes 0xFF) and check
    # every output equals the reference's, the masked ones included
    q, w, k, lens = _inputs(40 + p, jnp.bfloat16)
    k = np.array(k)
    for r, n_live in enumerate(np.asarray(lens)):
        k[r, n_live:] = 0xFF
    pages, rows = _paged(jnp.asarray(k), p)
    out = _kernel(act, page_entries=p, **cfg)(q, w, pages, lens)
    ref = _ref(act)(q, w, rows, lens)
    for r, n_live in enumerate(np.asarray(lens)):
        masked = np.asarray(out)[r, n_live:]
        assert np.all(masked == (0.0 if act == "sigmoid" else -np.inf)), r
        assert np.all(np.isfinite(np.asarray(out)[r, :n_live])), r
    assert_scores_close(out, ref, RTOL_F32, act=act, ref_logits=_ref("none")(q, w, rows, lens) if act == "sigmoid"
                        else None)


@pytest.mark.parametrize("p", [8, 64])
def test_page_blocked_multi_query_sigmoid_extremes(p):
    q, w, k, lens = _inputs(20 + p, jnp.float32, multi=3, extremes=True)
    pages, rows = _paged(k, p)
    out = _kernel("sigmoid", page_entries=p, block_n=16, blocks_per_program=2, queries_per_program=2)(
        q, w, pages, lens)
    assert_scores_close(out, _ref("sigmoid")(q, w, rows, lens), RTOL_F32, act="sigmoid",
                        ref_logits=_ref("none")(q, w, rows, lens))


@pytest.mark.parametrize("p", [4, 8, 64])
@pytest.mark.parametrize("impl", [indexer_scores_reference, indexer_scores_xla], ids=["reference", "xla"])
def test_page_blocked_reference_and_xla_equal_the_rows_bit_for_bit(p, impl):
    q, w, k, lens = _inputs(30 + p, jnp.float32, multi=2)
    pages, rows = _paged(k, p)
    got = jax.jit(functools.partial(impl, page_entries=p))(q, w, pages, lens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(impl)(q, w, rows, lens)))


def test_page_blocked_input_errors():
    q, w, k, lens = _inputs(40, jnp.float32)
    pages, _ = _paged(k, 8)
    with pytest.raises(ValueError, match="page_entries was given"):
        indexer_scores_reference(q, w, k, lens, page_entries=8)              # rows passed as pages
    with pytest.raises(ValueError, match="page_entries"):
        indexer_scores_reference(q, w, pages, lens, page_entries=16)         # wrong page size
    with pytest.raises(ValueError, match="D\\+4"):
        indexer_scores_reference(q, w, pages, lens)                          # pages without page_entries


@pytest.mark.parametrize("p", [8, 64])
def test_page_blocked_kernel_lowers_to_triton_without_a_gpu(p):
    # the paged loads (a [pages, bytes] tile reshaped to [block, D]) through Pallas' Triton lowering
    q, w, k, lens = _inputs(50, jnp.bfloat16)
    pages, _ = _paged(k, p)
    f = functools.partial(indexer_scores_pallas, act="none", page_entries=p)
    try:
        low = compat.lower_for_cuda(f, q, w, pages, lens)
    except TypeError as e:  # pragma: no cover - a jax without cross-platform lowering
        pytest.skip(f"no cross-platform lowering in this jax: {e}")
    text = low.as_text()
    assert text.count("@__gpu$xla.gpu.triton") + text.count("@triton_kernel_call_ffi") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("p", [16, 64])
@pytest.mark.parametrize("n", [77, 4096 + 40])
@pytest.mark.parametrize("qdtype", [jnp.float32, jnp.bfloat16], ids=["q_f32", "q_bf16"])
def test_compiled_page_blocked_kernel_on_gpu(p, n, qdtype):
    """The compiled paged kernel (default blocks: two 64-entry pages per 128-entry block for V4's pages)
    against the reference, V4's 64 heads x 128 dims, ragged lengths: the check that lets ``auto`` use it."""
    rng = np.random.default_rng(p + n)
    b, h, d = 3, 64, 128
    q = jnp.asarray(rng.normal(size=(b, h, d)), jnp.float32).astype(qdtype)
    w = jnp.asarray(rng.normal(size=(b, h)), jnp.float32)
    rows = jax.jit(pack_index_keys)(jnp.asarray(rng.normal(size=(b, n, d)) * 3.0, jnp.float32))
    pages, padded = _paged(rows, p)
    lens = jnp.array([n, 0, n // 2 + 3], jnp.int32)
    out = jax.jit(functools.partial(indexer_scores_pallas, act="none", page_entries=p))(q, w, pages, lens)
    assert_scores_close(out, _ref("none")(q, w, padded, lens), RTOL_F32)
