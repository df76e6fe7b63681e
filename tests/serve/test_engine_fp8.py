"""The fp8 KV end to end (issue 15), on tiny with kv_fp8 on (head_dim 72 = 64 nope + 8 rope: 88-byte rows):
keep-all LSA stays bit-identical to full; the cache, reserve and host mirror hold packed rows; the chunked
prefill streaming to the mirror gives the same tokens; decode agrees with the teacher-forced forward (the
forward's rounding is the stored values'); the byte accounting of v4_flash uses 584-byte entries."""
import jax
import numpy as np
import pytest

from fm_jax import get_config
from fm_jax import memory_indexer as mi
from fm_jax.model import forward, prefill
from serve.engine import LSAConfig, generate, kv_bytes
from tests.fm_jax.helpers import random_params

PROMPT, NEW, TAU = 100, 33, 16


@pytest.fixture(scope="module")
def fp8_setup():
    c = get_config("tiny", kv_fp8=True, head_dim=72, rope_dim=8)
    params = random_params(c, seed=5)
    icfg = mi.config_from_model(c)
    indexer = (icfg.replace(threshold=0.0), mi.init_params(icfg, jax.random.PRNGKey(3)))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, PROMPT), 0, c.vocab_size)
    full = generate(params, c, prompt, NEW, mode="full", return_logits=True, lsa=LSAConfig(tau=TAU))
    return c, params, indexer, prompt, full


def test_keep_all_lsa_is_bit_identical_to_full_with_fp8(fp8_setup):
    c, params, indexer, prompt, full = fp8_setup
    assert c.kv_entry_bytes == 88
    lsa = generate(params, c, prompt, NEW, mode="lsa", indexer=indexer, return_logits=True,
                   lsa=LSAConfig(tau=TAU, kmax_pages=10_000, stale_by_one=True))
    np.testing.assert_array_equal(lsa.tokens, full.tokens)
    np.testing.assert_array_equal(lsa.logits, full.logits)  # bit-exact, not allclose
    assert lsa.stats["resident_fraction"] == 1.0
    by = kv_bytes(c, full.stats["context_end"])
    assert lsa.stats["full_kv_bytes"] == full.stats["full_kv_bytes"] == int(by["full"].sum())
    # recall moves packed pages: page bytes = page_entries * (88 + index key bytes)
    assert lsa.stats["recalled_bytes"] % (c.page_entries * (88 + c.index_key_bytes)) == 0
    assert lsa.stats["host_mirror_bytes"] % (88 + c.index_key_bytes) == 0


@pytest.mark.slow
def test_chunked_prefill_to_the_mirror_gives_the_same_tokens(fp8_setup):
    c, params, indexer, prompt, full = fp8_setup
    ch = generate(params, c, prompt, NEW, mode="lsa", indexer=indexer, return_logits=True,
                  lsa=LSAConfig(tau=TAU, kmax_pages=10_000), prefill_chunk=64)
    np.testing.assert_array_equal(ch.tokens, full.tokens)
    np.testing.assert_allclose(ch.logits, full.logits, atol=2e-3)


def test_cache_holds_packed_rows_and_decode_matches_the_forward(fp8_setup):
    c, params, _, prompt, full = fp8_setup
    _, cache = jax.eval_shape(lambda p, t: prefill(p, c, t, max_len=256), params, prompt)
    for l, lc in enumerate(cache["layers"]):
        assert lc["window"].dtype == np.uint8 and lc["window"].shape[-1] == 88
        if c.compress_ratios[l]:
            assert lc["comp_kv"].dtype == np.uint8 and lc["comp_kv"].shape[-1] == 88
    # teacher-forced forward over prompt + generated tokens: the same logits up to summation order
    seq = np.concatenate([np.asarray(prompt), full.tokens[:, :-1]], axis=1)
    logits = np.asarray(forward(params, c, seq))[:, PROMPT - 1:]
    # (without the forward's rounding they differ by whole logits: the stored entries are fp8)
    np.testing.assert_allclose(logits, full.logits, atol=2e-3)


def test_v4_flash_kv_bytes_use_584_byte_entries():
    c = get_config("v4_flash")
    n = 1 << 20
    fp8, bf16 = kv_bytes(c, [n]), kv_bytes(c.replace(kv_fp8=False), [n])
    n_csa, n_hca = len(c.csa_layers), sum(r == c.hca_ratio for r in c.compress_ratios)
    assert fp8["csa_full"][0] == n_csa * (n // 4) * (584 + 132)
    assert fp8["hca"][0] == n_hca * (n // 128) * 584
    assert fp8["window"][0] == c.n_layers * 128 * 584
    assert bf16["full"][0] == 6_537_216_000 and fp8["full"][0] == 4_040_494_080   # 3.763 GiB
    assert abs(fp8["full"][0] / 2 ** 30 / 3.73 - 1) < 0.02
