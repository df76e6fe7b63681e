"""Host-mirror faults (issue 14 item 5): with `verify`, a page corrupted in the host mirror (a flipped
bit) or by a short host copy is detected on recall instead of being decoded. The pinned_host backend
(issue 11 item 5, `fm_jax.kv_pinned`): bit-exact round trips, recall and write-through equal to the NumPy
mirror's, per-shard placement on a mesh, and the same engine tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax import get_config
from fm_jax import kv_tiers as kt
from fm_jax import memory_indexer as mi
from fm_jax.model import init_params
from fm_jax.sharding import batch_row_groups, batch_sharding, make_mesh
from serve.engine import LSAConfig, generate

B, MAX_LEN = 2, 512


def _mirror(verify=True):
    c = get_config("tiny")
    layout = kt.make_layout(c, MAX_LEN, kmax_pages=6, recency_tail_pages=1, sink_pages=0, tau=16)
    rng = np.random.default_rng(0)
    n = layout.n_pages * layout.page_entries
    layers = [{} for _ in range(c.n_layers)]
    for l in c.csa_layers:
        layers[l] = {"comp_kv": rng.standard_normal((B, n, c.head_dim)).astype(np.float32),
                     "index_keys": rng.integers(0, 256, (B, layout.n_pages, c.index_page_bytes), dtype=np.uint8)}
    return c, layout, kt.HostMirror.from_cache({"layers": layers}, c, layout, verify=verify)


def _plan(layout, pages):
    pages = np.asarray(pages, np.int64)
    return kt.RecallPlan(np.tile(np.arange(pages.shape[1]), (B, 1)), pages, pages.size)


def test_recall_lands_each_data_shard_on_the_devices_that_own_it():
    """On a (2, 4) mesh request b's pages sit on exactly the 4 devices of data slice b, nowhere else;
    a flipped bit still names the request by its index in the whole batch."""
    c, layout, mirror = _mirror()
    mesh = make_mesh(2, 4)
    rows = batch_sharding(mesh, (B,))
    assert [(g.start, g.stop, len(d)) for g, d in batch_row_groups(rows, B)] == [(0, 1, 4), (1, 2, 4)]
    out = mirror.recall_to_device(_plan(layout, [[0, 3, 5], [1, 2, 7]]), rows)
    l = c.csa_layers[0]
    kv = out[l][0]
    assert kv.sharding.is_equivalent_to(rows, kv.ndim) and kv.shape == (B, 3, layout.page_entries, c.head_dim)
    for shard in kv.addressable_shards:
        b = next(i for i, row in enumerate(mesh.devices) if shard.device in list(row))  # its data slice
        assert shard.index[0] == slice(b, b + 1)
        np.testing.assert_array_equal(np.asarray(shard.data)[0, 2], mirror.kv[l][b, [5, 7][b]])
    mirror.kv[l][1, 7].view(np.uint8).reshape(-1)[3] ^= 1
    with pytest.raises(kt.PageChecksumError, match="page 7 of request 1"):
        mirror.recall_to_device(_plan(layout, [[0, 3, 5], [1, 2, 7]]), rows)


def test_clean_recall_passes_and_moves_the_pages():
    c, layout, mirror = _mirror()
    plan = _plan(layout, [[0, 3, 5], [1, 2, 7]])
    out = mirror.recall_to_device(plan)
    l = c.csa_layers[0]
    np.testing.assert_array_equal(np.asarray(out[l][0])[1, 2], mirror.kv[l][1, 7])
    np.testing.assert_array_equal(np.asarray(out[l][1])[0, 1], mirror.keys[l][0, 3])


@pytest.mark.parametrize("name", ["kv", "keys"])
def test_flipped_bit_in_the_mirror_is_detected(name):
    c, layout, mirror = _mirror()
    l = c.csa_layers[-1]
    arr = (mirror.kv if name == "kv" else mirror.keys)[l]
    arr[1, 5].view(np.uint8).reshape(-1)[37] ^= 0x10  # one bit of page 5 of request 1
    mirror.recall_to_device(_plan(layout, [[5, 0], [0, 1]]))  # page 5 of request 0 is fine
    with pytest.raises(kt.PageChecksumError, match=rf"CSA layer {l} {name}: page 5 of request 1"):
        mirror.recall_to_device(_plan(layout, [[5, 0], [0, 5]]))


def test_short_host_copy_is_detected(monkeypatch):
    c, layout, mirror = _mirror()
    real = kt._gather

    def short(src, bidx, pages):  # the copy of the last page stops halfway
        out = real(src, bidx, pages)
        flat = out[0, -1].reshape(-1)
        flat[flat.size // 2:] = 0
        return out
    monkeypatch.setattr(kt, "_gather", short)
    with pytest.raises(kt.PageChecksumError, match="page 4 of request 0"):
        mirror.recall_to_device(_plan(layout, [[1, 4], [2, 3]]))


def test_write_through_updates_the_checksums():
    c, layout, mirror = _mirror()
    l = c.csa_layers[0]
    new_kv = np.random.default_rng(1).standard_normal((B, 1, layout.page_entries, c.head_dim)).astype(np.float32)
    new_keys = np.ones((B, 1, c.index_page_bytes), np.uint8)
    mirror.write_through(l, new_kv, new_keys, np.array([[4], [-1]]))
    out = mirror.recall_to_device(_plan(layout, [[4], [4]]))  # checks pass for the rewritten page
    np.testing.assert_array_equal(np.asarray(out[l][0])[0, 0], new_kv[0, 0])


def test_without_verify_corruption_goes_unnoticed():
    """The check is what catches it (so the tests above can fail)."""
    c, layout, mirror = _mirror(verify=False)
    mirror.kv[c.csa_layers[0]][0, 2, 0, 0] += 1.0
    mirror.recall_to_device(_plan(layout, [[2], [2]]))


def test_engine_with_verify_reports_a_corrupted_page(monkeypatch):
    """End to end: a bit flipped in the mirror between cycles stops generate with PageChecksumError."""
    c = get_config("tiny")
    params = init_params(c, jax.random.PRNGKey(0))
    icfg = mi.config_from_model(c)
    indexer = (icfg, mi.init_params(icfg, jax.random.PRNGKey(3)))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (1, 400), 0, c.vocab_size)
    real = kt.HostMirror.recall_to_device
    calls = []

    def corrupt_then_recall(self, plan, sharding=None):
        calls.append(1)
        if len(calls) == 2:  # flip one bit of every page before the second recall
            for arr in self.kv.values():
                arr.view(np.uint32)[..., 0] ^= 1
        return real(self, plan, sharding)
    monkeypatch.setattr(kt.HostMirror, "recall_to_device", corrupt_then_recall)
    lsa = LSAConfig(tau=8, kmax_pages=4, recency_tail_pages=1, sink_pages=1, verify_recall=True)
    with pytest.raises(kt.PageChecksumError):
        generate(params, c, prompt, 65, mode="lsa", indexer=indexer, lsa=lsa)
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------ pinned backend
def _bf16_extremes(rng, shape):
    """Random bf16 bit patterns (infinities, subnormals, -0 included), NaN patterns made infinite."""
    bits = rng.integers(0, 1 << 16, shape, dtype=np.uint16)
    bits[(bits & 0x7F80) == 0x7F80] &= 0xFF80
    return bits.view(jnp.bfloat16)


def _mirrors(kv_dtype, sharding=None, verify=False):
    """The same random mirror as NumPy and pinned backends: kv bf16 (extreme values) or fp8 bytes."""
    c = get_config("tiny")
    layout = kt.make_layout(c, MAX_LEN, kmax_pages=6, recency_tail_pages=1, sink_pages=0, tau=16)
    rng = np.random.default_rng(7)
    shape = (B, layout.n_pages, layout.page_entries)
    kv = {l: _bf16_extremes(rng, shape + (c.head_dim,)) if kv_dtype == "bf16" else
          rng.integers(0, 256, shape + (c.head_dim + 8,), dtype=np.uint8) for l in c.csa_layers}
    keys = {l: rng.integers(0, 256, (B, layout.n_pages, c.index_page_bytes), dtype=np.uint8) for l in c.csa_layers}
    ref = kt.HostMirror(kv, keys)
    if verify:
        ref.start_verifying()
    return c, layout, ref, kt.HostMirror({l: a.copy() for l, a in kv.items()},
                                         {l: a.copy() for l, a in keys.items()}, verify).to_backend("pinned", sharding)


def _same_bytes(a, b):
    return np.array_equal(np.ascontiguousarray(np.asarray(a)).view(np.uint8),
                          np.ascontiguousarray(np.asarray(b)).view(np.uint8))


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_pinned_mirror_round_trips_and_recalls_bit_for_bit(kv_dtype):
    c, layout, ref, pinned = _mirrors(kv_dtype)
    assert all(a.sharding.memory_kind == "pinned_host" for _, _, arrs in pinned.shards for a in arrs.values())
    assert pinned.nbytes() == ref.nbytes()
    back = pinned.to_numpy()  # host -> pinned_host -> host
    for l in c.csa_layers:
        assert back.kv[l].dtype == ref.kv[l].dtype and _same_bytes(back.kv[l], ref.kv[l])
        assert _same_bytes(back.keys[l], ref.keys[l])
    plan = _plan(layout, [[0, 3, 5, 7], [1, 2, 7, 0]])
    want, got = ref.recall_to_device(plan), pinned.recall_to_device(plan)
    for l in c.csa_layers:
        for w, g in zip(want[l], got[l]):
            assert g.sharding.memory_kind == "device" and g.dtype == w.dtype and _same_bytes(g, w)


def test_pinned_write_through_then_recall_matches_numpy():
    c, layout, ref, pinned = _mirrors("bf16")
    rng = np.random.default_rng(3)
    l = c.csa_layers[-1]
    new_kv = jax.device_put(_bf16_extremes(rng, (B, 2, layout.page_entries, c.head_dim)))
    new_keys = jax.device_put(rng.integers(0, 256, (B, 2, c.index_page_bytes), dtype=np.uint8))
    pages = np.array([[4, -1], [6, 2]])
    for m in (ref, pinned):
        m.write_through(l, new_kv, new_keys, pages)
    plan = _plan(layout, [[4, 2, 6], [6, 2, 4]])
    want, got = ref.recall_to_device(plan), pinned.recall_to_device(plan)
    assert _same_bytes(got[l][0], want[l][0]) and _same_bytes(got[l][1], want[l][1])
    assert _same_bytes(np.asarray(got[l][0])[1, :2], np.asarray(new_kv)[1])  # pages 6, 2 of request 1


def test_pinned_recall_lands_each_data_shard_on_its_devices():
    mesh = make_mesh(2, 4)
    rows = batch_sharding(mesh, (B,))
    c, layout, ref, pinned = _mirrors("fp8", rows, verify=True)
    assert [dev.id for _, dev, _ in pinned.shards] == [mesh.devices[0, 0].id, mesh.devices[1, 0].id]
    plan = _plan(layout, [[0, 3, 5], [1, 2, 7]])
    want, got = ref.recall_to_device(plan, rows), pinned.recall_to_device(plan, rows)
    for l in c.csa_layers:
        for w, g in zip(want[l], got[l]):
            assert g.sharding.is_equivalent_to(rows, g.ndim) and _same_bytes(g, w)
            for shard in g.addressable_shards:
                b = next(i for i, row in enumerate(mesh.devices) if shard.device in list(row))
                assert shard.index[0] == slice(b, b + 1)
    l = c.csa_layers[0]
    pinned.sums[(l, "kv")][1, 7] ^= 1  # a stored checksum that no longer matches the page
    with pytest.raises(kt.PageChecksumError, match=f"CSA layer {l} kv: page 7 of request 1"):
        pinned.recall_to_device(plan, rows)


def test_from_cache_pinned_backend_equals_numpy():
    c, layout, ref = _mirror(verify=False)
    layers = [{} for _ in range(c.n_layers)]
    for l in c.csa_layers:
        layers[l] = {"comp_kv": jax.device_put(ref.kv[l].reshape(B, -1, c.head_dim)),
                     "index_keys": jax.device_put(ref.keys[l])}   # page-blocked, as in the cache
    pinned = kt.HostMirror.from_cache({"layers": layers}, c, layout, backend="pinned").to_numpy()
    for l in c.csa_layers:
        assert _same_bytes(pinned.kv[l], ref.kv[l]) and _same_bytes(pinned.keys[l], ref.keys[l])
    with pytest.raises(ValueError, match="backend must be one of"):
        kt.HostMirror.from_cache({"layers": layers}, c, layout, backend="cupy")


def test_engine_tokens_do_not_depend_on_the_mirror_backend():
    c = get_config("tiny")
    params = init_params(c, jax.random.PRNGKey(0))
    icfg = mi.config_from_model(c)
    indexer = (icfg, mi.init_params(icfg, jax.random.PRNGKey(3)))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 300), 0, c.vocab_size)
    out = {}
    for backend in kt.MIRROR_BACKENDS:
        lsa = LSAConfig(tau=8, kmax_pages=4, recency_tail_pages=1, sink_pages=1, host_mirror=backend,
                        verify_recall=True)
        res = generate(params, c, prompt, 41, mode="lsa", indexer=indexer, lsa=lsa)
        assert res.stats["recalled_bytes"] > 0
        out[backend] = res.tokens
    np.testing.assert_array_equal(out["pinned"], out["numpy"])


def test_pinned_gathers_agree_and_unknown_method_fails():
    from fm_jax import kv_pinned as kp
    c, layout, ref, pinned = _mirrors("bf16")
    _, dev, arrs = pinned.shards[0]
    keys = list(arrs)
    pages = np.array([[3, 0, 7], [5, 5, 1]])
    dtypes = [pinned.dtypes[k] for k in keys]
    take = kp.gather_pages([arrs[k] for k in keys], np.arange(B), pages, dev, dtypes=dtypes)
    fori = kp.gather_pages([arrs[k] for k in keys], np.arange(B), pages, dev, dtypes=dtypes, method="fori", unroll=2)
    for k, t, f in zip(keys, take, fori):
        src = (ref.kv if k[1] == "kv" else ref.keys)[k[0]]
        assert _same_bytes(t, f) and _same_bytes(t, src[np.arange(B)[:, None], pages])
    with pytest.raises(ValueError, match="method must be one of"):
        kp.gather_pages([arrs[k] for k in keys], np.arange(B), pages, dev, method="loop")
