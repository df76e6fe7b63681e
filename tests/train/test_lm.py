"""train.lm: the training forward is the inference backbone's function; the indexer KL loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_jax import backbone
from fm_jax.config import get_config
from fm_jax.model import init_params
from train import lm

_fwd = jax.jit(lm.forward_train, static_argnums=(1, 3, 4))
_ref = jax.jit(lambda p, c, t: backbone.run_sequence(p, c, t, impl="xla")[0], static_argnums=1)


def _setup(seed=0, t=83, **over):
    c = get_config("tiny", **over)
    params = init_params(c, jax.random.PRNGKey(seed))
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (2, t), 0, c.vocab_size)
    return c, params, tokens


@pytest.mark.parametrize("over", [{}, {"hc_mult": 4, "ffn": "moe", "n_hash_layers": 1}])
def test_sparse_forward_matches_backbone(over):
    """Stage 'sparse' computes what inference computes: same logits as backbone.run_sequence (float32)."""
    c, params, tokens = _setup(t=83, **over)  # ragged: 83 is not a multiple of the window or the ratios
    ref = _ref(params, c, tokens)
    got, auxes = _fwd(params, c, tokens, "sparse", False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
    assert any("kl" in a for a in auxes)


def test_dense_stage_is_sparse_with_unbounded_topk():
    c, params, tokens = _setup(t=70)
    dense, _ = _fwd(params, c, tokens, "dense", False)
    big = c.replace(index_topk=1024)
    sparse, _ = _fwd(params, big, tokens, "sparse", False)
    np.testing.assert_allclose(np.asarray(dense), np.asarray(sparse), rtol=1e-6, atol=1e-6)
    small, _ = _fwd(params, c, tokens, "sparse", False)
    assert not np.allclose(np.asarray(dense), np.asarray(small), atol=1e-3)  # top-k really restricts


def test_traced_stage_flag_matches_the_named_stages():
    """pretrain passes the stage as a traced bool (one compilation for both stages): same logits."""
    c, params, tokens = _setup(t=70)
    flag = jax.jit(lambda p, t, s: lm.forward_train(p, c, t, s, False)[0])
    for name, value in (("dense", False), ("sparse", True)):
        want, _ = _fwd(params, c, tokens, name, False)
        np.testing.assert_array_equal(np.asarray(flag(params, tokens, jnp.asarray(value))), np.asarray(want))


def test_window_logits_mask_matches_definition():
    rng = np.random.default_rng(0)
    b, t, h, d, w = 1, 37, 2, 8, 8
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    logits, valid, _ = lm.window_logits(q, kv, w, 1.0)
    pos = (np.arange(t)[:, None] // w - 1) * w + np.arange(2 * w)[None, :]
    for ti in range(t):
        seen = sorted(int(p) for p, v in zip(pos[ti], np.asarray(valid[ti])) if v)
        assert seen == list(range(max(0, ti - w + 1), ti + 1))
        for k in np.nonzero(np.asarray(valid[ti]))[0]:
            want = float(np.dot(np.asarray(q[0, ti, 0]), np.asarray(kv[0, pos[ti, k]])))
            assert abs(float(logits[0, ti, 0, k]) - want) < 1e-4


def test_indexer_kl_zero_iff_distributions_match():
    rng = np.random.default_rng(1)
    b, t, h, n = 2, 5, 3, 7
    ilog = jnp.asarray(rng.standard_normal((b, t, n)), jnp.float32)
    cand = jnp.asarray(rng.random((b, t, n)) < 0.7).at[:, :, 0].set(True)
    target = jax.nn.softmax(jnp.where(cand, ilog, -jnp.inf), axis=-1)  # [B, T, N]
    split = jax.nn.softmax(jnp.asarray(rng.standard_normal((b, t, h, 1)), jnp.float32), axis=2)
    probs = target[:, :, None, :] * split * 0.37  # any head split and any overall mass: renormalised
    assert abs(float(lm.indexer_kl(probs, ilog, cand))) < 1e-6
    other = jnp.asarray(rng.random((b, t, h, n)), jnp.float32)
    assert float(lm.indexer_kl(other, ilog, cand)) > 1e-3
    # no candidate anywhere: no contribution, no NaN
    assert float(lm.indexer_kl(other, ilog, jnp.zeros_like(cand))) == 0.0


def test_kl_gradient_reaches_only_the_indexer():
    c, params, tokens = _setup(t=48)

    def kl_only(p):
        _, auxes = lm.forward_train(p, c, tokens, "dense", remat=True)
        return sum(a["kl"] for a in auxes if "kl" in a)

    g = jax.jit(jax.grad(kl_only))(params)
    for layer, lg in enumerate(g["layers"]):
        for name, sub in lg["attn"].items():
            norm = float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(sub)))
            if name == "indexer":
                assert norm > 0 or c.layer_kind(layer) != "csa"
            else:
                assert norm == 0.0, (layer, name)
    assert float(jnp.sum(jnp.abs(g["embed"]))) == 0.0


def test_first_hit_reads_each_rows_first_masked_position():
    rng = np.random.default_rng(0)
    b, t, v = 3, 7, 5
    logits = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)
    pred = np.asarray(logits.argmax(-1))
    tokens = rng.integers(0, v, (b, t))
    mask = np.zeros((b, t), np.float32)
    mask[0, 2:5] = 1          # row 0: first masked position 2 predicts tokens[0, 3]; make it right
    tokens[0, 3] = pred[0, 2]
    tokens[0, 4] = (pred[0, 3] + 1) % v  # a later miss does not count
    mask[1, 4:6] = 1          # row 1: first masked position 4, wrong
    tokens[1, 5] = (pred[1, 4] + 1) % v
    tokens[1, 6] = pred[1, 5]
    hit = np.asarray(lm.first_hit(logits, jnp.asarray(tokens), jnp.asarray(mask)))  # row 2: nothing masked
    np.testing.assert_array_equal(hit, [1.0, 0.0, -1.0])


def test_prompt_loss_averages_the_prompt_positions_only():
    rng = np.random.default_rng(1)
    b, t, v = 2, 9, 6
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    tokens = rng.integers(1, v, (b, t))
    tokens[1, 7:] = 0                      # row 1 right-padded: positions 6, 7 predict PAD
    mask = np.zeros((b, t), np.float32)
    mask[:, 4:6] = 1                       # positions 4, 5 predict the answer
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [-logp[r, i, tokens[r, i + 1]] for r in range(b) for i in range(t - 1)
            if mask[r, i] == 0 and tokens[r, i + 1] != 0]
    loss = lambda lg: float(lm.prompt_loss(lm.next_token_nll(jnp.asarray(lg), jnp.asarray(tokens)),
                                           jnp.asarray(tokens), jnp.asarray(mask)))
    got = loss(logits)
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
    # the answer's and the padding's logits do not enter it
    logits[:, 4:6] += rng.normal(size=(b, 2, v)).astype(np.float32) * 5
    logits[1, 6:] += 7.0 * rng.normal(size=(3, v)).astype(np.float32)
    again = loss(logits)
    np.testing.assert_allclose(again, got, rtol=1e-6)
