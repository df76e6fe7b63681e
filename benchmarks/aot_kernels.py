"""Compile every GPU kernel for an H100 (sm_90a) on a machine with no GPU, and record what ptxas says.

Deviceless ahead-of-time compilation (`jax.experimental.topologies` with a GPU target description): XLA runs its
whole GPU pipeline here, Triton kernels included, down to PTX and ptxas; Mosaic GPU kernels go through their own
MLIR -> PTX -> ptxas pipeline. Nothing runs, so this says nothing about speed or numerical correctness (the
GPU-marked tests and ``bench_kernels.py`` do): it catches what fails to *compile* for the GPU (a Triton or Mosaic
lowering rule, a layout, shared memory, ptxas) and shows the register count and spills of each kernel, the
figures that decide occupancy and whether a kernel can stream at HBM speed.

Needs the CUDA plugin next to jax (a separate environment: it pulls in ~5 GB of NVIDIA wheels, so it is not a
dependency of the package or of CI):

    python3 -m venv /tmp/gpuvenv && . /tmp/gpuvenv/bin/activate
    pip install "jax[cuda12]==0.10.2" absl-py numpy        # 0.11.2, the GPU machine's, needs Python >= 3.12
    PYTHONPATH=$PWD python3 benchmarks/aot_kernels.py --out benchmarks/results/aot-kernels-sm90a-jax0.10.2.json

The script sets the environment it needs (CPU as JAX's default platform, the plugin's CUDA version check off,
XLA and Mosaic GPU dumping into a scratch folder) before jax is imported. ``--cases`` picks kernels by prefix
(``topk``, ``score_triton``, ``score_mosaic``, ``attn_triton``, ``attn_mosaic``, ``decode_step``: the model's
whole decode step with the kernels picked through the dispatch).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup_env() -> str:
    """Before jax is imported: CPU as the default platform, the plugin's version check off (it calls cuInit, which
    fails without a GPU), XLA and Mosaic GPU dumping their PTX and ptxas reports into a scratch folder (returned).
    Only `main` calls this, so importing the module changes nothing."""
    scratch = tempfile.mkdtemp(prefix="fm_jax_aot_")
    os.makedirs(os.path.join(scratch, "mosaic"))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={scratch}/xla").strip()
    os.environ.update(MOSAIC_GPU_DUMP_TO=f"{scratch}/mosaic", MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1")
    return scratch


# The H100 SXM as XLA describes it (sm_90a, 132 SMs, 227 KB of opt-in shared memory per block). The H200 is the
# same chip for the compiler; only memory size and bandwidth differ, which no kernel here is compiled against.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA" dnn_version_info { major: 9 minor: 7 } runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(text: str) -> list[dict]:
    """``ptxas -v`` output -> one dict per entry function: registers, spills, stack, barriers, static smem.
    (Mosaic GPU kernels take their shared memory dynamically, so their static figure is ~0.)"""
    out, cur = [], None
    for line in text.splitlines():
        if m := _PTXAS_FUNC.search(line):
            cur = {"name": m.group(1), "arch": m.group(2)}
            out.append(cur)
        elif cur is not None and (m := _PTXAS_SPILL.search(line)):
            cur.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                       spill_load_bytes=int(m.group(3)))
        elif cur is not None and (m := _PTXAS_REGS.search(line)):
            cur.update(registers=int(m.group(1)), barriers=int(m.group(2) or 0), smem_static_bytes=int(m.group(3) or 0))
    return out


_PTX_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(")
_PTX_GLOBAL = re.compile(r"\b(ld|st)\.global(?:\.nc)?((?:\.v[248])?\.[bfsu](?:8|16|32|64))\b")
_PTX_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\b[^;]*?,\s*(0x[0-9a-fA-F]+|\d+)\s*[,;]")


def ptx_memory_ops(ptx: str) -> dict:
    """Static counts of the global-memory instructions per entry function of a PTX module: ``ld`` / ``st`` by
    width (``"ld.b8"``, ``"ld.v4.b32"``, ...), ``cp.async`` by bytes (``"cp.async.16"``) and TMA copies
    (``"tma"``). Not executed counts (loops run many times), but they show whether a kernel reads its data in
    16-byte vectors or byte by byte."""
    out, starts = {}, [(m.start(), m.group(1)) for m in _PTX_ENTRY.finditer(ptx)]
    for i, (pos, name) in enumerate(starts):
        body = ptx[pos: starts[i + 1][0] if i + 1 < len(starts) else len(ptx)]
        counts: dict = {}
        for op, width in _PTX_GLOBAL.findall(body):
            key = f"{op}{width}"
            counts[key] = counts.get(key, 0) + 1
        for size in _PTX_CP_ASYNC.findall(body):
            key = f"cp.async.{int(size, 0)}"
            counts[key] = counts.get(key, 0) + 1
        if n_tma := len(re.findall(r"\bcp\.async\.bulk\.tensor\b", body)):
            counts["tma"] = n_tma
        out[name] = dict(sorted(counts.items()))
    return out


def find_ptxas() -> str:
    """The ptxas of the CUDA wheels beside jax (the one XLA itself uses), else the one on PATH."""
    try:
        import nvidia.cuda_nvcc as nvcc  # noqa: PLC0415 - only present with the CUDA wheels
        cand = os.path.join(list(nvcc.__path__)[0], "bin", "ptxas")   # a namespace package: no __file__
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    found = shutil.which("ptxas")
    if not found:
        sys.exit("aot_kernels: no ptxas (install the CUDA wheels: pip install 'jax[cuda12]')")
    return found


def ptxas_report(ptxas: str, ptx_path: str, arch: str = "sm_90a") -> list[dict]:
    with open(ptx_path) as fh:
        if ".entry" not in fh.read():   # XLA also dumps modules that hold no kernel
            return []
    res = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx_path, "-o", os.devnull], capture_output=True, text=True)
    if res.returncode:
        return [{"name": os.path.basename(ptx_path), "ptxas_error": res.stderr[-2000:]}]
    return parse_ptxas(res.stderr + res.stdout)


def _new_files(pattern: str, seen: set) -> list[str]:
    paths = sorted(set(glob.glob(pattern)) - seen)
    seen.update(paths)
    return paths


def cases(select: list[str]):
    """(name, params, fn, abstract args without sharding) for V4's shapes: H = 64 index heads x 128 and
    64-entry key pages for scoring; 64 heads x 512, top-512 + window 128 for attention; k = 512 for top-k."""
    import jax
    import jax.numpy as jnp

    from fm_jax.layers import kv_fp8
    from pallas_kernels.indexer_score import indexer_scores_pallas
    from pallas_kernels.indexer_score_mgpu import indexer_scores_mosaic
    from pallas_kernels.sparse_attention import sparse_attention_pallas
    from pallas_kernels.sparse_attention_mgpu import sparse_attention_mosaic
    from pallas_kernels.topk import topk_pallas
    s = jax.ShapeDtypeStruct
    f32, bf16, u8, i32 = jnp.float32, jnp.bfloat16, jnp.uint8, jnp.int32

    def scoring(b, n, qd, p):
        keys = s((b, n // p, p * 132), u8) if p else s((b, n, 132), u8)
        return s((b, 64, 128), qd), s((b, 64), f32), keys, s((b,), i32)

    def attention(b, d=512, n=65536, k=512, w=128, width=None, qd=bf16, kvd=bf16, h=64):
        dt = u8 if width else kvd
        return (s((b, h, d), qd), s((b, n, width or d), dt), s((b, k), i32), s((b, w, width or d), dt),
                s((b,), i32), s((h,), f32))

    # V4's shapes, then (marked ragged=True) the awkward shapes of `bench_kernels.py`'s on-device checks
    out = []
    for b, n, k in [(1, 65536, 512), (8, 65536, 512), (8, 262144, 512), (6, 20037, 512), (3, 300, 64)]:
        out.append(("topk", dict(batch=b, n_entries=n, topk=k, **_ragged(k != 512 or n % 1024)),
                    functools.partial(topk_pallas, k=k), (s((b, n), f32),)))
    for b, n, qd, p in [(1, 65536, bf16, 64), (8, 65536, bf16, 64), (1, 262144, bf16, 64), (1, 65536, f32, 64),
                        (8, 65536, bf16, None), (2, 65600, bf16, 64)]:
        out.append(("score_triton", dict(batch=b, n_entries=n, q_dtype=jnp.dtype(qd).name, page_entries=p,
                                         **_ragged(n % 1024)),
                    functools.partial(indexer_scores_pallas, page_entries=p), scoring(b, n, qd, p)))
    for b, n, qd, act in [(1, 65536, bf16, "none"), (8, 65536, bf16, "none"), (1, 262144, bf16, "sigmoid"),
                          (8, 262144, bf16, "none"), (1, 65536, f32, "none"), (8, 65536, f32, "none"),
                          (3, 37 * 64, f32, "sigmoid"), (2, 65600, bf16, "none")]:
        out.append(("score_mosaic", dict(batch=b, n_entries=n, q_dtype=jnp.dtype(qd).name, page_entries=64, act=act,
                                         **_ragged(n % 1024)),
                    functools.partial(indexer_scores_mosaic, page_entries=64, act=act), scoring(b, n, qd, 64)))
    fp8_width = kv_fp8.entry_bytes(512, 64)
    for b in (1, 8, 64):
        out.append(("attn_triton", dict(batch=b, kv_dtype="bf16"),
                    functools.partial(sparse_attention_pallas, scale=512 ** -0.5), attention(b)))
        out.append(("attn_triton", dict(batch=b, kv_dtype="fp8"),
                    functools.partial(sparse_attention_pallas, scale=512 ** -0.5, rope_dim=64),
                    attention(b, width=fp8_width)))
    for qd, kvd, h, d, k, w in [(f32, bf16, 64, 512, 300, 100), (f32, f32, 20, 64, 70, 33)]:
        out.append(("attn_triton", dict(batch=2, heads=h, dim=d, topk=k, window=w, q_dtype=jnp.dtype(qd).name,
                                        kv_dtype=jnp.dtype(kvd).name, ragged=True),
                    functools.partial(sparse_attention_pallas, scale=d ** -0.5),
                    attention(2, d=d, n=2000, k=k, w=w, qd=qd, kvd=kvd, h=h)))
    for b, d, cfg in [(1, 512, {}), (8, 512, {}), (32, 512, {}), (64, 512, {}), (8, 128, dict(splits=1, stages=3))]:
        out.append(("attn_mosaic", dict(batch=b, dim=d, kv_dtype="bf16", **cfg),
                    functools.partial(sparse_attention_mosaic, scale=d ** -0.5, **cfg), attention(b, d=d)))
    out.append(("attn_mosaic", dict(batch=2, dim=512, topk=300, window=100, kv_dtype="bf16", ragged=True),
                functools.partial(sparse_attention_mosaic, scale=512 ** -0.5), attention(2, n=2000, k=300, w=100)))
    want = lambda name: not select or any(name.startswith(p) for p in select)   # noqa: E731
    if want("decode_step"):   # (building the model's abstract params and cache is the costly part)
        for b, ctx, kv_dtype, impl in [(1, 65536, "fp8", "pallas"), (8, 65536, "fp8", "pallas"),
                                       (1, 65536, "bf16", "mosaic"), (8, 65536, "bf16", "mosaic"),
                                       (8, 65536, "bf16", "auto")]:   # auto: Mosaic scoring, Triton attention
            out.append(("decode_step", dict(batch=b, context=ctx, kv_dtype=kv_dtype, impl=impl, topk_impl="pallas"),
                        *_decode_step(b, ctx, kv_dtype, impl)))
    return [c for c in out if want(c[0])]


def _ragged(flag) -> dict:
    return {"ragged": True} if flag else {}


def _decode_step(batch: int, context: int, kv_dtype: str, impl: str):
    """One decode step of the benchmarks' V4-Flash attention stack (4 layers CSA / HCA, dense FFN) with every
    kernel the model can call through the dispatch: scoring and attention by `impl`, top-k by the kernel."""
    import jax
    import jax.numpy as jnp

    from benchmarks.common import v4_attention_stack
    from fm_jax import backbone
    from fm_jax.cache import init_cache
    from fm_jax.model import init_params
    c = v4_attention_stack(kv_dtype=kv_dtype).replace(topk_impl="pallas")
    params = jax.eval_shape(lambda: init_params(c, jax.random.PRNGKey(0)))
    cache = jax.eval_shape(lambda: init_cache(c, batch, context + 64))
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32)
    fn = lambda p, cache, tok: backbone.run_step(p, c, cache, tok, impl=impl)[:2]   # noqa: E731
    return fn, (params, cache, tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    ap.add_argument("--cases", default="", help="comma-separated kernel prefixes (default: all)")
    args = ap.parse_args()
    scratch = _setup_env()
    ptxas = find_ptxas()
    try:
        rows = compile_cases([c for c in args.cases.split(",") if c], scratch, ptxas)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    import jax
    payload = {"target": "sm_90a (H100 target description, deviceless: nothing ran)",
               "jax": jax.__version__, "cuda_plugin": _plugin_version(), "ptxas": _ptxas_version(ptxas),
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
               "note": ("with jax >= 0.11 the Triton kernels have no entries: from 0.11 on Pallas' Triton kernels "
                        "are compiled to PTX on the device when first run, so here they are only lowered"),
               "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(payload, fh, indent=1)
    if not all(r["compiled"] for r in rows):
        sys.exit(1)


def compile_cases(select: list[str], scratch: str, ptxas: str) -> list[dict]:
    """Compile each selected case for the H100 target; one row per case with what `ptxas` reported per kernel."""
    import jax
    from jax.experimental import topologies
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET, topology="1x1x1")
    except Exception as e:  # noqa: BLE001 - no plugin, or a jax without deviceless GPU topologies
        sys.exit(f"aot_kernels: no deviceless CUDA topology ({type(e).__name__}: {e}); install the CUDA plugin "
                 f"(module docstring)")
    mesh = topologies.make_mesh(topo, (1,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # the dispatch picks kernels for the backend it runs on; here that is the CPU, the target a GPU
    from pallas_kernels import dispatch
    dispatch.backend = lambda: "gpu"
    rows, seen = [], set()
    for name, params, fn, abstract in cases(select):
        sharded = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
        row = {"kernel": name, **params}
        try:
            # the abstract mesh names the target device: Pallas' Triton lowering asks it for the compute
            # capability from jax 0.11 on (it otherwise looks for a local GPU)
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                jax.jit(fn).lower(*sharded).compile()
            row["compiled"] = True
        except Exception as e:  # noqa: BLE001 - the failure is the finding: record it and go on
            row.update(compiled=False, error=f"{type(e).__name__}: {str(e)[:4000]}")
        row["entries"] = _kernel_reports(scratch, seen, ptxas)
        rows.append(row)
        summary = ", ".join(f"{e['name']}: {e.get('registers')} regs, {e.get('spill_store_bytes')} B spilled"
                            for e in row["entries"]) or row.get("error", "")[:300]
        print(f"{'OK  ' if row['compiled'] else 'FAIL'} {name} {params}: {summary}", flush=True)
    return rows


def _kernel_reports(scratch: str, seen: set, ptxas: str) -> list[dict]:
    """ptxas figures and global-memory instruction counts of the kernels dumped since the last call: Triton
    kernels from XLA's PTX (XLA's own fusions left out), Mosaic GPU kernels from their ptxas reports."""
    entries, mem_ops = [], {}
    for ptx in _new_files(os.path.join(scratch, "xla", "*.ptx"), seen):
        entries += [e for e in ptxas_report(ptxas, ptx) if "ptxas_error" in e or not _is_xla_fusion(e["name"])]
        with open(ptx) as fh:
            mem_ops.update(ptx_memory_ops(fh.read()))
    for rep in _new_files(os.path.join(scratch, "mosaic", "*.ptxas"), seen):
        with open(rep) as fh:
            entries += parse_ptxas(fh.read())
        with open(rep[: -len(".ptxas")] + ".ptx") as fh:
            mem_ops.update(ptx_memory_ops(fh.read()))
    for e in entries:
        if e.get("name") in mem_ops:
            e["global_memory_ops"] = mem_ops[e["name"]]
    _new_files(os.path.join(scratch, "*", "*"), seen)    # the rest of this case's dumps
    return entries


def _ptxas_version(ptxas: str) -> str | None:
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else None


def _plugin_version() -> str | None:
    from importlib import metadata
    for dist in ("jax-cuda12-plugin", "jax-cuda13-plugin"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def _is_xla_fusion(name: str) -> bool:
    """XLA's own kernels around a Pallas call (index fusions, pads, sorts): not what this script checks."""
    return bool(re.match(r"(loop_|input_|wrapped_|sort_|copy_|transpose_|reduce_|concatenate|broadcast|"
                         r"dynamic_|slice_|fusion|gemm_fusion|triton_gemm|cutlass)", name))


if __name__ == "__main__":
    main()
