"""Chunked prefill (`fm_jax.prefill`, issue 10) against the whole-sequence `fm_jax.model.prefill`.

Exactness on CPU: with the same reduction strategy in both programs the logits and the whole decode
cache are bit-identical (chunk 256 below, two chunks, the second partial). XLA:CPU picks a row
reduction's strategy (RMSNorm, softmax sums) by the size of the reduced array, so a chunk much smaller
than the prompt can put a norm in the other strategy: the values then differ by float32 summation
order only (checked at fp32 tolerance with chunk 32: 5-10 chunks, ratio-4 / ratio-16 / page boundaries
inside chunks, lengths not multiples of the chunk). Both variants: dense, and V4's MoE (hash-routed
first layer) with hyper-connections (hc_mult=4).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax import backbone, model
from fm_jax.config import get_config
from fm_jax.layers.key_pages import dequantize_index_pages
from fm_jax.prefill import bucket, check_chunk, chunk_multiple, prefill_chunked
from tests.fm_jax.helpers import random_params, tree_bytes_equal

VARIANTS = {"dense": {}, "moe_hc4": {"ffn": "moe", "hc_mult": 4, "n_hash_layers": 1}}


def _setup(name, batch, t, seed=0):
    c = get_config("tiny", **VARIANTS[name])
    params = random_params(c, seed=7)
    tokens = np.random.default_rng(seed).integers(0, c.vocab_size, (batch, t)).astype(np.int32)
    return c, params, tokens


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_bit_identical_to_whole_prefill(name):
    c, params, tokens = _setup(name, 3, 300)
    lengths = np.array([300, 247, 64], np.int32)  # 247: not a multiple of 4, 16 or the chunk
    ref_logits, ref_cache = model.prefill(params, c, jnp.asarray(tokens), 512, lengths=jnp.asarray(lengths))
    logits, cache, _ = prefill_chunked(params, c, tokens, 512, chunk=256, lengths=lengths)
    ref_logits, logits = np.asarray(ref_logits), np.asarray(logits)
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(logits[b, :n], ref_logits[b, :n])
    assert tree_bytes_equal(cache, ref_cache)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_small_chunks_match_within_float32_rounding(name):
    c, params, tokens = _setup(name, 4, 150, seed=1)
    # 150: 5 chunks of 32, the last partial; 97 mid-chunk; 64 ends a page (8 entries x 4) and an HCA
    # entry (16); 79 is one token short of an HCA entry
    lengths = np.array([150, 97, 64, 79], np.int32)
    ref_logits, ref_cache = model.prefill(params, c, jnp.asarray(tokens), 160, lengths=jnp.asarray(lengths))
    logits, cache, hidden = prefill_chunked(params, c, tokens, 160, chunk=32, lengths=lengths)
    ref_logits, logits = np.asarray(ref_logits), np.asarray(logits)
    tol = 1e-5 * np.abs(ref_logits).max()
    for b, n in enumerate(lengths):
        assert np.abs(logits[b, :n] - ref_logits[b, :n]).max() <= tol
    np.testing.assert_array_equal(cache["lengths"], lengths)
    for l, (got, want) in enumerate(zip(cache["layers"], ref_cache["layers"])):
        assert got.keys() == want.keys()
        for k in got:
            g, w = jax.tree_util.tree_leaves(got[k]), jax.tree_util.tree_leaves(want[k])
            for x, y in zip(g, w):
                assert x.shape == y.shape and x.dtype == y.dtype, (l, k)
                if k == "index_keys":  # fp8 bytes: a rounding-order flip moves a value by one fp8 step
                    x, y = (dequantize_index_pages(v, c.page_entries, c.index_head_dim) for v in (x, y))
                    np.testing.assert_allclose(x, y, rtol=0.07, atol=1e-6 + 0.07 * float(np.abs(y).max()))
                else:
                    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5, err_msg=f"{l} {k}")
    # the Memory Indexer's first query: the normed attention input at each request's last prompt token
    _, _, aux = backbone.run_sequence(params, c, jnp.asarray(tokens))
    for l, hl in enumerate(hidden):
        want = np.asarray(aux[l]["hidden"])[np.arange(4), lengths - 1]
        np.testing.assert_allclose(np.asarray(hl), want, rtol=1e-5, atol=1e-5)


def test_last_logits_and_decode_continue_from_chunked_cache():
    c, params, tokens = _setup("moe_hc4", 2, 90, seed=2)
    lengths = np.array([90, 45], np.int32)
    all_logits, cache, _ = prefill_chunked(params, c, tokens, 128, chunk=32, lengths=lengths)
    last, cache_l, _ = prefill_chunked(params, c, tokens, 128, chunk=32, lengths=lengths, logits="last")
    np.testing.assert_array_equal(np.asarray(last), np.asarray(all_logits)[np.arange(2), lengths - 1])
    assert tree_bytes_equal(cache, cache_l)
    ref_logits, ref_cache = model.prefill(params, c, jnp.asarray(tokens), 128, lengths=jnp.asarray(lengths))
    nxt = jnp.asarray(tokens[:, 0])
    for _ in range(5):  # decode steps from either cache agree to float32 rounding
        a, cache = model.decode_step(params, c, cache, nxt)
        b, ref_cache = model.decode_step(params, c, ref_cache, nxt)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * np.abs(np.asarray(b)).max())
        nxt = jnp.argmax(b, -1).astype(jnp.int32)


def test_no_recompilation_within_a_bucket():
    c, params, tokens = _setup("dense", 2, 120, seed=3)
    compiles = []
    counting = [False]

    def listener(event, duration, **kw):
        if counting[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    prefill_chunked(params, c, tokens[:, :40], 128, chunk=32)          # compiles this bucket's programs
    counting[0] = True
    for t, lens in ((50, None), (64, [64, 33]), (97, [97, 1]), (120, [120, 77])):
        logits, cache, _ = prefill_chunked(params, c, tokens[:, :t], 128, chunk=32,
                                           lengths=None if lens is None else np.array(lens, np.int32))
        jax.block_until_ready(cache)
    assert compiles == [], f"{len(compiles)} compilations within one bucket"
    prefill_chunked(params, c, tokens[:, :40], 192, chunk=32)          # another capacity: new programs
    assert len(compiles) > 0


def test_geometry_and_bad_input():
    c = get_config("tiny")
    assert chunk_multiple(c) == 32 and bucket(33, 32) == 64 and bucket(64, 32) == 64
    assert chunk_multiple(get_config("small")) == 256
    for bad in (0, 16, 48, 32.0, True):
        with pytest.raises(ValueError, match="chunk must be a positive multiple of 32"):
            check_chunk(c, bad)
    params = random_params(c, 0)
    with pytest.raises(ValueError, match="logits must be"):
        prefill_chunked(params, c, np.zeros((1, 8), np.int32), 32, chunk=32, logits="some")
    with pytest.raises(ValueError, match="max_len"):
        prefill_chunked(params, c, np.zeros((1, 8), np.int32), 0, chunk=32)
    with pytest.raises(ValueError, match="lengths must lie"):
        prefill_chunked(params, c, np.zeros((1, 8), np.int32), 32, chunk=32, lengths=np.array([9], np.int32))
