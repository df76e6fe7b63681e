"""Checkpoint interop with the reference formats: DeepSeek-V4 model checkpoints (SPEC §9) and FlashMemory
Memory-Indexer joint checkpoints (SPEC §4).

* :func:`load_deepseek_v4` / :func:`save_deepseek_v4`: a directory with ``config.json`` and
  ``model.safetensors`` (or shards listed by ``model.safetensors.index.json``) in the reference's naming
  and dtypes <-> ``(ModelConfig, params)`` in this project's parameter tree.
  :func:`config_from_v4_json` / :func:`config_to_v4_json` map ``config.json``; :func:`v4_param_shapes` is
  the loaded tree (shapes and dtypes).
* :func:`load_flashmemory_checkpoint` / :func:`save_flashmemory_checkpoint`: the FlashMemory release's
  ``retrievers.l{ID}.*`` file <-> ``(IndexerConfig, params)`` of :mod:`fm_jax.memory_indexer`.

PyTorch stores linear weights ``[out, in]``; this project ``[in, out]`` (``y = x @ w``), so weights are
transposed on the way in and out. The quantised formats are in :mod:`fm_jax.weight_formats`, the file
format in :mod:`fm_jax.safetensors_file`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fm_jax.config import KIND_CSA, KIND_WINDOW, ModelConfig, get_config
from fm_jax.memory_indexer import IndexerConfig, check_field_names, check_layer_params
from fm_jax.safetensors_file import SafetensorsFile, write_safetensors
from fm_jax.weight_formats import (
    FP8_BLOCK,
    dequantize_fp4,
    dequantize_fp8_blocks,
    fp4_shapes,
    fp8_scale_shape,
    quantize_fp4,
    quantize_fp8_blocks,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
APE_HALVES = ("overlap_first", "current_first")


# ====================================================================================================
# DeepSeek-V4: config.json <-> ModelConfig
# ====================================================================================================
# ModelConfig field <- config.json names (HF's first, then the reference inference config's)
_REQUIRED = {
    "vocab_size": ("vocab_size",), "d_model": ("hidden_size", "dim"), "n_layers": ("num_hidden_layers", "n_layers"),
    "n_heads": ("num_attention_heads", "n_heads"), "head_dim": ("head_dim",),
    "rope_dim": ("qk_rope_head_dim", "rope_head_dim"), "q_lora_rank": ("q_lora_rank",), "o_groups": ("o_groups",),
    "o_lora_rank": ("o_lora_rank",), "window": ("sliding_window", "window_size"),
    "n_index_heads": ("index_n_heads",), "index_head_dim": ("index_head_dim",), "index_topk": ("index_topk",),
    "n_routed_experts": ("n_routed_experts",), "n_shared_experts": ("n_shared_experts",),
    "moe_top_k": ("num_experts_per_tok", "n_activated_experts"),
    "moe_inter_dim": ("moe_intermediate_size", "moe_inter_dim"), "hc_mult": ("hc_mult",),
    "rope_base": ("rope_theta",), "compress_rope_base": ("compress_rope_theta",),
}
# optional ones, defaulting to the reference ModelArgs' values
_OPTIONAL = {
    "norm_eps": (("rms_norm_eps", "norm_eps"), 1e-6), "hc_eps": (("hc_eps",), 1e-6),
    "hc_sinkhorn_iters": (("hc_sinkhorn_iters",), 20),
    "routed_scaling_factor": (("routed_scaling_factor", "route_scale"), 1.0),
    "n_hash_layers": (("num_hash_layers", "n_hash_layers"), 0), "swiglu_limit": (("swiglu_limit",), 0.0),
}
_FLOAT_FIELDS = {"rope_base", "compress_rope_base", "norm_eps", "hc_eps", "routed_scaling_factor", "swiglu_limit",
                 "rope_factor", "beta_fast", "beta_slow"}
# config.json fields this project implements only at one value: (names, allowed values)
_FIXED = [(("num_key_value_heads",), (1,)), (("scoring_func", "score_func"), ("sqrtsoftplus",)),
          (("hidden_act",), ("silu",)), (("tie_word_embeddings",), (False,)), (("norm_topk_prob",), (True,)),
          (("topk_method",), ("noaux_tc",)), (("first_k_dense_replace",), (0,))]
CSA_RATIO = 4  # the reference: overlapping windows and a Lightning Indexer exactly where the ratio is 4


def _lookup(raw: dict, names: tuple):
    for n in names:
        if n in raw:
            return n, raw[n]
    return None, None


def _typed(field: str, key: str, v):
    if field in _FLOAT_FIELDS:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"config.json `{key}` must be a number, got {v!r}")
        return float(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"config.json `{key}` must be an int, got {v!r}")
    return v


def _split_ratios(ratios: tuple) -> int:
    """hca_ratio: the one non-zero ratio other than 4 (128 when every compressed layer is CSA)."""
    other = sorted({r for r in ratios if r not in (0, CSA_RATIO)})
    if len(other) > 1:
        raise ValueError(f"config.json `compress_ratios` mixes ratios {other} besides {CSA_RATIO}: this project has "
                         "one CSA ratio (4) and one HCA ratio")
    return other[0] if other else 128


def _rope_fields(raw: Mapping) -> dict:
    """YaRN fields and the RoPE table length. HF nests YaRN in ``rope_scaling``; the reference inference
    config keeps it at the top level. Without any, no YaRN (factor 1)."""
    rs = raw.get("rope_scaling") or {}
    if not isinstance(rs, Mapping):
        raise ValueError(f"config.json `rope_scaling` must be an object, got {rs!r}")
    rtype = rs.get("type", rs.get("rope_type", "yarn"))
    if rtype != "yarn":
        raise ValueError(f"config.json `rope_scaling.type`={rtype!r} is not supported (only 'yarn')")

    def pick(field, hf, ref, default):
        if hf in rs:
            return _typed(field, "rope_scaling." + hf, rs[hf])
        return _typed(field, ref, raw[ref]) if ref in raw else default

    out = {"rope_factor": pick("rope_factor", "factor", "rope_factor", 1.0),
           "rope_original_len": pick("rope_original_len", "original_max_position_embeddings", "original_seq_len",
                                     None),
           "beta_fast": pick("beta_fast", "beta_fast", "beta_fast", 32),
           "beta_slow": pick("beta_slow", "beta_slow", "beta_slow", 1)}
    for field in ("beta_fast", "beta_slow"):  # ModelConfig keeps them as ints
        if float(out[field]).is_integer():
            out[field] = int(out[field])
    key, v = _lookup(raw, ("max_position_embeddings", "max_seq_len"))
    if key is not None:
        out["max_seq_len"] = _typed("max_seq_len", key, v)
    elif out["rope_original_len"]:  # the inference config: the YaRN-extended length
        out["max_seq_len"] = int(out["rope_original_len"] * out["rope_factor"])
    else:
        out["max_seq_len"] = ModelConfig.max_seq_len
    if out["rope_original_len"] is None:
        out["rope_original_len"] = out["max_seq_len"]
    return out


def config_from_v4_json(raw: Mapping, dtype=None) -> tuple[ModelConfig, dict]:
    """A DeepSeek-V4 ``config.json`` (HF or reference-inference field names) -> (ModelConfig, format info).

    format info: ``{"block": (128, 128), "n_mtp": int}`` (fp8 block size; MTP layers listed after the
    ``n_layers`` main layers). Unknown fields are ignored; a missing required field, or one at a value this
    project does not implement (e.g. ``scoring_func`` other than ``sqrtsoftplus``), is a ``ValueError``
    naming it. ``dtype`` (``"float32"`` / ``"bfloat16"``; default ``torch_dtype``, else bfloat16) sets
    ``ModelConfig.dtype``.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"config.json must hold a JSON object, got {type(raw).__name__}")
    kw = {}
    for field, names in _REQUIRED.items():
        key, v = _lookup(raw, names)
        if key is None:
            raise ValueError(f"config.json is missing `{names[0]}` (ModelConfig `{field}`)")
        kw[field] = _typed(field, key, v)
    for field, (names, default) in _OPTIONAL.items():
        key, v = _lookup(raw, names)
        kw[field] = default if key is None else _typed(field, key, v)
    for names, allowed in _FIXED:
        key, v = _lookup(raw, names)
        if key is not None and v not in allowed:
            raise ValueError(f"config.json `{key}`={v!r} is not supported (this project implements {allowed})")
    if "qk_nope_head_dim" in raw and raw["qk_nope_head_dim"] + kw["rope_dim"] != kw["head_dim"]:
        raise ValueError(f"config.json `qk_nope_head_dim`={raw['qk_nope_head_dim']} + `qk_rope_head_dim`="
                         f"{kw['rope_dim']} != `head_dim`={kw['head_dim']}")

    kw.update(_rope_fields(raw))

    n = kw["n_layers"]
    ratios = raw.get("compress_ratios")
    if not isinstance(ratios, (list, tuple)) or len(ratios) < n or \
            any(isinstance(r, bool) or not isinstance(r, int) for r in ratios):
        raise ValueError(f"config.json `compress_ratios` must list an int ratio for each of the {n} layers "
                         f"(then the MTP layers), got {ratios!r}")
    kw["compress_ratios"] = tuple(ratios[:n])
    kw["csa_ratio"], kw["hca_ratio"] = CSA_RATIO, _split_ratios(kw["compress_ratios"])
    n_mtp = raw.get("num_nextn_predict_layers", len(ratios) - n)

    if dtype is None:
        dtype = raw.get("torch_dtype", "bfloat16")
        dtype = dtype if dtype in ("float32", "bfloat16") else "bfloat16"
    dtype = _dtype_name(dtype)
    kw.update(ffn="moe", dtype=dtype, compress_rope_position="first")  # SPEC §9: the chunk's first token

    q = raw.get("quantization_config") or {}
    block = tuple(q.get("weight_block_size", FP8_BLOCK))
    if len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in block):
        raise ValueError(f"config.json `quantization_config.weight_block_size` must be two positive ints, got "
                         f"{q.get('weight_block_size')!r}")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"config.json `quantization_config.fmt`={q['fmt']!r} is not supported (only 'e4m3')")

    flash = get_config("v4_flash")
    same_as_flash = (kw["d_model"], n, kw["compress_ratios"]) == (flash.d_model, flash.n_layers,
                                                                  flash.compress_ratios)
    config = ModelConfig(name="v4_flash" if same_as_flash else "deepseek_v4", **kw)
    return config, {"block": block, "n_mtp": int(n_mtp)}


def _dtype_name(dtype) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return name


def config_to_v4_json(config: ModelConfig, quantize: bool = True) -> dict:
    """The HF-style ``config.json`` of :func:`save_deepseek_v4` (read back by :func:`config_from_v4_json`)."""
    c = config
    raw = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
        "num_nextn_predict_layers": 0, "num_attention_heads": c.n_heads, "num_key_value_heads": 1,
        "head_dim": c.head_dim, "qk_rope_head_dim": c.rope_dim, "q_lora_rank": c.q_lora_rank,
        "o_groups": c.o_groups, "o_lora_rank": c.o_lora_rank, "sliding_window": c.window,
        "index_n_heads": c.n_index_heads, "index_head_dim": c.index_head_dim, "index_topk": c.index_topk,
        "n_routed_experts": c.n_routed_experts, "n_shared_experts": c.n_shared_experts,
        "num_experts_per_tok": c.moe_top_k, "moe_intermediate_size": c.moe_inter_dim,
        "num_hash_layers": c.n_hash_layers, "scoring_func": "sqrtsoftplus",
        "routed_scaling_factor": c.routed_scaling_factor, "norm_topk_prob": True, "topk_method": "noaux_tc",
        "swiglu_limit": c.swiglu_limit, "hidden_act": "silu", "hc_mult": c.hc_mult,
        "hc_sinkhorn_iters": c.hc_sinkhorn_iters, "hc_eps": c.hc_eps, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_base, "compress_rope_theta": c.compress_rope_base,
        "rope_scaling": {"type": "yarn", "factor": c.rope_factor, "original_max_position_embeddings":
                         c.rope_original_len, "beta_fast": c.beta_fast, "beta_slow": c.beta_slow},
        "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": False, "torch_dtype": c.dtype,
        "compress_ratios": list(c.compress_ratios),
    }
    if quantize:
        raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                      "activation_scheme": "dynamic", "weight_block_size": list(FP8_BLOCK)}
        raw["expert_dtype"] = "fp4"
    return raw


# ====================================================================================================
# DeepSeek-V4: checkpoint tensors <-> parameter leaves
# ====================================================================================================
@dataclass(frozen=True)
class _Leaf:
    """One parameter leaf and the checkpoint tensors it comes from.

    layout (checkpoint -> leaf): "same"; "t" (transpose); "wo_a" ([G*r, in] -> [G, in, r]); "fuse"
    (compressor wkv + wgate [C, d] each -> [d, 2C]); "experts" (E tensors [out, in] -> [E, in, out]);
    "ape" (overlapping compressor ape [r, 2D], halves in `ape_halves` order). store: the reference's
    on-disk format (fp8 / fp4 / bf16 / f32 / i32). kind: leaf dtype ("compute" = the model dtype).
    """

    path: tuple
    names: tuple
    layout: str
    store: str
    shape: tuple
    kind: str = "compute"

    def ckpt_shapes(self) -> list[tuple]:
        s = self.shape
        if self.layout == "t":
            return [s[::-1]]
        if self.layout == "wo_a":
            return [(s[0] * s[2], s[1])]
        if self.layout == "fuse":
            return [(s[1] // 2, s[0])] * 2
        if self.layout == "experts":
            return [(s[2], s[1])] * s[0]
        return [s]


def _compressor_leaves(path, prefix, d, dim, ratio, overlap):
    coff = 2 if overlap else 1
    return [_Leaf(path + ("wkv_gate",), (prefix + "wkv.weight", prefix + "wgate.weight"), "fuse", "bf16",
                  (d, 2 * coff * dim)),
            _Leaf(path + ("ape",), (prefix + "ape",), "ape" if overlap else "same", "f32", (ratio, coff * dim),
                  "float32"),
            _Leaf(path + ("norm",), (prefix + "norm.weight",), "same", "bf16", (dim,))]


def _hyper_leaves(path, prefix, rows, hc, d, n_scale):
    return [_Leaf(path + ("fn",), (prefix + "fn",), "same", "f32", (rows, hc * d), "float32"),
            _Leaf(path + ("base",), (prefix + "base",), "same", "f32", (rows,), "float32"),
            _Leaf(path + ("scale",), (prefix + "scale",), "same", "f32", (n_scale,), "float32")]


def _v4_leaves(config: ModelConfig) -> list[_Leaf]:
    """Every parameter leaf of a DeepSeek-V4-format model and its checkpoint tensors, in checkpoint order."""
    c = config
    d, hc, hd = c.d_model, c.hc_mult, c.head_dim
    out = [_Leaf(("embed",), ("embed.weight",), "same", "bf16", (c.vocab_size, d)),
           _Leaf(("lm_head",), ("head.weight",), "t", "bf16", (d, c.vocab_size)),
           _Leaf(("final_norm",), ("norm.weight",), "same", "bf16", (d,))]
    if hc > 1:
        out += _hyper_leaves(("hc_head",), "hc_head_", hc, hc, d, 1)
    for i in range(c.n_layers):
        L, p = ("layers", i), f"layers.{i}."
        out += [_Leaf(L + ("attn_norm",), (p + "attn_norm.weight",), "same", "bf16", (d,)),
                _Leaf(L + ("ffn_norm",), (p + "ffn_norm.weight",), "same", "bf16", (d,))]
        if hc > 1:
            for site in ("attn", "ffn"):
                out += _hyper_leaves(L + (f"hc_{site}",), f"{p}hc_{site}_", (2 + hc) * hc, hc, d, 3)
        a, pa = L + ("attn",), p + "attn."
        out += [_Leaf(a + ("wq_a",), (pa + "wq_a.weight",), "t", "fp8", (d, c.q_lora_rank)),
                _Leaf(a + ("q_norm",), (pa + "q_norm.weight",), "same", "bf16", (c.q_lora_rank,)),
                _Leaf(a + ("wq_b",), (pa + "wq_b.weight",), "t", "fp8", (c.q_lora_rank, c.n_heads * hd)),
                _Leaf(a + ("wkv",), (pa + "wkv.weight",), "t", "fp8", (d, hd)),
                _Leaf(a + ("kv_norm",), (pa + "kv_norm.weight",), "same", "bf16", (hd,)),
                _Leaf(a + ("wo_a",), (pa + "wo_a.weight",), "wo_a", "fp8",
                      (c.o_groups, c.heads_per_group * hd, c.o_lora_rank)),
                _Leaf(a + ("wo_b",), (pa + "wo_b.weight",), "t", "fp8", (c.o_groups * c.o_lora_rank, d)),
                _Leaf(a + ("sink",), (pa + "attn_sink",), "same", "f32", (c.n_heads,), "float32")]
        kind = c.layer_kind(i)
        if kind != KIND_WINDOW:
            out += _compressor_leaves(a + ("compressor",), pa + "compressor.", d, hd, c.compress_ratios[i],
                                      overlap=kind == KIND_CSA)
        if kind == KIND_CSA:
            ix, pix = a + ("indexer",), pa + "indexer."
            out += [_Leaf(ix + ("wq_b",), (pix + "wq_b.weight",), "t", "fp8",
                          (c.q_lora_rank, c.n_index_heads * c.index_head_dim)),
                    _Leaf(ix + ("weights_proj",), (pix + "weights_proj.weight",), "t", "bf16", (d, c.n_index_heads))]
            out += _compressor_leaves(ix + ("compressor",), pix + "compressor.", d, c.index_head_dim, c.csa_ratio,
                                      overlap=True)
        f, pf = L + ("ffn",), p + "ffn."
        n_e, inter = c.n_routed_experts, c.moe_inter_dim
        out.append(_Leaf(f + ("router",), (pf + "gate.weight",), "t", "bf16", (d, n_e), "float32"))
        if i < c.n_hash_layers:
            out.append(_Leaf(f + ("tid2eid",), (pf + "gate.tid2eid",), "same", "i32", (c.vocab_size, c.moe_top_k),
                             "int32"))
        else:
            out.append(_Leaf(f + ("router_bias",), (pf + "gate.bias",), "same", "f32", (n_e,), "float32"))
        for w, shape in (("w1", (n_e, d, inter)), ("w2", (n_e, inter, d)), ("w3", (n_e, d, inter))):
            names = tuple(f"{pf}experts.{e}.{w}.weight" for e in range(n_e))
            out.append(_Leaf(f + ("experts", w), names, "experts", "fp4", shape))
        if c.n_shared_experts:
            si = inter * c.n_shared_experts
            for w, shape in (("w1", (d, si)), ("w2", (si, d)), ("w3", (d, si))):
                out.append(_Leaf(f + ("shared", w), (f"{pf}shared_experts.{w}.weight",), "t", "fp8", shape))
    return out


def _leaf_dtype(leaf: _Leaf, dtype: str):
    return {"compute": jnp.dtype(dtype), "float32": jnp.dtype(jnp.float32), "int32": jnp.dtype(jnp.int32)}[leaf.kind]


def v4_param_shapes(config: ModelConfig):
    """The parameter pytree that :func:`load_deepseek_v4` returns, as ``jax.ShapeDtypeStruct`` leaves.

    Leaf dtypes: float32 for ``router``, ``router_bias``, ``sink``, the compressors' ``ape`` and the mHC
    tensors (the reference keeps them in float32), int32 for ``tid2eid``, ``config.dtype`` for the rest.
    """
    tree = {"layers": [{} for _ in range(config.n_layers)]}
    for leaf in _v4_leaves(config):
        _put(tree, leaf.path, jax.ShapeDtypeStruct(leaf.shape, _leaf_dtype(leaf, config.dtype)))
    return tree


def _put(tree, path, value):
    node = tree
    for k in path[:-1]:
        node = node[k] if isinstance(k, int) else node.setdefault(k, {})
    node[path[-1]] = value


def _where(path) -> str:
    return "params" + "".join(f"[{k!r}]" for k in path)


def _to_leaf(leaf: _Leaf, arrays: list, ape_halves: str) -> np.ndarray:
    (a, *rest) = arrays
    if leaf.layout == "t":
        return a.T
    if leaf.layout == "wo_a":
        g, inn, r = leaf.shape
        return a.reshape(g, r, inn).transpose(0, 2, 1)
    if leaf.layout == "fuse":
        return np.concatenate([a.T, rest[0].T], axis=1)
    if leaf.layout == "ape" and ape_halves == "current_first":
        return np.concatenate(np.split(a, 2, axis=-1)[::-1], axis=-1)
    return a


def _from_leaf(leaf: _Leaf, x: np.ndarray, ape_halves: str):
    """Leaf (NumPy) -> the checkpoint tensors of `leaf.names`, in order (a generator: experts one by one)."""
    if leaf.layout == "experts":
        yield from (x[e].T for e in range(x.shape[0]))
    elif leaf.layout == "t":
        yield x.T
    elif leaf.layout == "wo_a":
        g, inn, r = leaf.shape
        yield x.transpose(0, 2, 1).reshape(g * r, inn)
    elif leaf.layout == "fuse":
        kv, gate = np.split(x, 2, axis=1)
        yield kv.T
        yield gate.T
    else:
        yield _to_leaf(leaf, [x], ape_halves)  # "same", and "ape" (the half swap is its own inverse)


# ====================================================================================================
# DeepSeek-V4: reading
# ====================================================================================================
_HF_RENAMES = {"self_attn": "attn", "mlp": "ffn", "weight_scale_inv": "scale", "e_score_correction_bias": "bias"}
_FLOAT_DTYPES = ("F32", "BF16", "F16")
_INT_DTYPES = ("I32", "I64")
_SCALE_DTYPES = ("F8_E8M0", "F32", "BF16")
_MTP = re.compile(r"^(?:mtp\.|layers\.(\d+)\.)")


def canonical_name(name: str) -> str:
    """A checkpoint tensor name in the reference's naming: HF's ``model.`` prefix dropped, and the renames of
    the reference's ``convert.py`` (``self_attn``/``mlp``/``weight_scale_inv``/``e_score_correction_bias``)."""
    if name.startswith("model."):
        name = name[len("model."):]
    return ".".join(_HF_RENAMES.get(part, part) for part in name.split("."))


def _scale_name(name: str) -> str:
    return (name[: -len(".weight")] if name.endswith(".weight") else name) + ".scale"


class _Checkpoint:
    """The tensors of a checkpoint directory by canonical name, across its files (headers read up front)."""

    def __init__(self, root: str):
        self.root = root
        index, single = os.path.join(root, INDEX_FILE), os.path.join(root, SINGLE_FILE)
        weight_map = None
        if os.path.isfile(index):
            try:
                with open(index) as fh:
                    weight_map = json.load(fh)["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise ValueError(f"{index!r} is not a safetensors index (a JSON object with a `weight_map` "
                                 "of tensor name -> file name)") from None
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = [SINGLE_FILE]
        else:
            raise ValueError(f"{root!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
        self.files = {}
        for fname in files:
            fpath = os.path.join(root, fname)
            if os.path.dirname(os.path.normpath(fname)) or not os.path.isfile(fpath):
                raise ValueError(f"{INDEX_FILE} lists shard {fname!r}, which is not a file in {root!r}")
            self.files[fname] = SafetensorsFile(fpath)
        self.where: dict[str, tuple[str, str]] = {}  # canonical name -> (file, stored name)
        for fname, st in self.files.items():
            for stored in st.names:
                canon = canonical_name(stored)
                if canon in self.where:
                    other = self.where[canon]
                    raise ValueError(f"tensor {canon!r} is stored twice: as {other[1]!r} in {other[0]!r} and as "
                                     f"{stored!r} in {fname!r}")
                self.where[canon] = (fname, stored)
        for stored, fname in (weight_map or {}).items():
            if stored not in self.files[fname].names:
                raise ValueError(f"{INDEX_FILE} maps tensor {stored!r} to {fname!r}, which does not hold it")

    def describe(self, name: str) -> str:
        fname, stored = self.where[name]
        return f"tensor {stored!r} in {os.path.join(self.root, fname)!r}"

    def info(self, name: str):
        fname, stored = self.where[name]
        return self.files[fname].info(stored)

    def get(self, name: str) -> np.ndarray:
        fname, stored = self.where[name]
        return self.files[fname].get(stored)


def _check_tensor(ck: _Checkpoint, name: str, shape: tuple, leaf: _Leaf, block: tuple) -> list[str]:
    """Validate one checkpoint tensor from the headers (before any data is read); returns the names it uses."""
    if name not in ck.where:
        raise ValueError(f"checkpoint {ck.root!r} is missing tensor {name!r} (for {_where(leaf.path)})")
    dt, got = ck.info(name)
    want, used = shape, [name]
    if leaf.kind == "int32":
        if dt not in _INT_DTYPES:
            raise ValueError(f"{ck.describe(name)} has dtype {dt}, expected an integer table ({_INT_DTYPES})")
    elif dt == "F8_E4M3":
        used.append(_scale_name(name))
        scale_shape = fp8_scale_shape(shape, block)
    elif dt in ("I8", "U8") and leaf.layout == "experts":
        used.append(_scale_name(name))
        try:
            want, scale_shape = fp4_shapes(shape)
        except ValueError as e:
            raise ValueError(f"{ck.describe(name)}: {e}") from None
    elif dt not in _FLOAT_DTYPES:
        fmt = "fp4 (I8/U8 packed), " if leaf.layout == "experts" else ""
        raise ValueError(f"{ck.describe(name)} has dtype {dt}, which this tensor cannot have (expected "
                         f"{fmt}F8_E4M3 with a block scale, or one of {_FLOAT_DTYPES})")
    if tuple(got) != tuple(want):
        raise ValueError(f"{ck.describe(name)} has shape {tuple(got)}, expected {tuple(want)} "
                         f"(dtype {dt}, for {_where(leaf.path)})")
    if len(used) == 2:
        scale = used[1]
        if scale not in ck.where:
            raise ValueError(f"checkpoint {ck.root!r} is missing tensor {scale!r}, the scale of {ck.describe(name)}")
        sdt, sshape = ck.info(scale)
        if sdt not in _SCALE_DTYPES or tuple(sshape) != tuple(scale_shape):
            raise ValueError(f"{ck.describe(scale)} has dtype {sdt} and shape {tuple(sshape)}, expected one of "
                             f"{_SCALE_DTYPES} and shape {tuple(scale_shape)}")
    return used


def _read_tensor(ck: _Checkpoint, name: str, leaf: _Leaf, block: tuple, n_experts: int) -> np.ndarray:
    """One checkpoint tensor, dequantised to float32 (or int32 for integer tables), PyTorch layout."""
    dt, _ = ck.info(name)
    a = ck.get(name)
    try:
        if leaf.kind == "int32":  # tid2eid: expert ids
            if a.size and (a.min() < 0 or a.max() >= n_experts):
                raise ValueError(f"expert ids must lie in [0, n_routed_experts={n_experts}), got "
                                 f"[{a.min()}, {a.max()}]")
            return a.astype(np.int32)
        if dt not in ("F8_E4M3", "I8", "U8"):
            return a.astype(np.float32)
    except ValueError as e:
        raise ValueError(f"{ck.describe(name)}: {e}") from None
    scale = _scale_name(name)
    try:
        if dt == "F8_E4M3":
            return dequantize_fp8_blocks(a, ck.get(scale), block)
        return dequantize_fp4(a, ck.get(scale))
    except ValueError as e:
        raise ValueError(f"{ck.describe(scale)} (the scale of {name!r}): {e}") from None


def _read_leaf(ck: _Checkpoint, leaf: _Leaf, block: tuple, dtype, ape_halves: str, n_experts: int) -> np.ndarray:
    if leaf.layout == "experts":  # stack expert by expert: one expert's float32 copy at a time
        out = np.empty(leaf.shape, dtype)
        for e, name in enumerate(leaf.names):
            out[e] = _read_tensor(ck, name, leaf, block, n_experts).T
        return out
    arrays = [_read_tensor(ck, name, leaf, block, n_experts) for name in leaf.names]
    return np.asarray(_to_leaf(leaf, arrays, ape_halves), dtype=dtype, order="C")


def _skipped_mtp(name: str, n_layers: int, n_mtp: int) -> bool:
    m = _MTP.match(name)
    return bool(m) and (m.group(1) is None or n_layers <= int(m.group(1)) < n_layers + n_mtp)


def load_deepseek_v4(path, *, dtype=None, mesh=None, ape_halves: str = "overlap_first"):
    """Read a DeepSeek-V4 checkpoint directory -> ``(ModelConfig, params)``.

    ``path`` holds ``config.json`` and either ``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``. Tensor names are the reference's (``embed.weight``,
    ``layers.{i}.attn.wq_a.weight``, ... SPEC §9), with or without HF's ``model.`` prefix; fp8 scales may be
    named ``.scale`` or ``.weight_scale_inv`` (and ``self_attn`` / ``mlp`` / ``e_score_correction_bias``
    are accepted for ``attn`` / ``ffn`` / ``bias``, as the reference's ``convert.py`` renames them).

    * The config comes from ``config.json`` (:func:`config_from_v4_json`): ``compress_ratios`` (the first
      ``n_layers`` entries; the rest belong to MTP layers), dims, RoPE/YaRN, mHC, routing fields.
    * Each tensor is dequantised by its stored dtype: fp8 e4m3 with 128 x 128 block scales, fp4 e2m1
      routed experts (int8, two codes per byte) with a scale per 32 inputs, or bf16 / f16 / f32 as stored
      (formats in :mod:`fm_jax.weight_formats`); then transposed to ``[in, out]``, ``wo_a`` regrouped to
      ``[o_groups, heads_per_group * head_dim, o_lora_rank]``, routed experts stacked ``[E, in, out]``, the
      compressors' ``wkv`` and ``wgate`` fused into ``wkv_gate = [wkv^T | wgate^T]``, ``gate.weight`` ->
      ``ffn.router``, ``gate.bias`` -> ``ffn.router_bias``, ``gate.tid2eid`` -> ``ffn.tid2eid``, the mHC
      tensors ``hc_{attn,ffn}_{fn,base,scale}`` / ``hc_head_*`` -> ``hc_attn`` / ``hc_ffn`` / ``hc_head``.
    * ``ape`` (overlapping compressors, ``[ratio, 2 D]``): the checkpoint's halves are
      ``[previous-chunk (overlap) half | current-chunk half]``, which is this project's order, so the
      default ``ape_halves="overlap_first"`` keeps them. That is what the FlashMemory release's
      ``Compressor.apply_ape_hotfix`` implies for the released V4 (``SGLANG_DSV4_MODE=2604``: it stacks the
      halves in order ``[0, 1]`` into its kernel's ``[2 ratio, D]`` slots, previous chunk first) and what
      the official ``model.py`` uses directly. Older pre-release checkpoints (the hotfix's non-2604 branch,
      order ``[1, 0]``) store the halves swapped: load those with ``ape_halves="current_first"``.
    * Streaming: headers are checked first (names, dtypes, shapes, scales); then one leaf at a time is read
      from a memory map, converted and placed (``mesh``: with :func:`fm_jax.sharding.param_spec`, straight
      onto the mesh; otherwise on the default device), so the host holds at most one leaf's converted copy.
    * Skipped: the MTP layer(s) (``mtp.*`` and ``layers.{n_layers ...}``); this model has no MTP head.
    * Leaf dtypes: ``dtype`` (default: ``config.json``'s ``torch_dtype``) for weights and norms, float32
      for router, router bias, attention sinks, ``ape`` and mHC tensors, int32 for ``tid2eid``
      (:func:`v4_param_shapes`).

    Errors (``ValueError`` naming the tensor and its file): a missing or unexpected tensor, a wrong shape,
    an unknown or unsupported dtype, a missing or misshaped scale, a truncated or malformed file, expert
    ids out of range; and a missing or unsupported ``config.json`` field.

    Not pinned by the reference material (accepted either way): whether the real files use the
    ``model.`` prefix, the dtype of ``ape`` (F32 or BF16), of ``tid2eid`` (I32 or I64), of the scales
    (ue8m0, F32 or BF16) and whether ``wo_a`` is fp8 or bf16. Not supported: the ``F4`` dtype written by
    ``convert.py``'s fp4 output (the HF checkpoint packs fp4 as int8, which is supported). No real V4
    checkpoint was reachable: this loader was checked on files written in the same names, dtypes and
    layouts (:func:`save_deepseek_v4`).
    """
    root = os.fspath(path)
    if ape_halves not in APE_HALVES:
        raise ValueError(f"ape_halves must be one of {APE_HALVES}, got {ape_halves!r}")
    cfg_path = os.path.join(root, CONFIG_FILE)
    try:
        with open(cfg_path) as fh:
            raw = json.load(fh)
    except OSError as e:
        raise ValueError(f"cannot read {cfg_path!r}: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path!r} is not valid JSON: {e}") from None
    config, fmt = config_from_v4_json(raw, dtype)
    ck = _Checkpoint(root)
    leaves = _v4_leaves(config)

    used = set()
    for leaf in leaves:
        for name, shape in zip(leaf.names, leaf.ckpt_shapes()):
            used.update(_check_tensor(ck, name, shape, leaf, fmt["block"]))
    skipped = [n for n in ck.where if n not in used and _skipped_mtp(n, config.n_layers, fmt["n_mtp"])]
    extra = sorted(set(ck.where) - used - set(skipped))
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise ValueError(f"checkpoint has unexpected tensors: {', '.join(ck.describe(n) for n in extra[:5])}{more}")
    if skipped:
        log.info("load_deepseek_v4: skipped %d MTP tensors (e.g. %r); this model has no MTP head",
                 len(skipped), skipped[0])

    params = {"layers": [{} for _ in range(config.n_layers)]}
    for leaf in leaves:
        x = _read_leaf(ck, leaf, fmt["block"], _leaf_dtype(leaf, config.dtype), ape_halves, config.n_routed_experts)
        _put(params, leaf.path, _place(x, leaf.path, config, mesh))
    return config, params


def _place(x: np.ndarray, path: tuple, config: ModelConfig, mesh):
    if mesh is None:
        return jax.device_put(x)
    from jax.sharding import NamedSharding

    from fm_jax.sharding import param_spec
    return jax.device_put(x, NamedSharding(mesh, param_spec(path, x.shape, config, mesh)))


# ====================================================================================================
# DeepSeek-V4: writing
# ====================================================================================================
def _hf_name(name: str, scale: bool) -> str:
    return "model." + (name[: -len(".scale")] + ".weight_scale_inv" if scale else name)


def _encode(name: str, x: np.ndarray, store: str, quantize: bool, leaf_dtype) -> list[tuple[str, np.ndarray, bool]]:
    """(name, array, is_block_scale) of one checkpoint tensor in its on-disk format."""
    try:
        if store == "i32":
            return [(name, x.astype(np.int32), False)]
        if store == "f32":
            return [(name, x.astype(np.float32), False)]
        if not quantize:
            return [(name, x.astype(leaf_dtype), False)]
        if store == "fp8":
            q, s = quantize_fp8_blocks(x)
            return [(name, q, False), (_scale_name(name), s, True)]
        if store == "fp4":
            q, s = quantize_fp4(x)
            return [(name, q, False), (_scale_name(name), s, True)]
        return [(name, x.astype(ml_dtypes.bfloat16), False)]
    except ValueError as e:
        raise ValueError(f"cannot write tensor {name!r}: {e}") from None


class _ShardWriter:
    """Collects tensors into files of at most ``max_bytes`` (one file when None), then writes the index."""

    def __init__(self, root: str, max_bytes: int | None):
        self.root, self.max_bytes = root, max_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes, self.shards, self.total = 0, [], 0

    def add(self, name: str, x: np.ndarray):
        if self.max_bytes is not None and self.pending and self.pending_bytes + x.nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = x
        self.pending_bytes += x.nbytes

    def _flush(self):
        tmp = os.path.join(self.root, f".shard-{len(self.shards)}.tmp")
        write_safetensors(tmp, self.pending, {"format": "pt"})
        self.shards.append((tmp, list(self.pending)))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self):
        if self.pending or not self.shards:
            self._flush()
        if self.max_bytes is None:
            os.replace(self.shards[0][0], os.path.join(self.root, SINGLE_FILE))
            return
        n, weight_map = len(self.shards), {}
        for k, (tmp, names) in enumerate(self.shards):
            fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, os.path.join(self.root, fname))
            weight_map.update(dict.fromkeys(names, fname))
        with open(os.path.join(self.root, INDEX_FILE), "w") as fh:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, fh, indent=1)


def _get_leaf(params, leaf: _Leaf) -> np.ndarray:
    node = params
    for k in leaf.path:
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"params have no {_where(leaf.path)} (needed for checkpoint tensor "
                             f"{leaf.names[0]!r})") from None
    x = np.asarray(jax.device_get(node))
    if tuple(x.shape) != tuple(leaf.shape):
        raise ValueError(f"{_where(leaf.path)} has shape {tuple(x.shape)}, expected {tuple(leaf.shape)}")
    return x


def save_deepseek_v4(path, config: ModelConfig, params, *, quantize: bool = True, hf_names: bool = False,
                     max_shard_bytes: int | None = None, ape_halves: str = "overlap_first") -> None:
    """Write ``params`` as a DeepSeek-V4 checkpoint directory that :func:`load_deepseek_v4` (and the
    reference's loaders) read: ``config.json`` (:func:`config_to_v4_json`) plus safetensors.

    ``quantize=True`` writes the reference's dtypes: fp8 e4m3 with 128 x 128 ue8m0 block scales for
    ``wq_a``, ``wq_b``, ``wkv``, ``wo_a``, ``wo_b``, the indexer's ``wq_b`` and the shared expert; fp4 e2m1
    (int8-packed, ue8m0 scale per 32 inputs) for routed experts; bf16 for embeddings, head, norms, the
    router weight, compressor ``wkv`` / ``wgate`` and ``weights_proj``; float32 for ``ape``, attention
    sinks, router bias and mHC tensors; int32 ``tid2eid``. Loading it back gives exactly the values of
    that quantisation. ``quantize=False`` keeps each leaf's own dtype instead (a lossless round trip).
    ``hf_names``: HF naming (``model.`` prefix, ``.weight_scale_inv``). ``max_shard_bytes``: split into
    ``model-0000k-of-0000n.safetensors`` files plus ``model.safetensors.index.json`` (default: one
    ``model.safetensors``). ``path`` must not already hold a checkpoint. A leaf that is missing, misshaped,
    or that has no place in the format (e.g. a dense FFN) is a ``ValueError`` naming it.
    """
    if config.ffn != "moe":
        raise ValueError(f"the DeepSeek-V4 format has MoE layers only; config `ffn`={config.ffn!r}")
    if ape_halves not in APE_HALVES:
        raise ValueError(f"ape_halves must be one of {APE_HALVES}, got {ape_halves!r}")
    root = os.fspath(path)
    os.makedirs(root, exist_ok=True)
    for f in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE):
        if os.path.exists(os.path.join(root, f)):
            raise ValueError(f"{root!r} already holds {f}; write a checkpoint into a new directory")
    leaves = _v4_leaves(config)
    known = {leaf.path for leaf in leaves}
    for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kp)
        if p not in known:
            raise ValueError(f"{_where(p)} has no place in the DeepSeek-V4 checkpoint format")
    writer = _ShardWriter(root, max_shard_bytes)
    for leaf in leaves:
        x = _get_leaf(params, leaf)
        src = x.astype(np.int32) if leaf.kind == "int32" else x.astype(np.float32)
        for name, t in zip(leaf.names, _from_leaf(leaf, src, ape_halves)):
            for out_name, arr, is_scale in _encode(name, np.ascontiguousarray(t), leaf.store, quantize, x.dtype):
                writer.add(_hf_name(out_name, is_scale) if hf_names else out_name, arr)
    writer.finish()
    with open(os.path.join(root, CONFIG_FILE), "w") as fh:
        json.dump(config_to_v4_json(config, quantize), fh, indent=1)


# ====================================================================================================
# FlashMemory Memory-Indexer joint checkpoints
# ====================================================================================================
# Keys ``retrievers.l{ID}.{wq_a.weight, wq_b.weight, q_norm_weight, weights_proj.weight}`` in PyTorch
# ``[out, in]`` layout (the release's ``retriever.py``); n_heads / q_lora_rank / d_model come from the tensor
# shapes. The released weights (``flashmemory_ds_v4.safetensors``) are not reachable from here, so loading
# was verified on files written in the same key/shape/dtype layout, not on the real file. Whether the
# release's file carries ``__metadata__`` (e.g. ``head_dim``) is unknown: without it ``head_dim`` defaults
# to 128, as in the release.
# checkpoint tensor name (within "retrievers.l{ID}.") -> our param name, and whether it is [out, in]
_CKPT_TENSORS = {
    "wq_a.weight": ("wq_a", True),
    "wq_b.weight": ("wq_b", True),
    "q_norm_weight": ("q_norm_weight", False),
    "weights_proj.weight": ("weights_proj", True),
}
_CKPT_PREFIX = "retrievers."
_META_CONFIG_KEY = "fm_jax.indexer_config"
FLASHMEMORY_DEFAULT_HEAD_DIM = 128


def _layer_key(layer) -> str:
    if isinstance(layer, str):
        if not (layer.startswith("l") and layer[1:].isdigit()):
            raise ValueError(f"layer name {layer!r} is not of the form 'l{{ID}}'")
        return layer
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"layer id {layer!r} is neither an int nor 'l{{ID}}'")
    return f"l{int(layer)}"


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    tensors = {}
    with safe_open(path, framework="numpy") as f:
        meta = dict(f.metadata() or {})
        for k in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _read_pt(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path!r} (a .pt checkpoint) needs torch, which is not importable; "
                          "convert it to .safetensors or install torch") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(state).__name__})")  # noqa: TRY004
    return {k: _torch_to_numpy(v) for k, v in state.items() if hasattr(v, "detach")}, {}


def load_flashmemory_checkpoint(path, layers=None, **config_overrides) -> tuple[IndexerConfig, dict]:
    """Read a joint FlashMemory checkpoint (``retrievers.l{ID}.*`` keys) -> ``(indexer_config, params)``.

    ``.safetensors`` is read with safetensors; ``.pt`` only when torch is importable, and only with
    ``torch.load(weights_only=True)``. ``layers``: None (every layer in the file) or ids / ``"l{ID}"``.
    d_model, q_lora_rank and n_heads come from the tensor shapes; ``head_dim`` from the file's metadata
    when present, else 128 (the release's), checked to divide ``wq_b``'s rows. Config fields this module
    wrote into the metadata on save are restored; ``config_overrides`` override the rest (e.g.
    ``max_seq_len``, ``rope_dtype``). Params keep the on-disk dtype, transposed to ``[in, out]``.
    A missing layer / tensor or a misshaped tensor is a ``ValueError`` naming it.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        tensors, meta = _read_safetensors(path)
    elif path.endswith((".pt", ".pth", ".bin")):
        tensors, meta = _read_pt(path)
    else:
        raise ValueError(f"unsupported checkpoint extension for {path!r}: use .safetensors (or .pt with torch)")

    found: dict[str, dict[str, np.ndarray]] = {}
    for k, v in tensors.items():
        if not k.startswith(_CKPT_PREFIX):
            continue
        rest = k[len(_CKPT_PREFIX):]
        lname, _, tname = rest.partition(".")
        found.setdefault(lname, {})[tname] = v
    if not found:
        raise ValueError(f"{path!r} is not a joint FlashMemory checkpoint: no 'retrievers.l{{ID}}.*' keys "
                         f"(keys start with {sorted(tensors)[:3]})")
    bad_names = [n for n in found if not (n.startswith("l") and n[1:].isdigit())]
    if bad_names:
        raise ValueError(f"checkpoint layer names {['retrievers.' + n for n in bad_names]} are not 'l{{ID}}'")

    if layers is None:
        names = sorted(found, key=lambda n: int(n[1:]))
    else:
        names = [_layer_key(x) for x in layers]
        if not names:
            raise ValueError("layers must name at least one layer")
    for n in names:
        if n not in found:
            raise ValueError(f"layer {n!r} (keys 'retrievers.{n}.*') not found in {path!r}; available: "
                             f"{sorted(found, key=lambda x: int(x[1:]))}")

    for n in names:
        sub = found[n]
        for tname in _CKPT_TENSORS:
            if tname not in sub:
                raise ValueError(f"checkpoint is missing tensor 'retrievers.{n}.{tname}'")
        extra = [t for t in sub if t not in _CKPT_TENSORS and "freqs_cis" not in t]
        if extra:
            raise ValueError(f"checkpoint has unexpected tensors {[f'retrievers.{n}.{t}' for t in extra]}")
        for tname, arr in sub.items():
            if tname in _CKPT_TENSORS and not np.issubdtype(arr.dtype, np.floating) \
                    and arr.dtype.name not in ("bfloat16", "float16"):
                raise ValueError(f"tensor 'retrievers.{n}.{tname}' has non-float dtype {arr.dtype}")

    # ---- dims from the first layer, checked on every layer ----
    stored = {}
    if _META_CONFIG_KEY in meta:
        try:
            stored = json.loads(meta[_META_CONFIG_KEY])
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint metadata {_META_CONFIG_KEY!r} is not valid JSON: {e}") from None
    head_dim = FLASHMEMORY_DEFAULT_HEAD_DIM
    head_dim_src = "default (FlashMemory release)"
    if "head_dim" in meta:
        head_dim, head_dim_src = meta["head_dim"], "metadata 'head_dim'"
    elif "head_dim" in stored:
        head_dim, head_dim_src = stored["head_dim"], f"metadata {_META_CONFIG_KEY!r}"
    if "head_dim" in config_overrides:
        head_dim, head_dim_src = config_overrides["head_dim"], "override"
    try:
        head_dim = int(head_dim)
    except (TypeError, ValueError):
        raise ValueError(f"head_dim {head_dim!r} from {head_dim_src} is not an int") from None

    first = found[names[0]]
    wq_a0 = first["wq_a.weight"]
    if wq_a0.ndim != 2:
        raise ValueError(f"tensor 'retrievers.{names[0]}.wq_a.weight' must be 2-D [q_lora_rank, d_model], "
                         f"got shape {wq_a0.shape}")
    q_lora_rank, d_model = wq_a0.shape
    wq_b0 = first["wq_b.weight"]
    if wq_b0.ndim != 2:
        raise ValueError(f"tensor 'retrievers.{names[0]}.wq_b.weight' must be 2-D [n_heads*head_dim, "
                         f"q_lora_rank], got shape {wq_b0.shape}")
    if head_dim <= 0 or wq_b0.shape[0] % head_dim:
        raise ValueError(f"tensor 'retrievers.{names[0]}.wq_b.weight' has {wq_b0.shape[0]} rows, not a "
                         f"multiple of head_dim={head_dim} ({head_dim_src})")
    n_heads = wq_b0.shape[0] // head_dim
    expected = {
        "wq_a.weight": (q_lora_rank, d_model),
        "wq_b.weight": (n_heads * head_dim, q_lora_rank),
        "q_norm_weight": (q_lora_rank,),
        "weights_proj.weight": (n_heads, d_model),
    }
    for n in names:
        for tname, shape in expected.items():
            got = tuple(found[n][tname].shape)
            if got != shape:
                raise ValueError(f"tensor 'retrievers.{n}.{tname}' has shape {got}, expected {shape} "
                                 f"(d_model={d_model}, q_lora_rank={q_lora_rank}, n_heads={n_heads}, "
                                 f"head_dim={head_dim})")

    fields = {f.name for f in dataclasses.fields(IndexerConfig)}
    kw = {k: v for k, v in stored.items() if k in fields}
    if "target_layers" in kw:
        kw["target_layers"] = tuple(kw["target_layers"])
    check_field_names(config_overrides)
    kw.update(config_overrides)
    kw.update(d_model=int(d_model), q_lora_rank=int(q_lora_rank), n_heads=int(n_heads), head_dim=head_dim,
              target_layers=tuple(int(n[1:]) for n in names))
    dtypes = {found[n][t].dtype for n in names for t in _CKPT_TENSORS}
    if "param_dtype" not in config_overrides and "param_dtype" not in stored and len(dtypes) == 1:
        only = next(iter(dtypes)).name
        if only in ("float32", "bfloat16"):
            kw["param_dtype"] = only
    config = IndexerConfig(**kw)

    params = {}
    for n in names:
        layer = {}
        for tname, (pname, transpose) in _CKPT_TENSORS.items():
            arr = found[n][tname]
            layer[pname] = jnp.asarray(np.ascontiguousarray(arr.T if transpose else arr))
        params[n] = layer
    return config, params


def save_flashmemory_checkpoint(path, indexer_config: IndexerConfig, params) -> None:
    """Write ``params`` as a joint FlashMemory ``.safetensors`` (PyTorch ``[out, in]`` weights).

    Tensors keep their dtype (so save -> load is bit-exact); metadata records ``head_dim`` and the full
    ``IndexerConfig`` as JSON under ``"fm_jax.indexer_config"``, which the release's loader ignores.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_flashmemory_checkpoint writes .safetensors only, got {path!r}")
    c = indexer_config
    tensors = {}
    for name in c.layer_names:
        if name not in params:
            raise ValueError(f"params have no scorer {name!r} for target layer {name[1:]}")
        check_layer_params(params[name], c, where=f"params[{name!r}]")
        for tname, (pname, transpose) in _CKPT_TENSORS.items():
            arr = np.asarray(jax.device_get(params[name][pname]))
            tensors[f"{_CKPT_PREFIX}{name}.{tname}"] = np.ascontiguousarray(arr.T if transpose else arr)
    cfg = dataclasses.asdict(c)
    cfg["target_layers"] = list(c.target_layers)
    meta = {"format": "pt", "head_dim": str(c.head_dim), "n_heads": str(c.n_heads),
            _META_CONFIG_KEY: json.dumps(cfg, sort_keys=True)}
    save_file(tensors, path, metadata=meta)
