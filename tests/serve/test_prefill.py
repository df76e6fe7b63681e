"""Chunked prefill in the engine (`serve.prefill`, issue 10 item 2): the CSA entries stream to the host
mirror during prefill, the device keeps only the target layers' index keys of them, and keep-all LSA
after a chunked prefill is bit-identical to the full cache after the same chunked prefill."""
import jax
import numpy as np
import pytest

from fm_jax import get_config
from fm_jax import kv_tiers as kt
from fm_jax import memory_indexer as mi
from fm_jax.prefill import prefill_chunked
from serve.engine import LSAConfig, generate
from serve.prefill import MirrorStore, chunked_prefill
from tests.fm_jax.helpers import random_params, tree_bytes_equal

PROMPT, NEW, TAU, CHUNK = 150, 41, 16, 32


@pytest.fixture(scope="module")
def v4_setup():
    c = get_config("tiny", ffn="moe", hc_mult=4, n_hash_layers=2, swiglu_limit=10.0)
    params = random_params(c, seed=5)
    icfg = mi.config_from_model(c)
    indexer = (icfg, mi.init_params(icfg, jax.random.PRNGKey(3)))
    prompt = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, PROMPT), 0, c.vocab_size))
    return c, params, indexer, prompt


def test_mirror_holds_every_entry_and_device_only_target_keys(v4_setup):
    c, params, indexer, prompt = v4_setup
    lengths = np.array([PROMPT, 93], np.int32)
    targets = c.csa_layers[:1]  # the other CSA layer is not a target: its keys must leave the device too
    _, cache, _ = prefill_chunked(params, c, prompt, 200, chunk=CHUNK, lengths=lengths)
    logits, tcache, _, mirror = chunked_prefill(params, c, prompt, lengths, 200, CHUNK, tiered=True,
                                                target_layers=targets)
    layout = kt.make_layout(c, 224, kmax_pages=10_000, recency_tail_pages=0, sink_pages=0, tau=TAU)
    want = kt.HostMirror.from_cache(cache, c, layout)
    for l in c.csa_layers:
        np.testing.assert_array_equal(mirror.kv[l], want.kv[l])
        np.testing.assert_array_equal(mirror.keys[l], want.keys[l])
        assert tcache["layers"][l]["comp_kv"].shape[1] == 0
        if l in targets:
            np.testing.assert_array_equal(tcache["layers"][l]["index_keys"], cache["layers"][l]["index_keys"])
        else:
            assert tcache["layers"][l]["index_keys"].shape[1] == 0
    for l in range(c.n_layers):  # everything else is the full cache
        rest = {k: v for k, v in cache["layers"][l].items() if not (l in c.csa_layers and k in ("comp_kv",
                                                                                            "index_keys"))}
        assert tree_bytes_equal(rest, {k: tcache["layers"][l][k] for k in rest})


def test_store_transfers_each_chunk_once_down():
    c = get_config("tiny")
    params = random_params(c, 0)
    prompt = np.random.default_rng(0).integers(0, c.vocab_size, (1, 128)).astype(np.int32)
    store = MirrorStore(c, 1, 128, CHUNK, target_layers=())
    prefill_chunked(params, c, prompt, 128, chunk=CHUNK, csa_store=store)
    per_chunk = (CHUNK // c.csa_ratio) * (c.head_dim * 4 + c.index_key_bytes)
    n_chunks, n_csa = 4, len(c.csa_layers)
    assert store.d2h_bytes == n_chunks * n_csa * per_chunk
    assert store.h2d_bytes == n_csa * per_chunk * (0 + 1 + 2 + 3)  # each chunk's history, once per chunk


@pytest.mark.parametrize("mode", ["lsa", "recency"])
def test_keep_all_after_chunked_prefill_is_bit_identical_to_full(v4_setup, mode):
    c, params, (icfg, iparams), prompt = v4_setup
    indexer = (icfg.replace(threshold=0.0), iparams)  # keep every entry
    cfg = LSAConfig(tau=TAU, kmax_pages=10_000, stale_by_one=True)
    full = generate(params, c, prompt, NEW, mode="full", return_logits=True, lsa=cfg, prefill_chunk=CHUNK)
    tiered = generate(params, c, prompt, NEW, mode=mode, indexer=indexer if mode == "lsa" else None,
                      return_logits=True, lsa=cfg, prefill_chunk=CHUNK)
    np.testing.assert_array_equal(tiered.tokens, full.tokens)
    np.testing.assert_array_equal(tiered.logits, full.logits)  # bit-exact, not allclose
    assert tiered.stats["resident_fraction"] == 1.0
    # and the chunked prefill itself matches the whole-sequence prefill (to float32 rounding at chunk 32)
    whole = generate(params, c, prompt, NEW, mode="full", return_logits=True, lsa=cfg)
    np.testing.assert_array_equal(whole.tokens, full.tokens)
    np.testing.assert_allclose(whole.logits, full.logits, rtol=1e-5, atol=1e-5 * np.abs(whole.logits).max())


def test_small_budget_runs_from_chunked_prefill(v4_setup):
    c, params, indexer, prompt = v4_setup
    small = LSAConfig(tau=TAU, kmax_pages=kt.window_write_pages(c, TAU), recency_tail_pages=1)
    res = generate(params, c, prompt, NEW, mode="lsa", indexer=indexer, lsa=small,
                   prefill_chunk=CHUNK)
    assert res.tokens.shape == (2, NEW) and res.stats["resident_fraction"] < 1.0
    with pytest.raises(ValueError, match="chunk must be a positive multiple"):
        generate(params, c, prompt, NEW, mode="full", prefill_chunk=48)
