"""Pallas Mosaic GPU (Hopper) kernel: sparse decode attention (window + gathered top-k rows, per-head sink).

Same contract as :func:`pallas_kernels.sparse_attention.sparse_attention_pallas` for the supported case (bf16 q and
kv, 64 heads, D in {128, 256, 512}): per request the attended rows are ``window_kv[b, :window_lengths[b]]`` and
``kv[b, indices[b, j]]`` (-1 = padding, duplicates count per occurrence); keys == values.

Why a second kernel: the Triton kernel gives each program 16 heads, so every gathered 1 KB row is read once per head
block (4x at H = 64), and it reaches ~0.33 of the roofline at batch 64. Here one CTA holds all 64 heads (the wgmma M
tile) and reads each row of its share once.

Gather. Hopper has no TMA gather, so each row moves by its own TMA copy (a TMA box has at most 256 elements per
dimension, so the row is viewed as a ``[D / 256, 256]`` box) into a *staging* ring slot ``[block_k, D + 64]``. A
TMA box lands densely, so no copy can produce the wgmma operand layout (its 8-row x 128-byte swizzle atoms hold 8
different rows). Per block the CTA therefore loads the staged rows into registers in 64-column chunks (WGMMA layout)
and stores them into one tiled, 128-byte swizzled ``k_tile [block_k, D]``, which both matmuls read from SMEM:
``S = q [H, D] . k_tile^T`` and ``acc += P [H, block_k] . k_tile[:, dv slice]`` (P goes through SMEM as bf16).
The row pad is 64 bf16 (128 bytes): a TMA tensor copy needs a 128-byte aligned SMEM destination (the first GPU
run, with a 16-byte pad that staggered the rows over the banks, faulted with CUDA_ERROR_MISALIGNED_ADDRESS). So
every staged row starts on the same bank, no bank-conflict-free plan exists for a column chunk, and that move is
compiled unoptimised (``optimized=False``: 8-way conflicts, a known cost). Pipelining: ``k_tile`` is the second
buffer, so as soon as a block is moved out of its staging slot the slot is refilled with block ``t + stages``
while the CTA computes on ``k_tile``; at D = 512 shared memory holds q (64 KB), k_tile (64 KB) and one 72 KB
staging slot, so ``stages = 1`` there.

Rows. The wrapper builds one int32 row list per request (a tiny XLA fusion): the window positions (``-1`` past the
window length), then the top-k indices (``-1`` when out of range), then ``-1`` up to the padded block count. A CTA
TMAs its share of that list into SMEM once. Window blocks (always first, whole blocks: the window part is padded to
a block multiple) copy from ``window_kv``, the others from ``kv``; a ``-1`` row copies row 0 (so every block's
barrier sees the same byte count) and is masked out of the softmax.

Grid ``(batch, splits)``, two warpgroups per CTA: ``splits`` cuts the row blocks into equal runs (flash-decoding:
at batch 8 there are 8 requests for 132 SMs, so the default plan gives each CTA about one block), and warpgroup
``c`` accumulates output columns ``[c * D / 2, (c + 1) * D / 2)`` (a [64, 512] float32 accumulator would need 256
registers per thread in one warpgroup). Each warpgroup moves its half of the columns from staging into ``k_tile``
and computes the full (identical) scores itself; two mbarriers with one arrival per warpgroup order them
(``k_ready``: all of ``k_tile`` written and the staging slot read, before the scores and the refill;
``k_read``: the other warpgroup's scores are done with ``k_tile``, before it is overwritten). Warpgroup 0 issues
every TMA. Each CTA writes partial ``(acc, m, l)``; the sink and the merge are the Triton kernel's XLA epilogue
(:func:`pallas_kernels.sparse_attention.combine_splits`).

Known costs (candidates once GPU timings exist): both warpgroups compute the full scores (1.5x the minimum
tensor-core work; splitting the contraction over D would need an SMEM exchange of the partial scores), every block
crosses SMEM twice (staging -> registers -> k_tile), each row costs one TMA issued by one thread (64 per block),
and the row list and the merge are two small
XLA fusions around the kernel.

Status: checked against the reference in Mosaic GPU interpret mode (CPU; `_kernel`'s ``interp`` variant) and by
lowering the GPU variant to CUDA for the V4 shapes, and compiled for sm_90a on a CPU with jax 0.10.2 and 0.11.2
(`benchmarks/results/aot-kernels-sm90a-*.json`: 174 registers with one block per CTA; with several, as the
batch-32 and -64 plans have, 255 and a ~0.5 KB spill of the hoisted wgmma descriptors). On the H200 (jax 0.11.2)
the first version faulted (the staging pad above); with 128-byte rows its GPU tests (batch 1, 8, 64 and D = 128)
passed. Device time (`kernels-h200-attention-mgpu.json`, `kernels-h200-attention-b64.json`): 21.4 / 23.9 / 79.6 µs
at batch 1 / 8 / 64, against 10.8 / 17.0 / 52.7 for the Triton kernel and 14.9 / 25.6 / 98.1 for XLA (0.16 of
the roofline at batch 64). Slower than the Triton kernel everywhere, so the dispatch runs it only on request
(``sparse_attention(impl="mosaic")``), never under ``impl="auto"``. Unprofiled; the likely costs are the
bank-conflicted staging move above and the per-row TMA gather (one 1 KB copy per selected row).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import compat
from pallas_kernels.reference import check_attention_inputs
from pallas_kernels.sparse_attention import NEG, combine_splits

HEADS = 64        # one warpgroup's wgmma M tile: the kernel holds exactly this many heads
TMA_ELEMS = 256   # a TMA box moves at most 256 elements along each dimension
ROW_PAD = 64      # bf16 pad per staged row (128 bytes): a TMA tensor copy needs a 128-byte aligned SMEM destination
CHUNK = 64        # columns per staging -> k_tile move: one 128-byte swizzle atom wide
WARPGROUPS = 2    # consumer warpgroups per CTA, each accumulating D / 2 output columns
SMS = 132         # H100 / H200; at D = 512 a CTA takes most of an SM's shared memory, so one CTA per SM
SMEM_BYTES = 227 * 1024


def _smem_bytes(h, d, bk, stages, bps) -> int:
    """q + (staging ring | output chunks, aliased) + k_tile + P per warpgroup + the row list + (m, l)."""
    ring = max(stages * 2 * bk * (d + ROW_PAD), WARPGROUPS * 4 * h * CHUNK)
    return 2 * h * d + ring + 2 * bk * d + WARPGROUPS * 2 * h * bk + 4 * bps * bk + 8 * h


def plan(batch: int, heads: int, dim: int, topk: int, window: int, *, block_k: int | None = None,
         splits: int | None = None, stages: int | None = None) -> dict:
    """Static launch plan, or ValueError naming the unsupported shape. `block_k` rows per step (a multiple of 64),
    `splits` CTAs per (request, output slice) over the row blocks, `stages` staging slots in flight."""
    if heads != HEADS:
        raise ValueError(f"sparse_attention(impl='mosaic'): needs H={HEADS} heads (one wgmma M tile), got {heads}")
    if dim not in (128, 256, 512):
        raise ValueError(f"sparse_attention(impl='mosaic'): head dim D must be 128, 256 or 512, got {dim}")
    bk = block_k or 64
    if bk % 64 or not 64 <= bk <= 256:   # the staged rows load into registers in the WGMMA layout: 64-row tiles
        raise ValueError(f"sparse_attention(impl='mosaic'): block_k must be a multiple of 64 in [64, 256], got {bk}")
    dv = dim // WARPGROUPS
    n_wb = -(-window // bk)
    n_real = n_wb + -(-topk // bk)
    if splits is None:   # about one CTA per SM: at batch 8 one block per CTA (80 CTAs), at batch 64 two splits
        splits = max(1, SMS // max(batch, 1))
    splits = max(1, min(int(splits), max(n_real, 1)))
    bps = max(1, -(-n_real // splits))
    splits = max(1, -(-n_real // bps))
    if bps > 256:
        raise ValueError(f"sparse_attention(impl='mosaic'): {bps} row blocks per CTA (> 256); raise splits")
    st = max(1, min(stages or 3, bps))
    while st > 1 and _smem_bytes(HEADS, dim, bk, st, bps) > SMEM_BYTES:
        st -= 1
    if _smem_bytes(HEADS, dim, bk, st, bps) > SMEM_BYTES:
        raise ValueError(f"sparse_attention(impl='mosaic'): block_k={bk} does not fit in shared memory at D={dim}")
    return dict(block_k=bk, dv=dv, n_wblocks=n_wb, splits=splits, blocks_per_cta=bps, stages=st)


def _row_list(indices, window_lengths, n, window, n_wb, bk, total_blocks):
    """int32 [B, total_blocks * bk]: window positions (-1 at or past the length; the window part padded to n_wb
    blocks), then the top-k rows (-1 when outside [0, n)), then -1 padding."""
    b = indices.shape[0]
    pos = jnp.arange(n_wb * bk, dtype=jnp.int32)[None, :]
    wlen = jnp.minimum(window_lengths.astype(jnp.int32), window)[:, None]
    win = jnp.where(pos < wlen, pos, -1)
    idx = indices.astype(jnp.int32)
    idx = jnp.where((idx >= 0) & (idx < n), idx, -1)
    rows = jnp.concatenate([jnp.broadcast_to(win, (b, n_wb * bk)), idx], axis=1)
    return jnp.pad(rows, ((0, 0), (0, total_blocks * bk - rows.shape[1])), constant_values=-1)


def _kernel(rows_ref, q_ref, kv_ref, win_ref, acc_ref, m_ref, l_ref, *, d, dv, n_wg, bk, bps, stages, n_wb, scale,
            interp, rows_smem, q_smem, st_smem, k_tile, p_smem, ml_smem, q_bar, k_bars, k_ready, k_read,
            o_smem=None, kt_smem=None):
    """One CTA: request b, row blocks [s * bps, (s + 1) * bps); warpgroup c owns output columns [c * dv, (c + 1) *
    dv), moves those columns of each block into k_tile, and computes the (identical) scores on its own.
    `interp`: the CPU interpret mode's variant, which differs only where that mode lacks a primitive: plain ref
    loads instead of `plgpu.load` with a layout, k_tile^T materialised in SMEM (`kt_smem`, one per warpgroup)
    instead of a transposed view, zero / NEG initial values without a layout cast, the P.V product into a fresh
    accumulator instead of `ACC.init` of the running one, and one TMA per 256 columns of a row."""
    b = jax.lax.axis_index("batch")
    s = jax.lax.axis_index("split")
    c = jax.lax.axis_index("wg")
    if interp:
        st_smem, o_all = st_smem, o_smem
    else:
        st_smem, o_all = st_smem     # the same SMEM: the staging ring in the loop, the output chunks after it
    o_smem = o_all.at[c]
    p_smem = p_smem.at[c]
    h = q_smem.shape[0]
    n_tma = max(1, d // TMA_ELEMS)
    tma_w = d // n_tma
    if interp:
        load = lambda ref, layout, optimized=True: ref[...]
        cast = lambda x, layout: x
    else:
        load = lambda ref, layout, optimized=True: plgpu.load(ref, (), layout=layout, optimized=optimized)
        cast = plgpu.layout_cast

    def issue(t, slot):                # the TMA copies of block t's rows into staging slot `slot` (warpgroup 0)
        src = jnp.where(s * bps + t < n_wb, 1, 0)

        def one(j, carry):
            row = jnp.maximum(rows_smem[t, j], 0)      # -1 (masked) copies row 0: same bytes every block
            # one TMA per row: the row as a [D / 256, 256] box into the dense head of its padded staging row (the
            # interpreter has no reshaped refs: one copy per 256 columns there)
            dst = st_smem.at[slot, j, pl.ds(0, d)]
            if interp:
                copies = [(i, dst.at[pl.ds(i * tma_w, tma_w)]) for i in range(n_tma)]
            else:
                copies = [(slice(None), dst.reshape(n_tma, tma_w))]
            for ref, cond in ((win_ref, src == 1), (kv_ref, src == 0)):
                def copy_row(ref=ref):
                    for i, dst_i in copies:
                        plgpu.copy_gmem_to_smem(ref.at[b, row, i], dst_i, k_bars.at[slot])
                pl.when(cond)(copy_row)
            return carry
        @pl.when(c == 0)
        def _():
            jax.lax.fori_loop(0, bk, one, 0)

    @pl.when(c == 0)
    def _():
        plgpu.copy_gmem_to_smem(rows_ref.at[b, s], rows_smem, q_bar)
        plgpu.copy_gmem_to_smem(q_ref.at[b], q_smem, q_bar)
    plgpu.barrier_wait(q_bar)
    for j in range(stages):            # prologue: fill the ring
        issue(j, j)

    def sync(bar):                     # both warpgroups reach this point (mbarrier with one arrival per warpgroup)
        if n_wg > 1:
            plgpu.barrier_arrive(bar)
            plgpu.barrier_wait(bar)

    if interp:                         # B operand k_tile^T: the interpreter's wgmma takes no transposed view
        k_t = kt_smem.at[c]
    else:
        k_t = plgpu.transpose_ref(k_tile, (1, 0))
    v_tile = k_tile.at[:, pl.ds(pl.multiple_of(c * dv, dv), dv)]

    def step(t, carry):
        m_i, l_i, acc = carry
        slot = jax.lax.rem(t, stages)
        plgpu.barrier_wait(k_bars.at[slot])
        if n_wg > 1:                   # the other warpgroup's scores of block t - 1 no longer read k_tile
            pl.when(t > 0)(lambda: plgpu.barrier_wait(k_read))
        for i in range(n_wg):          # staging (row-major, padded) -> this warpgroup's columns of k_tile
            def move(i=i):
                for ch in range(i * dv // CHUNK, (i + 1) * dv // CHUNK):
                    cols = pl.ds(ch * CHUNK, CHUNK)
                    # staged rows start on the same bank (128-byte stride): no conflict-free plan exists
                    k_tile[:, cols] = load(st_smem.at[slot, :, cols], plgpu.Layout.WGMMA, optimized=False)
            pl.when(c == i)(move)
        plgpu.commit_smem()            # the register stores are visible to the wgmmas (async proxy)
        sync(k_ready)                  # every column of k_tile is in place, the staging slot fully read
        if interp:
            kt_smem[c] = k_tile[...].T

        @pl.when(t + stages < bps)     # the staging slot is consumed: refill it
        def _():
            issue(t + stages, slot)

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_t)
            return acc_ref[...]
        logits = pl.run_scoped(qk, plgpu.ACC((h, bk), jnp.float32))                 # [H, bk] float32
        if n_wg > 1:                   # done reading k_tile outside this warpgroup's columns
            plgpu.barrier_arrive(k_read)
        valid = load(rows_smem.at[t], plgpu.Layout.WGMMA.reduce(0)) >= 0           # [bk]
        valid = jax.lax.broadcast_in_dim(valid, (h, bk), [1])
        logits = jnp.where(valid, logits * scale, NEG)
        m_new = jnp.maximum(m_i, jnp.max(logits, axis=1))
        alpha = jnp.exp(m_i - m_new)
        p = jnp.where(valid, jnp.exp(logits - jax.lax.broadcast_in_dim(m_new, (h, bk), [0])), 0.0)
        l_new = l_i * alpha + jnp.sum(p, axis=1)
        p_smem[...] = p.astype(jnp.bfloat16)
        plgpu.commit_smem()
        scaled = acc * jax.lax.broadcast_in_dim(alpha, acc.shape, [0])
        if interp:
            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_tile)
                return acc_ref[...]
            acc_new = scaled + pl.run_scoped(pv, plgpu.ACC((h, dv), jnp.float32))
        else:
            def pv_state(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_tile)
            acc_new = pl.run_state(pv_state)(plgpu.ACC.init(scaled))
        return m_new, l_new, acc_new

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    init = (cast(jnp.full((h,), NEG, jnp.float32), row_layout), cast(jnp.zeros((h,), jnp.float32), row_layout),
            cast(jnp.zeros((h, dv), jnp.float32), plgpu.Layout.WGMMA))
    m_i, l_i, acc = jax.lax.fori_loop(0, bps, step, init)
    if n_wg > 1:                       # the last block's k_read phase (every phase is waited for once)
        plgpu.barrier_wait(k_read)

    # epilogue: the partial accumulator in 64-column chunks, and (m, l) from the first warpgroup. On the GPU o_smem
    # aliases the staging ring: free now (every issued block was waited for, and both warpgroups passed the last
    # k_ready, so neither still reads it)
    for ch in range(dv // CHUNK):
        if ch:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        o_smem[...] = acc[:, ch * CHUNK:(ch + 1) * CHUNK]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, acc_ref.at[b, s, :, pl.ds(c * dv + ch * CHUNK, CHUNK)])

    @pl.when(c == 0)
    def _():
        ml_smem[0] = m_i
        ml_smem[1] = l_i
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(ml_smem.at[0], m_ref.at[b, s])
        plgpu.copy_smem_to_gmem(ml_smem.at[1], l_ref.at[b, s])
    plgpu.wait_smem_to_gmem(0)


def sparse_attention_mosaic(q, kv, indices, window_kv, window_lengths, sink, *, scale, rope_dim=None,
                            interpret=False, block_k: int | None = None, splits: int | None = None,
                            stages: int | None = None):
    """Mosaic GPU launch wrapper; same contract as :func:`pallas_kernels.sparse_attention` for the supported case:
    q bf16 ``[batch, heads, head_dim]`` (heads = 64), kv bf16 ``[batch, n_entries, head_dim]``, indices int
    ``[batch, topk]``, window_kv bf16 ``[batch, window, head_dim]``, window_lengths ``[batch]``, sink ``[heads]``.
    Returns (out float32 ``[batch, heads, head_dim]``, lse float32 ``[batch, heads]``). Anything else (f32 q or kv,
    packed fp8 rows, other shapes) raises ValueError. `interpret`: False, or an ``InterpretGPUParams`` (or True for
    the default one) to run on the CPU."""
    info = check_attention_inputs(q, kv, indices, window_kv, window_lengths, sink, rope_dim)
    if info.kv_packed or info.window_packed:
        raise ValueError("sparse_attention(impl='mosaic'): packed fp8 KV rows are not supported (bf16 kv only)")
    if not (q.dtype == kv.dtype == window_kv.dtype == jnp.bfloat16):
        raise ValueError(f"sparse_attention(impl='mosaic'): needs bf16 q, kv and window_kv, got {q.dtype}, "
                         f"{kv.dtype}, {window_kv.dtype}")
    if info.n_entries == 0:   # masked rows copy row 0 of kv (module docstring), so it must exist
        raise ValueError("sparse_attention(impl='mosaic'): kv must hold at least one row")
    try:
        scale = float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError("sparse_attention(impl='mosaic'): scale must be a static Python number") from e
    b, h, d = info.batch, info.heads, info.dim
    cfg = plan(b, h, d, info.topk, info.window, block_k=block_k, splits=splits, stages=stages)
    bk, dv, bps, sp, st = cfg["block_k"], cfg["dv"], cfg["blocks_per_cta"], cfg["splits"], cfg["stages"]
    win, wl = window_kv, window_lengths
    if info.window == 0:   # keep the window ref well-formed (no window block is ever issued)
        win = jnp.zeros((b, 1, d), jnp.bfloat16)
    rows = _row_list(indices, wl, info.n_entries, info.window, cfg["n_wblocks"], bk, sp * bps)
    rows = rows.reshape(b, sp, bps, bk)
    if interpret is True:
        interpret = compat.gpu_interpret_params()
    interp = bool(interpret)
    n_tma = max(1, d // TMA_ELEMS)     # rows viewed as [D / 256, 256] (free reshapes): one TMA box per row
    kernel = functools.partial(_kernel, d=d, dv=dv, n_wg=WARPGROUPS, bk=bk, bps=bps, stages=st, n_wb=cfg["n_wblocks"],
                               scale=scale, interp=interp)

    tiled = functools.partial(compat.swizzled_smem, dtype=jnp.bfloat16)   # wgmma operands
    scratch = dict(
        rows_smem=plgpu.SMEM((bps, bk), jnp.int32),
        q_smem=tiled((h, d)),
        k_tile=tiled((bk, d)),
        p_smem=tiled((WARPGROUPS, h, bk)),
        ml_smem=plgpu.SMEM((2, h), jnp.float32),
        q_bar=plgpu.Barrier(num_arrivals=2),
        k_bars=plgpu.Barrier(num_arrivals=bk * (n_tma if interp else 1), num_barriers=st),   # TMAs per block
        k_ready=plgpu.Barrier(num_arrivals=WARPGROUPS),
        k_read=plgpu.Barrier(num_arrivals=WARPGROUPS),
    )
    staging = plgpu.SMEM((st, bk, d + ROW_PAD), jnp.bfloat16)
    out_chunks = plgpu.SMEM((WARPGROUPS, h, CHUNK), jnp.float32)
    if interp:
        scratch.update(st_smem=staging, o_smem=out_chunks, kt_smem=tiled((WARPGROUPS, d, bk)))
    else:   # the output chunks reuse the staging ring's SMEM (see the kernel's epilogue)
        scratch.update(st_smem=plgpu.RefUnion(staging, out_chunks))
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    call = plgpu.kernel(
        kernel,
        out_type=(f32(b, sp, h, d), f32(b, sp, h), f32(b, sp, h)),
        grid=(b, sp),
        grid_names=("batch", "split"),
        num_threads=WARPGROUPS,
        thread_name="wg",
        scratch_types=scratch,
        compiler_params=compat.mosaic_compiler_params(),
        interpret=interpret or None,
    )
    acc, m, l = call(rows, q, kv.reshape(*kv.shape[:2], n_tma, d // n_tma), win.reshape(*win.shape[:2], n_tma, -1))
    return combine_splits(acc, m, l, sink)
