"""The engine on a ("data", "model") mesh of 8 CPU devices (issue 11; tests/conftest.py sets the device
count before jax is imported): meshes (8, 1), (4, 2) and (2, 4) give the single-device tokens exactly, the
same resident sets, and logits within float32 reduction-order tolerance, in `full` and `lsa` modes, with
ragged prompts; every recall lands on the devices that own its requests; the window compiles once.

Small on purpose (CI time): the tiny preset cut to a window layer + one CSA layer, with MoE so that
experts (and heads) split over "model"; a 2-page budget over 3-4 pages so that `lsa` really recalls."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fm_jax import backbone, get_config
from fm_jax import kv_tiers as kt
from fm_jax import memory_indexer as mi
from fm_jax.sharding import make_mesh
from serve.engine import LSAConfig, generate
from tests.fm_jax.helpers import random_params

B, T, NEW = 8, 72, 25
LENGTHS = np.array([72, 41, 65, 30, 57, 72, 49, 36], np.int32)  # ragged, most not multiples of the ratio
LSA = LSAConfig(tau=8, kmax_pages=2, recency_tail_pages=1)
MESHES = [(8, 1), (4, 2), (2, 4)]


@pytest.fixture(scope="module")
def setup():
    c = get_config("tiny", n_layers=2, compress_ratios=(0, 4), ffn="moe")
    params = random_params(c, seed=0)  # NumPy draws: no per-shape compilation of jax.random
    icfg = mi.config_from_model(c)
    indexer = (icfg, mi.init_params(icfg, jax.random.PRNGKey(3)))
    prompt = np.random.default_rng(1).integers(0, c.vocab_size, (B, T)).astype(np.int32)
    kw = dict(indexer=indexer, lsa=LSA, return_logits=True, lengths=LENGTHS, trace_resident=True)
    ref = {mode: generate(params, c, prompt, NEW, mode=mode, **kw) for mode in ("full", "lsa")}
    assert ref["lsa"].stats["recalled_bytes"] > 0 and ref["lsa"].stats["resident_fraction"] < 1
    return c, params, prompt, kw, ref


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("mode", ["full", "lsa"])
def test_mesh_matches_one_device(setup, monkeypatch, mode, shape):
    c, params, prompt, kw, ref = setup
    mesh = make_mesh(*shape)
    rows = NamedSharding(mesh, P("data"))
    recalled, puts, traces, recalling = [], [], [], []
    real_recall, real_put, real_step = kt.HostMirror.recall_to_device, kt.to_device, backbone.run_step

    def recall(self, plan, sharding=None):
        recalling.append(1)
        out = real_recall(self, plan, sharding)
        recalling.pop()
        recalled.extend(x for pair in out.values() for x in pair)
        return out

    def put(x, sharding=None):
        if recalling:  # (the zero pages that compile the scatter once are not a recall)
            puts.append((x.shape[0], sharding))
        return real_put(x, sharding)
    monkeypatch.setattr(kt.HostMirror, "recall_to_device", recall)
    def step(*a, **k):  # called once per trace of the decode window
        traces.append(1)
        return real_step(*a, **k)
    monkeypatch.setattr(kt, "to_device", put)
    monkeypatch.setattr(backbone, "run_step", step)

    r = generate(params, c, prompt, NEW, mode=mode, mesh=mesh, **kw)
    want = ref[mode]
    np.testing.assert_array_equal(r.tokens, want.tokens)
    np.testing.assert_allclose(r.logits, want.logits, rtol=0, atol=1e-5 * np.abs(want.logits).max())
    assert len(traces) == 1  # one compilation: the carry keeps its shardings from window to window
    if mode == "full":
        return
    assert r.stats["recalled_bytes"] == want.stats["recalled_bytes"] > 0
    for mine, theirs in zip(r.resident_tables, want.resident_tables, strict=True):  # the same page choice
        np.testing.assert_array_equal(mine, theirs)
    assert recalled and puts
    for x in recalled:  # split by request over "data", whole over "model"
        assert x.sharding.is_equivalent_to(rows, x.ndim), x.sharding
    for n, sh in puts:  # every host -> device copy carries one data shard's requests to one device
        assert n == B // shape[0] and len(sh.device_set) == 1, (n, sh)


def test_mesh_rejects_bad_inputs(setup):
    c, params, prompt, kw, _ = setup
    with pytest.raises(ValueError, match=r"batch 6 is not a multiple of the mesh's `data` axis \(4\)"):
        generate(params, c, prompt[:6], NEW, mode="full", mesh=make_mesh(4, 2), lsa=LSA, lengths=LENGTHS[:6])
    with pytest.raises(ValueError, match=r"expected a \('data', 'model'\) mesh"):
        generate(params, c, prompt, NEW, mode="full", mesh=jax.make_mesh((8,), ("batch",)), lsa=LSA)
    with pytest.raises(ValueError, match="prefill_chunk is not supported with a mesh"):
        generate(params, c, prompt, NEW, mode="full", mesh=make_mesh(4, 2), lsa=LSA, prefill_chunk=32)
