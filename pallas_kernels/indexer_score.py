"""Pallas (Triton backend) kernel: head-fused indexer scoring over fp8-packed (or bf16/f32) keys.

``logit[b, m, s] = sum_h w[b, m, h] * relu(q[b, m, h] . k[b, s])`` for ``s < length``, then ``act``.

One program owns ``queries_per_program`` query positions of one request and a run of
``blocks_per_program`` key blocks of ``block_n`` entries. Per key block it reads the packed rows once
(``[block_n, D]`` fp8 bytes + ``[block_n, 4]`` scale bytes), converts fp8 -> bf16 in registers (exact), and for
each of its queries does one ``[block_n, D] x [D, H]`` tensor-core product (two for a float32 query, split
into bf16 hi + lo parts), relu, the weighted sum over heads and the fp8 scale (``relu(q.(s k)) = s relu(q.k)``
since ``s >= 0``), then writes ``block_n`` float32 results. Nothing of size ``[N, H]`` leaves the chip.

Page-blocked keys (``page_entries=P``, uint8 ``[B, n_pages, P * (D + 4)]``, the decode cache's layout:
``fm_jax.layers.key_pages``): a key block is whole pages or a run inside one page, so its fp8 bytes are one
contiguous (16-byte aligned) run per page and its scales another; the loaded ``[pages, bytes]`` tile is
reshaped to ``[block_n, D]`` in registers.

Numerics: fp8 and bf16 keys are exact in bf16, so with a bf16 query every product is exact and the only
difference from the float32 reference is the summation order; a float32 query is split as ``hi + lo``
(residual <= 2^-17 relative); float32 keys use IEEE float32 dots (slow path, kept for completeness).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import compat
from pallas_kernels.reference import check_indexer_inputs

FP8 = jnp.float8_e4m3fn


def _dot_nt(a, b, precision=None):
    """a [X, D] . b [Y, D]^T -> [X, Y] float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _scale_from_bytes(sb):
    """[rows, 4] uint8 -> float32 [rows] (little endian)."""
    shifts = (jnp.arange(4, dtype=jnp.uint32) * 8)[None, :]
    return jax.lax.bitcast_convert_type(jnp.sum(sb.astype(jnp.uint32) << shifts, axis=1), jnp.float32)


def _load_page_block(k_ref, b, start, block_n: int, page_entries: int, d: int, len_max):
    """Entries start .. start + block_n - 1 of page-blocked keys ([B, n_pages, P * (D + 4)]) -> (bf16
    [block_n, D], scale float32 [block_n]). The block is `ppb` whole pages (block_n a multiple of P) or a
    run of `epp` entries inside one page (P a multiple of block_n): either way one contiguous run of fp8
    bytes per page (16-byte aligned, see `fm_jax.layers.key_pages`) and one of scale bytes.

    The mask is per page part, not per entry: a part whose first entry is below `len_max` (<= N, so the page
    exists) is read whole, one past it not at all. A per-entry mask (the byte's entry below `len_max`) made
    Triton load every byte on its own (132 ``ld.global.b8`` per thread in the sm_90a PTX; with this mask the
    keys come in 16-byte loads: `benchmarks/aot_kernels.py`). The entries of a live part past `len_max`
    are stale bytes, possibly NaN codes; each only reaches its own output entry, which the caller masks."""
    ppb, epp = max(1, block_n // page_entries), min(block_n, page_entries)
    page0, off = start // page_entries, start % page_entries
    pages = pl.ds(page0, ppb)
    live = (start + jnp.arange(ppb, dtype=jnp.int32) * epp < len_max)[:, None]     # [ppb, 1]: part is read

    kb = compat.load(k_ref.at[b, pages, pl.ds(off * d, epp * d)], mask=live, other=0)
    kf = jax.lax.bitcast_convert_type(kb.reshape(block_n, d), FP8).astype(jnp.bfloat16)        # exact
    sb = compat.load(k_ref.at[b, pages, pl.ds(page_entries * d + off * 4, epp * 4)], mask=live, other=0)
    return kf, _scale_from_bytes(sb.reshape(block_n, 4))


def _indexer_kernel(len_ref, w_ref, q_ref, k_ref, o_ref, *, tm, block_n, blocks_per_program, n, m_total,
                    d, packed, mode, act, per_query_len, heads_major, page_entries=None):
    b = pl.program_id(0)
    mb = pl.program_id(1)
    pn = pl.program_id(2)
    base = pn * (block_n * blocks_per_program)
    rows = jnp.arange(block_n, dtype=jnp.int32)

    m_ids = [mb * tm + i for i in range(tm)]
    m_safe = [jnp.minimum(m, m_total - 1) for m in m_ids]
    if per_query_len:
        lens = [jnp.minimum(len_ref[b, m], n) for m in m_safe]
    else:
        lens = [jnp.minimum(len_ref[b], n)] * tm
    len_max = lens[0]
    for ln in lens[1:]:
        len_max = jnp.maximum(len_max, ln)

    def load_query(i):
        qm = q_ref[b, m_safe[i]]                                   # [H, D]
        wm = w_ref[b, m_safe[i]]                                   # [H]
        if mode == "split":
            hi = qm.astype(jnp.bfloat16)
            lo = (qm - hi.astype(jnp.float32)).astype(jnp.bfloat16)
            return (hi, lo), wm
        return (qm,), wm

    hoisted = [load_query(0)] if tm == 1 else None

    def block(j, carry):
        start = base + j * block_n
        offs = start + rows
        live = offs < len_max
        if page_entries:
            kf, scale = _load_page_block(k_ref, b, start, block_n, page_entries, d, len_max)
        elif packed:
            kb = compat.load(k_ref.at[b, pl.ds(start, block_n), pl.ds(0, d)], mask=live[:, None], other=0)
            kf = jax.lax.bitcast_convert_type(kb, FP8).astype(jnp.bfloat16)          # exact
            sb = compat.load(k_ref.at[b, pl.ds(start, block_n), pl.ds(d, 4)], mask=live[:, None], other=0)
            scale = _scale_from_bytes(sb)
        else:
            kf = compat.load(k_ref.at[b, pl.ds(start, block_n), pl.ds(0, d)], mask=live[:, None], other=0)
            scale = None
        for i in range(tm):
            qparts, wm = hoisted[0] if hoisted is not None else load_query(i)
            prec = jax.lax.Precision.HIGHEST if mode == "f32" else None
            if heads_major:   # [H, block_n]: heads on the MMA's M axis, reduce across rows
                s = _dot_nt(qparts[0], kf, precision=prec)
                for extra in qparts[1:]:
                    s = s + _dot_nt(extra, kf)
                logit = jnp.sum(jnp.maximum(s, 0.0) * wm[:, None], axis=0)            # [block_n]
            else:             # [block_n, H]: entries on the MMA's M axis, reduce within rows
                s = _dot_nt(kf, qparts[0], precision=prec)
                for extra in qparts[1:]:
                    s = s + _dot_nt(kf, extra)
                logit = jnp.sum(jnp.maximum(s, 0.0) * wm[None, :], axis=1)            # [block_n]
            if scale is not None:
                logit = logit * scale
            valid = offs < lens[i]
            if act == "sigmoid":
                out = jnp.where(valid, 1.0 / (1.0 + jnp.exp(-logit)), 0.0)
            else:
                out = jnp.where(valid, logit, -jnp.inf)
            compat.store(o_ref.at[b, m_safe[i], pl.ds(start, block_n)], out,
                         mask=(offs < n) & (m_ids[i] < m_total))
        return carry

    jax.lax.fori_loop(0, blocks_per_program, block, 0)


def default_config(batch: int, n_queries: int, heads: int, n_entries: int) -> dict:
    """Block sizes used when the caller gives none. From the H100 sweep (CUPTI kernel time, see
    benchmarks/NOTES_kernels.md): 128-entry key blocks, one block per program, 4 warps, 3 stages was the best
    of the configs tried for both 64 and 128 heads (64-entry blocks were 0-12% slower, 32-entry blocks 2-3x)."""
    del batch, heads
    block_n = min(128, max(16, compat.next_pow2(n_entries)))
    tm = 1 if n_queries == 1 else min(4, compat.next_pow2(n_queries))
    return dict(block_n=block_n, queries_per_program=tm, blocks_per_program=1, num_warps=4, num_stages=3,
                heads_major=False)


def paged_block(block_n: int, page_entries: int) -> int:
    """The key block used over page-blocked keys: `block_n` when it is a multiple or a divisor of
    `page_entries`, else the largest power of two dividing `page_entries` (a Triton tile needs a power of
    two, and the tensor-core product at least 16 rows: a compiled kernel wants page_entries % 16 == 0 or a
    power of two; every preset has one)."""
    if block_n % page_entries == 0 or page_entries % block_n == 0:
        return block_n
    return page_entries & -page_entries


def indexer_scores_pallas(q, weights, keys, lengths, *, act: str = "none", interpret: bool = False,
                          block_n: int | None = None, blocks_per_program: int | None = None,
                          queries_per_program: int | None = None, num_warps: int | None = None,
                          num_stages: int | None = None, heads_major: bool | None = None,
                          page_entries: int | None = None):
    """Pallas launch wrapper; same contract as :func:`pallas_kernels.indexer_scores`. With page-blocked keys
    (`page_entries`), a key block is whole pages or a part of one page: `block_n` is rounded to that."""
    info = check_indexer_inputs(q, weights, keys, lengths, act, page_entries)
    b, m, h, d, n = info.batch, info.n_queries, info.heads, info.dim, info.n_entries
    if not interpret and (d < 16 or d & (d - 1)):
        raise ValueError(f"indexer_scores(impl='pallas'): head dim D must be a power of two >= 16, got {d}")
    if not interpret and page_entries and paged_block(16, page_entries) < 16:
        raise ValueError(f"indexer_scores(impl='pallas'): page_entries={page_entries} gives key blocks of "
                         f"{paged_block(16, page_entries)} < 16 rows (the tensor-core product needs 16: "
                         "page_entries a multiple of 16 or a power of two)")
    cfg = default_config(b, m, h, n)
    for key, val in (("block_n", block_n), ("blocks_per_program", blocks_per_program),
                     ("queries_per_program", queries_per_program), ("num_warps", num_warps),
                     ("num_stages", num_stages), ("heads_major", heads_major)):
        if val is not None:
            cfg[key] = val

    q4 = q if info.multi else q[:, None]
    w3 = (weights if info.multi else weights[:, None]).astype(jnp.float32)
    if not info.packed and keys.dtype == jnp.float32:
        mode = "f32"
        q4 = q4.astype(jnp.float32)
    elif q4.dtype == jnp.bfloat16:
        mode = "bf16"
    else:
        mode = "split"
        q4 = q4.astype(jnp.float32)
    hp = max(16, compat.next_pow2(h))
    if hp != h:  # zero heads with zero weight contribute w * relu(0) = 0
        q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, hp - h), (0, 0)))
        w3 = jnp.pad(w3, ((0, 0), (0, 0), (0, hp - h)))
    lens = lengths.astype(jnp.int32)
    per_query_len = lens.ndim == 2

    tm, bn, bpp = cfg["queries_per_program"], cfg["block_n"], cfg["blocks_per_program"]
    if page_entries:
        bn = paged_block(bn, page_entries)
    grid = (b, pl.cdiv(m, tm), pl.cdiv(n, bn * bpp))
    kernel = functools.partial(
        _indexer_kernel, tm=tm, block_n=bn, blocks_per_program=bpp, n=n, m_total=m, d=d,
        packed=info.packed, mode=mode, act=act, per_query_len=per_query_len,
        heads_major=bool(cfg["heads_major"]), page_entries=page_entries)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, m, n), jnp.float32),
        grid=grid,
        compiler_params=compat.triton_compiler_params(cfg["num_warps"], cfg["num_stages"]),
        interpret=interpret,
        name="indexer_scores",
    )(lens, w3, q4, keys)
    return out if info.multi else out[:, 0]
