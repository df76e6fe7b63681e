"""KV compressor (SPEC §2): `compress_sequence` against a naive float64 per-entry loop written from the SPEC
formula; the decode shift register (`decode_update`) emits the same entries, also after a ragged prefill
(`state_from_sequence`). Ratio 4 with overlapping windows and ratio 16 without."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fm_jax.layers import compressor
from fm_jax.layers.rope import yarn_inv_freq

SETTINGS = settings(max_examples=10, deadline=None)
D_MODEL, D, EPS = 24, 16, 1e-6
INV = yarn_inv_freq(4, 160000.0, 1024, 8.0, 32, 1)  # rope_dim 4, YaRN active
CASES = [(4, True), (16, False)]  # (ratio, overlap): CSA and an HCA-like ratio
T = 37  # not a multiple of 4 or 16: a trailing partial block


def random_params(seed: int, ratio: int, overlap: bool):
    """The pytree of init_compressor, filled from numpy (no random-number compile), with a non-trivial ape
    and norm weight."""
    shapes = jax.eval_shape(lambda: compressor.init_compressor(jax.random.key(0), D_MODEL, D, ratio, overlap))
    rng = np.random.default_rng(seed)
    return {"wkv_gate": jnp.asarray(rng.standard_normal(shapes["wkv_gate"].shape) * D_MODEL ** -0.5, jnp.float32),
            "ape": jnp.asarray(rng.standard_normal(shapes["ape"].shape), jnp.float32),
            "norm": jnp.asarray(1.0 + 0.5 * rng.standard_normal(shapes["norm"].shape), jnp.float32)}


def naive_compress(p, x, ratio, overlap, freqs, rope_position, eps=EPS):
    """Entry i, float64, one python loop per entry and window token, straight from the SPEC:
    [kv_j, score_j] = x_j @ wkv_gate; overlap: tokens r*i - r .. r*i - 1 with the first half of the
    features and r*i .. r*i + r - 1 with the second half (entry 0's previous half absent), else the r
    tokens r*i ..; score_j += ape[j % r]; c = sum_j softmax_j(score) * kv_j per feature dim;
    RMSNorm(weight), then RoPE (interleaved pairs) on the last dims at r*i (first) or r*i + r - 1 (last)."""
    w = np.asarray(p["wkv_gate"], np.float64)
    ape = np.asarray(p["ape"], np.float64)
    norm_w = np.asarray(p["norm"], np.float64)
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    out = np.zeros((b, t // ratio, D))
    for bi in range(b):
        for i in range(t // ratio):
            kvs, scores = [], []
            if overlap:
                for j in range(ratio * i - ratio, ratio * i):
                    if j < 0:
                        continue
                    proj = x[bi, j] @ w
                    kvs.append(proj[:D])
                    scores.append(proj[2 * D:3 * D] + ape[j % ratio, :D])
            for j in range(ratio * i, ratio * i + ratio):
                proj = x[bi, j] @ w
                kv_all, score_all = proj[: w.shape[1] // 2], proj[w.shape[1] // 2:]
                half = slice(D, 2 * D) if overlap else slice(0, D)
                kvs.append(kv_all[half])
                scores.append(score_all[half] + ape[j % ratio, half])
            s = np.stack(scores)
            e = np.exp(s - s.max(0))
            c = (e / e.sum(0) * np.stack(kvs)).sum(0)
            c = c / np.sqrt(np.mean(c * c) + eps) * norm_w
            pos = ratio * i + (ratio - 1 if rope_position == "last" else 0)
            r = 2 * len(freqs)
            z = (c[-r:][0::2] + 1j * c[-r:][1::2]) * np.exp(1j * pos * np.asarray(freqs, np.float64))
            c[-r:] = np.stack([z.real, z.imag], -1).reshape(r)
            out[bi, i] = c
    return out


@functools.partial(jax.jit, static_argnames=("ratio", "overlap", "rope_position"))
def _compress(p, x, ratio, overlap, rope_position):
    return compressor.compress_sequence(p, x, ratio, overlap, INV, rope_position, EPS)


@functools.partial(jax.jit, static_argnames=("ratio", "overlap", "rope_position"))
def _stream(p, state, xs, positions, ratio, overlap, rope_position):
    """Feed xs [B, S, d] one token per step from `positions` [B] on; returns per-step outputs."""
    def step(st_, inp):
        x_t, pos = inp
        st_, entry, eid, emit = compressor.decode_update(p, st_, x_t, pos, ratio, overlap, INV, rope_position, EPS)
        return st_, (entry, eid, emit)
    steps = jnp.arange(xs.shape[1])
    _, (entries, eids, emits) = jax.lax.scan(step, state, (xs.swapaxes(0, 1), positions[None] + steps[:, None]))
    return entries.swapaxes(0, 1), eids.swapaxes(0, 1), emits.swapaxes(0, 1)  # [B, S, ...]


def _x(seed, b=2, t=T):
    return jnp.asarray(np.random.default_rng(seed + 1000).standard_normal((b, t, D_MODEL)), jnp.float32)


@SETTINGS
@given(st.integers(0, 2**20), st.sampled_from(CASES), st.sampled_from(["first", "last"]))
def test_compress_sequence_matches_naive_loop(seed, case, rope_position):
    ratio, overlap = case
    p, x = random_params(seed, ratio, overlap), _x(seed)
    got = np.asarray(_compress(p, x, ratio, overlap, rope_position))
    assert got.shape == (2, T // ratio, D)
    want = naive_compress(p, x, ratio, overlap, INV, rope_position)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("ratio,overlap", CASES)
def test_trailing_partial_block_yields_no_entry(ratio, overlap):
    p = random_params(0, ratio, overlap)
    x = _x(0)
    full = np.asarray(_compress(p, x, ratio, overlap, "first"))
    cut = (T // ratio) * ratio
    head = np.asarray(_compress(p, x[:, :cut], ratio, overlap, "first"))
    np.testing.assert_allclose(full, head, atol=1e-6)  # tokens after the last complete block are unused
    assert _compress(p, x[:, : ratio - 1], ratio, overlap, "first").shape[1] == 0


@pytest.mark.parametrize("ratio,overlap", CASES)
@pytest.mark.parametrize("rope_position", ["first", "last"])
def test_decode_stream_equals_compress_sequence(ratio, overlap, rope_position):
    p, x = random_params(1, ratio, overlap), _x(1)
    ref = np.asarray(_compress(p, x, ratio, overlap, rope_position))
    state = compressor.init_state(2, ratio, overlap, D)
    entries, eids, emits = _stream(p, state, x, jnp.zeros((2,), jnp.int32), ratio, overlap, rope_position)
    emits, eids = np.asarray(emits), np.asarray(eids)
    pos = np.arange(T)
    assert np.array_equal(emits, np.broadcast_to(pos % ratio == ratio - 1, (2, T)))
    assert np.array_equal(eids, np.broadcast_to(pos // ratio, (2, T)))
    got = np.asarray(entries)[emits].reshape(2, -1, D)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("ratio,overlap", CASES)
def test_ragged_prefill_state_then_decode(ratio, overlap):
    """state_from_sequence after lengths[b] tokens, then decoding the rest, yields every later entry."""
    p, x = random_params(2, ratio, overlap), _x(2, b=3)
    ref = np.asarray(_compress(p, x, ratio, overlap, "first"))
    lengths = np.array([1, ratio + 3, 2 * ratio + 1], np.int32)  # none a multiple of the ratio
    state = jax.jit(compressor.state_from_sequence, static_argnums=(3, 4))(p, x, jnp.asarray(lengths), ratio, overlap)
    steps = T - int(lengths.max())
    xs = jnp.stack([x[b, lengths[b]: lengths[b] + steps] for b in range(3)])
    entries, eids, emits = _stream(p, state, xs, jnp.asarray(lengths), ratio, overlap, "first")
    entries, eids, emits = np.asarray(entries), np.asarray(eids), np.asarray(emits)
    n_checked = 0
    for b in range(3):
        for s in np.nonzero(emits[b])[0]:
            np.testing.assert_allclose(entries[b, s], ref[b, eids[b, s]], atol=1e-5 * np.abs(ref).max())
            n_checked += 1
    assert n_checked >= 3 * ((steps - ratio) // ratio)


def test_init_state_shapes():
    st4 = compressor.init_state(2, 4, True, D)
    assert st4["kv"].shape == st4["score"].shape == (2, 8, 2 * D)
    st16 = compressor.init_state(2, 16, False, D)
    assert st16["kv"].shape == (2, 16, D)
