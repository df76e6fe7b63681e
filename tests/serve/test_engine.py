"""LSA engine invariants (issue 3): gate-open LSA is bit-identical to the full cache; small budgets keep
device KV well under full; an entry written during a window is visible at the step that completes it
(SPEC §9)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax import backbone, get_config
from fm_jax import kv_tiers as kt
from fm_jax import memory_indexer as mi
from fm_jax.model import init_params, prefill
from serve.engine import LSAConfig, decode_loop, generate
from serve.generate import main as cli_main
from tests.fm_jax.helpers import random_params

PROMPT, NEW, TAU = 150, 41, 16


@pytest.fixture(scope="module")
def setup():
    c = get_config("tiny")
    params = init_params(c, jax.random.PRNGKey(0))
    icfg = mi.config_from_model(c)
    indexer = (icfg, mi.init_params(icfg, jax.random.PRNGKey(3)))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, PROMPT), 0, c.vocab_size)
    full = generate(params, c, prompt, NEW, mode="full", return_logits=True, lsa=LSAConfig(tau=TAU))
    return c, params, indexer, prompt, full


@pytest.mark.parametrize("stale", [False, True])
def test_lsa_gate_open_is_bit_identical_to_full(setup, stale):
    c, params, indexer, prompt, full = setup
    icfg, iparams = indexer
    lsa = generate(params, c, prompt, NEW, mode="lsa", indexer=(icfg.replace(threshold=0.0), iparams),
                   return_logits=True, lsa=LSAConfig(tau=TAU, kmax_pages=10_000, stale_by_one=stale))
    assert lsa.tokens.shape == (2, NEW) and lsa.logits.shape == (2, NEW, c.vocab_size)
    np.testing.assert_array_equal(lsa.tokens, full.tokens)
    np.testing.assert_array_equal(lsa.logits, full.logits)  # bit-exact, not allclose
    assert lsa.stats["resident_fraction"] == 1.0


@pytest.fixture(scope="module")
def v4_setup():
    """The V4 backbone features on: dynamic mHC with 4 streams, MoE with 2 hash-routed layers then top-k
    routing with a bias, the SwiGLU clamp (random params: mixers far from their identity init)."""
    c = get_config("tiny", ffn="moe", hc_mult=4, n_hash_layers=2, swiglu_limit=10.0)
    params = random_params(c, seed=5)
    icfg = mi.config_from_model(c)
    indexer = (icfg, mi.init_params(icfg, jax.random.PRNGKey(3)))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, PROMPT), 0, c.vocab_size)
    full = generate(params, c, prompt, NEW, mode="full", return_logits=True, lsa=LSAConfig(tau=TAU))
    return c, params, indexer, prompt, full


def test_lsa_gate_open_is_bit_identical_to_full_with_mhc_moe_and_hash_layers(v4_setup):
    c, params, indexer, prompt, full = v4_setup
    assert c.hc_mult == 4 and c.ffn == "moe" and c.is_hash_layer(1) and "hc_head" in params
    assert np.all(np.isfinite(full.logits)) and len(np.unique(full.tokens)) > 4
    icfg, iparams = indexer
    lsa = generate(params, c, prompt, NEW, mode="lsa", indexer=(icfg.replace(threshold=0.0), iparams),
                   return_logits=True, lsa=LSAConfig(tau=TAU, kmax_pages=10_000, stale_by_one=True))
    np.testing.assert_array_equal(lsa.tokens, full.tokens)
    np.testing.assert_array_equal(lsa.logits, full.logits)  # bit-exact, not allclose
    assert lsa.stats["resident_fraction"] == 1.0


def test_resident_everything_equals_full(setup):
    """Recency with a budget covering every page: the same resident set as full, through another path."""
    c, params, _, prompt, full = setup
    rec = generate(params, c, prompt, NEW, mode="recency", return_logits=True,
                   lsa=LSAConfig(tau=TAU, kmax_pages=10_000))
    np.testing.assert_array_equal(rec.logits, full.logits)


def test_small_budget_keeps_device_kv_well_under_full(setup):
    c, params, indexer, _, full = setup
    prompt = jax.random.randint(jax.random.PRNGKey(2), (2, 800), 0, c.vocab_size)  # 200 entries = 25 pages
    for mode in ("lsa", "recency", "random"):
        r = generate(params, c, prompt, 2 * TAU + 1, mode=mode, indexer=indexer if mode == "lsa" else None,
                     lsa=LSAConfig(tau=TAU, kmax_pages=5, recency_tail_pages=1, sink_pages=1))
        st = r.stats
        # reserve: 5 pages (tail, sink and write pages inside) of 26; plus the target layer's index keys
        assert st["reserve_pages"] == 5
        assert st["device_csa_bytes"] < 0.4 * st["full_csa_bytes"], (mode, st)
        assert st["device_kv_bytes"] < 0.5 * st["full_kv_bytes"]
        assert 0 < st["resident_fraction"] < 0.2
        assert st["recalled_bytes"] > 0
        # every recall is timed until its pages are on the device, per cycle and in total
        landed = [pc["recall_landed_s"] for pc in st["per_cycle"]]
        assert st["recall_landed_s"] > 0 and min(landed) >= 0 and np.isclose(sum(landed), st["recall_landed_s"])
        assert r.tokens.shape == (2, 2 * TAU + 1)
    assert full.stats["device_kv_bytes"] == full.stats["full_kv_bytes"]


def test_permuted_reserve_and_new_entries_visible_at_once():
    """Every page resident but in a shuffled slot order: decode matches the entry-indexed cache to fp32
    rounding, including entries completed (and written through the page table) during the steps, which
    the completing step already reads."""
    c = get_config("tiny")
    params = init_params(c, jax.random.PRNGKey(0))
    toks = jax.random.randint(jax.random.PRNGKey(5), (2, 60), 0, c.vocab_size)
    _, cache = prefill(params, c, toks[:, :30], max_len=64 * 4)
    layout = kt.make_layout(c, 64 * 4, kmax_pages=100, recency_tail_pages=1, sink_pages=1, tau=8)
    assert layout.n_slots == layout.n_pages
    perm = np.stack([np.random.default_rng(b).permutation(layout.n_pages) for b in range(2)])  # page -> slot
    tiered = {**cache, "tier": {"page_slot": jnp.asarray(perm, jnp.int32),
                                "slot_page": jnp.asarray(np.argsort(perm, axis=1), jnp.int32)}}
    layers = list(tiered["layers"])
    p = c.page_entries
    for l in c.csa_layers:
        lc = dict(layers[l])
        for name in ("comp_kv", "index_keys"):   # kv rows [B, cells, row], keys page-blocked [B, pages, bytes]
            x = np.asarray(lc[name])
            pages = x.reshape(2, layout.n_pages, -1)
            y = np.zeros_like(pages)
            for b in range(2):
                y[b, perm[b]] = pages[b]
            lc[name] = jnp.asarray(y.reshape(x.shape))
        layers[l] = lc
    tiered["layers"] = tuple(layers)
    step = jax.jit(backbone.run_step, static_argnums=1)
    emitted = False
    for t in range(30, 60):
        l_full, cache, _ = step(params, c, cache, toks[:, t])
        l_tier, tiered, _ = step(params, c, tiered, toks[:, t])
        np.testing.assert_allclose(l_tier, l_full, rtol=1e-5, atol=1e-5 * float(jnp.abs(l_full).max()))
        emitted |= (t % c.csa_ratio == c.csa_ratio - 1)
    assert emitted
    # the entries completed during the steps sit in their permuted cells
    l = c.csa_layers[0]
    n_done = 60 // c.csa_ratio
    full_kv = np.asarray(cache["layers"][l]["comp_kv"])[:, :n_done]
    tier_kv = np.asarray(tiered["layers"][l]["comp_kv"]).reshape(2, layout.n_pages, p, -1)
    for b in range(2):
        for e in range(n_done):
            np.testing.assert_array_equal(tier_kv[b, perm[b, e // p], e % p], full_kv[b, e])


def test_plan_recall_moves_only_missing_pages_lru():
    c = get_config("tiny")
    layout = kt.make_layout(c, 512, kmax_pages=5, recency_tail_pages=1, sink_pages=1, tau=16)
    st = kt.ReserveState.empty(1, layout)
    st, plan = kt.plan_recall(st, [np.array([0, 1, 2])], layout, np.array([16]))
    assert plan.n_pages == 3 and sorted(plan.pages[0][: plan.n_pages]) == [0, 1, 2]
    st, plan = kt.plan_recall(st, [np.array([0, 2, 5])], layout, np.array([16]))
    assert plan.n_pages == 1 and plan.pages[0, 0] == 5  # 0 and 2 stay where they are
    tables = kt.device_tables(st, layout)
    ps = np.asarray(tables["page_slot"])[0]
    assert ps[1] == -1 and ps[0] >= 0 and ps[2] >= 0 and ps[5] >= 0  # page 1 held but not resident
    st, plan = kt.plan_recall(st, [np.array([0, 1, 2, 5])], layout, np.array([16]))
    assert plan.n_pages == 0  # page 1 was still in its slot (LRU kept it): no transfer
    # pages with no complete entry yet get a slot and no transfer
    st, plan = kt.plan_recall(st, [np.array([0, 15])], layout, np.array([10]))
    assert plan.n_pages == 0 and 15 in st.slot_page[0]
    with pytest.raises(ValueError, match="reserve holds"):
        kt.plan_recall(st, [np.arange(layout.n_slots + 1)], layout, np.array([16]))


def test_page_choice():
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.2, 0.6, 0.9, 0.95])
    assert list(kt.page_counts(scores, 8, 0.5, 2, 5)) == [1, 2, 0, 2, 0]  # kept 0,2,3,6,7 (8 not complete)
    c = get_config("tiny")  # 4 tokens per entry, 8 entries per page
    layout = kt.make_layout(c, 1024, kmax_pages=6, recency_tail_pages=2, sink_pages=1, tau=16)
    # position 300: 75 complete entries (pages 0..9, last complete page 9); the window writes entries 75..78
    assert list(kt.write_pages(300, layout, 16)) == [9]
    assert list(kt.write_pages(318, layout, 16)) == [9, 10]  # entries 79..82
    page_scores = np.zeros(layout.n_pages)
    page_scores[[3, 5, 6]] = [4, 7, 7]
    # forced: write 9, sink 0, tail 9, 8; then by score: 5, 6 (tie -> lower first), 3
    assert list(kt.select_pages(page_scores, 300, layout, 16, 6)) == [0, 3, 5, 6, 8, 9]
    assert list(kt.select_pages(page_scores, 300, layout, 16, 4)) == [0, 5, 8, 9]
    # the budget is exact: K = kmax_pages even when fewer pages score (zero-score pages fill it, lower first)
    assert list(kt.select_pages(np.zeros(layout.n_pages), 300, layout, 16, 6)) == [0, 1, 2, 3, 8, 9]
    # forced pages past the budget: written first, then sink, then the tail newest first
    assert list(kt.select_pages(page_scores, 318, layout, 16, 3)) == [0, 9, 10]
    # a budget past the candidates (pages 0..9 complete, 9 written) resident = all of them
    assert list(kt.select_pages(page_scores, 300, layout, 16, 100)) == list(range(10))
    assert list(kt.select_pages(kt.page_scores_recency(layout.n_pages), 300, layout, 16, 4)) == [0, 7, 8, 9]  # sink 0
    with pytest.raises(ValueError, match="kmax_pages=1 cannot hold"):
        kt.make_layout(c, 1024, kmax_pages=1, recency_tail_pages=2, sink_pages=1, tau=16)


def test_bad_engine_input(setup):
    c, params, indexer, prompt, _ = setup
    with pytest.raises(ValueError, match="mode"):
        generate(params, c, prompt, 4, mode="bogus")
    with pytest.raises(ValueError, match="indexer"):
        generate(params, c, prompt, 4, mode="lsa")
    with pytest.raises(ValueError, match="kmax_pages"):
        LSAConfig(kmax_pages=0)
    with pytest.raises(ValueError, match="recency_tail_pages"):
        LSAConfig(recency_tail_pages=-1)
    with pytest.raises(ValueError, match="kmax_pages=1 cannot hold"):
        generate(params, c, jnp.tile(prompt, (1, 4)), 40, mode="recency", lsa=LSAConfig(tau=TAU, kmax_pages=1))
    _, cache = prefill(params, c, prompt, max_len=PROMPT + 8)
    with pytest.raises(ValueError, match="max_len"):
        decode_loop(params, c, cache, prompt[:, -1], [None] * c.n_layers, 40, lsa=LSAConfig(tau=TAU))


def test_cli_json(capsys):
    # 600 tokens = 150 CSA entries = 19 pages of 8, against a reserve of 2 + 2 tail + 1 sink + 2 write pages
    assert cli_main(["--random-weights", "--preset", "tiny", "--context", "600", "--new-tokens", str(NEW),
                     "--tau", str(TAU), "--batch", "2", "--kmax-pages", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "lsa" and out["device_kv_bytes"] < out["full_kv_bytes"]
    assert cli_main(["--random-weights", "--preset", "tiny", "--context", "600", "--new-tokens", str(NEW),
                     "--tau", str(TAU), "--batch", "2", "--kmax-pages", "2"]) == 0
    assert "device CSA KV" in capsys.readouterr().out


@pytest.mark.parametrize("stale", [False, True])
def test_last_window_starts_no_recall(setup, monkeypatch, stale):
    """One plan (and, with stale_by_one, one scoring) per window that runs; none for a window after the last."""
    from serve import engine
    c, params, indexer, _, _ = setup
    counts = {"plan": 0, "score": 0}
    real_plan, real_scores = engine._Cycle._plan, engine._Cycle._page_scores

    def plan(self, *a):
        counts["plan"] += 1
        return real_plan(self, *a)

    def scores(self, *a):
        counts["score"] += 1
        return real_scores(self, *a)
    monkeypatch.setattr(engine._Cycle, "_plan", plan)
    monkeypatch.setattr(engine._Cycle, "_page_scores", scores)
    prompt = jax.random.randint(jax.random.PRNGKey(2), (1, 300), 0, c.vocab_size)
    res = generate(params, c, prompt, 4 * TAU + 1, mode="lsa", indexer=indexer,
                   lsa=LSAConfig(tau=TAU, kmax_pages=4, recency_tail_pages=1, stale_by_one=stale))
    assert res.stats["cycles"] == 4
    assert counts == {"plan": 4, "score": 3 if stale else 4}  # stale: window n uses boundary n-1's scores


def test_lsa_config_at_budget():
    c = get_config("mini")  # 16 entries per page: 4096 tokens = 1024 entries = 64 pages
    lsa = LSAConfig.at_budget(c, 4096, 0.1, tail_fraction=0.25, tau=64)
    assert (lsa.kmax_pages, lsa.recency_tail_pages, lsa.sink_pages) == (6, 1, 0)
    tiny = LSAConfig.at_budget(c, 4096, 0.01)  # never below the pages one window writes
    assert tiny.kmax_pages == kt.window_write_pages(c, 64)
    with pytest.raises(ValueError, match="budget"):
        LSAConfig.at_budget(c, 4096, 0.0)
