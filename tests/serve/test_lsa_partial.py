"""LSA with a partial resident set (issue 14 item 4): pages are evicted, recalled, written through and
chosen stale-by-one, yet every logit must equal a reference that keeps the whole CSA cache on the
device and masks Level 2 (the Lightning Indexer) to exactly the resident set the engine used in each
window. Differences would show a page recalled into the wrong slot, a stale or lost write-through,
or a mirror page that went out of date."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax import get_config
from fm_jax import kv_tiers as kt
from fm_jax import memory_indexer as mi
from fm_jax.cache import entry_capacity
from fm_jax.model import init_params, prefill_with_hidden
from serve.engine import LSAConfig, generate, run_window

TAU, NEW = 8, 8 * 8 + 1  # 8 cycles
LENGTHS = (400, 333, 270)  # ragged: 100 / 83 / 67 complete entries = 13 / 11 / 9 pages of 8


@pytest.fixture(scope="module")
def setup():
    c = get_config("tiny")
    params = init_params(c, jax.random.PRNGKey(0))
    icfg = mi.config_from_model(c)
    iparams = mi.init_params(icfg, jax.random.PRNGKey(3))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (len(LENGTHS), max(LENGTHS)), 0, c.vocab_size)
    return c, params, (icfg.replace(threshold=0.5), iparams), prompt, jnp.asarray(LENGTHS, jnp.int32)


def _permute_csa(cache, c, perm, inverse: bool):
    """Move the CSA buffers between page order (cell = entry) and slot order (page p in slot perm[b, p])."""
    b_count, n_pages = perm.shape
    bidx = np.arange(b_count)[:, None]
    layers = list(cache["layers"])
    for l in c.csa_layers:
        lc = dict(layers[l])
        for name in ("comp_kv", "index_keys"):   # kv rows [B, cells, row], keys page-blocked [B, pages, bytes]
            shape = lc[name].shape
            x = lc[name].reshape(b_count, n_pages, -1)
            x = x[bidx, perm] if inverse else x.at[bidx, perm].set(x)
            lc[name] = x.reshape(shape)
        layers[l] = lc
    return {**cache, "layers": tuple(layers)}


def masked_reference(params, c, prompt, lengths, n_new, tau, tables):
    """Greedy decode with the whole CSA cache on the device (never evicted, recalled or mirrored); in
    window w the Lightning Indexer of request b sees only the pages resident in the engine's table
    `tables[w][b]` (page_slot, -1 = not resident). The cache is laid out in the engine's slot order for
    the window (resident pages in their engine slots, the others after them), so top-k ties between
    equal scores break the same way. Returns logits [B, n_new, V]."""
    max_len = prompt.shape[1] + 1 + -(-(n_new - 1) // tau) * tau
    logits0, cache, _ = prefill_with_hidden(params, c, prompt, lengths, max_len)
    last = jnp.take_along_axis(logits0, (lengths - 1)[:, None, None], axis=1)[:, 0]
    token = jnp.argmax(last, -1).astype(jnp.int32)
    cache, token = jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding), (cache, token))
    n_pages = entry_capacity(c, c.csa_layers[0], max_len) // c.page_entries
    key = jax.random.PRNGKey(0)
    out = [np.asarray(last)[:, None]]
    for table in tables:
        b_count, k = table.shape[0], int(table.max()) + 1
        perm = np.zeros((b_count, n_pages), np.int64)  # page -> slot of the reference's full-size reserve
        for b in range(b_count):
            res = table[b, :n_pages] >= 0
            perm[b, res] = table[b, :n_pages][res]
            perm[b, ~res] = k + np.arange(np.sum(~res))
        page_slot = np.where(table[:, :n_pages] >= 0, perm, -1).astype(np.int32)
        slot_page = np.full_like(page_slot, -1)
        for b in range(b_count):
            slot_page[b, page_slot[b][page_slot[b] >= 0]] = np.nonzero(page_slot[b] >= 0)[0]
        cache = _permute_csa(cache, c, jnp.asarray(perm), inverse=False)
        cache = {**cache, "tier": {"page_slot": jnp.asarray(page_slot), "slot_page": jnp.asarray(slot_page)}}
        cache, token, _, logits, _, key = run_window(params, c, cache, token, key, tau, True, True, "auto", ())
        cache = _permute_csa({k_: v for k_, v in cache.items() if k_ != "tier"}, c, jnp.asarray(perm), inverse=True)
        out.append(np.asarray(logits).transpose(1, 0, 2))
    return np.concatenate(out, axis=1)[:, :n_new]


def _check_resident_sets(c, res, lsa, lengths):
    """The budget holds: exactly K pages per request and window, and every page the window writes."""
    layout = kt.make_layout(c, 10**4, kmax_pages=lsa.kmax_pages, recency_tail_pages=lsa.recency_tail_pages,
                            sink_pages=lsa.sink_pages, tau=lsa.tau)
    evictions, prev = 0, None
    for w, table in enumerate(res.resident_tables):
        sets = [set(np.nonzero(t >= 0)[0].tolist()) for t in table]
        for b, pages in enumerate(sets):
            pos = int(lengths[b]) + w * lsa.tau
            n_cand = max(-(-(pos // c.csa_ratio) // c.page_entries),
                         int(kt.write_pages(pos, layout, lsa.tau)[-1]) + 1)
            assert len(pages) == min(lsa.kmax_pages, n_cand), (w, b, pages)
            assert set(kt.write_pages(pos, layout, lsa.tau).tolist()) <= pages
            if prev is not None:
                evictions += len(prev[b] - pages)
        prev = sets
    return evictions


@pytest.mark.parametrize("mode,stale,kmax", [("lsa", True, 4), ("lsa", False, 4), ("lsa", True, 5),
                                             ("random", True, 5), ("recency", False, 4)])
def test_partial_resident_set_matches_masked_full_cache(setup, mode, stale, kmax):
    c, params, indexer, prompt, lengths = setup
    lsa = LSAConfig(tau=TAU, kmax_pages=kmax, recency_tail_pages=1, sink_pages=1, stale_by_one=stale,
                    verify_recall=stale, seed=7)
    res = generate(params, c, prompt, NEW, mode=mode, indexer=indexer if mode == "lsa" else None, lsa=lsa,
                   lengths=lengths, return_logits=True, trace_resident=True)
    evictions = _check_resident_sets(c, res, lsa, np.asarray(lengths))
    if mode != "recency":  # the newest pages only move forward: one eviction per page crossing
        assert evictions >= 2 * len(res.resident_tables), evictions  # several evictions per cycle
    assert res.stats["recalled_bytes"] > 0
    ref = masked_reference(params, c, prompt, lengths, NEW, TAU, res.resident_tables)
    np.testing.assert_array_equal(res.logits, ref)  # bit for bit


def test_reference_sees_only_the_resident_set(setup):
    """The check above can fail: masking to a different resident set changes the logits."""
    c, params, indexer, prompt, lengths = setup
    lsa = LSAConfig(tau=TAU, kmax_pages=4, recency_tail_pages=1, sink_pages=1)
    res = generate(params, c, prompt, NEW, mode="lsa", indexer=indexer, lsa=lsa, lengths=lengths,
                   return_logits=True, trace_resident=True)
    max_len = prompt.shape[1] + 1 + -(-(NEW - 1) // TAU) * TAU
    n_pages = entry_capacity(c, c.csa_layers[0], max_len) // c.page_entries
    everything = [np.tile(np.arange(n_pages, dtype=np.int32), (len(LENGTHS), 1)) for _ in res.resident_tables]
    ref_all = masked_reference(params, c, prompt, lengths, NEW, TAU, everything)
    assert not np.array_equal(res.logits, ref_all)
