"""Checkpoint interop (fm_jax.interop): DeepSeek-V4 checkpoints in the reference format (fp8 blocks, fp4
experts, hash-layer tables, mHC tensors, HF naming, shards), their bad-checkpoint errors and the fp8 / fp4
codecs against a NumPy transcription of the format; FlashMemory Memory-Indexer joint checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from fm_jax import interop
from fm_jax.config import get_config
from fm_jax.safetensors_file import SafetensorsFile, write_safetensors
from fm_jax.weight_formats import FP4_TABLE, quantize_fp4, quantize_fp8_blocks
from tests.fm_jax.helpers import random_indexer_params as random_params
from tests.fm_jax.helpers import release_indexer_tensors
from tests.fm_jax.helpers import small_indexer_config as small_config

# ---------------------------------------------------------------------------------------------------
# DeepSeek-V4 checkpoints
# ---------------------------------------------------------------------------------------------------
# tiny dims, but with fp8 tensors spanning several (and partial) 128 x 128 blocks, fp4 rows of 5 blocks,
# mHC with 4 streams and one hash-routed layer
V4_TINY = dict(ffn="moe", hc_mult=4, hc_sinkhorn_iters=20, n_hash_layers=1, routed_scaling_factor=1.5,
               swiglu_limit=10.0, d_model=160, n_heads=8, o_lora_rank=96)


def v4_config(**kw):
    return get_config("tiny", **{**V4_TINY, **kw})


def random_v4_params(c, seed=0):
    """Random leaves of the loader's tree with model-like magnitudes (weights N(0, 1/fan_in)), weight rows
    scaled by random powers of two so that fp8 / fp4 blocks get different scales."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name, parent = path[-1].key, getattr(path[-2], "key", None) if len(path) > 1 else None
        if x.dtype == np.int32:
            return rng.integers(0, c.n_routed_experts, x.shape).astype(np.int32)
        z = rng.standard_normal(x.shape)
        if name in ("embed", "sink"):
            v = z
        elif name in ("ape", "router_bias", "base") or (name == "fn" and parent.startswith("hc")):
            v = 0.1 * z * (x.shape[-1] ** -0.5 if name == "fn" else 1.0)
        elif len(x.shape) >= 2:
            v = z * x.shape[-2] ** -0.5 * 2.0 ** rng.integers(-1, 2, x.shape[:-1] + (1,))
        else:  # norm weights, mHC scales
            v = 1.0 + 0.1 * z
        return v.astype(np.float32).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(fill, interop.v4_param_shapes(c))


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """fp8 e4m3fn bytes -> float64 by the bit layout: sign, 4 exponent bits (bias 7), 3 mantissa bits."""
    c = codes.astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    e, m = (c >> 3) & 0xF, c & 0x7
    mag = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7))
    return sign * mag


def ref_dequant_fp8(q_bytes: np.ndarray, scale_bytes: np.ndarray) -> np.ndarray:
    out = np.empty(q_bytes.shape)
    for i in range(q_bytes.shape[0]):
        for j in range(q_bytes.shape[1]):
            out[i, j] = decode_e4m3(q_bytes[i, j]) * 2.0 ** (int(scale_bytes[i // 128, j // 128]) - 127)
    return out


def ref_dequant_fp4(packed: np.ndarray, scale_bytes: np.ndarray) -> np.ndarray:
    """The reference convert.py: FP4_TABLE[low nibble] is element 2k, FP4_TABLE[high nibble] element 2k+1."""
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    b = packed.view(np.uint8)
    out = np.empty((b.shape[0], 2 * b.shape[1]))
    for i in range(b.shape[0]):
        for k in range(b.shape[1]):
            for j, code in ((2 * k, b[i, k] & 0xF), (2 * k + 1, b[i, k] >> 4)):
                out[i, j] = table[code] * 2.0 ** (int(scale_bytes[i, j // 32]) - 127)
    return out


def test_fp8_and_fp4_dequant_match_numpy_transcription():
    from fm_jax.weight_formats import dequantize_fp4, dequantize_fp8_blocks

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (300, 200)).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x11  # e4m3fn NaN codes are not weights
    scale = rng.integers(110, 140, (3, 2)).astype(np.uint8)
    got = dequantize_fp8_blocks(codes.view(ml_dtypes.float8_e4m3fn), scale.view(ml_dtypes.float8_e8m0fnu))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref_dequant_fp8(codes, scale).astype(np.float32))

    packed = rng.integers(-128, 128, (7, 48)).astype(np.int8)
    s4 = rng.integers(110, 140, (7, 3)).astype(np.uint8)
    got4 = dequantize_fp4(packed, s4.view(ml_dtypes.float8_e8m0fnu))
    np.testing.assert_array_equal(got4, ref_dequant_fp4(packed, s4).astype(np.float32))
    # the writer's code table (ml_dtypes e2m1) agrees with the reference's FP4_TABLE
    np.testing.assert_array_equal(np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32),
                                  FP4_TABLE)


def test_quantisers_are_exact_on_representable_weights():
    """Weights already on the format's grid (each block holding its max code) come back unchanged; others
    land within half a code step, with power-of-two scales."""
    from fm_jax.weight_formats import dequantize_fp4, dequantize_fp8_blocks

    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (200, 300)).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E  # 448 or -448
    w = decode_e4m3(codes)
    for bi in range(2):
        for bj in range(3):
            w[bi * 128, bj * 128] = 448.0
            w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128] *= 2.0 ** rng.integers(-20, 5)
    q, s = quantize_fp8_blocks(w.astype(np.float32))
    assert s.shape == (2, 3) and q.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(dequantize_fp8_blocks(q, s), w.astype(np.float32))

    v = FP4_TABLE[rng.integers(0, 16, (5, 96))].astype(np.float64)
    v[:, ::32] = 6.0
    v *= 2.0 ** rng.integers(-10, 10, (5, 3)).repeat(32, axis=1)
    p, s4 = quantize_fp4(v.astype(np.float32))
    assert p.shape == (5, 48) and p.dtype == np.int8 and s4.shape == (5, 3)
    np.testing.assert_array_equal(dequantize_fp4(p, s4), v.astype(np.float32))

    x = rng.standard_normal((130, 70)).astype(np.float32)
    q, s = quantize_fp8_blocks(x)
    sf = s.astype(np.float32)
    assert np.all(np.log2(sf) == np.round(np.log2(sf)))
    err = np.abs(dequantize_fp8_blocks(q, s) - x)
    assert np.all(err <= np.abs(x) * 2.0 ** -4 + np.repeat(np.repeat(sf, 128, 0), 128, 1)[:130, :70] * 2.0 ** -10)


def torch_layout(c, p) -> dict:
    """Reference name -> PyTorch-layout tensor, written from SPEC §9 / the reference model code."""
    g = lambda x: np.asarray(x, np.float32) if np.asarray(x).dtype != np.int32 else np.asarray(x)
    t = {"embed.weight": g(p["embed"]), "head.weight": g(p["lm_head"]).T, "norm.weight": g(p["final_norm"])}
    for k in ("fn", "base", "scale"):
        t[f"hc_head_{k}"] = g(p["hc_head"][k])
    for i, lp in enumerate(p["layers"]):
        pre = f"layers.{i}."
        t[pre + "attn_norm.weight"], t[pre + "ffn_norm.weight"] = g(lp["attn_norm"]), g(lp["ffn_norm"])
        for site in ("attn", "ffn"):
            for k in ("fn", "base", "scale"):
                t[f"{pre}hc_{site}_{k}"] = g(lp[f"hc_{site}"][k])
        a = lp["attn"]
        for k in ("wq_a", "wq_b", "wkv", "wo_b"):
            t[f"{pre}attn.{k}.weight"] = g(a[k]).T
        t[pre + "attn.q_norm.weight"], t[pre + "attn.kv_norm.weight"] = g(a["q_norm"]), g(a["kv_norm"])
        wo_a = g(a["wo_a"])  # [G, in, r] -> [G * r, in] (reference: wo_a.weight.view(G, r, in))
        t[pre + "attn.wo_a.weight"] = wo_a.transpose(0, 2, 1).reshape(-1, wo_a.shape[1])
        t[pre + "attn.attn_sink"] = g(a["sink"])
        comps = [("attn.compressor.", a.get("compressor"))]
        if "indexer" in a:
            t[pre + "attn.indexer.wq_b.weight"] = g(a["indexer"]["wq_b"]).T
            t[pre + "attn.indexer.weights_proj.weight"] = g(a["indexer"]["weights_proj"]).T
            comps.append(("attn.indexer.compressor.", a["indexer"]["compressor"]))
        for cp, comp in comps:
            if comp is None:
                continue
            wkv, wgate = np.split(g(comp["wkv_gate"]), 2, axis=1)
            t[pre + cp + "wkv.weight"], t[pre + cp + "wgate.weight"] = wkv.T, wgate.T
            t[pre + cp + "ape"], t[pre + cp + "norm.weight"] = g(comp["ape"]), g(comp["norm"])
        f = lp["ffn"]
        t[pre + "ffn.gate.weight"] = g(f["router"]).T
        if "tid2eid" in f:
            t[pre + "ffn.gate.tid2eid"] = g(f["tid2eid"])
        else:
            t[pre + "ffn.gate.bias"] = g(f["router_bias"])
        for w in ("w1", "w2", "w3"):
            for e in range(c.n_routed_experts):
                t[f"{pre}ffn.experts.{e}.{w}.weight"] = g(f["experts"][w][e]).T
            t[f"{pre}ffn.shared_experts.{w}.weight"] = g(f["shared"][w]).T
    return t


def stored_format(name: str) -> str:
    """The on-disk format of a reference tensor (SPEC §9 'Checkpoint dtypes')."""
    if ".experts." in name and ".shared_experts." not in name:
        return "fp4"
    if name.endswith(("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight",
                      "attn.wo_b.weight", "indexer.wq_b.weight")) or ".shared_experts." in name:
        return "fp8"  # (the compressors' wkv / wgate are bf16)
    if name.endswith(("ape", "attn_sink", "gate.bias")) or ".hc_" in name or name.startswith("hc_"):
        return "f32"
    return "i32" if name.endswith("tid2eid") else "bf16"


def qdq(name: str, x: np.ndarray) -> np.ndarray:
    """Quantise-then-dequantise in the checkpoint layout (dequantised by the NumPy transcriptions)."""
    fmt = stored_format(name)
    if fmt == "fp8":
        q, s = quantize_fp8_blocks(x)
        return ref_dequant_fp8(q.view(np.uint8), s.view(np.uint8)).astype(np.float32)
    if fmt == "fp4":
        q, s = quantize_fp4(x)
        return ref_dequant_fp4(q, s.view(np.uint8)).astype(np.float32)
    if fmt == "bf16":
        return x.astype(ml_dtypes.bfloat16).astype(np.float32)
    return x


def read_dir(path) -> dict:
    """All tensors of a checkpoint directory (any sharding) by stored name: (dtype string, array)."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            st = SafetensorsFile(os.path.join(path, f))
            out.update({n: (st.info(n)[0], np.array(st.get(n))) for n in st.names})
    return out


@pytest.fixture(scope="module")
def v4_setup(tmp_path_factory):
    c = v4_config()
    p = random_v4_params(c, seed=3)
    ref = torch_layout(c, p)
    # the expected tensors are computed per tensor, once (the fp4 transcription loops in Python)
    expected = {n: qdq(n, x) for n, x in ref.items()}
    return c, p, ref, expected, tmp_path_factory


def _assert_loaded(c, loaded, expected, dtype):
    shapes = interop.v4_param_shapes(c.replace(dtype=dtype))
    assert jax.tree.structure(loaded) == jax.tree.structure(shapes)
    for a, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(shapes)):
        assert a.shape == s.shape and a.dtype == s.dtype
    got = torch_layout(c, loaded)
    assert got.keys() == expected.keys()
    for n, want in expected.items():
        np.testing.assert_array_equal(got[n], want, err_msg=n)


@pytest.mark.parametrize("hf_names,shard_bytes,dtype", [(False, None, None), (True, None, None),
                                                        (False, 150_000, "bfloat16"), (True, 150_000, None)])
def test_v4_checkpoint_loads_exact_dequantised_params(v4_setup, hf_names, shard_bytes, dtype):
    c, p, ref, expected, tmp = v4_setup
    path = tmp.mktemp("v4")
    interop.save_deepseek_v4(path, c, p, hf_names=hf_names, max_shard_bytes=shard_bytes)
    files = sorted(os.listdir(path))
    if shard_bytes:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 3
    else:
        assert files == ["config.json", "model.safetensors"]
    # the reference's names and dtypes on disk
    stored = read_dir(path)
    prefix, scale_suffix = ("model.", ".weight_scale_inv") if hf_names else ("", ".scale")
    disk = {"fp8": "F8_E4M3", "fp4": "I8", "bf16": "BF16", "f32": "F32", "i32": "I32"}
    names = set()
    for n in ref:
        fmt = stored_format(n)
        assert stored[prefix + n][0] == disk[fmt], n
        names.add(prefix + n)
        if fmt in ("fp8", "fp4"):
            scale = prefix + n[: -len(".weight")] + scale_suffix
            assert stored[scale][0] == "F8_E8M0", scale
            names.add(scale)
    assert names == set(stored)
    config, loaded = interop.load_deepseek_v4(path, dtype=dtype)
    assert config == (c if dtype is None else c.replace(dtype=dtype))
    _assert_loaded(c, loaded, expected, config.dtype)


def test_v4_unquantised_checkpoint_is_the_reference_layout(tmp_path):
    """quantize=False: every tensor on disk equals the test's own transcription of the reference layout,
    and loading returns the params bit for bit (so neither direction can hide a layout error)."""
    c = v4_config(n_hash_layers=2)
    p = random_v4_params(c, seed=4)
    interop.save_deepseek_v4(tmp_path, c, p, quantize=False)
    stored, ref = read_dir(tmp_path), torch_layout(c, p)
    assert set(stored) == set(ref)
    for n, x in ref.items():
        np.testing.assert_array_equal(stored[n][1], x, err_msg=n)
    config, loaded = interop.load_deepseek_v4(tmp_path)
    assert config == c
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(p)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), b)


def test_v4_ape_half_order(tmp_path):
    c = v4_config()
    p = random_v4_params(c, seed=5)
    interop.save_deepseek_v4(tmp_path, c, p, quantize=False)
    _, default = interop.load_deepseek_v4(tmp_path)
    _, swapped = interop.load_deepseek_v4(tmp_path, ape_halves="current_first")
    csa = c.csa_layers[0]
    ape = np.asarray(p["layers"][csa]["attn"]["compressor"]["ape"])  # [4, 2 * head_dim]
    np.testing.assert_array_equal(np.asarray(default["layers"][csa]["attn"]["compressor"]["ape"]), ape)
    half = ape.shape[1] // 2
    np.testing.assert_array_equal(np.asarray(swapped["layers"][csa]["attn"]["compressor"]["ape"]),
                                  np.concatenate([ape[:, half:], ape[:, :half]], axis=1))
    hca = c.compress_ratios.index(c.hca_ratio)  # no overlap: no halves to order
    np.testing.assert_array_equal(np.asarray(swapped["layers"][hca]["attn"]["compressor"]["ape"]),
                                  np.asarray(p["layers"][hca]["attn"]["compressor"]["ape"]))


def test_v4_mtp_layer_is_skipped(tmp_path):
    c = v4_config()
    p = random_v4_params(c, seed=6)
    interop.save_deepseek_v4(tmp_path, c, p, quantize=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["compress_ratios"].append(0)
    cfg["num_nextn_predict_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    n = c.n_layers
    _rewrite(tmp_path, add={f"layers.{n}.attn_norm.weight": np.ones(c.d_model, np.float32),
                            "mtp.0.e_proj.weight": np.ones((c.d_model, c.d_model), np.float32)})
    config, loaded = interop.load_deepseek_v4(tmp_path)
    assert config == c and len(loaded["layers"]) == n
    _rewrite(tmp_path, add={f"layers.{n + 1}.attn_norm.weight": np.ones(c.d_model, np.float32)})
    with pytest.raises(ValueError, match=rf"unexpected tensors.*layers\.{n + 1}\.attn_norm\.weight"):
        interop.load_deepseek_v4(tmp_path)


def test_v4_load_onto_mesh(tmp_path):
    from jax.sharding import NamedSharding

    from fm_jax.sharding import make_mesh, param_spec

    c = v4_config()
    p = random_v4_params(c, seed=7)
    interop.save_deepseek_v4(tmp_path, c, p)
    mesh = make_mesh(2, 4)
    _, host = interop.load_deepseek_v4(tmp_path)
    _, placed = interop.load_deepseek_v4(tmp_path, mesh=mesh)
    flat, _ = jax.tree_util.tree_flatten_with_path(placed)
    split = 0
    for (kp, a), b in zip(flat, jax.tree.leaves(host)):
        names = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in kp)
        want = NamedSharding(mesh, param_spec(names, a.shape, c, mesh))
        assert a.sharding.is_equivalent_to(want, a.ndim), names
        split += any(s is not None for s in want.spec)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert split > 10  # heads, experts, vocabulary really split over "model"


def test_v4_config_json_of_the_release():
    """The official V4-Flash config.json (V4-REFERENCE §1) -> the v4_flash dims, read from the file."""
    ratios = [0, 0] + [4, 128] * 20 + [4, 0]
    raw = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "hidden_size": 4096,
           "num_hidden_layers": 43, "num_nextn_predict_layers": 1, "num_attention_heads": 64,
           "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8,
           "o_lora_rank": 1024, "sliding_window": 128, "index_n_heads": 64, "index_head_dim": 128,
           "index_topk": 512, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 6,
           "moe_intermediate_size": 2048, "num_hash_layers": 3, "scoring_func": "sqrtsoftplus",
           "routed_scaling_factor": 1.5, "norm_topk_prob": True, "topk_method": "noaux_tc", "swiglu_limit": 10.0,
           "hidden_act": "silu", "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-06, "rms_norm_eps": 1e-06,
           "rope_theta": 10000, "compress_rope_theta": 160000,
           "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                            "beta_fast": 32, "beta_slow": 1},
           "max_position_embeddings": 1048576, "vocab_size": 129280, "bos_token_id": 0, "eos_token_id": 1,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "compress_ratios": ratios,
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                   "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    assert len(ratios) == 44
    c, fmt = interop.config_from_v4_json(raw)
    flash = get_config("v4_flash")
    same = ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "rope_dim", "q_lora_rank", "o_groups",
            "o_lora_rank", "window", "compress_ratios", "csa_ratio", "hca_ratio", "n_index_heads",
            "index_head_dim", "index_topk", "n_routed_experts", "n_shared_experts", "moe_top_k", "moe_inter_dim",
            "hc_mult", "dtype", "ffn", "rope_factor", "rope_original_len", "max_seq_len")
    for f in same:
        assert getattr(c, f) == getattr(flash, f), f
    assert c.name == "v4_flash" and fmt == {"block": (128, 128), "n_mtp": 1}
    assert (c.rope_base, c.compress_rope_base, c.beta_fast, c.beta_slow) == (10000.0, 160000.0, 32, 1)
    assert (c.routed_scaling_factor, c.n_hash_layers, c.swiglu_limit) == (1.5, 3, 10.0)
    assert (c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps) == (20, 1e-6, 1e-6)
    # the reference inference config's names map to the same config
    inference = {"vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3,
                 "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 6,
                 "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024,
                 "head_dim": 512, "rope_head_dim": 64, "o_groups": 8, "o_lora_rank": 1024, "window_size": 128,
                 "original_seq_len": 65536, "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32,
                 "beta_slow": 1, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4,
                 "hc_sinkhorn_iters": 20, "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4",
                 "compress_rope_theta": 160000, "compress_ratios": ratios}
    c2, fmt2 = interop.config_from_v4_json(inference)
    assert c2 == c and fmt2 == fmt


# ---- bad checkpoints: one test per kind of damage, each naming the tensor (and its file)
def _rewrite(path, add=None, drop=(), replace=None, file="model.safetensors"):
    st = SafetensorsFile(os.path.join(path, file))
    tensors = {n: np.array(st.get(n)) for n in st.names if n not in drop}
    tensors.update(replace or {})
    tensors.update(add or {})
    del st
    write_safetensors(os.path.join(path, file), tensors)


@pytest.fixture(scope="module")
def v4_good(tmp_path_factory):
    c = v4_config()
    path = tmp_path_factory.mktemp("good")
    interop.save_deepseek_v4(path, c, random_v4_params(c, seed=8))
    return c, path


@pytest.fixture
def v4_copy(v4_good, tmp_path):
    c, good = v4_good
    shutil.copytree(good, tmp_path / "ck")
    return c, tmp_path / "ck"


def test_v4_missing_tensor(v4_copy):
    c, path = v4_copy
    _rewrite(path, drop=["layers.2.ffn.experts.3.w2.weight"])
    with pytest.raises(ValueError, match=r"missing tensor 'layers\.2\.ffn\.experts\.3\.w2\.weight'"):
        interop.load_deepseek_v4(path)


def test_v4_missing_scale(v4_copy):
    c, path = v4_copy
    _rewrite(path, drop=["layers.1.attn.wo_a.scale"])
    with pytest.raises(ValueError, match=r"missing tensor 'layers\.1\.attn\.wo_a\.scale'.*wo_a\.weight"):
        interop.load_deepseek_v4(path)


def test_v4_unexpected_tensor(v4_copy):
    c, path = v4_copy
    _rewrite(path, add={"layers.0.attn.extra.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensors: tensor 'layers\.0\.attn\.extra\.weight' in .*"
                                         r"model\.safetensors"):
        interop.load_deepseek_v4(path)


def test_v4_wrong_shape(v4_copy):
    c, path = v4_copy
    _rewrite(path, replace={"layers.3.attn.kv_norm.weight": np.ones(c.head_dim + 1, ml_dtypes.bfloat16)})
    with pytest.raises(ValueError, match=r"'layers\.3\.attn\.kv_norm\.weight' in .*model\.safetensors.* has shape "
                                         rf"\({c.head_dim + 1},\), expected \({c.head_dim},\)"):
        interop.load_deepseek_v4(path)
    _rewrite(path, replace={"layers.3.attn.kv_norm.weight": np.ones(c.head_dim, ml_dtypes.bfloat16),
                            "layers.3.attn.wq_a.scale": np.ones((1, 1), ml_dtypes.float8_e8m0fnu)})
    with pytest.raises(ValueError, match=r"'layers\.3\.attn\.wq_a\.scale'.*expected .* shape \(1, 2\)"):
        interop.load_deepseek_v4(path)


def test_v4_unknown_and_unsupported_dtypes(v4_copy):
    c, path = v4_copy
    _rewrite(path, replace={"norm.weight": np.ones(c.d_model, np.int16)})
    with pytest.raises(ValueError, match=r"'norm\.weight' in .* has dtype I16"):
        interop.load_deepseek_v4(path)
    # a dtype name safetensors does not define: patch the header in place
    _rewrite(path, replace={"norm.weight": np.ones(c.d_model, np.float32)})
    f = path / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["norm.weight"]["dtype"] = "F4_E9"
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    f.write_bytes(raw[:8] + new + raw[8 + n:])
    with pytest.raises(ValueError, match=r"'norm\.weight' in .*model\.safetensors.* unknown dtype 'F4_E9'"):
        interop.load_deepseek_v4(path)


def test_v4_truncated_file(v4_copy):
    c, path = v4_copy
    f = path / "model.safetensors"
    raw = f.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])  # the tensor that loses its tail
    f.write_bytes(raw[:-1])
    with pytest.raises(ValueError, match=rf"'{last}' in .*model\.safetensors.* truncated"):
        interop.load_deepseek_v4(path)
    f.write_bytes(f.read_bytes()[:5])
    with pytest.raises(ValueError, match=r"model\.safetensors.* truncated"):
        interop.load_deepseek_v4(path)


def test_v4_bad_values(v4_copy):
    c, path = v4_copy
    _rewrite(path, replace={"layers.0.ffn.gate.tid2eid": np.full((c.vocab_size, c.moe_top_k), c.n_routed_experts,
                                                                np.int32)})
    with pytest.raises(ValueError, match=r"'layers\.0\.ffn\.gate\.tid2eid'.*ids must lie in \[0, n_routed_experts=4\)"):
        interop.load_deepseek_v4(path)
    _rewrite(path, replace={"layers.0.ffn.gate.tid2eid": np.zeros((c.vocab_size, c.moe_top_k), np.int64),
                            "layers.0.attn.wq_b.scale": np.full((2, 1), 255, np.uint8).view(ml_dtypes.float8_e8m0fnu)})
    with pytest.raises(ValueError, match=r"'layers\.0\.attn\.wq_b\.scale' in .*model\.safetensors.*NaN"):
        interop.load_deepseek_v4(path)


def test_v4_bad_config_and_index(v4_copy):
    c, path = v4_copy
    cfg_file = path / "config.json"
    good = json.loads(cfg_file.read_text())
    for change, pattern in ((lambda r: r.pop("compress_rope_theta"), "missing `compress_rope_theta`"),
                            (lambda r: r.update(scoring_func="softmax"), "`scoring_func`='softmax' is not supported"),
                            (lambda r: r.update(head_dim=32.5), "`head_dim` must be an int"),
                            (lambda r: r.update(compress_ratios=[0, 4]), "`compress_ratios`"),
                            (lambda r: r.update(compress_ratios=[0, 4, 16, 8]), r"mixes ratios \[8, 16\]")):
        raw = json.loads(json.dumps(good))
        change(raw)
        cfg_file.write_text(json.dumps(raw))
        with pytest.raises(ValueError, match=pattern):
            interop.load_deepseek_v4(path)
    cfg_file.write_text(json.dumps(good))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"norm.weight": "gone.safetensors"}}))
    with pytest.raises(ValueError, match="gone.safetensors"):
        interop.load_deepseek_v4(path)
    with pytest.raises(ValueError, match=r"cannot read .*nowhere.*config\.json"):
        interop.load_deepseek_v4(path / "nowhere")
    os.remove(path / "model.safetensors.index.json")
    os.remove(path / "model.safetensors")
    with pytest.raises(ValueError, match="holds neither model.safetensors nor model.safetensors.index.json"):
        interop.load_deepseek_v4(path)


def test_v4_save_rejects_params_it_cannot_write(tmp_path):
    c = v4_config()
    p = random_v4_params(c)
    p["layers"][1]["ffn"]["dense"] = {"w1": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match=r"params\['layers'\]\[1\]\['ffn'\]\['dense'\]\['w1'\] has no place"):
        interop.save_deepseek_v4(tmp_path / "a", c, p)
    p = random_v4_params(c)
    del p["layers"][2]["ffn"]["router_bias"]
    with pytest.raises(ValueError, match=r"params have no params\['layers'\]\[2\]\['ffn'\]\['router_bias'\]"):
        interop.save_deepseek_v4(tmp_path / "b", c, p)
    with pytest.raises(ValueError, match="MoE"):
        interop.save_deepseek_v4(tmp_path / "c", get_config("tiny"), p)
    interop.save_deepseek_v4(tmp_path / "d", c, random_v4_params(c))
    with pytest.raises(ValueError, match="already holds"):
        interop.save_deepseek_v4(tmp_path / "d", c, random_v4_params(c))


# ---- integration with the model (needs the V4 model tree: dynamic mHC, V4 routing)
def test_v4_tree_is_the_model_tree():
    """The loader's tree has exactly the structure and shapes of `fm_jax.model.init_params`."""
    from tests.fm_jax.helpers import abstract_params

    c = v4_config()
    want, got = abstract_params(c), interop.v4_param_shapes(c)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == b.shape


def test_v4_checkpoint_runs_prefill_and_decode(v4_good):
    """A synthetic V4-format checkpoint loads through the documented call and runs prefill + decode,
    matching the uncached forward pass."""
    from fm_jax import model

    c, path = v4_good
    config, params = interop.load_deepseek_v4(path)
    rng = np.random.default_rng(9)
    seq = rng.integers(0, c.vocab_size, (2, 24)).astype(np.int32)
    full = np.asarray(model.forward(params, config, jax.numpy.asarray(seq)))
    assert np.all(np.isfinite(full)) and np.abs(full).max() > 0
    tol = 1e-4 * np.abs(full).max()  # float32, as test_model's prefill / decode checks
    logits, cache = model.prefill(params, config, jax.numpy.asarray(seq[:, :20]), max_len=24)
    assert np.abs(np.asarray(logits) - full[:, :20]).max() <= tol
    for t in range(20, 24):
        step, cache = model.decode_step(params, config, cache, jax.numpy.asarray(seq[:, t]))
        assert np.abs(np.asarray(step) - full[:, t]).max() <= tol


# ---------------------------------------------------------------------------------------------------
# FlashMemory Memory-Indexer joint checkpoints (moved here with the functions from memory_indexer)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_flashmemory_checkpoint_round_trip_bit_exact(tmp_path, param_dtype):
    from safetensors import safe_open

    c = small_config(param_dtype=param_dtype, rope_dtype="float32", threshold=0.25, ensemble="mean")
    params = random_params(c, seed=11)
    path = tmp_path / "fm.safetensors"
    interop.save_flashmemory_checkpoint(path, c, params)
    # PyTorch [out, in] layout under the release's key names
    with safe_open(str(path), framework="numpy") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert shapes["retrievers.l3.wq_a.weight"] == (c.q_lora_rank, c.d_model)
    assert shapes["retrievers.l3.wq_b.weight"] == (c.n_heads * c.head_dim, c.q_lora_rank)
    assert shapes["retrievers.l3.q_norm_weight"] == (c.q_lora_rank,)
    assert shapes["retrievers.l3.weights_proj.weight"] == (c.n_heads, c.d_model)
    assert len(shapes) == 4 * len(c.target_layers)
    c2, p2 = interop.load_flashmemory_checkpoint(path)
    assert c2 == c
    for name in params:
        for k, v in params[name].items():
            assert p2[name][k].dtype == v.dtype and p2[name][k].shape == v.shape
            np.testing.assert_array_equal(np.asarray(p2[name][k]).view(np.uint8), np.asarray(v).view(np.uint8))
    c3, p3 = interop.load_flashmemory_checkpoint(path, layers=["l5", 1])
    assert c3.target_layers == (5, 1) and list(p3) == ["l5", "l1"]


def _write_release_style(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


def test_flashmemory_load_release_style_file_without_metadata(tmp_path):
    t = release_indexer_tensors()
    _write_release_style(tmp_path / "r.safetensors", t)
    c, p = interop.load_flashmemory_checkpoint(tmp_path / "r.safetensors")
    assert (c.d_model, c.q_lora_rank, c.n_heads, c.head_dim, c.target_layers) == (40, 24, 3, 128, (10, 12))
    assert (c.rope_dim, c.rope_base, c.max_seq_len, c.rope_dtype) == (64, 160000.0, 1048576, "bfloat16")
    np.testing.assert_array_equal(np.asarray(p["l12"]["wq_b"]), t["retrievers.l12.wq_b.weight"].T)
    np.testing.assert_array_equal(np.asarray(p["l10"]["weights_proj"]), t["retrievers.l10.weights_proj.weight"].T)
    # head_dim from metadata
    t64 = release_indexer_tensors(layers=(10,), hd=64, h=4)
    _write_release_style(tmp_path / "m.safetensors", t64, metadata={"head_dim": "64"})
    c64, _ = interop.load_flashmemory_checkpoint(tmp_path / "m.safetensors")
    assert (c64.head_dim, c64.n_heads) == (64, 4)


def test_flashmemory_bad_checkpoints(tmp_path, monkeypatch):
    good = release_indexer_tensors()
    p = tmp_path / "a.safetensors"
    _write_release_style(p, good)
    with pytest.raises(ValueError, match=r"'l11'"):  # missing layer
        interop.load_flashmemory_checkpoint(p, layers=[10, 11])

    t = dict(good)
    del t["retrievers.l12.q_norm_weight"]
    _write_release_style(p, t)
    with pytest.raises(ValueError, match=r"retrievers\.l12\.q_norm_weight"):  # missing tensor
        interop.load_flashmemory_checkpoint(p)

    t = dict(good)
    t["retrievers.l12.weights_proj.weight"] = t["retrievers.l12.weights_proj.weight"][:, :-1]
    _write_release_style(p, t)
    with pytest.raises(ValueError, match=r"retrievers\.l12\.weights_proj\.weight"):  # misshaped
        interop.load_flashmemory_checkpoint(p)

    t = dict(good)
    t["retrievers.l10.wq_b.weight"] = t["retrievers.l10.wq_b.weight"][:-3]
    _write_release_style(p, t)
    with pytest.raises(ValueError, match=r"retrievers\.l10\.wq_b\.weight.*head_dim"):  # rows % head_dim
        interop.load_flashmemory_checkpoint(p)

    t = {k.replace("retrievers.", "retriever."): v for k, v in good.items()}
    _write_release_style(p, t)
    with pytest.raises(ValueError, match="retrievers"):  # wrong key prefix
        interop.load_flashmemory_checkpoint(p)

    t = {k.replace("wq_a.weight", "wq_a.weights"): v for k, v in good.items()}
    _write_release_style(p, t)
    with pytest.raises(ValueError, match=r"retrievers\.l10\.wq_a\.weight"):  # misnamed tensor
        interop.load_flashmemory_checkpoint(p)

    t = {k.replace("retrievers.l12", "retrievers.layer12"): v for k, v in good.items()}
    _write_release_style(p, t)
    with pytest.raises(ValueError, match="layer12"):
        interop.load_flashmemory_checkpoint(p)

    with pytest.raises(ValueError, match="extension"):
        interop.load_flashmemory_checkpoint(tmp_path / "a.npz")
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not importable -> .pt refused clearly
    with pytest.raises(ImportError, match="torch"):
        interop.load_flashmemory_checkpoint(tmp_path / "a.pt")


def test_flashmemory_save_rejects_bad_params(tmp_path):
    c = small_config()
    params = random_params(c)
    with pytest.raises(ValueError, match="'l5'"):
        interop.save_flashmemory_checkpoint(tmp_path / "x.safetensors", c, {k: params[k] for k in ("l1", "l3")})
    params["l3"]["wq_b"] = params["l3"]["wq_b"][:, :-1]
    with pytest.raises(ValueError, match="wq_b"):
        interop.save_flashmemory_checkpoint(tmp_path / "x.safetensors", c, params)
    with pytest.raises(ValueError, match="safetensors"):
        interop.save_flashmemory_checkpoint(tmp_path / "x.pt", c, random_params(c))



def test_flashmemory_metadata_config_survives_release_loader_view(tmp_path):
    """Our metadata is plain strings; the config JSON round-trips through it."""
    from safetensors import safe_open

    c = small_config(rope_dtype="float32", max_seq_len=65536)
    interop.save_flashmemory_checkpoint(tmp_path / "m.safetensors", c, random_params(c))
    with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
        meta = f.metadata()
    assert meta["head_dim"] == str(c.head_dim)
    assert json.loads(meta["fm_jax.indexer_config"])["max_seq_len"] == 65536
