"""Pallas Mosaic GPU (Hopper) kernel: indexer scoring over page-blocked fp8 keys, TMA + wgmma.

``logit[b, s] = scale[b, s] * sum_h w[b, h] * relu(q[b, h] . fp8[b, s])`` for ``s < length[b]``, then ``act``
(the same function as :func:`pallas_kernels.indexer_score.indexer_scores_pallas`; ``relu(q.(s k)) = s relu(q.k)``
since ``s >= 0``).

Why a second kernel: scoring is memory bound (132 bytes per key against 2 * H * D flops) and the Triton kernel
reaches only ~0.31 of the HBM roofline at batch 1, N = 64K on the H100. Here every byte moves by TMA into a
multi-stage shared-memory ring, so a CTA keeps `stages` key blocks in flight while it computes on one.

Layout (``fm_jax.layers.key_pages``): one page of P keys is ``P * D`` fp8 bytes then ``P`` float32 scales. With
``4 P % D == 0`` a page is exactly ``R = P + 4 P / D`` rows of D bytes, so the buffer ``[B, n_pages, P * (D + 4)]``
is viewed (a free reshape) as ``[B, n_pages, R, D]``: rows ``0 .. P - 1`` of a page are its keys, the other
``4 P / D`` rows its scales. Per step, one TMA box ``[P, D]`` per page lands in the (128-byte swizzled, untiled)
key tile, and one box ``[pages, 4 P / D, D]`` of scale bytes in a byte buffer that a `RefUnion` also exposes as
float32 ``[block]``. Why these choices: Mosaic GPU cannot bitcast registers between widths, a TMA cannot move
bytes into a float32 buffer, and XLA would copy the whole key buffer to make a float32 view; a *tiled* key tile
would make the TMA tile the whole ``[R, D]`` page view, which needs R % 8 == 0 (R = 66 for V4's P = 64).

Grid: ``(batch, chunks)``; a CTA (one warpgroup) owns ``blocks_per_cta`` consecutive key blocks of ``block_n =
ppb * P`` entries (whole pages). Per block: wait for its TMA, load the fp8 tile to registers, convert to bf16
(exact), ``wgmma([block_n, D] regs x q^T [D, H] smem) -> [block_n, H]`` float32, then relu, times w[h], the row
sum over heads, times the scale, mask ``s >= length``, act, and a TMA store of ``block_n`` float32. The last
CTA of a row may own fewer than ``blocks_per_cta`` blocks: its extra steps (block index clamped, so every index
stays in bounds) load and store nothing; the last block starts at page ``n_pages - ppb`` so that it never reads
past N (when ``ppb`` does not divide n_pages it overlaps its predecessor and rewrites identical values). Blocks
wholly at or past a request's length are not read (no TMA, no barrier wait; their outputs are all masked), so a
ragged batch moves only its live keys.

Numerics: fp8 keys are exact in bf16, a bf16 query makes every product exact, so the only difference from the
float32 reference is the summation order. A float32 query is split as ``hi + lo`` bf16 (two wgmmas into one
accumulator), as the Triton kernel does.

Status: checked against the reference in Mosaic GPU interpret mode (CPU; the interpreter's variant, see
`_kernel`), by lowering the GPU variant to CUDA for the V4 shapes, and compiled for sm_90a on a CPU with jax 0.10.2
and 0.11.2 (163-184 registers, no spills: `benchmarks/results/aot-kernels-sm90a-*.json`). On the H200 (jax
0.11.2, 2026-12-05) it passed ``pytest -m gpu`` and the on-device checks (batch 1-8, ragged lengths, a partial
last page, f32 q), and inside the model (prefill + decode under ``impl="auto"`` against ``impl="xla"``). Device time
(`kernels-h200-scoring-pages.json`, bf16 q / `kernels-h200-scoring-f32.json`, float32 q), fraction of the HBM roofline:
batch 1, N = 64K: 6.4 µs (0.32) / 8.9; batch 1, 256K: 15.8 (0.53) / 20.8; batch 8, 64K: 27.5 (0.60) / 36.0; batch 8,
256K: 96.8 (0.69) / 128.6: 1.13-1.59x the paged Triton kernel, so ``impl="auto"`` runs it wherever `plan` fits.
The short rows are latency bound: XLA's size-matched row sum over the same bytes (a streaming reference, not an
upper bound) took 5.8 µs at batch 1, N = 64K and 124.9 at batch 8, 256K.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fm_jax.layers.key_pages import SCALE_BYTES
from pallas_kernels import compat
from pallas_kernels.indexer_score import FP8
from pallas_kernels.reference import check_indexer_inputs, split_bf16

TARGET_CTAS = 264   # ~2 CTAs per SM of an H100 / H200 (132 SMs): enough parallel TMA streams at batch 1


def plan(batch: int, heads: int, dim: int, n_pages: int, page_entries: int, *, block_n: int | None = None,
         blocks_per_cta: int | None = None, stages: int | None = None) -> dict:
    """Static launch plan, or ValueError naming the unsupported shape (callers then use the Triton kernel).
    `block_n` entries per step (whole pages, a multiple of 64 = the wgmma M tile), `blocks_per_cta` steps per
    CTA, `stages` TMA buffers in flight."""
    p, d, h = page_entries, dim, heads
    if d not in (64, 128):
        raise ValueError(f"indexer_scores(impl='mosaic'): head dim D must be 64 or 128, got {d}")
    if h % 32 or not 32 <= h <= 256:   # the weights' TMA moves H * 4 bytes: a multiple of 128 (one per thread)
        raise ValueError(f"indexer_scores(impl='mosaic'): heads must be a multiple of 32 in [32, 256], got {h}")
    if (SCALE_BYTES * p) % max(d, 128):   # a page is whole rows of D bytes; its scale TMA a multiple of 128 bytes
        raise ValueError(f"indexer_scores(impl='mosaic'): page_entries={p} must be a multiple of 32 (4 * P a "
                         f"multiple of D={d} and of 128 bytes)")
    want = block_n or max(128, p)
    ppb = max(1, want // p)
    if (ppb * p) % 64:
        ppb = 64 // p if 64 % p == 0 else ppb
    ppb = min(ppb, n_pages)
    bn = ppb * p
    if bn % 64 or bn > 256 or n_pages < ppb:
        raise ValueError(f"indexer_scores(impl='mosaic'): no key block of whole pages (page_entries={p}, "
                         f"n_pages={n_pages}) is a multiple of 64 entries <= 256; got block_n={bn}")
    n_blocks = -(-n_pages // ppb)
    bpc = blocks_per_cta or max(1, -(-n_blocks * batch // TARGET_CTAS))
    bpc = min(bpc, n_blocks)
    st = max(1, min(stages or 4, bpc))
    return dict(ppb=ppb, block_n=bn, n_blocks=n_blocks, blocks_per_cta=bpc, chunks=-(-n_blocks // bpc), stages=st)


def _kernel(len_ref, w_ref, q_ref, k_ref, o_ref, *, n, n_pages, page_entries, rows_per_page, ppb, n_blocks, bpc,
            stages, act, split, interp, q_smem, w_smem, k_smem, s_smem, o_smem, q_bar, k_bars, a_smem=None,
            qt_smem=None):
    """`interp`: the CPU interpret mode's variant, which differs only where that mode lacks a primitive: plain
    ref loads instead of `plgpu.load` with a layout (and no layout casts), the wgmma's A operand staged through
    SMEM (`a_smem`) instead of registers, q^T materialised in SMEM (`qt_smem`) instead of a transposed view,
    and the scales bitcast from bytes in registers instead of read through the float32 alias of their bytes."""
    p = page_entries
    bn = ppb * p
    srows = rows_per_page - p          # scale rows of D bytes per page
    if interp:
        s_bytes, s_f32 = s_smem, None
        load = lambda ref, layout: ref[...]
        cast = lambda x, layout: x
        iota = lambda shape, layout: jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    else:
        s_bytes, s_f32 = s_smem        # the same SMEM, as bytes (TMA target) and as float32 (registers)
        load = lambda ref, layout: plgpu.load(ref, (), layout=layout)
        cast = plgpu.layout_cast
        iota = lambda shape, layout: plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=layout)
    row_layout = plgpu.Layout.WGMMA.reduce(1)       # [bn]: one value per accumulator row
    b = jax.lax.axis_index("batch")
    c = jax.lax.axis_index("chunk")
    length = jnp.minimum(len_ref[b], n)

    def first_page(j):                 # clamped: in bounds for the extra steps, and the last block ends at N
        blk = jnp.minimum(c * bpc + j, n_blocks - 1)
        return jnp.minimum(blk * ppb, n_pages - ppb)

    # the two regions of the page view [B, n_pages, R, D]
    key_rows = k_ref.at[:, :, pl.ds(0, p)]           # [B, n_pages, P, D] fp8 bytes
    scale_rows = k_ref.at[:, :, pl.ds(p, srows)]     # [B, n_pages, 4P/D, D] float32 bytes

    def real(j):                       # not a clamped repeat of the last block (those are skipped entirely)
        return c * bpc + j < n_blocks

    def live(j):                       # a real block holding an entry below the length: only then is it read
        return real(j) & (first_page(j) * p < length)

    def issue(j, slot):                # skipped for dead blocks, and so is the matching barrier wait
        page0 = first_page(j)

        @pl.when(live(j))
        def _():
            for i in range(ppb):
                plgpu.copy_gmem_to_smem(key_rows.at[b, page0 + i], k_smem.at[slot, pl.ds(i * p, p)],
                                        k_bars.at[slot])
            plgpu.copy_gmem_to_smem(scale_rows.at[b, pl.ds(page0, ppb)], s_bytes.at[slot], k_bars.at[slot])

    # one TMA per [H, D] query part: a batched [2, H, D] copy with the (8, 64) tiling is a 6-D strided copy at
    # batch > 1, past TMA's 5 (found by compiling for sm_90a: benchmarks/aot_kernels.py)
    for i in range(2 if split else 1):
        plgpu.copy_gmem_to_smem(q_ref.at[b, i] if split else q_ref.at[b], q_smem.at[i] if split else q_smem, q_bar)
    plgpu.copy_gmem_to_smem(w_ref.at[b], w_smem, q_bar)
    for j in range(stages):            # prologue: fill the ring
        issue(j, j)
    plgpu.barrier_wait(q_bar)
    w_row = load(w_smem, plgpu.Layout.WGMMA.reduce(0))                          # [H], broadcast over rows
    heads = w_row.shape[0]
    parts = [q_smem.at[i] for i in range(2)] if split else [q_smem]             # [H, D] each (hi, lo)
    if interp:                         # B operand q^T [D, H]: the interpreter's wgmma takes no transposed view
        q_t = []
        for i, part in enumerate(parts):
            qt_smem[i] = part[...].T
            q_t.append(qt_smem.at[i])
    else:
        q_t = [plgpu.transpose_ref(part, (1, 0)) for part in parts]

    def step(j, carry):
        slot = jax.lax.rem(j, stages)

        @pl.when(live(j))              # a dead block computes on stale SMEM; every output is masked anyway
        def _():
            plgpu.barrier_wait(k_bars.at[slot])

        kb = load(k_smem.at[slot], plgpu.Layout.WGMMA_UPCAST_2X)                  # uint8 [bn, D]
        # fp8 -> f32 -> bf16, exact both ways: Mosaic GPU has no direct e4m3 -> bf16 convert with the ptxas of
        # jax 0.10 (only -> f16, and q in f16 would not be exact)
        kf = cast(jax.lax.bitcast_convert_type(kb, FP8).astype(jnp.float32).astype(jnp.bfloat16),
                  plgpu.Layout.WGMMA)
        if interp:
            scale = jax.lax.bitcast_convert_type(s_bytes[slot].reshape(bn, 4), jnp.float32)
        else:
            scale = load(s_f32.at[slot], row_layout)                            # float32 [bn]

        @pl.when(j + stages < bpc)     # the slot's bytes are in registers: refill it
        def _():
            issue(j + stages, slot)

        if interp:
            a_smem[...] = kf
            plgpu.commit_smem()
            lhs = a_smem
        else:
            lhs = kf

        def mma(acc_ref):
            for qt in q_t:             # one wgmma, or hi then lo into the same accumulator
                plgpu.wgmma(acc_ref, lhs, qt)
            return acc_ref[...]

        s = pl.run_scoped(mma, plgpu.ACC((bn, heads), jnp.float32))               # [bn, H] float32, from 0
        logit = jnp.sum(jnp.maximum(s, 0.0) * jax.lax.broadcast_in_dim(w_row, (bn, heads), [1]), axis=1) * scale
        start = first_page(j) * p
        valid = start + iota((bn,), row_layout) < length
        if act == "sigmoid":
            out = jnp.where(valid, 1.0 / (1.0 + jnp.exp(-logit)), 0.0)
        else:
            out = jnp.where(valid, logit, -jnp.inf)
        @pl.when(real(j))
        def _():
            oslot = jax.lax.rem(j, 2)
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # the store issued from this slot 2 steps ago is done
            o_smem[oslot] = out
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[oslot], o_ref.at[b, pl.ds(start, bn)])
        return carry

    jax.lax.fori_loop(0, bpc, step, 0)
    plgpu.wait_smem_to_gmem(0)


def input_plan(info, keys, page_entries: int | None, **plan_args) -> dict:
    """`plan` for checked inputs (``info``: `check_indexer_inputs`' result), or ValueError where this kernel does
    not apply: it needs page-blocked keys and one query per request. The dispatch asks it whether ``auto`` can
    run this kernel; the launch wrapper takes its launch plan from it."""
    if page_entries is None or info.multi:
        raise ValueError("indexer_scores(impl='mosaic'): needs page-blocked keys (page_entries=) and one query "
                         "per request (q [B, H, D], lengths [B])")
    return plan(info.batch, info.heads, info.dim, keys.shape[1], page_entries, **plan_args)


def indexer_scores_mosaic(q, weights, keys, lengths, *, page_entries: int, act: str = "none", interpret=False,
                          block_n: int | None = None, blocks_per_cta: int | None = None, stages: int | None = None):
    """Mosaic GPU launch wrapper; same contract as :func:`pallas_kernels.indexer_scores` for the supported case:
    q bf16 / f32 ``[batch, heads, head_dim]`` (one query per request), weights ``[batch, heads]``, page-blocked
    keys uint8 ``[batch, n_pages, page_entries * (head_dim + 4)]``, lengths ``[batch]``. Returns float32
    ``[batch, n_pages * page_entries]``. Anything else raises ValueError (see `plan`). `interpret`: False, or
    an ``InterpretGPUParams`` (or True for the default one) to run on the CPU."""
    info = check_indexer_inputs(q, weights, keys, lengths, act, page_entries)
    cfg = input_plan(info, keys, page_entries, block_n=block_n, blocks_per_cta=blocks_per_cta, stages=stages)
    b, h, d, n = info.batch, info.heads, info.dim, info.n_entries
    p = page_entries
    n_pages = keys.shape[1]
    rows_per_page = p + SCALE_BYTES * p // d
    k_rows = keys.reshape(b, n_pages, rows_per_page, d)             # free: pages are whole rows of D bytes
    split = q.dtype != jnp.bfloat16
    if split:   # float32 query: hi + lo bf16 parts (the same split as the XLA path / Triton kernel)
        hi, lo = split_bf16(q)
        qk = jnp.stack([hi, lo], axis=1)                             # [B, 2, H, D]
        q_scratch = compat.swizzled_smem((2, h, d), jnp.bfloat16)
    else:
        qk = q
        q_scratch = compat.swizzled_smem((h, d), jnp.bfloat16)
    st, bn, ppb = cfg["stages"], cfg["block_n"], cfg["ppb"]
    srows = rows_per_page - p
    if interpret is True:
        interpret = compat.gpu_interpret_params()
    interp = bool(interpret)
    kernel = functools.partial(
        _kernel, n=n, n_pages=n_pages, page_entries=p, rows_per_page=rows_per_page, ppb=ppb,
        n_blocks=cfg["n_blocks"], bpc=cfg["blocks_per_cta"], stages=st, act=act, split=split, interp=interp)
    s_bytes = plgpu.SMEM((st, ppb, srows, d), jnp.uint8)
    scratch = dict(
        q_smem=q_scratch,
        w_smem=plgpu.SMEM((h,), jnp.float32),
        k_smem=plgpu.SMEM((st, bn, d), jnp.uint8, transforms=(plgpu.SwizzleTransform(d),)),
        s_smem=s_bytes if interp else plgpu.RefUnion(s_bytes, plgpu.SMEM((st, bn), jnp.float32)),
        o_smem=plgpu.SMEM((2, bn), jnp.float32),
        q_bar=plgpu.Barrier(num_arrivals=3 if split else 2),              # the q part(s) and the weights
        k_bars=plgpu.Barrier(num_arrivals=ppb + 1, num_barriers=st),   # ppb key copies + 1 scale copy
    )
    if interp:   # the bf16 key tile and q^T (hi, lo) as wgmma operands in SMEM, see the kernel's docstring
        scratch["a_smem"] = plgpu.SMEM((bn, d), jnp.bfloat16)
        scratch["qt_smem"] = plgpu.SMEM((2, d, h), jnp.bfloat16)
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((b, n), jnp.float32),
        grid=(b, cfg["chunks"]),
        grid_names=("batch", "chunk"),
        scratch_types=scratch,
        compiler_params=compat.mosaic_compiler_params(),
        interpret=interpret or None,
    )
    return call(lengths.astype(jnp.int32), weights.astype(jnp.float32), qk, k_rows)
