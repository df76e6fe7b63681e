"""The one entry point per op that model code calls: ``impl="pallas" | "xla" | "auto"``.

``auto`` runs the Pallas kernel when ``jax.default_backend() == "gpu"`` (and the shapes suit it: head dim a
power of two >= 16) and the plain-XLA path everywhere else, so CPU and TPU users still run. Results are under
``benchmarks/results/``. Two exceptions:
* packed fp8 KV rows: ``auto`` takes the XLA path on every backend (``impl="pallas"`` still runs the kernel): the
  packed-row kernel measured 0.36-0.47x the XLA path on the H100 with byte loads (`kernels-h100.json`, run 'c')
  and 0.75x / 0.56x at batch 8 / 64 with word loads on the H200 (`kernels-h200-fp8.json`);
* top-k: ``auto`` runs the radix-select kernel only where it was measured faster than ``lax.top_k`` on the H200
  (``_topk_kernel_measured_faster``: batch <= 8, N >= 32K, k <= 512; 1.8x at batch 1, N = 64K, 3.2x at batch 8,
  N = 256K, `kernels-h200-topk-sweep.json`; in the model's decode step at batch 8, N = 32K, 126 µs of top-k
  against 197, `kernels-h200-step-topk.json`), ``lax.top_k`` elsewhere. The model's Lightning Indexer calls
  ``topk`` with ``ModelConfig.topk_impl``, not with the scoring / attention ``impl``.
Page-blocked index keys (``indexer_scores(page_entries=)``, the decode cache's layout since issue 12) take the
Mosaic GPU (TMA + wgmma) scoring kernel under ``auto`` on a Hopper GPU where its launch plan fits (one query
per request; head dim 64 / 128, 32-256 heads, pages of a multiple of 32 entries:
``indexer_score_mgpu.input_plan``), else the paged Triton kernel (other GPUs, several queries per request as in
prefill, or other shapes). On the H200 the Mosaic kernel beat the paged Triton kernel at all eight timed shapes
(batch 1 / 8, N = 64K / 256K, bf16 and float32 q: 1.13-1.59x; 4.7-8.4x XLA; `kernels-h200-scoring-pages.json`,
`kernels-h200-scoring-f32.json`), and the model's prefill + decode under ``auto`` matched ``impl="xla"`` there
(`kernels-h200-gpu-tests.json`).
``sparse_attention(impl="mosaic")`` is the Mosaic GPU attention kernel (one CTA per 64 heads, per-row TMA gather,
split-K), bf16 q and kv with 64 heads only (else ValueError: ``pallas_kernels.sparse_attention_mgpu.plan``), explicit
opt-in only: it passed its GPU tests but was slower than the Triton kernel at every timed batch (21.4 / 23.9 / 79.6
µs against 10.8 / 17.0 / 52.7 at batch 1 / 8 / 64, `kernels-h200-attention-mgpu.json`, `-b64.json`).
``interpret=True`` runs the Pallas kernel in interpret mode (CPU tests); it only matters for ``impl="pallas"``
and ``"mosaic"``.
"""
from __future__ import annotations

import math

import jax

from pallas_kernels.indexer_score import indexer_scores_pallas
from pallas_kernels.reference import (
    check_attention_inputs,
    check_indexer_inputs,
    check_topk_inputs,
    indexer_scores_xla,
    sparse_attention_xla,
    topk_xla,
)
from pallas_kernels.sparse_attention import sparse_attention_pallas
from pallas_kernels.topk import topk_pallas

IMPLS = ("auto", "pallas", "xla")
MOSAIC_IMPLS = IMPLS + ("mosaic",)   # scoring and attention also have a Mosaic GPU kernel


def _pow2_dim(d: int) -> bool:
    return d >= 16 and d & (d - 1) == 0


def _choose(op: str, impl: str, interpret: bool, dim: int, rope_dim: int | None = None, impls: tuple = IMPLS
            ) -> str:
    """`rope_dim`: packed fp8 KV rows (XLA under "auto", see the module docstring)."""
    return _pick(op, impl, interpret, rope_dim is None and _pow2_dim(dim), impls)


def backend() -> str:
    """The backend the dispatch picks for: JAX's default one. (`benchmarks/aot_kernels.py` compiles the model
    for a GPU target from a CPU process and points this at "gpu" for that.)"""
    return jax.default_backend()


def _pick(op: str, impl: str, interpret: bool, kernel_fits: bool, impls: tuple = IMPLS) -> str:
    """`kernel_fits`: the shapes suit the Pallas kernel (else "auto" takes the XLA path even on a GPU);
    `impls`: the op's choices. A kernel ("pallas", "mosaic") needs a GPU unless interpreted."""
    if impl not in impls:
        raise ValueError(f"{op}: impl must be one of {impls}, got {impl!r}")
    if impl == "auto":
        return "pallas" if backend() == "gpu" and kernel_fits else "xla"
    if impl != "xla" and not interpret and backend() != "gpu":
        raise ValueError(f"{op}(impl={impl!r}) needs a GPU backend (found {backend()!r}); "
                         "pass interpret=True to run the kernel in interpret mode, or impl='xla'")
    return impl


def _hopper_gpu() -> bool:
    """The Mosaic GPU kernels use wgmma, which only Hopper (compute capability 9.x) has. With no GPU visible (the
    deviceless compile of `benchmarks/aot_kernels.py`, which targets sm_90a) the target is taken to be Hopper."""
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        return True
    cc = getattr(dev, "compute_capability", None)
    return cc is None or str(cc).split(".")[0] == "9"


def _mosaic_scoring_fits(info, keys, page_entries) -> bool:
    """Whether "auto" runs the Mosaic GPU scoring kernel: a Hopper GPU, page-blocked keys, one query per request,
    and a shape its launch plan supports (elsewhere the paged Triton kernel, which handles every shape)."""
    if page_entries is None or not _hopper_gpu():
        return False
    from pallas_kernels.indexer_score_mgpu import input_plan  # lazy: Mosaic GPU's import is heavy
    try:
        input_plan(info, keys, page_entries)
    except ValueError:
        return False
    return True


def indexer_scores(q, weights, keys, lengths, *, act: str = "none", impl: str = "auto", interpret: bool = False,
                   page_entries: int | None = None):
    """Indexer logits ``sum_h w[h] relu(q[h] . k[s])`` (act="none", masked -> -inf) or their sigmoid
    (act="sigmoid", masked -> 0). q [B, H, D] | [B, M, H, D]; keys uint8 [B, N, D+4] | bf16/f32 [B, N, D], or
    with ``page_entries=P`` page-blocked uint8 [B, n_pages, P * (D + 4)] (N = n_pages * P);
    lengths [B] | [B, M]. Returns float32 [B, N] | [B, M, N]. impl: "auto" | "pallas" | "xla" | "mosaic"."""
    info = check_indexer_inputs(q, weights, keys, lengths, act, page_entries)
    choice = _pick("indexer_scores", impl, interpret, _pow2_dim(info.dim), MOSAIC_IMPLS)
    if impl == "auto" and choice == "pallas" and _mosaic_scoring_fits(info, keys, page_entries):
        choice = "mosaic"
    if choice == "mosaic":
        from pallas_kernels.indexer_score_mgpu import indexer_scores_mosaic  # lazy: Mosaic GPU's import is heavy
        return indexer_scores_mosaic(q, weights, keys, lengths, act=act, page_entries=page_entries,
                                     interpret=interpret)
    if choice == "pallas":
        return indexer_scores_pallas(q, weights, keys, lengths, act=act, interpret=interpret,
                                     page_entries=page_entries)
    return indexer_scores_xla(q, weights, keys, lengths, act=act, page_entries=page_entries)


def sparse_attention(q, kv, indices, window_kv, window_lengths, sink, *, scale, rope_dim: int | None = None,
                     impl: str = "auto", interpret: bool = False):
    """Sparse decode attention over ``window_kv[:, :window_lengths]`` plus ``kv[indices]`` (-1 = padding)
    with a per-head sink logit; ``kv`` / ``window_kv`` may be packed fp8 rows (uint8, with ``rope_dim``).
    Returns (out float32 [B, H, D], lse float32 [B, H]). impl: "auto" | "pallas" | "xla" | "mosaic"."""
    info = check_attention_inputs(q, kv, indices, window_kv, window_lengths, sink, rope_dim)
    choice = _choose("sparse_attention", impl, interpret, info.dim, info.rope_dim, MOSAIC_IMPLS)
    if choice == "mosaic":
        from pallas_kernels.sparse_attention_mgpu import sparse_attention_mosaic  # lazy: heavy Mosaic GPU import
        return sparse_attention_mosaic(q, kv, indices, window_kv, window_lengths, sink, scale=scale,
                                       rope_dim=rope_dim, interpret=interpret)
    if choice == "pallas":
        return sparse_attention_pallas(q, kv, indices, window_kv, window_lengths, sink, scale=scale,
                                       rope_dim=rope_dim, interpret=interpret)
    return sparse_attention_xla(q, kv, indices, window_kv, window_lengths, sink, scale=scale, rope_dim=rope_dim)


def _topk_kernel_measured_faster(batch: int, n_entries: int, k: int) -> bool:
    """The shapes where the radix-select kernel beat ``lax.top_k`` on the H200 (module docstring): up to 8 rows
    of at least 32K entries, k <= 512. Elsewhere (more rows, short rows) it is untimed, so "auto" keeps XLA."""
    return batch <= 8 and n_entries >= 32768 and k <= 512


def topk(scores, k: int, *, impl: str = "auto", interpret: bool = False):
    """Exact top-k over the last axis, identical to ``jax.lax.top_k`` (ties to the lower index) with k clipped
    to N. scores float [..., N] (no NaN; -inf = not a candidate). Returns (values [..., k], indices int32
    [..., k]). The Pallas kernel reads float32 (other float dtypes are cast, exactly)."""
    k = check_topk_inputs(scores, k)
    lead, n = scores.shape[:-1], scores.shape[-1]
    rows = math.prod(lead)
    if k == 0 or _pick("topk", impl, interpret, _topk_kernel_measured_faster(rows, n, k)) == "xla":
        return topk_xla(scores, k)
    vals, idx = topk_pallas(scores.reshape(rows, n), k, interpret=interpret)
    return vals.reshape(*lead, k), idx.reshape(*lead, k)
