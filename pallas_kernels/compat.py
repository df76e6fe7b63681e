"""Small shims over Pallas API names that moved between JAX releases.

Checked against jax 0.10.2 (CPU CI) and jax 0.11.2 (the GPU machine):
- the Triton backend's compiler-params class is ``jax.experimental.pallas.triton.CompilerParams``
  (``TritonCompilerParams`` before jax 0.7); passing it also *selects* the Triton backend, which matters
  because ``jax_pallas_use_mosaic_gpu`` defaults to True in these releases;
- masked loads/stores are ``pallas.triton.load/store`` (``pl.load/store`` were deprecated in 0.7); atomics and
  the CTA barrier live in the same module.
- Mosaic GPU's default lowering semantics changed from lane to warpgroup in 0.11 (`mosaic_compiler_params`);
- lowering Triton kernels for CUDA without a GPU needs an abstract target device from 0.11 (`lower_for_cuda`).
Also the small helpers the kernel wrappers share (`next_pow2`, the Mosaic kernels' `swizzled_smem`).
"""
from __future__ import annotations

import jax
from jax.experimental import pallas as pl

try:  # jax >= 0.4.34
    from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover - very old jax
    _pltriton = None


def triton_compiler_params(num_warps: int | None = None, num_stages: int | None = None):
    """The Triton backend's compiler-params object (whatever the installed jax calls it)."""
    for mod, name in ((_pltriton, "CompilerParams"), (_pltriton, "TritonCompilerParams"),
                      (pl, "TritonCompilerParams")):
        cls = getattr(mod, name, None) if mod is not None else None
        if cls is not None:
            return cls(num_warps=num_warps, num_stages=num_stages)
    raise ImportError("no Pallas Triton CompilerParams class in this jax version")  # pragma: no cover


def _pick(name: str):
    fn = getattr(_pltriton, name, None) if _pltriton is not None else None
    if fn is None:  # pragma: no cover
        raise ImportError(f"jax.experimental.pallas.triton.{name} is missing in this jax version")
    return fn


load = _pick("load")    # load(ref_view, *, mask=None, other=None)
store = _pick("store")  # store(ref_view, value, *, mask=None)
atomic_add = _pick("atomic_add")        # atomic_add(ref, idx, val) -> old value (acquire-release, gpu scope)
debug_barrier = _pick("debug_barrier")  # a CTA-wide barrier (bar.sync), despite its docstring


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1): Triton tile sizes."""
    return 1 << max(0, (int(x) - 1).bit_length())


def mosaic_compiler_params():
    """Mosaic GPU compiler params shared by the Mosaic kernels: exact math, and *lane* lowering semantics pinned.
    The default changed from lane (jax 0.10.2) to warpgroup (0.11.2), whose layout inference fails on the
    attention kernel's padded staging ring (IndexError in `_conjure_transforms_for_smem_ref`, found by compiling
    for sm_90a under jax 0.11.2: `benchmarks/aot_kernels.py`); the kernels are written and tested for lane."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # lazy: Mosaic GPU's import is heavy
    return plgpu.CompilerParams(approx_math=False, lowering_semantics=plgpu.LoweringSemantics.Lane)


def swizzled_smem(shape, dtype):
    """A Mosaic GPU shared-memory tile in the (tiling, swizzle) form TMA writes and wgmma reads: rows swizzled
    in 128-byte atoms, or the row width when it is narrower."""
    import jax.numpy as jnp
    from jax.experimental.pallas import mosaic_gpu as plgpu  # lazy: Mosaic GPU's import is heavy
    sw = min(128, shape[-1] * jnp.dtype(dtype).itemsize)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, sw // jnp.dtype(dtype).itemsize)),
                                                plgpu.SwizzleTransform(sw)))


def lower_for_cuda(fn, *args, device_kind: str = "NVIDIA H100 80GB HBM3"):
    """``jax.jit(fn)`` lowered for CUDA from a process without a GPU (CPU tests of the GPU lowering). From jax 0.11
    Pallas' Triton lowering asks the abstract mesh for the target GPU (before, it left the target to XLA), so the
    lowering runs under a one-device abstract mesh naming `device_kind`."""
    target = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    # Auto axes, as a plain jit has (0.11's default for an AbstractMesh is Explicit: sharding in types)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=target)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def gpu_interpret_params():
    """Mosaic GPU interpret mode's params object (runs a `plgpu.kernel` on the CPU): private in jax 0.10.x."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:  # pragma: no cover - moved in a later jax
        from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams  # type: ignore[attr-defined]
    return InterpretGPUParams()
