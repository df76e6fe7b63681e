"""DeepSeek-V4 MoE (SPEC §9) against a plain-NumPy float64 transcription written here: sqrt(softplus)
scores, top-k by score + bias (the bias only chooses), hash routing by token id (tid2eid, no bias),
weights renormalised x routed_scaling_factor and applied before w2, shared expert with weight 1, and the
SwiGLU clamp (up to +-limit, gate to <= limit) on routed and shared experts; both MoE implementations
(`moe_impl` "dense" and "sparse"). Sparse-specific tests (dispatch, skewed routing, scan, mesh) are in
test_moe_sparse.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax.config import get_config
from fm_jax.layers.ffn import ffn, init_ffn, moe_route

E, K, D, I, V = 8, 3, 32, 16, 50
C = get_config("tiny", ffn="moe", d_model=D, n_routed_experts=E, moe_top_k=K, moe_inter_dim=I, vocab_size=V,
               n_shared_experts=1, routed_scaling_factor=1.5, swiglu_limit=10.0, n_hash_layers=1)
RTOL = 1e-5


# ---------------------------------------------------------------- SPEC §9, transcribed in NumPy float64
def np_silu(z):
    return z / (1.0 + np.exp(-z))


def np_expert(w1, w3, w2, x, weight, limit):
    gate, up = x @ w1, x @ w3
    if limit > 0:
        up = np.clip(up, -limit, limit)
        gate = np.minimum(gate, limit)
    return (weight * (np_silu(gate) * up)) @ w2


def np_route(router, bias, tid2eid, x, token, k, route_scale):
    """One token: (expert ids [k], weights [k])."""
    scores = np.sqrt(np.log1p(np.exp(x @ router)))
    if tid2eid is not None:
        ids = tid2eid[token]
    else:
        ids = np.argsort(-(scores + bias), kind="stable")[:k]
    w = scores[ids]
    return ids, w / w.sum() * route_scale


def np_moe(p, x, tokens, k, route_scale, limit):
    """x [T, d] -> [T, d]: sum over the chosen experts, plus the shared expert with weight 1."""
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        ids, w = np_route(p["router"], p.get("router_bias"), p.get("tid2eid"), x[t], tokens[t], k, route_scale)
        for e, we in zip(ids, w):
            out[t] += np_expert(p["w1"][e], p["w3"][e], p["w2"][e], x[t], we, limit)
        out[t] += np_expert(p["s1"], p["s3"], p["s2"], x[t], 1.0, limit)
    return out


# ---------------------------------------------------------------- data
def params(seed, hash_routed):
    p = init_ffn(jax.random.key(seed), C, hash_routed=hash_routed)
    rng = np.random.default_rng(seed)
    p = jax.tree.map(np.asarray, p)
    if not hash_routed:
        p["router_bias"] = (0.3 * rng.standard_normal(E)).astype(np.float32)
    return p


def flat64(p):
    q = {"router": p["router"], "w1": p["experts"]["w1"], "w3": p["experts"]["w3"], "w2": p["experts"]["w2"],
         "s1": p["shared"]["w1"], "s3": p["shared"]["w3"], "s2": p["shared"]["w2"]}
    q = {k: np.asarray(v, np.float64) for k, v in q.items()}
    if "router_bias" in p:
        q["router_bias"] = np.asarray(p["router_bias"], np.float64)
    if "tid2eid" in p:
        q["tid2eid"] = np.asarray(p["tid2eid"])
    return q


_ffn = jax.jit(ffn, static_argnums=1)


@pytest.mark.parametrize("moe_impl", ["dense", "sparse"])
@pytest.mark.parametrize("hash_routed", [False, True], ids=["topk", "hash"])
@pytest.mark.parametrize("x_scale", [1.0, 8.0], ids=["small", "clamped"])
def test_moe_matches_spec(hash_routed, x_scale, moe_impl):
    p = params(1, hash_routed)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 6, D)) * x_scale).astype(np.float32)
    tokens = rng.integers(0, V, (2, 6)).astype(np.int32)
    got = np.asarray(_ffn(jax.tree.map(jnp.asarray, p), C.replace(moe_impl=moe_impl), jnp.asarray(x),
                          jnp.asarray(tokens)))
    q = flat64(p)
    want = np_moe(q, x.reshape(-1, D).astype(np.float64), tokens.reshape(-1), K, 1.5, 10.0).reshape(2, 6, D)
    assert got.shape == (2, 6, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())
    unclamped = np_moe(q, x.reshape(-1, D).astype(np.float64), tokens.reshape(-1), K, 1.5, 0.0).reshape(2, 6, D)
    clamp_active = np.abs(unclamped - want).max() > 1e-3 * np.abs(want).max()
    assert clamp_active == (x_scale > 1)  # the large inputs really exercise the clamp


def test_routing_ids_and_weights():
    p = params(3, False)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20, D)).astype(np.float32)
    ids, w = moe_route(jax.tree.map(jnp.asarray, p), C, jnp.asarray(x))
    assert ids.dtype == jnp.int32 and ids.shape == (20, K) and w.dtype == jnp.float32
    q = flat64(p)
    for t in range(20):
        ids_w, w_w = np_route(q["router"], q["router_bias"], None, x[t].astype(np.float64), None, K, 1.5)
        order = np.argsort(np.asarray(ids[t]))
        np.testing.assert_array_equal(np.asarray(ids[t])[order], np.sort(ids_w))
        np.testing.assert_allclose(np.asarray(w[t])[order], w_w[np.argsort(ids_w)], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.5, rtol=RTOL)  # renormalised x routed_scaling_factor


def test_bias_only_chooses():
    """A huge bias on expert 0 puts it in every token's top-k, yet its weight is its unbiased score's."""
    p = params(5, False)
    p["router_bias"] = np.zeros(E, np.float32)
    p["router_bias"][0] = 100.0
    rng = np.random.default_rng(6)
    x = rng.standard_normal((10, D)).astype(np.float32)
    ids, w = moe_route(jax.tree.map(jnp.asarray, p), C, jnp.asarray(x))
    ids, w = np.asarray(ids), np.asarray(w)
    assert np.all(np.any(ids == 0, axis=-1))
    scores = np.sqrt(np.log1p(np.exp(x.astype(np.float64) @ p["router"].astype(np.float64))))
    for t in range(10):
        chosen = scores[t, ids[t]]
        np.testing.assert_allclose(w[t], chosen / chosen.sum() * 1.5, rtol=RTOL)
    assert np.any(scores[:, 0] < np.sort(scores, -1)[:, -K])  # expert 0 would not have been chosen on merit


def test_hash_routing_reads_the_token_table():
    p = params(7, True)
    assert "router_bias" not in p and p["tid2eid"].dtype == np.int32 and p["tid2eid"].shape == (V, K)
    assert all(len(set(row)) == K for row in p["tid2eid"].tolist())  # distinct experts per token
    assert p["tid2eid"].min() >= 0 and p["tid2eid"].max() < E
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, D)).astype(np.float32)
    tokens = np.array([0, 3, 3, 49, 17], np.int32)
    jp = jax.tree.map(jnp.asarray, p)
    ids, _ = moe_route(jp, C, jnp.asarray(x), jnp.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(ids), p["tid2eid"][tokens])
    # the same token routes to the same experts whatever its hidden state; another table, other experts
    other = {**jp, "tid2eid": jnp.asarray((p["tid2eid"] + 1) % E)}
    assert not np.allclose(np.asarray(ffn(jp, C, jnp.asarray(x), jnp.asarray(tokens))),
                           np.asarray(ffn(other, C, jnp.asarray(x), jnp.asarray(tokens))))
    with pytest.raises(ValueError, match="token ids"):
        ffn(jp, C, jnp.asarray(x))


def test_dense_swiglu_clamp():
    c = get_config("tiny", d_model=D, dense_inter_dim=I, swiglu_limit=2.0)
    p = jax.tree.map(np.asarray, init_ffn(jax.random.key(9), c))
    x = (np.random.default_rng(10).standard_normal((4, D)) * 4).astype(np.float32)
    got = np.asarray(ffn(jax.tree.map(jnp.asarray, p), c, jnp.asarray(x)))
    d = {k: np.asarray(v, np.float64) for k, v in p["dense"].items()}
    want = np.stack([np_expert(d["w1"], d["w3"], d["w2"], xi, 1.0, 2.0) for xi in x.astype(np.float64)])
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())
    off = np.asarray(ffn(jax.tree.map(jnp.asarray, p), c.replace(swiglu_limit=0.0), jnp.asarray(x)))
    assert np.abs(off - got).max() > 1e-2 * np.abs(want).max()  # 0 = no clamp
