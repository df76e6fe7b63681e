"""Dense vs sparse MoE on the GPU (issue 11 item 2): one V4-Flash MoE layer (256 routed experts, top-6,
inter 2048, d_model 4096, one shared expert, bf16), routing included, for decode (1..64 tokens) and prefill
(8K tokens); per-call median wall time after warm-up, and the sparse outputs' distance to the dense ones.

    PYTHONPATH=$PWD python3 benchmarks/bench_moe.py --out benchmarks/results/moe-h100.json
    PYTHONPATH=$PWD python3 benchmarks/bench_moe.py --smoke --out /tmp/moe-smoke.json   # CPU check, tiny dims

Implementations (`--impls`):
  dense         every expert on every token (`moe_impl="dense"`)
  sparse        `moe_impl="sparse"` as the model runs it: sort by expert + `gathered_matmul` (up to
                n_experts // 16 token-expert rows) or `jax.lax.ragged_dot` (XLA's default lowering)
  sparse_ragged the sparse dispatch with `jax.lax.ragged_dot` at every size
  sparse_triton `sparse` with `jax_ragged_dot_use_gpu_pallas_triton_lowering` (GPU; if this jax has it)
  sparse_mgpu   the sparse dispatch with the Hopper Mosaic-GPU grouped matmul of
                `jax.experimental.pallas.ops.gpu.ragged_dot_mgpu` in place of `ragged_dot` (GPU only)
A variant that cannot run here (or fails: out of memory, unsupported lowering) gets a row with `error`.
"""
from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import median_time, run_info, write_json
from fm_jax.config import get_config
from fm_jax.layers import moe_sparse
from fm_jax.layers.ffn import ffn, init_ffn, moe_route
from fm_jax.layers.swiglu import swiglu

IMPLS = ("dense", "sparse", "sparse_ragged", "sparse_triton", "sparse_mgpu")
_TRITON_FLAG = "jax_ragged_dot_use_gpu_pallas_triton_lowering"


def moe_config(smoke: bool):
    """V4-Flash's MoE layer (top-k routed, not hash) in bf16; --smoke: the same structure at tiny dims."""
    if smoke:
        return get_config("tiny", ffn="moe", d_model=64, n_routed_experts=16, moe_top_k=4, moe_inter_dim=32,
                          n_shared_experts=1, dtype="bfloat16")
    return get_config("v4_flash", n_hash_layers=0)


def layer_fn(impl: str, c):
    """(jitted fn(params, x) -> [tokens, d_model], context manager to run it in) for one implementation."""
    if impl in ("dense", "sparse", "sparse_triton"):  # the model's own path (the lowering flag aside)
        cfg = c.replace(moe_impl="dense" if impl == "dense" else "sparse")
        fn = jax.jit(lambda p, x: ffn(p, cfg, x))
    elif impl == "sparse_ragged":
        cfg = c.replace(moe_impl="sparse")
        fn = jax.jit(lambda p, x: _sparse_with(p, cfg, x, jax.lax.ragged_dot))
    elif impl == "sparse_mgpu":
        if jax.default_backend() != "gpu":
            raise RuntimeError("the Mosaic-GPU grouped matmul needs a GPU")
        cfg = c.replace(moe_impl="sparse")
        gm = moe_sparse.mosaic_grouped_matmul
        fn = jax.jit(lambda p, x: _sparse_with(p, cfg, x, gm))
    else:
        raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")
    if impl != "sparse_triton":
        return fn, contextlib.nullcontext()
    if jax.default_backend() != "gpu":
        raise RuntimeError("the Pallas-Triton ragged_dot lowering is GPU only")
    if not hasattr(jax.config, _TRITON_FLAG):
        raise RuntimeError(f"this jax ({jax.__version__}) has no `{_TRITON_FLAG}`")
    return fn, _config_flag(_TRITON_FLAG, True)


@contextlib.contextmanager
def _config_flag(name: str, value):
    old = getattr(jax.config, name)
    jax.config.update(name, value)
    try:
        yield
    finally:
        jax.config.update(name, old)


def _sparse_with(p, c, x, grouped_matmul):
    """`ffn`'s sparse branch (top-k routing, routed experts, shared expert) with another grouped matmul."""
    ids, w = moe_route(p, c, x)
    out = moe_sparse.routed_experts(p["experts"], x, ids, w, c.swiglu_limit, grouped_matmul=grouped_matmul)
    return out.astype(x.dtype) + swiglu(p["shared"], x, c.swiglu_limit)


def expert_flops(c, tokens: int, impl: str) -> float:
    """Matmul FLOPs of the routed experts (3 matmuls of d_model x inter per token-expert pair)."""
    per_pair = 2.0 * 3 * c.d_model * c.moe_inter_dim
    return per_pair * tokens * (c.n_routed_experts if impl == "dense" else c.moe_top_k)


def run(c, params, impls, phase: str, tokens: int, warmup: int, reps: int, seed: int = 0) -> list[dict]:
    x = (jax.random.normal(jax.random.key(seed), (tokens, c.d_model), jnp.float32)).astype(c.compute_dtype)
    rows, ref = [], None
    for impl in impls:
        row = {"phase": phase, "tokens": tokens, "impl": impl, "expert_flops": expert_flops(c, tokens, impl)}
        try:
            fn, ctx = layer_fn(impl, c)
            with ctx:
                out = fn(params, x).block_until_ready()  # compiles
                t = median_time(lambda f=fn: f(params, x).block_until_ready(), warmup=warmup, reps=reps)
            out = np.asarray(out.astype(jnp.float32))
            row.update(ms=t * 1e3, tokens_per_s=tokens / t, expert_tflops_per_s=row["expert_flops"] / t / 1e12)
            if impl == "dense":
                ref = out
            elif ref is not None:  # same routing, so only rounding separates them
                row["max_abs_diff_vs_dense"] = float(np.abs(out - ref).max())
                row["max_abs_dense"] = float(np.abs(ref).max())
        except Exception as e:  # noqa: BLE001 - an OOM or unsupported lowering is a result to record
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(row, flush=True)
        rows.append(row)
    dense = next((r for r in rows if r["impl"] == "dense" and "ms" in r), None)
    for r in rows:
        if dense and "ms" in r:
            r["speedup_vs_dense"] = dense["ms"] / r["ms"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--decode-tokens", default="1,2,4,8,16,32,64")
    ap.add_argument("--prefill-tokens", type=int, default=8192)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny dims, few reps (CPU check of the script)")
    args = ap.parse_args(argv)
    impls = tuple(args.impls.split(","))
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"unknown impl {impl!r}; choose from {IMPLS}")
    c = moe_config(args.smoke)
    prefill = 64 if args.smoke else args.prefill_tokens
    warmup, reps = (1, 3) if args.smoke else (args.warmup, args.reps)
    params = init_ffn(jax.random.key(0), c, c.compute_dtype)
    # a router bias as trained V4 layers have: it moves choices, so the routing is not uniform by construction
    params["router_bias"] = 0.1 * jax.random.normal(jax.random.key(1), (c.n_routed_experts,), jnp.float32)
    rows = []
    for t in [int(v) for v in args.decode_tokens.split(",")]:
        rows += run(c, params, impls, "decode", t, warmup, reps)
    rows += run(c, params, impls, "prefill", prefill, warmup, max(3, reps // 4))
    layer = {k: getattr(c, k) for k in ("d_model", "n_routed_experts", "moe_top_k", "moe_inter_dim",
                                        "n_shared_experts", "dtype", "swiglu_limit")}
    write_json(args.out, {**run_info(), "layer": layer, "rows": rows,
                          "note": "one MoE layer (router + routed experts + shared expert), jitted, per call; "
                                  "expert_flops counts the routed experts' matmuls only"})
    return 0


if __name__ == "__main__":
    main()
