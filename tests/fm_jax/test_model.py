"""Public API (`fm_jax.model`): prefill + decode reproduce the uncached forward at every position, with
ragged prompt lengths that are not multiples of 4 or of the HCA ratio and a generation that crosses several
CSA / HCA compression boundaries and the Lightning Indexer's top-k limit; a dense variant and one with
V4's MoE (a hash-routed first layer, top-k routing after it) + dynamic hyper-connections (hc_mult=4). A
user-jitted decode step compiles once for a whole generation and poisons the logits of a request decoded
past the cache capacity. Bad inputs raise ValueError naming the limit.

One generation per variant is computed once per module (module-scoped fixtures) and shared by the tests.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax import model
from fm_jax.cache import init_cache
from fm_jax.config import get_config
from tests.fm_jax.helpers import LENGTHS, MAX_LEN, STEPS, B, random_params, sequences, step_tokens

# the second variant turns on MoE (experts, shared expert, hash routing on layer 0, top-k routing after it)
# and hyper-connections: one more compiled model instead of three keeps the suite fast
VARIANTS = {"dense": {}, "moe_hc4": {"ffn": "moe", "hc_mult": 4, "n_hash_layers": 1}}


def generate(c, params, seqs, prompt, step_fn):
    """Prefill the ragged prompt, then decode STEPS tokens per request with `step_fn`."""
    logits_p, cache = model.prefill(params, c, jnp.asarray(prompt), MAX_LEN, lengths=jnp.asarray(LENGTHS))
    out = []
    for i in range(STEPS):
        logits, cache = step_fn(params, cache, step_tokens(seqs, LENGTHS + i))
        out.append(np.asarray(logits))
    return np.asarray(logits_p), np.stack(out, 1), cache  # [B, PROMPT, V], [B, STEPS, V]


def _run(name):
    c = get_config("tiny", **VARIANTS[name])
    params = random_params(c, seed=7)
    seqs, prompt = sequences(c)
    ref = np.asarray(model.forward(params, c, jnp.asarray(seqs)))
    return c, params, seqs, prompt, ref


@pytest.fixture(scope="module")
def dense_run():
    """The dense variant, decoded with a *user-jitted* decode_step whose traces are counted."""
    c, params, seqs, prompt, ref = _run("dense")
    n_traces = []

    def step(p, cache, tokens):
        n_traces.append(1)
        return model.decode_step(p, c, cache, tokens)
    jstep = jax.jit(step)
    logits_p, logits_d, cache = generate(c, params, seqs, prompt, jstep)
    return {"c": c, "params": params, "seqs": seqs, "ref": ref, "logits_p": logits_p, "logits_d": logits_d,
            "cache": cache, "jstep": jstep, "n_traces": n_traces}


@pytest.fixture(scope="module")
def moe_hc4_run():
    """MoE + hyper-connections, decoded through the public (internally jitted) decode_step."""
    c, params, seqs, prompt, ref = _run("moe_hc4")
    assert c.ffn == "moe" and c.hc_mult == 4 and c.is_hash_layer(0) and not c.is_hash_layer(1)
    logits_p, logits_d, cache = generate(c, params, seqs, prompt,
                                         lambda p, cache, t: model.decode_step(p, c, cache, t))
    return {"c": c, "ref": ref, "logits_p": logits_p, "logits_d": logits_d, "cache": cache}


def check_matches_forward(run):
    ref, tol = run["ref"], 1e-4 * np.abs(run["ref"]).max()
    assert np.all(np.isfinite(ref)) and np.abs(ref).max() > 0
    for b in range(B):
        n = LENGTHS[b]
        d_pre = np.abs(run["logits_p"][b, :n] - ref[b, :n]).max()
        d_dec = np.abs(run["logits_d"][b] - ref[b, n: n + STEPS]).max()
        assert d_pre <= tol, f"request {b}: prefill max|diff| {d_pre} > {tol}"
        assert d_dec <= tol, f"request {b}: decode max|diff| {d_dec} > {tol}"


def test_generation_covers_the_interesting_cases(dense_run):
    c = dense_run["c"]
    assert c.compress_ratios == (0, 4, 16, 4) and c.hca_ratio == 16 and c.window == 16
    ends = LENGTHS + STEPS
    assert ends.max() == MAX_LEN                                   # one request fills the cache
    assert (ends.max() - 1) // c.csa_ratio > c.index_topk          # the indexer's top-k really drops entries
    assert np.sum(LENGTHS % 4 != 0) >= 2 and np.sum(LENGTHS % c.hca_ratio == 0) >= 1
    for b in range(B):                                             # every request crosses HCA boundaries
        assert ends[b] // c.hca_ratio > LENGTHS[b] // c.hca_ratio
    assert np.array_equal(np.asarray(dense_run["cache"]["lengths"]), ends)


def test_dense_prefill_and_jitted_decode_match_forward(dense_run):
    check_matches_forward(dense_run)


def test_moe_hc4_prefill_and_decode_match_forward(moe_hc4_run):
    check_matches_forward(moe_hc4_run)


def test_jitted_decode_compiles_once(dense_run):
    assert len(dense_run["n_traces"]) == 1, f"traced {len(dense_run['n_traces'])} times over {STEPS} steps"


def test_decode_past_capacity(dense_run):
    """Request 2 is at capacity: eagerly that raises; inside the user's jit its logits are NaN while the
    other requests still decode correctly, without a retrace."""
    c, params, seqs, ref, cache = (dense_run[k] for k in ("c", "params", "seqs", "ref", "cache"))
    lengths = np.asarray(cache["lengths"])
    assert lengths[2] == MAX_LEN and np.all(np.delete(lengths, 2) < MAX_LEN)
    tokens = step_tokens(seqs, lengths)
    with pytest.raises(ValueError, match=re.escape(f"max_len={MAX_LEN}")):
        model.decode_step(params, c, cache, tokens)
    logits, _ = dense_run["jstep"](params, cache, tokens)
    logits = np.asarray(logits)
    assert np.all(np.isnan(logits[2]))
    tol = 1e-4 * np.abs(ref).max()
    for b in (0, 1, 3):
        assert np.all(np.isfinite(logits[b]))
        assert np.abs(logits[b] - ref[b, lengths[b]]).max() <= tol
    assert len(dense_run["n_traces"]) == 1


def test_cache_buffers_keep_their_shapes(dense_run):
    c, cache = dense_run["c"], dense_run["cache"]
    empty = init_cache(c, B, MAX_LEN)
    got = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), cache)
    want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), empty)
    assert got == want
    assert cache["layers"][1]["index_keys"].shape[::2] == (B, c.index_page_bytes)      # page-blocked
    assert cache["layers"][1]["index_keys"].shape[1] * c.page_entries >= MAX_LEN // c.csa_ratio
    assert cache["layers"][2]["comp_kv"].shape[1] >= MAX_LEN // c.hca_ratio


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def small_model():
    c = get_config("tiny")
    return c, random_params(c, seed=1)


def test_tokens_outside_vocabulary(small_model):
    c, params = small_model
    toks = np.ones((2, 8), np.int32)
    for bad in (c.vocab_size, -1):
        t = toks.copy()
        t[1, 3] = bad
        with pytest.raises(ValueError, match=re.escape(f"vocab_size={c.vocab_size}")):
            model.forward(params, c, jnp.asarray(t))
        with pytest.raises(ValueError, match=re.escape(f"vocab_size={c.vocab_size}")):
            model.prefill(params, c, jnp.asarray(t), 16)
    cache = init_cache(c, 2, 16)
    with pytest.raises(ValueError, match=re.escape(f"vocab_size={c.vocab_size}")):
        model.decode_step(params, c, cache, jnp.asarray([3, c.vocab_size]))


def test_wrong_dtype_and_rank(small_model):
    c, params = small_model
    with pytest.raises(ValueError, match="integer dtype"):
        model.forward(params, c, jnp.ones((2, 8), jnp.float32))
    with pytest.raises(ValueError, match="rank 2"):
        model.forward(params, c, jnp.ones((8,), jnp.int32))
    with pytest.raises(ValueError, match="rank 2"):
        model.prefill(params, c, jnp.ones((1, 2, 8), jnp.int32), 16)
    with pytest.raises(ValueError, match="integer array"):
        model.forward(params, c, [[1, 2, 3]])
    cache = init_cache(c, 2, 16)
    with pytest.raises(ValueError, match="rank 1"):
        model.decode_step(params, c, cache, jnp.ones((2, 1), jnp.int32))
    with pytest.raises(ValueError, match="integer dtype"):
        model.decode_step(params, c, cache, jnp.ones((2,), jnp.float32))
    with pytest.raises(ValueError, match="batch"):
        model.decode_step(params, c, cache, jnp.ones((3,), jnp.int32))


def test_prompt_longer_than_max_len_and_bad_lengths(small_model):
    c, params = small_model
    toks = jnp.ones((2, 20), jnp.int32)
    with pytest.raises(ValueError, match=re.escape("max_len=16")):
        model.prefill(params, c, toks, 16)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="max_len"):
            model.prefill(params, c, toks, bad)
    for lengths in ([0, 5], [21, 5], [5]):
        with pytest.raises(ValueError, match="lengths"):
            model.prefill(params, c, toks, 32, lengths=jnp.asarray(lengths, jnp.int32))


def test_positions_past_rope_table(small_model):
    c, params = small_model
    short = c.replace(max_seq_len=32)
    with pytest.raises(ValueError, match=re.escape("max_seq_len=32")):
        model.forward(params, short, jnp.ones((1, 33), jnp.int32))
    with pytest.raises(ValueError, match=re.escape("max_seq_len=32")):
        model.prefill(params, short, jnp.ones((1, 8), jnp.int32), 48)
    # a hand-built cache larger than the table: decoding at position 32 must refuse
    cache = init_cache(short, 1, 64)
    cache = {**cache, "lengths": jnp.asarray([32], jnp.int32)}
    with pytest.raises(ValueError, match=re.escape("max_seq_len=32")):
        model.decode_step(params, short, cache, jnp.asarray([1], jnp.int32))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the off-GPU error that proves the route")
def test_topk_impl_reaches_the_indexer_top_k(small_model):
    """`topk_impl` is the Lightning Indexer's top-k knob: "pallas" must reach `dispatch.topk` in both the
    sequence and the decode paths (off the GPU that is the dispatch's clear error), "xla" equals "auto"."""
    c, params = small_model
    toks = jnp.asarray(np.random.default_rng(3).integers(0, c.vocab_size, (2, 24)), jnp.int32)
    k = c.replace(topk_impl="pallas")
    with pytest.raises(ValueError, match=re.escape("topk(impl='pallas') needs a GPU")):
        model.forward(params, k, toks)
    cache = init_cache(c, 2, 32)
    with pytest.raises(ValueError, match=re.escape("topk(impl='pallas') needs a GPU")):
        model.decode_step(params, k, cache, toks[:, 0])
    np.testing.assert_array_equal(np.asarray(model.forward(params, c.replace(topk_impl="xla"), toks)),
                                  np.asarray(model.forward(params, c, toks)))


@pytest.mark.gpu
def test_topk_kernel_gives_the_same_decode_as_lax_top_k(small_model):
    """On a GPU the radix-select kernel picks exactly `lax.top_k`'s entries, so prefill + decode logits match
    bit for bit. Context past `index_topk` compressed entries, so the top-k really selects."""
    c, params = small_model
    t = 4 * c.csa_ratio * c.index_topk + 16
    toks = jnp.asarray(np.random.default_rng(4).integers(0, c.vocab_size, (2, t)), jnp.int32)
    out = {}
    for impl in ("xla", "pallas"):
        ci = c.replace(topk_impl=impl)
        logits, cache = model.prefill(params, ci, toks, t + 8)
        steps = [np.asarray(logits)]
        for i in range(4):
            lg, cache = model.decode_step(params, ci, cache, toks[:, i])
            steps.append(np.asarray(lg))
        out[impl] = steps
    for a, b in zip(out["xla"], out["pallas"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
def test_auto_kernels_give_the_decode_of_the_xla_path():
    """On a (Hopper) GPU, impl="auto" runs the Mosaic GPU scoring kernel over the page-blocked index keys in the
    decode step where its plan fits (here: 32 index heads of dim 64, 32-entry pages, one query per request), the
    paged Triton kernel in prefill and the attention the dispatch picks; prefill + decode logits must match the
    plain-XLA path within 2e-2 (the kernels sum in another order, so exact equality is not expected)."""
    from pallas_kernels.indexer_score_mgpu import plan
    c = get_config("tiny").replace(n_index_heads=32, index_head_dim=64, page_entries=32)
    params = random_params(c, seed=5)
    t = 4 * c.csa_ratio * c.page_entries + 16              # 4 pages and more of compressed entries
    n_pages = next(lc["index_keys"].shape[1] for lc in init_cache(c, 2, t + 8)["layers"] if "index_keys" in lc)
    plan(2, c.n_index_heads, c.index_head_dim, n_pages, c.page_entries)   # raises if "auto" would not take it
    toks = jnp.asarray(np.random.default_rng(6).integers(0, c.vocab_size, (2, t)), jnp.int32)
    out = {}
    for impl in ("xla", "auto"):
        logits, cache = model.prefill(params, c, toks, t + 8, impl=impl)
        steps = [np.asarray(logits)]
        for i in range(4):
            lg, cache = model.decode_step(params, c, cache, toks[:, i], impl=impl)
            steps.append(np.asarray(lg))
        out[impl] = steps
    for a, b in zip(out["xla"], out["auto"]):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)
