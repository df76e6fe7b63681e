"""Config presets (SPEC §8) and validation: every invalid field raises a ValueError naming it."""
from __future__ import annotations

import dataclasses
import re

import jax
import pytest

from fm_jax.config import KIND_CSA, KIND_HCA, KIND_WINDOW, PRESETS, ModelConfig, get_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_are_hashable(name):
    c = get_config(name)
    assert isinstance(c, ModelConfig) and c.name == name
    assert hash(c) == hash(get_config(name))  # static jit argument
    assert len(c.compress_ratios) == c.n_layers
    assert set(c.layer_kinds) <= {KIND_WINDOW, KIND_CSA, KIND_HCA}
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.d_model = 1  # type: ignore[misc]


def test_tiny_preset_matches_spec():
    c = get_config("tiny")
    assert c.d_model == 64 and 4 <= c.n_layers <= 6 and c.window == 16 and c.index_topk == 8
    assert c.page_entries == 8
    assert set(c.layer_kinds) == {KIND_WINDOW, KIND_CSA, KIND_HCA}  # mixes 0 / 4 / hca ratios


def test_small_preset_matches_spec():
    c = get_config("small")
    assert (c.csa_ratio, c.hca_ratio) == (4, 128)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(_abstract_params(c)))
    assert 20e6 <= n_params <= 100e6, n_params


def test_v4_flash_preset_matches_spec():
    c = get_config("v4_flash")
    assert (c.d_model, c.n_heads, c.head_dim, c.rope_dim, c.q_lora_rank) == (4096, 64, 512, 64, 1024)
    assert (c.n_index_heads, c.index_head_dim, c.index_topk, c.window) == (64, 128, 512, 128)
    assert c.vocab_size == 129280
    assert (c.n_routed_experts, c.moe_top_k, c.n_shared_experts, c.moe_inter_dim) == (256, 6, 1, 2048)
    assert c.index_key_bytes == 132  # SPEC §3: 128 fp8 + one fp32 scale
    assert c.page_entries == 64 and c.compress_rope_base == 160000
    kinds = c.layer_kinds
    assert kinds.count(KIND_CSA) == 21 and kinds.count(KIND_HCA) == 20
    # SPEC §9: the official config.json's values
    assert kinds[:2] == (KIND_WINDOW, KIND_WINDOW) and c.compress_ratios[2:4] == (4, 128)
    assert (c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps) == (4, 20, 1e-6, 1e-6)
    assert c.ffn == "moe"  # every layer MoE (no dense FFN layers)
    assert (c.n_hash_layers, c.routed_scaling_factor, c.swiglu_limit) == (3, 1.5, 10.0)
    assert [c.is_hash_layer(i) for i in range(5)] == [True, True, True, False, False]
    assert (c.rope_base, c.compress_rope_base, c.rope_factor, c.rope_original_len) == (10000, 160000, 16, 65536)


def _abstract_params(c):
    from fm_jax.model import init_params
    return jax.eval_shape(lambda k: init_params(c, k), jax.random.key(0))


def test_overrides_and_layer_count_override():
    c = get_config("tiny", window=32, d_model=96)
    assert (c.window, c.d_model) == (32, 96)
    c6 = get_config("tiny", n_layers=6)  # compress_ratios cycles the preset's pattern
    assert c6.compress_ratios == (0, 4, 16, 4, 0, 4)
    assert c.replace(window=8).window == 8


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="huge"):
        get_config("huge")
    with pytest.raises(ValueError, match="`not_a_field`"):
        get_config("tiny", not_a_field=1)


# (field, bad value, extra overrides needed to reach the check)
INVALID = [
    ("vocab_size", 0, {}), ("vocab_size", True, {}), ("d_model", -1, {}), ("d_model", 64.0, {}),
    ("n_layers", 0, {}), ("n_heads", 0, {}), ("head_dim", 0, {}), ("q_lora_rank", 0, {}),
    ("o_groups", 0, {}), ("o_groups", 3, {}), ("o_lora_rank", 0, {}), ("window", 0, {}),
    ("n_index_heads", 0, {}), ("index_head_dim", 0, {}), ("index_head_dim", 24, {}),
    ("index_topk", 0, {}), ("max_seq_len", 0, {}), ("max_seq_len", 4100, {}), ("page_entries", 0, {}),
    ("hc_mult", 0, {}), ("hc_mult", 2.0, {}), ("csa_ratio", 0, {}), ("hca_ratio", 0, {}),
    ("hca_ratio", 4, {}), ("rope_dim", 0, {}), ("rope_dim", 7, {}), ("rope_dim", 32, {}),
    ("rope_dim", 16, {"head_dim": 64}), ("compress_ratios", (0, 4, 8, 4), {}),
    ("compress_ratios", (0, 4, 16), {}), ("rope_factor", 0.5, {}), ("compress_rope_position", "middle", {}),
    ("ffn", "sparse", {}), ("n_routed_experts", 0, {"ffn": "moe"}), ("moe_top_k", 0, {"ffn": "moe"}),
    ("moe_top_k", 5, {"ffn": "moe"}), ("moe_inter_dim", 0, {"ffn": "moe"}),
    ("n_shared_experts", -1, {"ffn": "moe"}), ("dense_inter_dim", 0, {}), ("dtype", "float16", {}),
    ("hc_sinkhorn_iters", 0, {}), ("hc_sinkhorn_iters", 2.0, {}), ("hc_eps", 0.0, {}),
    ("hc_eps", float("nan"), {}), ("n_hash_layers", -1, {"ffn": "moe"}), ("n_hash_layers", 1, {}),
    ("routed_scaling_factor", 0.0, {"ffn": "moe"}), ("swiglu_limit", -1.0, {}),
]

INVALID += [("rope_base", 0.0, {}), ("compress_rope_base", -1.0, {}), ("norm_eps", -1e-6, {}),
            ("rope_original_len", 0, {}), ("beta_fast", 0, {}), ("rope_factor", float("nan"), {})]
# V4 routing / mHC fields (SPEC §9)
INVALID += [("hc_eps", -1e-6, {}), ("routed_scaling_factor", 0.0, {}), ("swiglu_limit", -1.0, {}),
            ("n_hash_layers", -1, {"ffn": "moe"}), ("n_hash_layers", 5, {"ffn": "moe"}), ("n_hash_layers", 1, {})]
# how the routed experts are computed (layers/ffn.py)
INVALID += [("moe_impl", "gather", {"ffn": "moe"}), ("moe_impl", "Sparse", {})]
INVALID += [("topk_impl", "triton", {}), ("topk_impl", "Pallas", {})]


def test_list_compress_ratios_become_a_hashable_tuple():
    c = get_config("tiny", compress_ratios=[0, 4, 16, 4])
    assert c.compress_ratios == (0, 4, 16, 4)
    hash(c)  # a static jit argument


@pytest.mark.parametrize("field,value,extra", INVALID)
def test_invalid_field_raises_naming_it(field, value, extra):
    with pytest.raises(ValueError, match=re.escape(f"`{field}`")):
        get_config("tiny", **{**extra, field: value})
