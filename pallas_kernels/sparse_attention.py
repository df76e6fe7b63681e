"""Pallas (Triton backend) kernel: gathered sparse multi-query decode attention with window and sink.

Per request ``b`` the attended entries are the window slots ``[0, window_lengths[b])`` followed by the
``K`` gathered rows ``kv[b, indices[b, j]]`` (``-1`` / out-of-range = padding; duplicates count per
occurrence); one shared KV head (keys == values), ``H`` query heads, per-head sink logit in the
denominator only.

Grid ``(B, H / heads_per_program, n_splits)``. The ``W + K`` entries are cut into blocks of ``block_k``
rows (window blocks first, then gathered blocks); split ``s`` owns a contiguous run of those blocks and runs
an online softmax over them: per block it loads the rows once (a contiguous window tile or a row gather
from the pool; masked rows issue no memory traffic), ``logits = scale * q . k^T`` on the tensor cores, and
``acc += p . v`` with the same tile as ``v``. With one split the program folds the sink in and writes the
final ``(out, lse)``. With several (flash-decoding, which is what keeps all SMs busy at small batch) each
split writes ``(acc, m, l)`` partials, merged either by a small XLA epilogue (2-3 kernels) or in the same
launch (``fused_combine``): every split bumps a per-(request, head block) arrival counter with an
acquire-release atomic after a CTA barrier, and the split that arrives last merges all partials and writes
``(out, lse)``. No split waits on another, so this cannot deadlock whatever the scheduling order. The merge is
serial in that last program, so it only pays off with few splits (see ``default_config``).

fp8 KV (V4's packed rows, ``fm_jax.layers.kv_fp8``; ``kv`` and/or ``window_kv`` uint8 ``[B, ., E]``): the
program loads the packed rows as uint32 words (gathered or window rows alike; byte loads measured 0.36-0.47x
the XLA path on the H100) and dequantises in registers, one column tile at a time: each 64-value nope block
is its fp8 bytes (shifted out of the words, bitcast to e4m3, converted) times the block's power-of-two scale
(its ue8m0 byte shifted into a float32 exponent), the RoPE tile two bf16 values per word; every tile is exact
in bf16. The logits are then the sum of the per-tile products and the accumulator is one ``[heads, width]``
tile per column tile. No dequantised copy of the KV exists in HBM.
When any input is packed, every input is read in these column tiles (so D need not be a power of two, but
``rope_dim`` must be one, >= 16); otherwise one tile of width D.

Numerics: bf16 q and kv -> bf16 tensor-core products with float32 accumulation and ``p`` rounded to bf16 for
``p . v`` (as flash attention does); a float32 q with bf16 kv splits q and p into bf16 hi + lo parts
(~float32 accuracy); float32 kv uses IEEE float32 dots.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fm_jax.layers import kv_fp8
from pallas_kernels import compat
from pallas_kernels.reference import check_attention_inputs

NEG = -1e30   # "minus infinity" for running maxima (keeps exp(m_old - m_new) NaN-free)


def _dot(a, b, contract_b: int, precision=None):
    """a [X, C] . b -> [X, Y] float32, contracting b's axis ``contract_b``."""
    return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _split(x):
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def column_tiles(d: int, rope_dim: int | None) -> tuple:
    """(offset, width) column tiles the kernel reads: one tile of D for bf16/f32 inputs; for packed fp8
    inputs (``rope_dim`` given) one tile per 64-value scale block of the nope dims, then the RoPE dims."""
    if rope_dim is None:
        return ((0, d),)
    nope = d - rope_dim
    return tuple((c0, kv_fp8.BLOCK) for c0 in range(0, nope, kv_fp8.BLOCK)) + ((nope, rope_dim),)


def as_words(packed: jax.Array) -> jax.Array:
    """Packed rows uint8 [B, N, E] -> the same bytes as little-endian uint32 words [B, N, E / 4] (a reshape and
    a bitcast, which XLA can apply without copying). The kernel reads words, not bytes: 4x fewer loads, and
    since a row's 584 bytes keep every row 8-byte aligned, wider vector loads are possible along a row."""
    b, n, e = packed.shape
    return jax.lax.bitcast_convert_type(packed.reshape(b, n, e // 4, 4), jnp.uint32)


def _bytes_of(words, nbits: int, dtype):
    """uint32 words [bk, w] -> their little-endian `nbits` fields [bk, w * 32 / nbits] as `dtype` (an unsigned
    int of that width), in memory order."""
    per = 32 // nbits
    shifts = (nbits * jnp.arange(per, dtype=jnp.uint32))[None, None, :]
    fields = (words[:, :, None] >> shifts) & jnp.uint32((1 << nbits) - 1)          # [bk, w, per]
    return fields.astype(dtype).reshape(words.shape[0], words.shape[1] * per)


def _load_packed(ref, b, ridx, valid, tiles, d, rope_dim):
    """Packed fp8 rows ``ref[b, ridx]`` (uint32 words, see `as_words`; int32 [bk] row ids, masked by ``valid``)
    -> one bf16 [bk, width] tile per column tile, dequantised in registers (exact)."""
    nope = d - rope_dim
    r2, m2 = ridx[:, None], valid[:, None]
    s0 = (nope + 2 * rope_dim) // 4                                   # first word of the scale row
    scale_words = [compat.load(ref.at[b, ridx, s0 + j], mask=valid, other=0)
                   for j in range(-(-(len(tiles) - 1) // 4))]
    out = []
    for i, (c0, w) in enumerate(tiles[:-1]):
        cols = (c0 // 4 + jnp.arange(w // 4, dtype=jnp.int32))[None, :]
        by = _bytes_of(compat.load(ref.at[b, r2, cols], mask=m2, other=0), 8, jnp.uint8)
        vals = jax.lax.bitcast_convert_type(by, kv_fp8.FP8)
        e = (scale_words[i // 4] >> jnp.uint32(8 * (i % 4))) & jnp.uint32(0xFF)
        out.append((vals.astype(jnp.float32) * kv_fp8.scale_from_byte(e)[:, None]).astype(jnp.bfloat16))
    cols = (nope // 4 + jnp.arange(rope_dim // 2, dtype=jnp.int32))[None, :]     # two bf16 per word
    halves = _bytes_of(compat.load(ref.at[b, r2, cols], mask=m2, other=0), 16, jnp.uint16)
    out.append(jax.lax.bitcast_convert_type(halves, jnp.bfloat16))
    return out


def _attention_kernel(wl_ref, sink_ref, q_ref, kv_ref, idx_ref, win_ref, *refs, bh, bk, d, n, k_total,
                      w_total, n_wblocks, n_blocks, blocks_per_split, n_splits, scale, mode, fused, barrier,
                      tiles, rope_dim, kv_packed, win_packed):
    b = pl.program_id(0)
    hb = pl.program_id(1)
    sp = pl.program_id(2)
    h0 = hb * bh
    rows = jnp.arange(bk, dtype=jnp.int32)
    wlen = jnp.minimum(wl_ref[b], w_total)
    kt_dtype = jnp.float32 if mode == "f32" else jnp.bfloat16

    def qparts_of(c0, w):
        q = q_ref[b, pl.ds(h0, bh), pl.ds(c0, w)]                              # [bh, w]
        return _split(q.astype(jnp.float32)) if mode == "split" else (q.astype(kt_dtype),)
    qparts = [qparts_of(c0, w) for c0, w in tiles]
    prec = jax.lax.Precision.HIGHEST if mode == "f32" else None

    def step(kts, valid, carry):      # kts: one [bk, width] tile per column tile
        m_i, l_i, accs = carry
        kts = [kt.astype(kt_dtype) for kt in kts]
        s = None
        for qp, kt in zip(qparts, kts):
            s_t = _dot(qp[0], kt, 1, prec)
            for extra in qp[1:]:
                s_t = s_t + _dot(extra, kt, 1)
            s = s_t if s is None else s + s_t
        s = jnp.where(valid[None, :], s * scale, NEG)                           # [bh, bk]
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        alpha = jnp.exp(m_i - m_new)
        p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        l_new = l_i * alpha + jnp.sum(p, axis=1)
        if mode == "f32":
            pvs = [_dot(p, kt, 0, prec) for kt in kts]
        elif mode == "split":
            ph, pl_ = _split(p)
            pvs = [_dot(ph, kt, 0) + _dot(pl_, kt, 0) for kt in kts]
        else:
            pvs = [_dot(p.astype(jnp.bfloat16), kt, 0) for kt in kts]
        return m_new, l_new, tuple(acc * alpha[:, None] + pv for acc, pv in zip(accs, pvs))

    def load_float(ref, rows_ix, valid):
        return [compat.load(ref.at[b, rows_ix, (c0 + jnp.arange(w, dtype=jnp.int32))[None, :]],
                            mask=valid[:, None], other=0) for c0, w in tiles]

    def window_block(t, carry):                          # t: global block id < n_wblocks
        w0 = t * bk
        valid = w0 + rows < wlen
        if win_packed:
            kts = _load_packed(win_ref, b, jnp.minimum(w0 + rows, w_total - 1), valid, tiles, d, rope_dim)
        elif len(tiles) == 1:
            kts = [compat.load(win_ref.at[b, pl.ds(w0, bk), :], mask=valid[:, None], other=0)]
        else:
            kts = load_float(win_ref, jnp.minimum(w0 + rows, w_total - 1)[:, None], valid)
        return step(kts, valid, carry)

    def gather_block(t, carry):                          # t: global block id >= n_wblocks
        g0 = (t - n_wblocks) * bk
        idx = compat.load(idx_ref.at[b, pl.ds(g0, bk)], mask=g0 + rows < k_total, other=-1)
        valid = (idx >= 0) & (idx < n)
        safe = jnp.where(valid, idx, 0)
        if kv_packed:
            kts = _load_packed(kv_ref, b, safe, valid, tiles, d, rope_dim)
        else:
            kts = load_float(kv_ref, safe[:, None], valid)
        return step(kts, valid, carry)

    # this split owns global blocks [lo, hi): window blocks first, then gathered blocks
    lo = sp * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, n_blocks)
    init = (jnp.full((bh,), NEG, jnp.float32), jnp.zeros((bh,), jnp.float32),
            tuple(jnp.zeros((bh, w), jnp.float32) for _, w in tiles))
    carry = jax.lax.fori_loop(jnp.minimum(lo, n_wblocks), jnp.minimum(hi, n_wblocks), window_block, init)
    m_i, l_i, accs = jax.lax.fori_loop(jnp.maximum(lo, n_wblocks), jnp.maximum(hi, n_wblocks), gather_block, carry)

    def finish(m_i, l_i, accs):      # fold the sink in and write the final (out, lse)
        sink = sink_ref[pl.ds(h0, bh)]
        m = jnp.maximum(m_i, sink)
        a = jnp.exp(m_i - m)
        denom = l_i * a + jnp.exp(sink - m)
        inv = jnp.where(denom > 0, a / jnp.where(denom > 0, denom, 1.0), 0.0)
        for (c0, w), acc in zip(tiles, accs):
            o_ref[b, pl.ds(h0, bh), pl.ds(c0, w)] = acc * inv[:, None]
        lse_ref[b, pl.ds(h0, bh)] = m + jnp.log(denom)

    if n_splits == 1:
        o_ref, lse_ref = refs
        finish(m_i, l_i, accs)
        return
    if not fused:
        acc_ref, m_ref, l_ref = refs
    else:
        _, o_ref, lse_ref, acc_ref, m_ref, l_ref, cnt_ref = refs    # refs[0] is the counter input (aliased)
    for (c0, w), acc in zip(tiles, accs):
        acc_ref[b, sp, pl.ds(h0, bh), pl.ds(c0, w)] = acc
    m_ref[b, sp, pl.ds(h0, bh)] = m_i
    l_ref[b, sp, pl.ds(h0, bh)] = l_i
    if not fused:
        return
    if barrier:   # every thread's partial stores precede the (single-thread) release atomic
        compat.debug_barrier()
    arrived = compat.atomic_add(cnt_ref, (b * pl.num_programs(1) + hb,), jnp.int32(1))

    @pl.when(arrived == n_splits - 1)
    def _merge():                    # online merge of the n_splits partials, in split order
        def body(t, carry):
            m_run, l_run, acc_run = carry
            m_t = m_ref[b, t, pl.ds(h0, bh)]
            m_new = jnp.maximum(m_run, m_t)
            a_run, a_t = jnp.exp(m_run - m_new), jnp.exp(m_t - m_new)
            return (m_new, l_run * a_run + l_ref[b, t, pl.ds(h0, bh)] * a_t,
                    tuple(acc * a_run[:, None] + acc_ref[b, t, pl.ds(h0, bh), pl.ds(c0, w)] * a_t[:, None]
                          for (c0, w), acc in zip(tiles, acc_run)))
        finish(*jax.lax.fori_loop(0, n_splits, body, init))


def tiles_supported(d: int, rope_dim: int | None) -> bool:
    """Whether the compiled (Triton) kernel takes these shapes: every column tile a power of two >= 16."""
    return all(w >= 16 and w & (w - 1) == 0 for _, w in column_tiles(d, rope_dim))


def combine_splits(acc, m, l, sink):
    """Partials acc [B, S, H, D], m/l [B, S, H] + sink [H] -> (out [B, H, D], lse [B, H])."""
    sink = sink.astype(jnp.float32)[None, :]
    mx = jnp.maximum(jnp.max(m, axis=1), sink)                                  # [B, H]
    a = jnp.exp(m - mx[:, None, :])                                             # [B, S, H]
    denom = jnp.exp(sink - mx) + jnp.sum(a * l, axis=1)
    inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
    out = jnp.sum(acc * a[..., None], axis=1) * inv[..., None]
    return out, mx + jnp.log(denom)


def default_config(batch: int, heads: int, topk: int, window: int, dim: int, mode: str = "bf16",
                   packed: bool = False) -> dict:
    """Block sizes used when the caller gives none, from the H100 sweeps (CUPTI kernel time, see
    benchmarks/NOTES_kernels.md). 16 heads x 64 entries per block, 4 warps (32 entries for f32 / wide heads).
    Batch > 8: 2 splits merged in-kernel (2.1-2.2x XLA at batch 32 and 64; a 64-head program was slower).
    Batch <= 8: the split count doubles until ``batch * ceil(H / 16) * splits`` reaches two programs per SM
    (132 SMs) and the partials are merged by the XLA epilogue: the in-kernel merge reads the partials
    one split after another in the last program, which cost more than the epilogue at 4-5 splits."""
    hp = max(16, compat.next_pow2(heads))
    # packed fp8 rows: 32 entries per block (H200 sweep, kernels-h200-fp8-sweep.json: 27.4 / 42.6 us at batch
    # 1 / 8 against 37.1 / 58.1 with 64)
    bh, bk = 16, (64 if mode == "bf16" and dim <= 512 and not packed else 32)
    n_blocks = -(-window // bk) + -(-topk // bk)
    hblocks = -(-hp // bh)
    if batch > 8:
        splits, fused = 2, True
    else:
        splits, fused = 1, False
        while batch * hblocks * splits < 2 * 132 and splits * 2 <= n_blocks:
            splits *= 2
    return dict(heads_per_program=bh, block_k=bk, n_splits=splits, num_warps=4,
                num_stages=1 if mode == "f32" else 2, fused_combine=fused)


def sparse_attention_pallas(q, kv, indices, window_kv, window_lengths, sink, *, scale, rope_dim: int | None = None,
                            interpret: bool = False,
                            heads_per_program: int | None = None, block_k: int | None = None,
                            n_splits: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None, fused_combine: bool | None = None):
    """Pallas launch wrapper; same contract as :func:`pallas_kernels.sparse_attention`.

    ``fused_combine`` picks where split-K partials are merged: in-kernel by the last split to arrive (True) or
    by a separate XLA epilogue (False); see the module docstring."""
    info = check_attention_inputs(q, kv, indices, window_kv, window_lengths, sink, rope_dim)
    b, h, d = info.batch, info.heads, info.dim
    tiles = column_tiles(d, info.rope_dim)
    try:
        scale = float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError("sparse_attention(impl='pallas'): scale must be a static Python number") from e
    if not interpret and not tiles_supported(d, info.rope_dim):
        raise ValueError(f"sparse_attention(impl='pallas'): head dim D must be a power of two >= 16 (packed fp8 KV: "
                         f"rope_dim must be), got D={d}, rope_dim={info.rope_dim}")
    if (info.kv_packed or info.window_packed) and info.rope_dim % 2:
        raise ValueError(f"sparse_attention(impl='pallas'): packed fp8 rows are read as uint32 words, which needs "
                         f"an even rope_dim, got {info.rope_dim}")
    if kv.dtype == jnp.float32 or window_kv.dtype == jnp.float32:   # (packed rows are uint8: exact in bf16)
        mode = "f32"
    elif q.dtype == jnp.bfloat16:
        mode = "bf16"
    else:
        mode = "split"
    cfg = default_config(b, h, info.topk, info.window, d, mode, info.kv_packed or info.window_packed)
    for key, val in (("heads_per_program", heads_per_program), ("block_k", block_k), ("n_splits", n_splits),
                     ("num_warps", num_warps), ("num_stages", num_stages), ("fused_combine", fused_combine)):
        if val is not None:
            cfg[key] = val
    bh, bk = cfg["heads_per_program"], cfg["block_k"]

    hp = -(-h // bh) * bh
    qp, sinkp = q, sink.astype(jnp.float32)
    if hp != h:
        qp = jnp.pad(q, ((0, 0), (0, hp - h), (0, 0)))
        sinkp = jnp.pad(sinkp, (0, hp - h))
    idx = indices.astype(jnp.int32)
    if info.topk == 0:   # keep the kernel's loads well-formed
        idx = jnp.full((b, 1), -1, jnp.int32)
    win, wl = window_kv, window_lengths.astype(jnp.int32)
    if info.window == 0:
        win = jnp.zeros((b, 1, window_kv.shape[2]), window_kv.dtype)
        wl = jnp.zeros((b,), jnp.int32)

    n_wblocks = -(-info.window // bk)
    n_blocks = n_wblocks + -(-info.topk // bk)
    splits = max(1, min(int(cfg["n_splits"]), n_blocks))
    bps = -(-n_blocks // splits)
    splits = -(-n_blocks // bps)
    nhb = hp // bh
    fused = splits > 1 and bool(cfg["fused_combine"])
    final_shapes = (jax.ShapeDtypeStruct((b, hp, d), jnp.float32), jax.ShapeDtypeStruct((b, hp), jnp.float32))
    partial_shapes = (jax.ShapeDtypeStruct((b, splits, hp, d), jnp.float32),
                      jax.ShapeDtypeStruct((b, splits, hp), jnp.float32),
                      jax.ShapeDtypeStruct((b, splits, hp), jnp.float32))
    # packed rows travel as uint32 words (`as_words`); entry_bytes is a multiple of 8, so E / 4 is whole
    kv_in = as_words(kv) if info.kv_packed else kv
    win_in = as_words(win) if info.window_packed else win
    args = [wl, sinkp, qp, kv_in, idx, win_in]
    aliases = {}
    if splits == 1:
        out_shape = final_shapes
    elif not fused:
        out_shape = partial_shapes
    else:   # + the arrival counters, zeroed by XLA and updated in place
        out_shape = final_shapes + partial_shapes + (jax.ShapeDtypeStruct((b * nhb,), jnp.int32),)
        aliases = {len(args): len(out_shape) - 1}
        args.append(jnp.zeros((b * nhb,), jnp.int32))
    kernel = functools.partial(
        _attention_kernel, bh=bh, bk=bk, d=d, n=info.n_entries, k_total=idx.shape[1], w_total=info.window,
        n_wblocks=n_wblocks, n_blocks=n_blocks, blocks_per_split=bps, n_splits=splits, scale=scale, mode=mode,
        fused=fused, barrier=not interpret, tiles=tiles, rope_dim=info.rope_dim, kv_packed=info.kv_packed,
        win_packed=info.window_packed)
    res = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(b, nhb, splits),
        input_output_aliases=aliases,
        compiler_params=compat.triton_compiler_params(cfg["num_warps"], cfg["num_stages"]),
        interpret=interpret,
        name="sparse_attention",
    )(*args)
    if splits > 1 and not fused:
        out, lse = combine_splits(*res, sinkp)
    else:
        out, lse = res[:2]
    return out[:, :h], lse[:, :h]
