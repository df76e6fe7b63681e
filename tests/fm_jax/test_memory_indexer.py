"""Memory Indexer (SPEC §4): scoring vs a float64 per-entry loop, masking, ensembling, selection,
initialisation from the backbone Lightning Indexer and input checks (checkpoint I/O: test_interop.py).

The last tests cross-check against a PyTorch re-statement of the FlashMemory release's scorer; they
skip when torch is not importable.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fm_jax import interop
from fm_jax import memory_indexer as mi
from fm_jax.config import get_config
from fm_jax.layers.hadamard import hadamard
from fm_jax.layers.key_pages import block_index_keys
from fm_jax.layers.norm import rms_norm
from fm_jax.layers.quant import pack_index_keys
from fm_jax.layers.rope import apply_rope, inv_freq_for_layer
from tests.fm_jax.helpers import random_indexer_params as random_params
from tests.fm_jax.helpers import release_indexer_tensors
from tests.fm_jax.helpers import small_indexer_config as small_config


def random_inputs(c: mi.IndexerConfig, b: int = 3, n: int = 29, seed: int = 1):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, c.d_model)).astype(np.float32) * 2.0
    keys_f = rng.normal(size=(b, n, c.head_dim)).astype(np.float32) * rng.uniform(0.5, 4.0, (b, n, 1))
    packed = np.asarray(pack_index_keys(jnp.asarray(keys_f.astype(np.float32))))
    positions = rng.integers(0, c.max_seq_len, size=(b,)).astype(np.int32)
    lengths = rng.integers(1, n + 1, size=(b,)).astype(np.int32)
    return hidden, packed, positions, lengths


# ---------------------------------------------------------------------------------------------------
# float64 reference (per-entry loop)
# ---------------------------------------------------------------------------------------------------
def _dequant_np(packed: np.ndarray) -> np.ndarray:
    d = packed.shape[-1] - 4
    vals = np.ascontiguousarray(packed[..., :d]).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    scale = np.ascontiguousarray(packed[..., d:]).view(np.float32)[..., 0].astype(np.float64)
    return vals * scale[..., None]


def _hadamard_matrix(d: int) -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(d)


def _bf16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def naive_query(layer_params, c: mi.IndexerConfig, hidden, positions, emulate_bf16=False):
    p = {k: np.asarray(jnp.asarray(v, jnp.float32), np.float64) for k, v in layer_params.items()}
    x = np.asarray(hidden, np.float64)
    ql = x @ p["wq_a"]
    ql = ql / np.sqrt(np.mean(ql * ql, axis=-1, keepdims=True) + c.norm_eps) * p["q_norm_weight"]
    q = (ql @ p["wq_b"]).reshape(x.shape[0], c.n_heads, c.head_dim)
    if emulate_bf16:
        q = _bf16(q)
    inv = np.asarray(c.inv_freq, np.float32)
    out = q.copy()
    for b in range(x.shape[0]):
        # the release (and DeepSeek) compute the angle in float32
        ang = (np.float32(positions[b]) * inv).astype(np.float32).astype(np.float64)
        for i in range(c.rope_dim // 2):
            j = c.head_dim - c.rope_dim + 2 * i
            x0, x1 = q[b, :, j], q[b, :, j + 1]
            out[b, :, j] = x0 * math.cos(ang[i]) - x1 * math.sin(ang[i])
            out[b, :, j + 1] = x0 * math.sin(ang[i]) + x1 * math.cos(ang[i])
    if emulate_bf16:
        out[..., -c.rope_dim:] = _bf16(out[..., -c.rope_dim:])
    q = out @ _hadamard_matrix(c.head_dim)
    w = (x @ p["weights_proj"]) * (c.head_dim ** -0.5 * c.n_heads ** -0.5)
    return q, w


def naive_logits(layer_params, c, hidden, packed, positions, lengths, emulate_bf16=False):
    q, w = naive_query(layer_params, c, hidden, positions, emulate_bf16)
    k = _dequant_np(np.asarray(packed))
    b, n = k.shape[:2]
    out = np.full((b, n), -np.inf)
    for bi in range(b):
        for s in range(int(lengths[bi])):
            acc = 0.0
            for h in range(c.n_heads):
                acc += w[bi, h] * max(0.0, float(q[bi, h] @ k[bi, s]))
            out[bi, s] = acc
    return out


def _sigmoid_masked(logits):
    return np.where(np.isfinite(logits), 1.0 / (1.0 + np.exp(-np.where(np.isfinite(logits), logits, 0))), 0.0)


# ---------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------
def test_release_defaults():
    c = mi.IndexerConfig()
    assert (c.n_heads, c.head_dim, c.q_lora_rank, c.rope_dim) == (128, 128, 2048, 64)
    assert (c.rope_base, c.rope_factor, c.rope_original_len, c.beta_fast, c.beta_slow) == (160000, 16, 65536, 32, 1)
    assert c.target_layers == (10, 12, 20) and c.layer_names == ("l10", "l12", "l20")
    assert c.rope_dtype == "bfloat16" and c.threshold == 0.5 and c.index_key_bytes == 132


@pytest.mark.parametrize("field,value", [
    ("head_dim", 48), ("rope_dim", 7), ("rope_dim", 32), ("n_heads", 0), ("rope_dtype", "float16"),
    ("threshold", 1.5), ("target_layers", ()), ("target_layers", (3, 3)), ("target_layers", (-1,)),
    ("ensemble", "sum"), ("rope_factor", 0.5), ("norm_eps", 0.0), ("max_seq_len", -4), ("param_dtype", "int8"),
])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        small_config(**{field: value})


def test_config_from_model():
    m = get_config("tiny")
    c = mi.config_from_model(m)
    assert c.target_layers == m.csa_layers
    assert (c.d_model, c.q_lora_rank, c.n_heads, c.head_dim, c.rope_dim) == (
        m.d_model, m.q_lora_rank, m.n_index_heads, m.index_head_dim, m.rope_dim)
    for layer in m.csa_layers:  # the indexer's RoPE table is the CSA layer's table
        np.testing.assert_array_equal(c.inv_freq, inv_freq_for_layer(m, layer))
    v = mi.config_from_model(get_config("v4_flash"))
    assert v.target_layers == (10, 12, 20) and (v.n_heads, v.head_dim, v.q_lora_rank) == (64, 128, 1024)
    assert mi.config_from_model(m, rope_dtype="float32", threshold=0.3).threshold == 0.3
    with pytest.raises(ValueError, match="`target_layers`"):
        mi.config_from_model(m, target_layers=(0,))  # layer 0 of tiny is window-only
    with pytest.raises(ValueError, match="`no_such_field`"):
        mi.config_from_model(m, no_such_field=1)


def test_init_params_layout():
    c = small_config(param_dtype="bfloat16")
    p = mi.init_params(c, jax.random.key(3))
    assert sorted(p) == ["l1", "l3", "l5"]
    for layer in p.values():
        assert {k: tuple(v.shape) for k, v in layer.items()} == c.param_shapes()
        assert all(v.dtype == jnp.bfloat16 for v in layer.values())
    assert not np.array_equal(np.asarray(p["l1"]["wq_a"], np.float32), np.asarray(p["l3"]["wq_a"], np.float32))


# ---------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------
def test_score_layer_matches_float64_loop_fp32_rope():
    c = small_config(rope_dtype="float32")
    params = random_params(c)
    hidden, packed, positions, lengths = random_inputs(c)
    ref_logits = naive_logits(params["l3"], c, hidden, packed, positions, lengths)
    got_logits = np.asarray(mi.layer_logits(params["l3"], c, hidden, packed, positions, lengths))
    valid = np.isfinite(ref_logits)
    assert valid.sum() > 10 and (np.abs(ref_logits[valid]) > 0.05).any()
    np.testing.assert_array_equal(np.isfinite(got_logits), valid)
    # fp32 tolerance; the off-GPU path of pallas_kernels.indexer_scores splits q into two bf16 parts
    # (~2^-17 relative on q), a few times looser than a plain float32 einsum (~3e-7 of the scale here)
    np.testing.assert_allclose(got_logits[valid], ref_logits[valid], rtol=2e-5,
                               atol=1e-5 * np.abs(ref_logits[valid]).max())
    got = np.asarray(mi.score_layer(params["l3"], c, hidden, packed, positions, lengths))
    assert got.dtype == np.float32 and got.shape == packed.shape[:2]
    np.testing.assert_allclose(got, _sigmoid_masked(ref_logits), rtol=0, atol=1e-5)


def test_score_layer_bf16_rope_matches_release_rounding():
    c = small_config()  # rope_dtype="bfloat16", as the release
    params = random_params(c, seed=5)
    hidden, packed, positions, lengths = random_inputs(c, seed=6)
    ref = naive_logits(params["l1"], c, hidden, packed, positions, lengths, emulate_bf16=True)
    ref32 = naive_logits(params["l1"], c, hidden, packed, positions, lengths, emulate_bf16=False)
    got = np.asarray(mi.layer_logits(params["l1"], c, hidden, packed, positions, lengths))
    v = np.isfinite(ref)
    scale = np.abs(ref[v]).max()
    err = np.abs(got[v] - ref[v])
    # q is rounded to bf16 twice; an fp32-vs-fp64 difference can move a rare element by one bf16 ulp
    assert np.median(err) <= 1e-5 * scale and err.max() <= 2e-3 * scale
    # ... and the rounding is really applied: the fp32-RoPE result is much further away
    assert np.median(np.abs(got[v] - ref32[v])) > 10 * np.median(err)


def test_masking_and_lengths():
    c = small_config()
    params = random_params(c)
    hidden, packed, positions, _ = random_inputs(c, b=3, n=21)
    full = np.asarray(mi.score_layer(params["l5"], c, hidden, packed, positions))
    lengths = np.array([21, 7, 0], np.int32)
    masked = np.asarray(mi.score_layer(params["l5"], c, hidden, packed, positions, lengths))
    logits = np.asarray(mi.layer_logits(params["l5"], c, hidden, packed, positions, lengths))
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(masked[b, :n], full[b, :n])
        assert (masked[b, n:] == 0.0).all() and (logits[b, n:] == -np.inf).all()
        assert np.isfinite(logits[b, :n]).all()
    assert (full > 0).all() and (full < 1).all()


def test_float_keys_equal_dequantised_packed_keys():
    c = small_config()
    params = random_params(c)
    hidden, packed, positions, lengths = random_inputs(c)
    a = mi.score_layer(params["l1"], c, hidden, packed, positions, lengths)
    b = mi.score_layer(params["l1"], c, hidden, _dequant_np(packed).astype(np.float32), positions, lengths)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def test_score_layer_under_jit_and_score_all():
    c = small_config()
    params = random_params(c)
    hidden, packed, positions, lengths = random_inputs(c)
    eager = mi.score_layer(params["l1"], c, hidden, packed, positions, lengths)
    jitted = jax.jit(lambda p, h, k, t, n: mi.score_layer(p, c, h, k, t, n))(
        params["l1"], hidden, packed, positions, lengths)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
    # per-layer hidden states and keys keyed by layer id or name; shared arrays also accepted
    rng = np.random.default_rng(9)
    hid = {1: hidden, "l3": hidden * 0.5, 5: rng.normal(size=hidden.shape).astype(np.float32)}
    keys = {"l1": packed, 3: packed, "l5": packed}
    out = mi.score_all(params, c, hid, keys, positions, lengths)
    assert list(out) == ["l1", "l3", "l5"]
    np.testing.assert_array_equal(np.asarray(out["l1"]), np.asarray(eager))
    np.testing.assert_array_equal(
        np.asarray(out["l3"]), np.asarray(mi.score_layer(params["l3"], c, hidden * 0.5, packed, positions, lengths)))
    shared = mi.score_all(params, c, hidden, packed, positions, lengths)
    np.testing.assert_array_equal(np.asarray(shared["l1"]), np.asarray(eager))
    with pytest.raises(ValueError, match="target layer 5"):
        mi.score_all(params, c, {1: hidden, 3: hidden}, packed, positions, lengths)


@pytest.mark.parametrize("p", [4, 8])
def test_page_blocked_keys_score_like_rows(p):
    # the engine passes its cache's page-blocked buffers (page_entries=); N = 29 rows pad to whole pages
    c = small_config()
    params = random_params(c)
    hidden, packed, positions, lengths = random_inputs(c)
    pages = block_index_keys(jnp.asarray(packed), p)
    n_all = pages.shape[1] * p
    rows = np.pad(packed, ((0, 0), (0, n_all - packed.shape[1]), (0, 0)))
    for fn in (mi.score_layer, mi.layer_logits):
        got = fn(params["l1"], c, hidden, pages, positions, lengths, page_entries=p)
        want = fn(params["l1"], c, hidden, rows, positions, lengths)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    whole = mi.score_all(params, c, hidden, pages, positions, page_entries=p)   # lengths None: every entry
    assert whole["l3"].shape == (3, n_all)
    np.testing.assert_array_equal(np.asarray(whole["l3"]),
                                  np.asarray(mi.score_layer(params["l3"], c, hidden, rows, positions)))
    with pytest.raises(ValueError, match="page_entries=None for rows"):
        mi.score_layer(params["l1"], c, hidden, packed, positions, lengths, page_entries=p)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, N="):
        mi.score_layer(params["l1"], c, hidden, pages, positions, lengths + n_all, page_entries=p)


def test_impl_passed_through():
    c = small_config()
    params = random_params(c)
    hidden, packed, positions, lengths = random_inputs(c)
    auto = mi.score_layer(params["l1"], c, hidden, packed, positions, lengths)
    xla = mi.score_layer(params["l1"], c, hidden, packed, positions, lengths, impl="xla")
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))
    with pytest.raises(ValueError, match="impl"):
        mi.score_layer(params["l1"], c, hidden, packed, positions, lengths, impl="no_such_impl")


def test_ensemble_modes():
    rng = np.random.default_rng(2)
    s = {f"l{i}": rng.uniform(size=(2, 9)).astype(np.float32) for i in (10, 12, 20)}
    stacked = np.stack(list(s.values()))
    for form in (s, list(s.values()), tuple(s.values()), stacked):
        np.testing.assert_array_equal(np.asarray(mi.ensemble_scores(form)), stacked.max(0))
        np.testing.assert_allclose(np.asarray(mi.ensemble_scores(form, mode="mean")), stacked.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        mi.ensemble_scores(s, mode="min")
    with pytest.raises(ValueError, match="shape"):
        mi.ensemble_scores([stacked[0], stacked[1][:, :4]])


def test_select_threshold():
    rng = np.random.default_rng(4)
    scores = rng.uniform(size=(3, 17)).astype(np.float32)
    scores[0, 3] = 0.5  # the boundary is kept (>=)
    keep = np.asarray(mi.select(scores, 0.5))
    np.testing.assert_array_equal(keep, scores >= 0.5)
    assert keep[0, 3]
    lengths = np.array([17, 5, 0])
    keep = np.asarray(mi.select(scores, 0.0, lengths))
    np.testing.assert_array_equal(keep, np.arange(17)[None] < lengths[:, None])
    # threshold 0 keeps every valid entry of a real score row (masked ones are 0.0 but out of range)
    c = small_config()
    params = random_params(c)
    hidden, packed, positions, lens = random_inputs(c)
    sc = mi.ensemble_scores(mi.score_all(params, c, hidden, packed, positions, lens))
    np.testing.assert_array_equal(np.asarray(mi.select(sc, 0.0, lens)),
                                  np.arange(packed.shape[1])[None] < lens[:, None])


# ---------------------------------------------------------------------------------------------------
# init from the backbone Lightning Indexer
# ---------------------------------------------------------------------------------------------------
def _fake_backbone_params(m, seed=0):
    rng = np.random.default_rng(seed)

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32) / math.sqrt(shape[0]))

    layers = []
    for layer in range(m.n_layers):
        attn = {"wq_a": r(m.d_model, m.q_lora_rank),
                "q_norm": jnp.asarray(rng.uniform(0.5, 1.5, m.q_lora_rank).astype(np.float32))}
        if layer in m.csa_layers:
            attn["indexer"] = {"wq_b": r(m.q_lora_rank, m.n_index_heads * m.index_head_dim),
                               "weights_proj": r(m.d_model, m.n_index_heads)}
        layers.append({"attn": attn})
    return {"layers": layers}


@jax.default_matmul_precision("float32")  # the inline formula's matmuls in true fp32 (no TF32 on GPU)
def test_init_from_lightning_indexer_equals_backbone_query():
    m = get_config("tiny")
    mp = _fake_backbone_params(m)
    c = mi.config_from_model(m, rope_dtype="float32")
    params = mi.init_from_lightning_indexer(c, mp, m)
    assert sorted(params) == [f"l{i}" for i in m.csa_layers]
    rng = np.random.default_rng(7)
    b = 3
    x = jnp.asarray(rng.normal(size=(b, m.d_model)).astype(np.float32))
    pos = jnp.asarray(rng.integers(0, m.max_seq_len, b).astype(np.int32))
    for layer in m.csa_layers:
        attn = mp["layers"][layer]["attn"]
        # the backbone's Lightning Indexer query, stated inline
        ql = rms_norm(x @ attn["wq_a"], attn["q_norm"], m.norm_eps)
        qi = (ql @ attn["indexer"]["wq_b"]).reshape(b, m.n_index_heads, m.index_head_dim)
        qi = hadamard(apply_rope(qi, pos[:, None], inv_freq_for_layer(m, layer)))
        wi = (x @ attn["indexer"]["weights_proj"]) * m.index_head_dim ** -0.5 * m.n_index_heads ** -0.5
        q, w = mi.query_tower(params[f"l{layer}"], c, x, pos)
        np.testing.assert_allclose(np.asarray(q), np.asarray(qi), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(w), np.asarray(wi), rtol=1e-5, atol=1e-7)
        # and the score is the LI logit sum_h w relu(q.k) through the sigmoid
        keys = rng.normal(size=(b, 11, m.index_head_dim)).astype(np.float32)
        li = jnp.sum(jax.nn.relu(jnp.einsum("bhd,bnd->bnh", qi, keys)) * wi[:, None, :], -1)
        np.testing.assert_allclose(np.asarray(mi.score_layer(params[f"l{layer}"], c, x, keys, pos)),
                                   np.asarray(jax.nn.sigmoid(li)), rtol=1e-5, atol=2e-6)


@jax.default_matmul_precision("float32")
def test_init_from_real_backbone_params_matches_index_query():
    """Against the backbone's own parameter init and Lightning Indexer query (fm_jax.model / layers)."""
    from fm_jax.layers.indexer import index_query
    from fm_jax.model import init_params as init_model_params

    m = get_config("tiny")
    # the backbone's own param tree (layout and shapes via eval_shape: no compiles), random values
    rng = np.random.default_rng(8)
    tree = jax.eval_shape(lambda k: init_model_params(m, k), jax.random.key(4))
    mp = jax.tree.map(lambda s: jnp.asarray(
        rng.normal(size=s.shape).astype(np.float32) / math.sqrt(s.shape[0] if len(s.shape) > 1 else 1.0)
        + (1.0 if len(s.shape) == 1 else 0.0)).astype(s.dtype), tree)
    c = mi.config_from_model(m, rope_dtype="float32")
    params = mi.init_from_lightning_indexer(c, mp, m)
    x = jnp.asarray(rng.normal(size=(2, m.d_model)).astype(np.float32))  # the LI's (normed) layer input
    pos = jnp.asarray(np.array([3, 3001], np.int32))
    @jax.jit
    def backbone_query(attn, x, pos, inv):
        q_lora = rms_norm(x @ attn["wq_a"], attn["q_norm"], m.norm_eps)
        return index_query(attn["indexer"], m, x, q_lora, pos, inv)

    for layer in m.csa_layers:
        qi, wi = backbone_query(mp["layers"][layer]["attn"], x, pos, inv_freq_for_layer(m, layer))
        q, w = jax.jit(mi.query_tower, static_argnums=1)(params[f"l{layer}"], c, x, pos)
        np.testing.assert_allclose(np.asarray(q), np.asarray(qi), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(w), np.asarray(wi), rtol=1e-5, atol=1e-7)


def test_init_from_lightning_indexer_errors():
    m = get_config("tiny")
    mp = _fake_backbone_params(m)
    with pytest.raises(ValueError, match="`n_heads`"):
        mi.init_from_lightning_indexer(mi.config_from_model(m, n_heads=8), mp, m)
    with pytest.raises(ValueError, match="`q_lora_rank`"):
        mi.init_from_lightning_indexer(mi.config_from_model(m, q_lora_rank=64), mp, m)
    c = mi.config_from_model(m)
    with pytest.raises(ValueError, match="not a CSA layer"):
        mi.init_from_lightning_indexer(c.replace(target_layers=(0,)), mp, m)
    broken = _fake_backbone_params(m)
    del broken["layers"][m.csa_layers[0]]["attn"]["indexer"]["weights_proj"]
    with pytest.raises(ValueError, match="weights_proj"):
        mi.init_from_lightning_indexer(c, broken, m)
    broken = _fake_backbone_params(m)
    broken["layers"][m.csa_layers[-1]]["attn"]["wq_a"] = jnp.ones((m.d_model, m.q_lora_rank + 1))
    with pytest.raises(ValueError, match="wq_a"):
        mi.init_from_lightning_indexer(c, broken, m)


# ---------------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------------
def test_bad_inputs():
    c = small_config()
    params = random_params(c)
    hidden, packed, positions, _ = random_inputs(c, n=8)
    lp = params["l1"]
    with pytest.raises(ValueError, match="dtype int32"):
        mi.score_layer(lp, c, hidden, packed.astype(np.int32), positions)
    with pytest.raises(ValueError, match="rank 2"):
        mi.score_layer(lp, c, hidden, packed[:, 0], positions)
    with pytest.raises(ValueError, match="head_dim \\+ 4"):
        mi.score_layer(lp, c, hidden, packed[..., :-1], positions)
    with pytest.raises(ValueError, match="max_seq_len"):
        mi.score_layer(lp, c, hidden, packed, np.array([0, 1, c.max_seq_len], np.int32))
    with pytest.raises(ValueError, match="max_seq_len"):
        mi.score_layer(lp, c, hidden, packed, np.array([0, -1, 2], np.int32))
    with pytest.raises(ValueError, match="positions"):
        mi.score_layer(lp, c, hidden, packed, positions.astype(np.float32))
    with pytest.raises(ValueError, match="d_model"):
        mi.score_layer(lp, c, hidden[:, :-1], packed, positions)
    with pytest.raises(ValueError, match="batch"):
        mi.score_layer(lp, c, hidden[:2], packed, positions[:2])
    with pytest.raises(ValueError, match="lengths"):
        mi.score_layer(lp, c, hidden, packed, positions, np.array([1, 9, 2], np.int32))
    with pytest.raises(ValueError, match="wq_b"):
        mi.score_layer({k: v for k, v in lp.items() if k != "wq_b"}, c, hidden, packed, positions)


# ---------------------------------------------------------------------------------------------------
# optional: PyTorch re-statement of the FlashMemory release's scorer (retriever.py, _LayerScorer.logits)
# ---------------------------------------------------------------------------------------------------
def _torch_release_scores(torch, sd, name, hidden, packed, positions, head_dim=128, rope_dim=64, inv=None):
    """Re-statement of the release: fp32 linear, RMSNorm by division, q -> bf16, complex RoPE on the
    last 64 dims with a float32 YaRN table (base 160000, factor 16, orig 65536, beta 32/1; ramp upper
    index clamped at rope_dim//2 - 1), back to bf16 then fp32, Hadamard / sqrt(d), weighted relu sum."""
    F = torch.nn.functional
    wq_a, wq_b = sd[f"retrievers.{name}.wq_a.weight"].float(), sd[f"retrievers.{name}.wq_b.weight"].float()
    g, wp = sd[f"retrievers.{name}.q_norm_weight"].float(), sd[f"retrievers.{name}.weights_proj.weight"].float()
    n_heads = wq_b.shape[0] // head_dim

    def corr(n_rot):
        return rope_dim * math.log(65536 / (n_rot * 2 * math.pi)) / (2 * math.log(160000.0))

    low, high = max(math.floor(corr(32.0)), 0), min(math.ceil(corr(1.0)), rope_dim // 2 - 1)
    freqs = 1.0 / (160000.0 ** (torch.arange(0, rope_dim, 2).float() / rope_dim))
    ramp = torch.zeros(rope_dim // 2)
    for i in range(rope_dim // 2):
        ramp[i] = 0.0 if i < low else (1.0 if i >= high else (i - low) / max(high - low, 1))
    release_inv = freqs * (1 - ramp) + (freqs / 16.0) * ramp
    inv = release_inv if inv is None else inv
    angles = torch.outer(positions.float(), inv)
    rot = torch.polar(torch.ones_like(angles), angles).unsqueeze(1)  # [B, 1, rope_dim/2]

    x = hidden.float()
    ql = F.linear(x, wq_a)
    ql = ql / torch.sqrt(ql.pow(2).mean(-1, keepdim=True) + 1e-6) * g
    q = F.linear(ql, wq_b).view(x.shape[0], n_heads, head_dim).to(torch.bfloat16)
    qp, qr = q[..., : head_dim - rope_dim], q[..., head_dim - rope_dim:]
    qc = torch.view_as_complex(qr.float().reshape(*qr.shape[:-1], rope_dim // 2, 2).contiguous())
    qr = torch.view_as_real(qc * rot).reshape(*qr.shape).to(torch.bfloat16)
    q = torch.cat([qp, qr], -1).float()
    hq, s = q, 1
    while s < head_dim:
        hq = hq.view(*q.shape[:-1], head_dim // (2 * s), 2, s)
        hq = torch.stack([hq[..., 0, :] + hq[..., 1, :], hq[..., 0, :] - hq[..., 1, :]], dim=-2).view(q.shape)
        s *= 2
    q = hq / math.sqrt(head_dim)
    w = F.linear(x, wp) * (head_dim ** -0.5 * n_heads ** -0.5)
    k = packed[..., :head_dim].contiguous().view(torch.float8_e4m3fn).float() \
        * packed[..., head_dim:].contiguous().view(torch.float32)
    logits = (F.relu(torch.einsum("bhd,bnd->bnh", q, k)) * w.unsqueeze(1)).sum(-1)
    return torch.sigmoid(logits), logits, release_inv


def test_matches_pytorch_release_restatement(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    d, r, h = 96, 64, 8
    t = release_indexer_tensors(layers=(10, 20), d=d, r=r, h=h, seed=21)
    for k in t:  # release-like magnitudes
        if k.endswith(".weight"):
            t[k] = t[k] / math.sqrt(t[k].shape[1])
    sd = {k: torch.from_numpy(v.copy()) for k, v in t.items()}
    path = tmp_path / "rel.safetensors"
    safetensors_torch.save_file(sd, str(path))  # written by the torch writer, no metadata
    c, params = interop.load_flashmemory_checkpoint(path)
    assert (c.n_heads, c.head_dim, c.rope_dim, c.rope_dtype) == (h, 128, 64, "bfloat16")

    rng = np.random.default_rng(22)
    b, n = 4, 50
    hidden = rng.normal(size=(b, d)).astype(np.float32) * 3
    keys = rng.normal(size=(b, n, 128)).astype(np.float32) * rng.uniform(0.5, 4, (b, n, 1))
    packed = np.asarray(pack_index_keys(jnp.asarray(keys)))
    positions = np.array([0, 4097, 300001, 1048575], np.int32)
    ours_inv = np.asarray(c.inv_freq)
    for name in ("l10", "l20"):
        args = (torch, sd, name, torch.from_numpy(hidden), torch.from_numpy(packed.copy()),
                torch.from_numpy(positions).long())
        ts, tl, inv = _torch_release_scores(*args)
        # YaRN table: bit-identical where numpy's float32 pow is correctly rounded (seen: numpy 2.4 on
        # this repo's CPU machines); numpy's AVX-512 pow (seen on the GPU hosts) is 1 ulp off in a few
        # entries, which at positions near 1M moves the float32 angle by ~0.03 rad. Then check the
        # rest of the scorer against the release's arithmetic on our table.
        np.testing.assert_allclose(ours_inv, inv.numpy(), rtol=2.5e-7, atol=0)
        if not np.array_equal(ours_inv, inv.numpy()):
            ts, tl, _ = _torch_release_scores(*args, inv=torch.from_numpy(ours_inv.copy()))
        got_l = np.asarray(mi.layer_logits(params[name], c, hidden, packed, positions))
        got_s = np.asarray(mi.score_layer(params[name], c, hidden, packed, positions))
        tl = tl.numpy()
        scale = np.abs(tl).max()
        err = np.abs(got_l - tl)
        assert np.median(err) <= 2e-6 * scale and err.max() <= 2e-3 * scale, (np.median(err), err.max(), scale)
        np.testing.assert_allclose(got_s, ts.numpy(), rtol=0, atol=1e-3)
        assert np.median(np.abs(got_s - ts.numpy())) <= 1e-6

    # .pt loading (weights_only) gives the same params
    torch.save(sd, str(tmp_path / "rel.pt"))
    c_pt, p_pt = interop.load_flashmemory_checkpoint(tmp_path / "rel.pt")
    assert c_pt == c
    for name in params:
        for k in params[name]:
            np.testing.assert_array_equal(np.asarray(p_pt[name][k]), np.asarray(params[name][k]))
