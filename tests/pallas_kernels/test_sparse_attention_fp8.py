"""Sparse attention over V4's packed fp8 KV rows (issue 15): the Pallas kernel in interpret mode, which
loads packed bytes and dequantises in registers, and the XLA path, against the reference on random inputs.

The reference dequantises the attended rows exactly, so it equals the bf16/f32 reference over the rounded KV
bit for bit; tolerances are the bf16 / float32 ones of the unpacked kernel (never loosened).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax.layers import kv_fp8
from pallas_kernels import sparse_attention
from pallas_kernels.reference import sparse_attention_reference, sparse_attention_xla
from pallas_kernels.sparse_attention import sparse_attention_pallas
from tests.pallas_kernels.test_sparse_attention import RTOL_BF16, RTOL_F32, rel_err

B = 3


def _inputs(seed, d, rope_dim, n, k, w, h, qdtype=jnp.float32, window_lengths=None):
    """Packed kv [B, n, E] and window [B, w, E] of random entries (per-row scales 2^-6 .. 2^6, so the
    blocks' ue8m0 scales differ), indices with padding (-1), duplicates and out-of-range rows, ragged
    window lengths (full, ragged, empty by default)."""
    rng = np.random.default_rng(seed)

    def rows(m):
        x = rng.normal(size=(B, m, d)) * np.exp2(rng.integers(-6, 7, size=(B, m, 1)))
        return kv_fp8.pack(jnp.asarray(x, jnp.float32), rope_dim)

    q = jnp.asarray(rng.normal(size=(B, h, d)), jnp.float32).astype(qdtype)
    idx = rng.integers(0, n, size=(B, k))
    idx = np.where(rng.uniform(size=(B, k)) < 0.25, -1, idx)
    idx[0, :3] = idx[0, 4]                                   # duplicates
    idx[1, 0] = n + 5                                        # out of range: padding
    idx[2] = -1                                              # request 2 gathers nothing
    wl = jnp.array(window_lengths or [w, max(1, w // 3), 0], jnp.int32)
    return q, rows(n), jnp.asarray(idx, jnp.int32), rows(w), wl, jnp.asarray(rng.normal(size=h), jnp.float32)


SHAPES = {  # name: (d, rope_dim, n, k, w, h)
    "v4": (512, 64, 24, 12, 8, 16),          # V4-Flash's 584-byte rows, 7 scale blocks
    "small": (144, 16, 40, 20, 12, 20),      # 2 scale blocks; 20 heads padded to 32
}


def _check(args, rope_dim, rtol, **cfg):
    d = args[0].shape[-1]
    out, lse = jax.jit(functools.partial(sparse_attention_pallas, scale=d ** -0.5, rope_dim=rope_dim, interpret=True,
                                         **cfg))(*args)
    ref_out, ref_lse = jax.jit(functools.partial(sparse_attention_reference, scale=d ** -0.5,
                                                 rope_dim=rope_dim))(*args)
    assert out.shape == ref_out.shape and out.dtype == jnp.float32
    assert not np.isnan(np.asarray(out)).any()
    assert rel_err(out, ref_out) < rtol, rel_err(out, ref_out)
    assert rel_err(lse, ref_lse) < rtol, rel_err(lse, ref_lse)
    np.testing.assert_array_equal(np.asarray(out)[2], 0.0)     # request 2: empty window, nothing gathered
    return out


@pytest.mark.parametrize("shape,qdtype,n_splits,fused", [
    ("v4", jnp.bfloat16, 1, True),
    ("v4", jnp.float32, 3, True),
    ("small", jnp.bfloat16, 3, False),
])
def test_packed_kernel_matches_reference(shape, qdtype, n_splits, fused):
    d, rd, n, k, w, h = SHAPES[shape]
    args = _inputs(1, d, rd, n, k, w, h, qdtype)
    _check(args, rd, RTOL_BF16 if qdtype == jnp.bfloat16 else RTOL_F32, block_k=8, n_splits=n_splits,
           fused_combine=fused)


def test_packed_pool_with_float_window():
    # chunked prefill: the pool is the packed cache, the window the chunk's rounded float keys
    d, rd, n, k, w, h = SHAPES["small"]
    q, kv, idx, win, wl, sink = _inputs(2, d, rd, n, k, w, h, window_lengths=[w, 5, 0])
    win_f = kv_fp8.unpack(win, d, rd)
    _check((q, kv, idx, win_f, wl, sink), rd, RTOL_F32, block_k=8, n_splits=2)


def test_reference_dequantises_exactly_and_xla_path():
    d, rd, n, k, w, h = SHAPES["v4"]
    q, kv, idx, win, wl, sink = _inputs(3, d, rd, n, k, w, h, jnp.bfloat16)
    f = functools.partial(sparse_attention_reference, scale=d ** -0.5)
    packed = f(q, kv, idx, win, wl, sink, rope_dim=rd)
    floats = f(q, kv_fp8.unpack(kv, d, rd), idx, kv_fp8.unpack(win, d, rd), wl, sink)
    for a, b in zip(packed, floats):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the XLA path gathers packed rows then dequantises them to bf16 (exact): same as its bf16 input path
    xla = functools.partial(sparse_attention_xla, scale=d ** -0.5)
    out_p = xla(q, kv, idx, win, wl, sink, rope_dim=rd)[0]
    out_b = xla(q, kv_fp8.unpack(kv, d, rd, jnp.bfloat16), idx, kv_fp8.unpack(win, d, rd, jnp.bfloat16), wl, sink)[0]
    np.testing.assert_array_equal(np.asarray(out_p), np.asarray(out_b))
    assert rel_err(out_p, packed[0]) < RTOL_BF16


def test_bad_packed_inputs():
    d, rd, n, k, w, h = SHAPES["small"]
    q, kv, idx, win, wl, sink = _inputs(4, d, rd, n, k, w, h)
    with pytest.raises(ValueError, match="rope_dim was not given"):
        sparse_attention(q, kv, idx, win, wl, sink, scale=1.0)
    with pytest.raises(ValueError, match="E=168"):
        sparse_attention(q, kv[..., :-8], idx, win, wl, sink, scale=1.0, rope_dim=rd)
    with pytest.raises(ValueError, match="multiple of 64"):
        sparse_attention(q, kv, idx, win, wl, sink, scale=1.0, rope_dim=24)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 32])
def test_packed_kernel_compiled_on_gpu(batch):
    """The compiled Triton kernel (default block config) at V4-Flash shapes, against the reference."""
    rng = np.random.default_rng(batch)
    d, rd, h, n, k, w = 512, 64, 64, 2048, 512, 128
    q = jnp.asarray(rng.normal(size=(batch, h, d)), jnp.bfloat16)
    kv = kv_fp8.pack(jnp.asarray(rng.normal(size=(batch, n, d)), jnp.float32), rd)
    win = kv_fp8.pack(jnp.asarray(rng.normal(size=(batch, w, d)), jnp.float32), rd)
    idx = jnp.asarray(rng.integers(-1, n, size=(batch, k)), jnp.int32)
    wl = jnp.asarray(rng.integers(0, w + 1, size=batch), jnp.int32)
    sink = jnp.asarray(rng.normal(size=h), jnp.float32)
    out, lse = sparse_attention(q, kv, idx, win, wl, sink, scale=d ** -0.5, rope_dim=rd, impl="pallas")
    ref_out, ref_lse = sparse_attention_reference(q, kv, idx, win, wl, sink, scale=d ** -0.5, rope_dim=rd)
    assert rel_err(out, ref_out) < RTOL_BF16 and rel_err(lse, ref_lse) < RTOL_BF16


def test_auto_dispatch_for_packed_rows(monkeypatch):
    # packed rows: XLA under auto even on the GPU (the kernel measured slower, see dispatch); bf16 rows: Pallas
    from pallas_kernels import dispatch
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert dispatch._choose("sparse_attention", "auto", False, 512, 64) == "xla"
    assert dispatch._choose("sparse_attention", "auto", False, 512) == "pallas"
    assert dispatch._choose("sparse_attention", "pallas", False, 512, 64) == "pallas"
