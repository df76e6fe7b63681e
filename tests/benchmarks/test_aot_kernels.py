"""benchmarks/aot_kernels.py: its ptxas parsing, and every case it compiles lowering for CUDA on the CPU (the
model's decode step with each kernel picked through the dispatch included), so CI catches a kernel or model change
that no longer lowers for the GPU; the deviceless compile itself needs the CUDA plugin (the script's docstring)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from benchmarks import aot_kernels
from pallas_kernels import compat, dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ptxas -v as printed for a Triton kernel (no smem figure), an XLA sort and a Mosaic GPU kernel that spills
PTXAS_TEXT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'topk_hist2' for 'sm_90a'
ptxas info    : Function properties for topk_hist2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 159 registers, used 1 barriers
ptxas info    : Compiling entry function 'sort_16_0' for 'sm_90a'
ptxas info    : Function properties for sort_16_0
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 6144 bytes smem
ptxas warning : Registers are spilled to local memory in function 'anonymous_mosaic_gpu_kernel', 536 bytes spill \
stores, 536 bytes spill loads
ptxas info    : Compiling entry function 'anonymous_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for anonymous_mosaic_gpu_kernel
    536 bytes stack frame, 536 bytes spill stores, 536 bytes spill loads
ptxas info    : Used 255 registers, used 16 barriers, 536 bytes cumulative stack size, 1 bytes smem
"""


def test_parse_ptxas():
    got = aot_kernels.parse_ptxas(PTXAS_TEXT)
    assert [e["name"] for e in got] == ["topk_hist2", "sort_16_0", "anonymous_mosaic_gpu_kernel"]
    assert got[0] == dict(name="topk_hist2", arch="sm_90a", stack_bytes=0, spill_store_bytes=0, spill_load_bytes=0,
                          registers=159, barriers=1, smem_static_bytes=0)
    assert got[1]["registers"] == 32 and got[1]["smem_static_bytes"] == 6144
    assert got[2]["registers"] == 255 and got[2]["barriers"] == 16
    assert got[2]["spill_store_bytes"] == got[2]["spill_load_bytes"] == got[2]["stack_bytes"] == 536
    assert got[2]["smem_static_bytes"] == 1


PTX_TEXT = """\
.visible .entry indexer_scores(
\t.param .u64 .ptr .global .align 16 indexer_scores_param_0
)
{
\tld.global.v4.b32 \t{ %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
\tld.global.v4.b32 \t{ %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];
\tld.global.b8 \t{ %rs1 }, [ %rd3 + 0 ];
\tld.global.nc.b32 \t%r9, [%rd4];
\tcp.async.cg.shared.global [ %r85 + 0 ], [ %rd256 + 0 ], 0x10, %r86;
\tst.global.v2.b32 \t[%rd5], {%r1, %r2};
}
.visible .entry anonymous_mosaic_gpu_kernel(
\t.param .u64 .ptr .align 256 anonymous_mosaic_gpu_kernel_param_0
)
{
\tcp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];
\tcp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%r5], [%rd1, {%r6, %r7}], [%r8];
\tcp.async.bulk.global.shared::cta.bulk_group [%rd145], [%rd146], %r859;
}
"""


def test_ptx_memory_ops():
    got = aot_kernels.ptx_memory_ops(PTX_TEXT)
    assert got == {"indexer_scores": {"cp.async.16": 1, "ld.b32": 1, "ld.b8": 1, "ld.v4.b32": 2, "st.v2.b32": 1},
                   "anonymous_mosaic_gpu_kernel": {"tma": 2}}


def test_xla_fusions_are_told_from_kernels():
    for name in ("loop_broadcast_fusion", "sort_16_0", "gemm_fusion_dot_30", "input_reduce_fusion"):
        assert aot_kernels._is_xla_fusion(name), name
    for name in ("topk_hist0", "indexer_scores", "sparse_attention__1", "anonymous_mosaic_gpu_kernel"):
        assert not aot_kernels._is_xla_fusion(name), name


def test_case_selection():
    names = [c[0] for c in aot_kernels.cases(["score", "decode"])]
    assert set(names) == {"score_triton", "score_mosaic", "decode_step"}
    assert {c[0] for c in aot_kernels.cases([])} == {"topk", "score_triton", "score_mosaic", "attn_triton",
                                                      "attn_mosaic", "decode_step"}


@pytest.mark.parametrize("case", aot_kernels.cases([]), ids=lambda c: c[0] + "-" + "-".join(
    f"{k}{v}" for k, v in c[1].items() if k in ("batch", "n_entries", "q_dtype", "kv_dtype", "impl", "dim")))
def test_every_case_lowers_for_cuda(case, monkeypatch):
    # the dispatch picks for the backend it runs on (the CPU here); the script points it at the GPU target
    monkeypatch.setattr(dispatch, "backend", lambda: "gpu")
    name, params, fn, abstract = case
    try:
        low = compat.lower_for_cuda(fn, *abstract)
    except TypeError as e:  # pragma: no cover - a jax without cross-platform lowering
        pytest.skip(f"no cross-platform lowering in this jax: {e}")
    text = low.as_text()
    n_kernels = text.count("@__gpu$xla.gpu.triton") + text.count("@triton_kernel_call_ffi") + text.count(
        "custom_call @mosaic_gpu")
    assert n_kernels >= 1, f"{name} {params}: no Pallas kernel in the lowered module"
    if name == "decode_step":   # every kernel the step can use is the kernel, none fell back to XLA
        from benchmarks.common import v4_attention_stack
        from fm_jax.config import KIND_CSA
        c = v4_attention_stack()
        n_csa = sum(c.layer_kind(i) == KIND_CSA for i in range(c.n_layers))
        # attention in every layer, scoring in the CSA layers; "auto" (bf16 kv): Mosaic scoring, Triton attention
        from pallas_kernels.topk import default_config as topk_config
        n_entries = params["context"] // c.csa_ratio
        topk = n_csa * (len(topk_config(params["batch"], n_entries)["digits"]) + 1)   # a histogram per digit + select
        impl = params["impl"]
        mosaic = n_csa * (impl in ("mosaic", "auto")) + c.n_layers * (impl == "mosaic")
        triton = n_csa * (impl == "pallas") + c.n_layers * (impl in ("pallas", "auto"))
        assert text.count("custom_call @mosaic_gpu") == mosaic
        assert text.count("@__gpu$xla.gpu.triton") + text.count("@triton_kernel_call_ffi") == topk + triton


@pytest.mark.skipif(importlib.util.find_spec("jax_plugins") is not None
                    and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None,
                    reason="the CUDA plugin is installed here: the script would compile")
def test_without_the_cuda_plugin_the_script_says_what_to_install():
    res = subprocess.run([sys.executable, "benchmarks/aot_kernels.py", "--cases", "topk"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "no deviceless CUDA topology" in res.stderr and "CUDA plugin" in res.stderr
