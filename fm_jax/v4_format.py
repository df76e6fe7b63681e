"""The DeepSeek-V4 checkpoint format (SPEC §9): ``config.json`` <-> ``ModelConfig``, and which checkpoint
tensors make up each parameter leaf of this project's tree (names, PyTorch layouts, on-disk dtypes).

Reading and writing files is :mod:`fm_jax.interop`; the quantised codecs are :mod:`fm_jax.weight_formats`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax.config import KIND_CSA, KIND_WINDOW, ModelConfig, get_config
from fm_jax.weight_formats import FP8_BLOCK

# ``ape`` halves of overlapping compressors: "overlap_first" (the released V4 and this project) or
# "current_first" (pre-release checkpoints); see fm_jax.interop.load_deepseek_v4
APE_HALVES = ("overlap_first", "current_first")


# ---------------------------------------------------------------------------------------------------- config.json
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


# ---------------------------------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class Leaf:
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
    return [Leaf(path + ("wkv_gate",), (prefix + "wkv.weight", prefix + "wgate.weight"), "fuse", "bf16",
                  (d, 2 * coff * dim)),
            Leaf(path + ("ape",), (prefix + "ape",), "ape" if overlap else "same", "f32", (ratio, coff * dim),
                  "float32"),
            Leaf(path + ("norm",), (prefix + "norm.weight",), "same", "bf16", (dim,))]


def _hyper_leaves(path, prefix, rows, hc, d, n_scale):
    return [Leaf(path + ("fn",), (prefix + "fn",), "same", "f32", (rows, hc * d), "float32"),
            Leaf(path + ("base",), (prefix + "base",), "same", "f32", (rows,), "float32"),
            Leaf(path + ("scale",), (prefix + "scale",), "same", "f32", (n_scale,), "float32")]


def v4_leaves(config: ModelConfig) -> list[Leaf]:
    """Every parameter leaf of a DeepSeek-V4-format model and its checkpoint tensors, in checkpoint order."""
    c = config
    d, hc, hd = c.d_model, c.hc_mult, c.head_dim
    out = [Leaf(("embed",), ("embed.weight",), "same", "bf16", (c.vocab_size, d)),
           Leaf(("lm_head",), ("head.weight",), "t", "bf16", (d, c.vocab_size)),
           Leaf(("final_norm",), ("norm.weight",), "same", "bf16", (d,))]
    if hc > 1:
        out += _hyper_leaves(("hc_head",), "hc_head_", hc, hc, d, 1)
    for i in range(c.n_layers):
        L, p = ("layers", i), f"layers.{i}."
        out += [Leaf(L + ("attn_norm",), (p + "attn_norm.weight",), "same", "bf16", (d,)),
                Leaf(L + ("ffn_norm",), (p + "ffn_norm.weight",), "same", "bf16", (d,))]
        if hc > 1:
            for site in ("attn", "ffn"):
                out += _hyper_leaves(L + (f"hc_{site}",), f"{p}hc_{site}_", (2 + hc) * hc, hc, d, 3)
        a, pa = L + ("attn",), p + "attn."
        out += [Leaf(a + ("wq_a",), (pa + "wq_a.weight",), "t", "fp8", (d, c.q_lora_rank)),
                Leaf(a + ("q_norm",), (pa + "q_norm.weight",), "same", "bf16", (c.q_lora_rank,)),
                Leaf(a + ("wq_b",), (pa + "wq_b.weight",), "t", "fp8", (c.q_lora_rank, c.n_heads * hd)),
                Leaf(a + ("wkv",), (pa + "wkv.weight",), "t", "fp8", (d, hd)),
                Leaf(a + ("kv_norm",), (pa + "kv_norm.weight",), "same", "bf16", (hd,)),
                Leaf(a + ("wo_a",), (pa + "wo_a.weight",), "wo_a", "fp8",
                      (c.o_groups, c.heads_per_group * hd, c.o_lora_rank)),
                Leaf(a + ("wo_b",), (pa + "wo_b.weight",), "t", "fp8", (c.o_groups * c.o_lora_rank, d)),
                Leaf(a + ("sink",), (pa + "attn_sink",), "same", "f32", (c.n_heads,), "float32")]
        kind = c.layer_kind(i)
        if kind != KIND_WINDOW:
            out += _compressor_leaves(a + ("compressor",), pa + "compressor.", d, hd, c.compress_ratios[i],
                                      overlap=kind == KIND_CSA)
        if kind == KIND_CSA:
            ix, pix = a + ("indexer",), pa + "indexer."
            out += [Leaf(ix + ("wq_b",), (pix + "wq_b.weight",), "t", "fp8",
                          (c.q_lora_rank, c.n_index_heads * c.index_head_dim)),
                    Leaf(ix + ("weights_proj",), (pix + "weights_proj.weight",), "t", "bf16", (d, c.n_index_heads))]
            out += _compressor_leaves(ix + ("compressor",), pix + "compressor.", d, c.index_head_dim, c.csa_ratio,
                                      overlap=True)
        f, pf = L + ("ffn",), p + "ffn."
        n_e, inter = c.n_routed_experts, c.moe_inter_dim
        out.append(Leaf(f + ("router",), (pf + "gate.weight",), "t", "bf16", (d, n_e), "float32"))
        if i < c.n_hash_layers:
            out.append(Leaf(f + ("tid2eid",), (pf + "gate.tid2eid",), "same", "i32", (c.vocab_size, c.moe_top_k),
                             "int32"))
        else:
            out.append(Leaf(f + ("router_bias",), (pf + "gate.bias",), "same", "f32", (n_e,), "float32"))
        for w, shape in (("w1", (n_e, d, inter)), ("w2", (n_e, inter, d)), ("w3", (n_e, d, inter))):
            names = tuple(f"{pf}experts.{e}.{w}.weight" for e in range(n_e))
            out.append(Leaf(f + ("experts", w), names, "experts", "fp4", shape))
        if c.n_shared_experts:
            si = inter * c.n_shared_experts
            for w, shape in (("w1", (d, si)), ("w2", (si, d)), ("w3", (d, si))):
                out.append(Leaf(f + ("shared", w), (f"{pf}shared_experts.{w}.weight",), "t", "fp8", shape))
    return out


def leaf_dtype(leaf: Leaf, dtype: str):
    """The leaf's dtype in a model of compute dtype `dtype`."""
    return {"compute": jnp.dtype(dtype), "float32": jnp.dtype(jnp.float32), "int32": jnp.dtype(jnp.int32)}[leaf.kind]


def v4_param_shapes(config: ModelConfig):
    """The parameter pytree that :func:`load_deepseek_v4` returns, as ``jax.ShapeDtypeStruct`` leaves.

    Leaf dtypes: float32 for ``router``, ``router_bias``, ``sink``, the compressors' ``ape`` and the mHC
    tensors (the reference keeps them in float32), int32 for ``tid2eid``, ``config.dtype`` for the rest.
    """
    tree = {"layers": [{} for _ in range(config.n_layers)]}
    for leaf in v4_leaves(config):
        put_leaf(tree, leaf.path, jax.ShapeDtypeStruct(leaf.shape, leaf_dtype(leaf, config.dtype)))
    return tree


def put_leaf(tree, path, value):
    """Set `tree[path[0]][path[1]]... = value`, creating dicts on the way (integers index `tree["layers"]`)."""
    node = tree
    for k in path[:-1]:
        node = node[k] if isinstance(k, int) else node.setdefault(k, {})
    node[path[-1]] = value


def leaf_where(path) -> str:
    """`params['layers'][3]['attn']['wq_a']`: a leaf path for error messages."""
    return "params" + "".join(f"[{k!r}]" for k in path)


def to_leaf(leaf: Leaf, arrays: list, ape_halves: str) -> np.ndarray:
    """The leaf from its checkpoint tensors (PyTorch layout, in `leaf.names` order; not for "experts")."""
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


def from_leaf(leaf: Leaf, x: np.ndarray, ape_halves: str):
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
        yield to_leaf(leaf, [x], ape_halves)  # "same", and "ape" (the half swap is its own inverse)



_HF_RENAMES = {"self_attn": "attn", "mlp": "ffn", "weight_scale_inv": "scale", "e_score_correction_bias": "bias"}


def canonical_name(name: str) -> str:
    """A checkpoint tensor name in the reference's naming: HF's ``model.`` prefix dropped, and the renames of
    the reference's ``convert.py`` (``self_attn``/``mlp``/``weight_scale_inv``/``e_score_correction_bias``)."""
    if name.startswith("model."):
        name = name[len("model."):]
    return ".".join(_HF_RENAMES.get(part, part) for part in name.split("."))


def scale_name(name: str) -> str:
    """`x.weight` -> `x.scale`: the block-scale sibling of a quantised weight (reference naming)."""
    return (name[: -len(".weight")] if name.endswith(".weight") else name) + ".scale"
