"""Exact top-k kernel (interpret mode on CPU) against ``jax.lax.top_k``: same values, same indices, same order.

Every call packs eight kinds of rows into one batch (random, few levels with ties across the k-th place, all
-inf, fewer than k finite, +-0 and subnormals, one value repeated around the threshold, large negatives with
+inf, all equal), so each shape compiles once. Small chunks make the ragged tails and many programs per row
appear at small N.
"""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat, dispatch, topk, topk_reference, topk_xla
from pallas_kernels.topk import default_config as topk_config
from pallas_kernels.topk import topk_pallas

ROW_KINDS = ("normal", "levels", "all_neg_inf", "few_finite", "zeros_subnormals", "threshold_ties",
             "negative_inf", "all_equal")


def rows(seed: int, n: int, k: int, kinds=ROW_KINDS) -> np.ndarray:
    """float32 [len(kinds), n], one row per kind (never all zeros: the zero row mixes +-0 with subnormals)."""
    rng = np.random.default_rng(seed)
    out = []
    for kind in kinds:
        x = rng.normal(size=n).astype(np.float32) * 3
        if kind == "levels":
            x = rng.choice(np.array([-1.5, 0.25, 2.0, 3.0], np.float32), size=n, p=[0.4, 0.3, 0.2, 0.1])
        elif kind == "all_neg_inf":
            x[:] = -np.inf
        elif kind == "few_finite":
            keep = rng.uniform(size=n) < min(0.5, k / (2 * n))
            x = np.where(keep, x, -np.inf)
        elif kind == "zeros_subnormals":
            tiny = np.float32(1e-45)          # the smallest subnormal
            pool = np.array([0.0, -0.0, tiny, -tiny, 3 * tiny, np.float32(1e-39), -np.float32(1e-39), 1.0, -1.0],
                            np.float32)
            x = rng.choice(pool, size=n)
        elif kind == "threshold_ties":     # the k-th largest value repeated at many places before and after
            v = np.sort(x)[::-1][min(k, n) - 1]
            x = np.where(rng.uniform(size=n) < 0.2, v, x)
        elif kind == "negative_inf":
            x = -np.abs(x) * np.float32(1e37)
            x[rng.integers(0, n, size=3)] = np.inf
            x[rng.integers(0, n, size=3)] = -np.float32(3.4e38)
        elif kind == "all_equal":
            x[:] = np.float32(0.5)
        out.append(x.astype(np.float32))
    return np.stack(out)


def assert_same_topk(got, want):
    gv, gi = (np.asarray(a) for a in got)
    wv, wi = (np.asarray(a) for a in want)
    assert gi.dtype == np.int32 and gi.shape == wi.shape
    np.testing.assert_array_equal(gi, wi)
    # bitwise, so -0.0 vs +0.0 and the subnormals count
    np.testing.assert_array_equal(gv.view(np.int32), wv.view(np.int32))


@functools.cache
def _kernel(k, chunk, cpp, digits=(11, 11, 10), onehot="bf16", skip_empty=True):
    return jax.jit(functools.partial(topk_pallas, k=k, interpret=True, chunk=chunk, chunks_per_program=cpp,
                                     digits=digits, onehot=onehot, skip_empty=skip_empty))


@pytest.mark.parametrize("n,k,chunk,cpp,digits,onehot,skip", [
    (1000, 37, 64, 2, (11, 11, 10), "bf16", True),       # ragged: 8 programs per row, the last one partly past N
    (1000, 37, 64, 2, (8, 8, 8, 8), "int8", False),
    (4097, 512, 128, 4, (8, 8, 8, 8), "bf16", True),     # one entry into the last program
    (20000, 512, 256, 8, (11, 11, 10), "int8", True),    # the default chunk, 10 programs per row
    (300, 300, 32, 4, (11, 11, 10), "bf16", False),      # k == N
    (64, 1, 32, 1, (8, 8, 8, 8), "bf16", True),          # k == 1
])
def test_matches_lax_top_k(n, k, chunk, cpp, digits, onehot, skip):
    x = jnp.asarray(rows(n + k, n, k))
    assert_same_topk(_kernel(k, chunk, cpp, digits, onehot, skip)(x), jax.lax.top_k(x, k))


def test_default_config_digits():
    assert topk_config(1, 65536)["digits"] == (8, 8, 8, 8)   # measured faster at every timed shape (H200)
    assert topk_config(8, 262144)["digits"] == (8, 8, 8, 8)
    with pytest.raises(ValueError, match="digits"):
        topk_pallas(jnp.ones((1, 64)), 4, interpret=True, digits=(16, 16))
    with pytest.raises(ValueError, match="onehot"):
        topk_pallas(jnp.ones((1, 64)), 4, interpret=True, onehot="fp8")


def test_reference_is_lax_top_k():
    x = jnp.asarray(rows(7, 500, 64))
    assert_same_topk(topk_reference(x, 64), jax.lax.top_k(x, 64))
    assert_same_topk(topk_xla(x, 64), jax.lax.top_k(x, 64))


def test_negative_zero_ranks_below_positive_zero():
    # lax.top_k (XLA:CPU) orders in IEEE total order; the kernel's int key does the same
    x = jnp.asarray([[-0.0, 0.0, -0.0, 0.0] * 4], jnp.float32)
    v, i = _kernel(8, 32, 1)(x)
    assert np.asarray(i).tolist() == [[1, 3, 5, 7, 9, 11, 13, 15]]
    assert_same_topk((v, i), jax.lax.top_k(x, 8))


def test_dispatch_clips_k_and_keeps_leading_dims():
    x = jnp.asarray(rows(3, 100, 100)[:6].reshape(2, 3, 100))
    for impl in ("pallas", "xla"):
        v, i = topk(x, 512, impl=impl, interpret=True)            # k > N: every entry, sorted
        assert v.shape == (2, 3, 100) and i.shape == (2, 3, 100)
        assert_same_topk((v, i), jax.lax.top_k(x, 100))
    v, i = topk(x, 0, impl="pallas", interpret=True)
    assert v.shape == (2, 3, 0) and i.shape == (2, 3, 0)


def test_dispatch_choice(monkeypatch):
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="impl must be"):
        topk(x, 4, impl="cuda")
    with pytest.raises(ValueError, match="k must be"):
        topk(x, -1)
    with pytest.raises(ValueError, match="float array"):
        topk(x.astype(jnp.int32), 4)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            topk(x, 4, impl="pallas")
        assert dispatch._pick("topk", "auto", False, True) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert dispatch._pick("topk", "auto", False, True) == "pallas"
    # auto on a GPU: the kernel only where it was measured faster than lax.top_k (<= 8 rows of >= 32K entries,
    # k <= 512; dispatch module doc); impl="pallas" runs it anywhere, with the leading dims flattened into rows
    calls = []
    monkeypatch.setattr(dispatch, "topk_pallas", lambda x, k, **kw: calls.append(x.shape) or jax.lax.top_k(x, k))
    topk(jnp.ones((2, 128, 64)), 4)                    # 256 short rows: untimed, lax.top_k
    topk(jnp.ones((9, 32768)), 512)                    # 9 rows: untimed
    topk(jnp.ones((2, 32767)), 512)                    # just below 32K entries
    topk(jnp.ones((2, 32768)), 513)                    # k above the timed 512
    assert calls == []
    topk(jnp.ones((2, 4, 32768)), 512)                 # 8 rows of 32K: the kernel
    topk(jnp.ones((1, 65536)), 64)
    assert calls == [(8, 32768), (1, 65536)]
    topk(jnp.ones((2, 128, 64)), 4, impl="pallas")
    assert calls[-1] == (256, 64)


@pytest.mark.parametrize("digits,onehot", [((11, 11, 10), "bf16"), ((8, 8, 8, 8), "int8")])
def test_lowers_to_triton_without_a_gpu(digits, onehot):
    # the GPU path (masked atomics, no spare column) through Pallas' Triton lowering: catches primitives
    # without a Triton rule in CI (with jaxlib <= 0.10.2 Triton's own compile to PTX happens only on the GPU)
    f = functools.partial(topk_pallas, k=512, digits=digits, onehot=onehot)
    try:
        low = compat.lower_for_cuda(f, jax.ShapeDtypeStruct((3, 20000 + 37), jnp.float32))
    except TypeError as e:  # pragma: no cover - a jax without cross-platform lowering
        pytest.skip(f"no cross-platform lowering in this jax: {e}")
    text = low.as_text()   # jaxlib <= 0.10.2 leaves the Triton compile to XLA, later ones compile here
    assert text.count("@__gpu$xla.gpu.triton") + text.count("@triton_kernel_call_ffi") == len(digits) + 1


def test_no_integer_vector_atomics_in_the_triton_ir(monkeypatch, capsys):
    # Pallas' Triton lowering emits `tt.atomic_rmw fadd` for a vector atomic add of int32 values (its integer
    # check sees scalars only), which broke the int32-histogram version on the H200: every atomic add of the
    # kernel must be a float add on float32 memory or an integer add
    from jax.experimental import pallas as pl
    topk_mod = importlib.import_module("pallas_kernels.topk")
    monkeypatch.setattr(pl, "pallas_call", functools.partial(pl.pallas_call, debug=True))   # prints the TTIR
    f = functools.partial(topk_mod.topk_pallas, k=512)
    try:
        compat.lower_for_cuda(f, jax.ShapeDtypeStruct((3, 20000 + 37), jnp.float32))
    except TypeError as e:  # pragma: no cover - a jax without cross-platform lowering
        pytest.skip(f"no cross-platform lowering in this jax: {e}")
    atomics = [line for line in capsys.readouterr().out.splitlines() if "tt.atomic_rmw" in line]
    assert len(atomics) == len(topk_config(3, 20037)["digits"]) + 1     # one per histogram digit + the slot counter
    for line in atomics:
        kind, ptr_type = line.split("tt.atomic_rmw ")[1].split(",")[0], line.split(": (")[1].split(",")[0]
        assert (kind == "fadd" and "ptr<f32>" in ptr_type) or (kind == "add" and "ptr<i32>" in ptr_type), line


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("n", [65536, 262144])
def test_compiled_kernel_on_gpu(batch, n):
    k = 512
    x = jnp.asarray(rows(n + batch, n, k, ROW_KINDS[:batch]))
    for digits, onehot in (((11, 11, 10), "bf16"), ((8, 8, 8, 8), "bf16"), ((8, 8, 8, 8), "int8")):
        got = jax.jit(functools.partial(topk_pallas, k=k, digits=digits, onehot=onehot))(x)
        assert_same_topk(got, jax.lax.top_k(x, k))
