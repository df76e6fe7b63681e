"""Shared test helpers (not collected: no `test_` prefix).

`random_params(config, seed)` fills the exact pytree of `fm_jax.model.init_params` (structure, shapes and
dtypes from `jax.eval_shape`, so it follows the model as it changes) with numpy random values of the same
statistics as the initialisers. Eager `init_params` compiles one random-number program per distinct
parameter shape (~10 s of CPU for `tiny`); this takes milliseconds and keeps the test suite fast.
Norm weights are `1 + 0.1 N(0, 1)` rather than exactly 1 so that a dropped weight would show; the MoE
router bias is random (so that it changes choices) and hash tables hold distinct random experts per token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax import memory_indexer as mi
from fm_jax.model import init_params


def abstract_params(config):
    return jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "idx", last)))


def random_params(config, seed: int = 0):
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name, shape = _leaf_name(path), tuple(x.shape)
        if name == "tid2eid":  # hash routing table: distinct experts per token
            order = np.argsort(rng.random((shape[0], config.n_routed_experts)), axis=-1)
            return jnp.asarray(order[:, :shape[1]], x.dtype)
        z = rng.standard_normal(shape)
        if name == "embed" or name == "sink":
            v = z
        elif name == "ape":
            v = 0.1 * z
        elif name == "fn":  # hyper-connection mixers [rows, hc*d] (PyTorch layout): mixes of std ~0.3
            v = 0.3 * z * shape[-1] ** -0.5
        elif name == "base":  # hyper-connection biases: logits of std 0.5
            v = 0.5 * z
        elif name == "router_bias":  # shifts the choice of experts, comparable to the score spread
            v = 0.3 * z
        elif len(shape) >= 2:  # dense weights, [.., in, out] layout: N(0, 1 / fan_in)
            v = z * shape[-2] ** -0.5
        else:  # norm weights, hyper-connection `scale`
            v = 1.0 + 0.1 * z
        return jnp.asarray(v.astype(np.float32), x.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract_params(config))


def tree_bytes_equal(a, b) -> bool:
    """Same structure and bit-identical leaves (dtype and shape included)."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


# ---- the ragged generation shared by test_model and test_sharding (same shapes: compiled programs are reused)
B, MAX_LEN, PROMPT = 4, 48, 21
LENGTHS = np.array([5, 13, 21, 16], np.int32)  # 3 not multiples of 4 or 16; one exactly on a boundary
STEPS = MAX_LEN - PROMPT                       # the longest request fills the cache exactly


def sequences(c, seed: int = 0):
    """Tokens [B, MAX_LEN] and the right-padded prompt [B, PROMPT] whose padding is *other* random
    tokens (so a leak of padding into the cache would show)."""
    rng = np.random.default_rng(seed)
    seqs = rng.integers(0, c.vocab_size, size=(B, MAX_LEN)).astype(np.int32)
    prompt = seqs[:, :PROMPT].copy()
    pad = np.arange(PROMPT)[None, :] >= LENGTHS[:, None]
    prompt[pad] = rng.integers(0, c.vocab_size, size=int(pad.sum()))
    return seqs, prompt


def step_tokens(seqs, lengths_now):
    """Token of every request at its next position (clamped for requests at capacity)."""
    return jnp.asarray(seqs[np.arange(B), np.minimum(lengths_now, MAX_LEN - 1)])


# ---- Memory Indexer: small dims; max_seq_len > rope_original_len so that the YaRN ramp is active
SMALL_INDEXER = {"d_model": 48, "q_lora_rank": 24, "n_heads": 4, "head_dim": 16, "rope_dim": 8,
                 "max_seq_len": 131072, "target_layers": (1, 3, 5)}


def small_indexer_config(**kw) -> mi.IndexerConfig:
    return mi.IndexerConfig(**{**SMALL_INDEXER, **kw})


def random_indexer_params(c: mi.IndexerConfig, seed: int = 0) -> dict:
    """Random scorers with a random (non-unit) q_norm weight."""
    params = mi.init_params(c, jax.random.key(seed))
    rng = np.random.default_rng(seed + 100)
    for name in params:
        params[name]["q_norm_weight"] = jnp.asarray(
            rng.uniform(0.5, 1.5, c.q_lora_rank).astype(np.float32)).astype(params[name]["wq_a"].dtype)
    return params


def release_indexer_tensors(layers=(10, 12), d=40, r=24, h=3, hd=128, seed=0):
    """Random tensors under the FlashMemory release's names and PyTorch [out, in] layout."""
    rng = np.random.default_rng(seed)
    t = {}
    for i in layers:
        t[f"retrievers.l{i}.wq_a.weight"] = rng.normal(size=(r, d)).astype(np.float32)
        t[f"retrievers.l{i}.wq_b.weight"] = rng.normal(size=(h * hd, r)).astype(np.float32)
        t[f"retrievers.l{i}.q_norm_weight"] = rng.uniform(0.5, 1.5, r).astype(np.float32)
        t[f"retrievers.l{i}.weights_proj.weight"] = rng.normal(size=(h, d)).astype(np.float32)
    return t
