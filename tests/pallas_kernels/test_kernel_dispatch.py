"""The dispatch (impl="auto" | "xla" | "pallas") and the input checks of both public ops."""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from fm_jax.layers.quant import pack_index_keys
from pallas_kernels import (
    dispatch,
    indexer_scores,
    indexer_scores_reference,
    indexer_scores_xla,
    sparse_attention,
    sparse_attention_reference,
    sparse_attention_xla,
)
from tests.pallas_kernels.test_indexer_score import RTOL_F32, assert_scores_close


def _indexer_args(b=2, h=4, d=16, n=20, multi=0):
    rng = np.random.default_rng(0)
    qshape = (b, multi, h, d) if multi else (b, h, d)
    q = jnp.asarray(rng.normal(size=qshape), jnp.float32)
    w = jnp.asarray(rng.normal(size=qshape[:-1]), jnp.float32)
    keys = jax.jit(pack_index_keys)(jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32))
    return q, w, keys, jnp.array([n, n // 2][:b], jnp.int32)


def _attention_args(b=2, h=4, d=16, n=10, k=6, w=4):
    rng = np.random.default_rng(1)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return (normal(b, h, d), normal(b, n, d), jnp.asarray(rng.integers(-1, n, size=(b, k)), jnp.int32),
            normal(b, w, d), jnp.array([w, 1][:b], jnp.int32), normal(h))


def test_public_exports():
    for name in ("indexer_scores", "sparse_attention", "indexer_scores_reference", "sparse_attention_reference"):
        assert callable(getattr(pallas_kernels, name))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the off-GPU choice")
def test_auto_on_cpu_picks_xla(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the Pallas kernel must not run on CPU with impl='auto'")

    monkeypatch.setattr(dispatch, "indexer_scores_pallas", boom)
    monkeypatch.setattr(dispatch, "sparse_attention_pallas", boom)
    args = _indexer_args()
    np.testing.assert_array_equal(jax.jit(indexer_scores)(*args), jax.jit(indexer_scores_xla)(*args))
    a = _attention_args()
    got = jax.jit(functools.partial(sparse_attention, scale=0.25, impl="auto"))(*a)
    want = jax.jit(functools.partial(sparse_attention_xla, scale=0.25))(*a)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def _rel(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(out), fin)
    return np.linalg.norm(np.where(fin, out, 0) - np.where(fin, ref, 0)) / np.linalg.norm(np.where(fin, ref, 0))


def test_xla_path_equals_reference():
    args = _indexer_args(multi=3)
    xla = jax.jit(functools.partial(indexer_scores, impl="xla"))
    assert _rel(xla(*args), jax.jit(indexer_scores_reference)(*args)) < 1e-5
    a = _attention_args()
    got = jax.jit(functools.partial(sparse_attention, scale=0.25, impl="xla"))(*a)
    want = jax.jit(functools.partial(sparse_attention_reference, scale=0.25))(*a)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5


def test_pallas_interpret_through_dispatch():
    args = _indexer_args()
    assert _rel(indexer_scores(*args, impl="pallas", interpret=True), indexer_scores_reference(*args)) < 1e-5


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the off-GPU error")
def test_pallas_without_gpu_or_interpret_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a GPU"):
        indexer_scores(*_indexer_args(), impl="pallas")
    with pytest.raises(ValueError, match="needs a GPU"):
        sparse_attention(*_attention_args(), scale=0.25, impl="pallas")


def test_bad_impl_and_act():
    with pytest.raises(ValueError, match="impl must be one of"):
        indexer_scores(*_indexer_args(), impl="cuda")
    with pytest.raises(ValueError, match="act must be one of"):
        indexer_scores(*_indexer_args(), act="relu")
    with pytest.raises(ValueError, match="impl must be one of"):
        sparse_attention(*_attention_args(), scale=0.25, impl="triton")


@pytest.mark.parametrize("which,make,match", [
    ("q rank", lambda q, w, k, n: (q[0], w, k, n), "q must be"),
    ("q dtype", lambda q, w, k, n: (q.astype(jnp.int32), w, k, n), "q must be a float"),
    ("weights shape", lambda q, w, k, n: (q, w[:, :2], k, n), "weights must be"),
    ("keys dtype", lambda q, w, k, n: (q, w, k.astype(jnp.int32), n), "keys must be uint8"),
    ("packed width", lambda q, w, k, n: (q, w, k[..., :-1], n), "D\\+4"),
    ("float keys width", lambda q, w, k, n: (q, w, jnp.zeros((2, 20, 8), jnp.float32), n), "keys must be"),
    ("keys batch", lambda q, w, k, n: (q, w, k[:1], n), "keys must be"),
    ("lengths dtype", lambda q, w, k, n: (q, w, k, n.astype(jnp.float32)), "lengths must be an integer"),
    ("lengths shape", lambda q, w, k, n: (q, w, k, n[:, None]), "lengths must have shape"),
])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_indexer_bad_inputs(which, make, match, impl):
    with pytest.raises(ValueError, match=match):
        indexer_scores(*make(*_indexer_args()), impl=impl, interpret=True)


@pytest.mark.parametrize("which,make,match", [
    ("q rank", lambda a: (a[0][0],) + a[1:], "q must be"),
    ("kv dtype", lambda a: (a[0], a[1].astype(jnp.int8)) + a[2:], "kv must be"),
    ("kv dim", lambda a: (a[0], a[1][..., :8]) + a[2:], "kv must be"),
    ("indices dtype", lambda a: a[:2] + (a[2].astype(jnp.float32),) + a[3:], "indices must be an integer"),
    ("window dim", lambda a: a[:3] + (a[3][..., :8],) + a[4:], "window_kv must be"),
    ("window lengths", lambda a: a[:4] + (a[4][:1],) + a[5:], "window_lengths must be"),
    ("sink shape", lambda a: a[:5] + (a[5][:2],), "sink must be"),
])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_attention_bad_inputs(which, make, match, impl):
    with pytest.raises(ValueError, match=match):
        sparse_attention(*make(_attention_args()), scale=0.25, impl=impl, interpret=True)


def test_pallas_attention_needs_a_static_scale():
    a = _attention_args()
    f = jax.jit(lambda s, *x: sparse_attention(*x, scale=s, impl="pallas", interpret=True))
    with pytest.raises(ValueError, match="scale must be a static"):
        f(0.25, *a)


def test_auto_falls_back_to_xla_for_kernel_unfriendly_dims(monkeypatch):
    # head dim 12 is not a power of two: even on a GPU, auto must take the XLA path
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert dispatch._choose("indexer_scores", "auto", False, 12) == "xla"
    assert dispatch._choose("indexer_scores", "auto", False, 128) == "pallas"


def test_auto_picks_the_page_kernels_on_a_gpu(monkeypatch):
    """Page-blocked keys on a GPU under "auto": the Mosaic GPU kernel where its plan fits one query per request
    (it beat the paged Triton kernel at every timed shape on the H200), else the paged Triton kernel (a head dim
    Mosaic does not take, or several queries per request); rows take the row kernel (dispatch docstring)."""
    import pallas_kernels.indexer_score_mgpu as mgpu
    from fm_jax.layers.key_pages import block_index_keys

    calls = []

    def spy(name, kernel):
        def run(*a, **k):
            calls.append((name, k.get("page_entries")))
            return kernel(*a, **{**k, "interpret": True})
        return run

    monkeypatch.setattr(dispatch, "indexer_scores_pallas", spy("pallas", dispatch.indexer_scores_pallas))
    monkeypatch.setattr(mgpu, "indexer_scores_mosaic", spy("mosaic", mgpu.indexer_scores_mosaic))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for h, d, p, n, multi, want in ((4, 16, 16, 32, 0, "pallas"),      # D = 16: not a Mosaic shape
                                    (32, 64, 32, 128, 0, "mosaic"),
                                    (32, 64, 32, 128, 2, "pallas")):    # several queries per request
        q, w, keys, lens = _indexer_args(h=h, d=d, n=n, multi=multi)
        if multi:
            lens = jnp.broadcast_to(lens[:, None], (2, multi))
        pages = block_index_keys(keys, p)
        calls.clear()
        got = indexer_scores(q, w, pages, lens, page_entries=p)
        assert calls == [(want, p)]
        assert_scores_close(got, indexer_scores_xla(q, w, pages, lens, page_entries=p), RTOL_F32)
    q, w, keys, lens = _indexer_args(h=32, d=64, n=128)                # a Mosaic shape on a pre-Hopper GPU
    pages = block_index_keys(keys, 32)
    monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(compute_capability="8.0")])
    calls.clear()
    indexer_scores(q, w, pages, lens, page_entries=32)
    assert calls == [("pallas", 32)]
    calls.clear()
    indexer_scores(q, w, keys, lens)                                   # rows
    indexer_scores(q, w, pages, lens, page_entries=32, impl="xla")
    assert calls == [("pallas", None)]
