"""Pallas (Triton backend) kernels: exact top-k over the last axis by a radix select on the float bits.

Same result as ``jax.lax.top_k``: values descending, equal values in index order, and where equal values
straddle the k-th place the lower indices are kept. ``-0.0`` ranks below ``+0.0`` (``lax.top_k`` on CPU compares in
IEEE total order; the interpret-mode tests check it). Inputs hold no NaN (masked scores are ``-inf``).

Each float32 ``x`` maps to an int32 key ``s`` with the same order (``s = i ^ ((i >> 31) & 0x7FFFFFFF)``,
``i`` the bits of ``x``). The k-th largest key ``T`` of a row is found digit by digit, most significant first
(digits of 11/11/10 bits, or 8/8/8/8: see ``default_config``). Each digit is one kernel over
``grid = (batch, programs per row)``:

* every program extends the state left by the previous kernel (the prefix of ``T`` found so far and how many
  of the still-matching keys are needed) by the bin of the previous digit's finished histogram that holds the
  k-th key (cumulative sums over at most 2048 bins), and program 0 of the row stores it for the next kernel;
* it builds the histogram of the next digit over its keys that match the prefix, without shared-memory
  atomics: with the digit split as ``hi * L + lo``, ``hist[hi, lo] = onehot(hi)^T @ onehot(lo)``, an
  ``[R, chunk] x [chunk, L]`` tensor-core product of 0/1 values (bf16 with float32 accumulation, exact since
  every count is at most the program's key count, far below 2^24; or int8 with int32); chunks with no matching
  key skip the product;
* it adds its histogram to the row's global one with one vector of global atomics (only the non-zero bins).

The last digit's kernel also keeps each program's histogram (``[batch, programs, R, L]``): its column at
``T``'s last digit is the number of keys equal to ``T`` in each program, which places the kept ties in index
order without another pass. A final kernel writes the ``k`` picks into ``[batch, k]`` slots: keys above ``T``
(exactly ``k - need`` of them) at slots reserved per program by one atomic add on a per-row counter, and the
first ``need`` keys equal to ``T`` in index order at slots ``k - need + rank``. An XLA sort of the ``[batch, k]``
picks by (key descending, index ascending) gives ``lax.top_k``'s order.

The histogram buffer is float32 although it only holds integers: Pallas' Triton lowering (jax 0.10.2 and
0.11.2) emits ``tt.atomic_rmw fadd`` for a *vector* atomic add of int32 values (its integer check looks at the
element type of scalars only; a scalar int32 atomic gets ``add``), which on the GPU added the counts' bits as
floats. Every value stored there is exact in float32: counts and the slot counter below 2^24, ``need <= k``, and
the prefixes have at most 24 bits (3 x 8 or 2 x 11 digits before the last).

Status: exact against ``lax.top_k`` in interpret mode (CPU tests) and on the H200 (jax 0.11.2, 2026-12-05:
``pytest -m gpu`` and 12 on-device checks at batch 1 / 6 / 8, N = 20,037 / 64K / 256K, both digit sets and both
one-hot types; `kernels-h200-topk-radix.json`). The earlier int32-buffer version failed every check there
(`kernels-h200-topk-quick.json`): the fadd above. Device time at k = 512 (`kernels-h200-topk-sweep.json`),
against ``lax.top_k``: 26.7 µs vs 48.5 at batch 1, N = 64K; 52.3 vs 97.9 at batch 8, N = 64K; 137.2 vs 440.5
at batch 8, N = 256K (8/8/8/8 digits; 11/11/10 took 34.5, 102.0 and 288.0). The dispatch's ``auto`` picks it
where it was measured faster (`pallas_kernels.dispatch.topk`).

Launches per call: one zero fill of the ``[batch, digits + 1, 32, 64]`` float32 histogram buffer, one histogram
kernel per digit (3 or 4), the select kernel and the sort: 6 or 7.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import compat

# every digit's histogram fits in [32, 64] (digits of 8..11 bits); the slab after the digits' holds the select
# kernel's per-row slot counter at [0, 0] and the per-digit (prefix, need) state in row 1
HIST_ROWS, HIST_COLS = 32, 64
DIGIT_SETS = ((11, 11, 10), (8, 8, 8, 8))   # digit widths, most significant first (they sum to 32)


def _layout(digits) -> tuple:
    """Per digit (shift, bits, lo_bits): the digit's histogram is [2^(bits - lo_bits), 2^lo_bits] (both >= 16,
    the smallest tensor-core operand), bin d at [d >> lo_bits, d & (2^lo_bits - 1)]."""
    if sum(digits) != 32 or not all(8 <= w <= 11 for w in digits):
        raise ValueError(f"topk_pallas: digits must be widths of 8..11 bits summing to 32, got {digits}")
    out, shift = [], 32
    for w in digits:
        shift -= w
        hi = max(4, w - 6)
        out.append((shift, w, w - hi))
    return tuple(out)


def _sort_key(x):
    """float32 -> int32 with the same order (IEEE total order: -0.0 < +0.0; no NaN expected)."""
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    return i ^ ((i >> 31) & jnp.int32(0x7FFFFFFF))


def _hist_view(layout, level: int):
    """The index of digit ``level``'s histogram in the [batch, levels + 1, 32, 64] buffer (after the row)."""
    _, bits, lo_bits = layout[level]
    return pl.ds(0, 1 << (bits - lo_bits)), pl.ds(0, 1 << lo_bits)


def _select_bin(h, need):
    """h int32 [R, L]: a histogram whose bin d = hi * L + lo counts keys of digit d; need: how many of the
    largest counted keys are wanted (1 <= need <= total). Returns (d, need_in_d): the digit of the need-th
    largest key and how many keys of bin d are among the wanted ones."""
    rows = jnp.sum(h, axis=1)                                               # [R]
    total = jnp.sum(rows)
    incl = (jnp.cumsum(rows) - rows)[:, None] + jnp.cumsum(h, axis=1)       # keys in bins <= d
    above = total - incl                                                    # keys in bins > d (non-increasing)
    d = jnp.sum((above >= need).astype(jnp.int32))
    lin = (jnp.arange(h.shape[0], dtype=jnp.int32)[:, None] * h.shape[1]
           + jnp.arange(h.shape[1], dtype=jnp.int32)[None, :])
    return d, need - jnp.sum(jnp.where(lin > d, h, 0))


def _prefix_state(hist_in_ref, hist_ref, b, j, layout, level: int, k: int):
    """(prefix, need) after the first ``level >= 1`` digits: prefix = the signed value of ``T >> shift`` (the shift
    of digit ``level - 1``), need = how many keys with that prefix are among the top k.

    The previous kernel stored the state after ``level - 1`` digits in the counter slab (row 1, columns
    ``2 (level - 2)``, ``+1``); one bin selection on digit ``level - 1``'s histogram extends it, and program 0 of
    the row stores the result for the next kernel (``hist_ref`` None: the select kernel, the last reader). So
    each kernel waits on one histogram scan, not one per earlier digit."""
    slab = jnp.int32(len(layout))
    one = jnp.int32(1)
    _, bits, _ = layout[level - 1]
    if level == 1:
        need = k
    else:
        prefix = hist_in_ref[b, slab, one, jnp.int32(2 * (level - 2))].astype(jnp.int32)
        need = hist_in_ref[b, slab, one, jnp.int32(2 * (level - 2) + 1)].astype(jnp.int32)
    d, need = _select_bin(hist_in_ref[(b, level - 1) + _hist_view(layout, level - 1)].astype(jnp.int32), need)
    # the top digit was biased by 2^(bits - 1) to make it non-negative (the key is signed)
    prefix = d - (1 << (bits - 1)) if level == 1 else prefix * (1 << bits) + d
    if hist_ref is not None:
        @pl.when(j == 0)
        def _store():
            hist_ref[b, slab, one, jnp.int32(2 * (level - 1))] = prefix.astype(jnp.float32)
            hist_ref[b, slab, one, jnp.int32(2 * (level - 1) + 1)] = need.astype(jnp.float32)
    return prefix, need


def _hist_kernel(x_ref, hist_in_ref, *out_refs, layout, level: int, k: int, n: int, chunk: int, chunks: int,
                 onehot: str, skip_empty: bool, interpret: bool):
    """Histogram of digit ``level`` over the program's keys that match the prefix of the earlier digits."""
    hist_ref = out_refs[0]
    b = pl.program_id(0)
    j = pl.program_id(1)
    shift, bits, lo_bits = layout[level]
    rows, cols = 1 << (bits - lo_bits), 1 << lo_bits
    prefix = _prefix_state(hist_in_ref, hist_ref, b, j, layout, level, k)[0] if level else None
    hi_ids = jnp.arange(rows, dtype=jnp.int32)[:, None]
    lo_ids = jnp.arange(cols, dtype=jnp.int32)[None, :]
    # one-hot operands: bf16 with float32 accumulation, or int8 with int32 (half the bytes per operand)
    dt, acc_dt = (jnp.int8, jnp.int32) if onehot == "int8" else (jnp.bfloat16, jnp.float32)
    one, zero = dt(1), dt(0)

    def add_chunk(acc, digit, live):
        oh_hi = jnp.where(((digit >> lo_bits)[None, :] == hi_ids) & live[None, :], one, zero)  # [R, chunk]
        oh_lo = jnp.where((digit & (cols - 1))[:, None] == lo_ids, one, zero)                  # [chunk, L]
        return acc + jax.lax.dot_general(oh_hi, oh_lo, (((1,), (0,)), ((), ())),
                                         preferred_element_type=acc_dt)

    def body(c, acc):
        start = (j * chunks + c) * chunk
        offs = start + jnp.arange(chunk, dtype=jnp.int32)
        live = offs < n
        s = _sort_key(compat.load(x_ref.at[b, pl.ds(start, chunk)], mask=live, other=0.0))
        if level == 0:
            return add_chunk(acc, (s >> shift) + (1 << (bits - 1)), live)
        live = live & ((s >> (shift + bits)) == prefix)
        if not skip_empty:
            return add_chunk(acc, (s >> shift) & ((1 << bits) - 1), live)
        # past the first digit few chunks hold a matching key (for untied data): skip the one-hot product
        return jax.lax.cond(jnp.sum(live.astype(jnp.int32)) > 0, add_chunk, lambda a, *_: a,
                            acc, (s >> shift) & ((1 << bits) - 1), live)

    counts = jax.lax.fori_loop(0, chunks, body, jnp.zeros((rows, cols), acc_dt))
    # float32 atomics (module doc: an int32 vector atomic is lowered as a float add). Interpret mode has no
    # masked atomics; on the GPU the mask skips the (many) empty bins.
    # (static indices as arrays: the interpret-mode atomic wants every index to have a shape)
    compat.atomic_add(hist_ref, (b, jnp.int32(level)) + _hist_view(layout, level), counts.astype(jnp.float32),
                      **({} if interpret else {"mask": counts != 0}))
    if level == len(layout) - 1:
        out_refs[1][b, j] = counts.astype(jnp.int32)


def _select_kernel(x_ref, hist_in_ref, part_ref, hist_ref, idx_ref, val_ref, key_ref, *, layout, k: int, n: int,
                   chunk: int, chunks: int, n_programs: int):
    """Writes the program's picks: keys > T at slots from the row counter, the first ``need`` keys == T (in
    index order over the row) at slots ``k - need + rank``. Lanes not picked are masked (slot ``k``)."""
    b = pl.program_id(0)
    j = pl.program_id(1)
    last = len(layout) - 1
    thr, need = _prefix_state(hist_in_ref, None, b, j, layout, last + 1, k)      # T and the ties to keep
    d = thr & ((1 << layout[last][1]) - 1)                                       # T's last digit
    lo_bits = layout[last][2]
    n_gt = k - need
    # keys == T in earlier programs of the row: column d of their last-digit histograms
    progs = jnp.arange(compat.next_pow2(n_programs), dtype=jnp.int32)
    before = compat.load(part_ref.at[b, pl.ds(0, progs.shape[0]), d >> lo_bits, d & ((1 << lo_bits) - 1)],
                         mask=progs < j, other=0)
    eq_before = jnp.sum(before)

    def block(c):
        start = (j * chunks + c) * chunk
        offs = start + jnp.arange(chunk, dtype=jnp.int32)
        live = offs < n
        x = compat.load(x_ref.at[b, pl.ds(start, chunk)], mask=live, other=0.0)
        s = _sort_key(x)
        return offs, x, s, live & (s > thr), live & (s == thr)

    def count(c, tot):
        return tot + jnp.sum(block(c)[3].astype(jnp.int32))

    mine = jax.lax.fori_loop(0, chunks, count, jnp.int32(0))
    zero = jnp.int32(0)
    # the row's slot counter (a float32 cell of the histogram buffer: exact below 2^24)
    base = compat.atomic_add(hist_ref, (b, jnp.int32(last + 1), zero, zero), mine.astype(jnp.float32))
    base = base.astype(jnp.int32)

    def write(c, carry):
        gt_run, eq_run = carry
        offs, x, s, gt, eq = block(c)
        gti, eqi = gt.astype(jnp.int32), eq.astype(jnp.int32)
        r_gt = base + gt_run + jnp.cumsum(gti) - 1
        r_eq = eq_before + eq_run + jnp.cumsum(eqi) - 1
        take_eq = eq & (r_eq < need)
        slot = jnp.where(gt, r_gt, jnp.where(take_eq, n_gt + r_eq, k))
        # slot < k holds whenever T is right; the guard keeps a wrong T (as on the H200, module doc) from
        # storing past the [batch, k] outputs into other buffers
        pick = (gt | take_eq) & (slot < k)
        compat.store(idx_ref.at[b, slot], offs, mask=pick)
        compat.store(val_ref.at[b, slot], x, mask=pick)
        compat.store(key_ref.at[b, slot], ~s, mask=pick)      # ascending ~s == descending s
        return gt_run + jnp.sum(gti), eq_run + jnp.sum(eqi)

    jax.lax.fori_loop(0, chunks, write, (jnp.int32(0), jnp.int32(0)))


def default_config(batch: int, n_entries: int) -> dict:
    """256-entry chunks (the one-hot operands then stay small, e.g. [32, 256] and [256, 64] bf16) and about 512
    programs per call, so that even batch 1 fills the GPU while each program's histogram atomics are amortised
    over as many keys as the shape allows. Digits 8/8/8/8: on the H200 they beat 11/11/10 (one launch fewer, but
    five times the one-hot columns per key: 2048 + 2048 + 1024 against 4 x 256) at every timed shape, by 1.3x at
    batch 1, N = 64K to 2.1x at batch 8, N = 256K (`benchmarks/results/kernels-h200-topk-sweep.json`)."""
    chunk = min(256, max(32, compat.next_pow2(n_entries)))
    per_row = max(1, -(-512 // max(batch, 1)))
    chunks = max(1, min(64, compat.next_pow2(-(-n_entries // (chunk * per_row)))))
    digits = DIGIT_SETS[1]
    return dict(chunk=chunk, chunks_per_program=chunks, digits=digits, onehot="bf16", skip_empty=True, num_warps=4,
                num_stages=2)


def topk_pallas(scores, k: int, *, interpret: bool = False, chunk: int | None = None,
                chunks_per_program: int | None = None, digits: tuple | None = None, onehot: str | None = None,
                skip_empty: bool | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """Exact top-k of ``scores [batch, n_entries]`` (float32, no NaN) over the last axis.

    Returns (values float32 [batch, k], indices int32 [batch, k]) exactly as ``jax.lax.top_k``; needs
    ``1 <= k <= n_entries``. ``digits``: the radix digit widths, most significant first (see DIGIT_SETS);
    ``onehot``: the histogram product's operand type, "bf16" or "int8"; ``skip_empty``: skip the product on
    chunks without a key matching the prefix (a branch per chunk)."""
    if scores.ndim != 2:
        raise ValueError(f"topk_pallas: scores must be [batch, n_entries], got shape {scores.shape}")
    b, n = scores.shape
    if not 1 <= k <= n:
        raise ValueError(f"topk_pallas: need 1 <= k <= n_entries, got k={k}, n_entries={n}")
    cfg = default_config(b, n)
    for name, val in (("chunk", chunk), ("chunks_per_program", chunks_per_program), ("digits", digits),
                      ("onehot", onehot), ("skip_empty", skip_empty), ("num_warps", num_warps),
                      ("num_stages", num_stages)):
        if val is not None:
            cfg[name] = val
    ch, cpp, layout = cfg["chunk"], cfg["chunks_per_program"], _layout(tuple(cfg["digits"]))
    if ch < 32 or ch & (ch - 1):   # 32: the int8 tensor-core product's smallest K
        raise ValueError(f"topk_pallas: chunk must be a power of two >= 32, got {ch}")
    if cfg["onehot"] not in ("bf16", "int8"):
        raise ValueError(f"topk_pallas: onehot must be 'bf16' or 'int8', got {cfg['onehot']!r}")
    levels = len(layout)
    n_programs = pl.cdiv(n, ch * cpp)
    x = scores.astype(jnp.float32)
    params = compat.triton_compiler_params(cfg["num_warps"], cfg["num_stages"])
    # one [32, 64] histogram per digit, then the slab of the slot counter and the per-digit state
    hist_shape = jax.ShapeDtypeStruct((b, levels + 1, HIST_ROWS, HIST_COLS), jnp.float32)
    _, bits, lo_bits = layout[-1]
    part_shape = jax.ShapeDtypeStruct((b, n_programs, 1 << (bits - lo_bits), 1 << lo_bits), jnp.int32)
    hist = jnp.zeros(hist_shape.shape, jnp.float32)     # the one zero fill: every later kernel updates in place
    part = None
    for level in range(levels):
        final = level == levels - 1
        res = pl.pallas_call(
            functools.partial(_hist_kernel, layout=layout, level=level, k=k, n=n, chunk=ch, chunks=cpp,
                              onehot=cfg["onehot"], skip_empty=bool(cfg["skip_empty"]), interpret=interpret),
            out_shape=(hist_shape, part_shape) if final else (hist_shape,),
            grid=(b, n_programs),
            input_output_aliases={1: 0},
            compiler_params=params,
            interpret=interpret,
            name=f"topk_hist{level}",
        )(x, hist)
        hist = res[0]
        part = res[1] if final else None
    # interpret mode writes masked scatter lanes back to their slot, so they get a spare column k (sliced off);
    # on the GPU masked lanes touch no memory
    width = k + 1 if interpret else k
    out_shape = (hist_shape, jax.ShapeDtypeStruct((b, width), jnp.int32),
                 jax.ShapeDtypeStruct((b, width), jnp.float32), jax.ShapeDtypeStruct((b, width), jnp.int32))
    _, idx, val, key = pl.pallas_call(
        functools.partial(_select_kernel, layout=layout, k=k, n=n, chunk=ch, chunks=cpp, n_programs=n_programs),
        out_shape=out_shape,
        grid=(b, n_programs),
        input_output_aliases={1: 0},
        compiler_params=params,
        interpret=interpret,
        name="topk_select",
    )(x, hist, part)
    key, idx, val = key[:, :k], idx[:, :k], val[:, :k]
    _, idx, val = jax.lax.sort((key, idx, val), dimension=1, num_keys=2, is_stable=False)
    return val.astype(scores.dtype), idx
