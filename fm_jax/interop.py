"""Checkpoint interop with the reference formats: DeepSeek-V4 model checkpoints (SPEC §9) and FlashMemory
Memory-Indexer joint checkpoints (SPEC §4).

* :func:`load_deepseek_v4` / :func:`save_deepseek_v4`: a directory with ``config.json`` and
  ``model.safetensors`` (or shards listed by ``model.safetensors.index.json``) in the reference's naming
  and dtypes <-> ``(ModelConfig, params)`` in this project's parameter tree.
  :func:`config_from_v4_json` / :func:`config_to_v4_json` map ``config.json``; :func:`v4_param_shapes` is
  the loaded tree (shapes and dtypes); the format itself is :mod:`fm_jax.v4_format`.
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

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding

from fm_jax.config import ModelConfig
from fm_jax.memory_indexer import IndexerConfig, check_field_names, check_layer_params
from fm_jax.safetensors_file import SafetensorsFile, write_safetensors
from fm_jax.sharding import param_spec
from fm_jax.v4_format import (
    APE_HALVES,
    Leaf,
    canonical_name,
    config_from_v4_json,
    config_to_v4_json,
    from_leaf,
    leaf_dtype,
    leaf_where,
    put_leaf,
    scale_name,
    to_leaf,
    v4_leaves,
    v4_param_shapes,
)
from fm_jax.weight_formats import (
    dequantize_fp4,
    dequantize_fp8_blocks,
    fp4_shapes,
    fp8_scale_shape,
    quantize_fp4,
    quantize_fp8_blocks,
)

__all__ = ["config_from_v4_json", "config_to_v4_json", "load_deepseek_v4", "load_flashmemory_checkpoint",
           "save_deepseek_v4", "save_flashmemory_checkpoint", "v4_param_shapes"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ====================================================================================================
# DeepSeek-V4: reading
# ====================================================================================================
_FLOAT_DTYPES = ("F32", "BF16", "F16")
_INT_DTYPES = ("I32", "I64")
_SCALE_DTYPES = ("F8_E8M0", "F32", "BF16")
_MTP = re.compile(r"^(?:mtp\.|layers\.(\d+)\.)")


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


def _check_tensor(ck: _Checkpoint, name: str, shape: tuple, leaf: Leaf, block: tuple) -> list[str]:
    """Validate one checkpoint tensor from the headers (before any data is read); returns the names it uses."""
    if name not in ck.where:
        raise ValueError(f"checkpoint {ck.root!r} is missing tensor {name!r} (for {leaf_where(leaf.path)})")
    dt, got = ck.info(name)
    want, used = shape, [name]
    if leaf.kind == "int32":
        if dt not in _INT_DTYPES:
            raise ValueError(f"{ck.describe(name)} has dtype {dt}, expected an integer table ({_INT_DTYPES})")
    elif dt == "F8_E4M3":
        used.append(scale_name(name))
        scale_shape = fp8_scale_shape(shape, block)
    elif dt in ("I8", "U8") and leaf.layout == "experts":
        used.append(scale_name(name))
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
                         f"(dtype {dt}, for {leaf_where(leaf.path)})")
    if len(used) == 2:
        scale = used[1]
        if scale not in ck.where:
            raise ValueError(f"checkpoint {ck.root!r} is missing tensor {scale!r}, the scale of {ck.describe(name)}")
        sdt, sshape = ck.info(scale)
        if sdt not in _SCALE_DTYPES or tuple(sshape) != tuple(scale_shape):
            raise ValueError(f"{ck.describe(scale)} has dtype {sdt} and shape {tuple(sshape)}, expected one of "
                             f"{_SCALE_DTYPES} and shape {tuple(scale_shape)}")
    return used


def _read_tensor(ck: _Checkpoint, name: str, leaf: Leaf, block: tuple, n_experts: int) -> np.ndarray:
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
    scale = scale_name(name)
    try:
        if dt == "F8_E4M3":
            return dequantize_fp8_blocks(a, ck.get(scale), block)
        return dequantize_fp4(a, ck.get(scale))
    except ValueError as e:
        raise ValueError(f"{ck.describe(scale)} (the scale of {name!r}): {e}") from None


def _read_leaf(ck: _Checkpoint, leaf: Leaf, block: tuple, dtype, ape_halves: str, n_experts: int) -> np.ndarray:
    if leaf.layout == "experts":  # stack expert by expert: one expert's float32 copy at a time
        out = np.empty(leaf.shape, dtype)
        for e, name in enumerate(leaf.names):
            out[e] = _read_tensor(ck, name, leaf, block, n_experts).T
        return out
    arrays = [_read_tensor(ck, name, leaf, block, n_experts) for name in leaf.names]
    return np.asarray(to_leaf(leaf, arrays, ape_halves), dtype=dtype, order="C")


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
    leaves = v4_leaves(config)

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
        x = _read_leaf(ck, leaf, fmt["block"], leaf_dtype(leaf, config.dtype), ape_halves, config.n_routed_experts)
        put_leaf(params, leaf.path, _place(x, leaf.path, config, mesh))
    return config, params


def _place(x: np.ndarray, path: tuple, config: ModelConfig, mesh):
    if mesh is None:
        return jax.device_put(x)
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
            return [(name, q, False), (scale_name(name), s, True)]
        if store == "fp4":
            q, s = quantize_fp4(x)
            return [(name, q, False), (scale_name(name), s, True)]
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


def _get_leaf(params, leaf: Leaf) -> np.ndarray:
    node = params
    for k in leaf.path:
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"params have no {leaf_where(leaf.path)} (needed for checkpoint tensor "
                             f"{leaf.names[0]!r})") from None
    x = np.asarray(jax.device_get(node))
    if tuple(x.shape) != tuple(leaf.shape):
        raise ValueError(f"{leaf_where(leaf.path)} has shape {tuple(x.shape)}, expected {tuple(leaf.shape)}")
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
    leaves = v4_leaves(config)
    known = {leaf.path for leaf in leaves}
    for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kp)
        if p not in known:
            raise ValueError(f"{leaf_where(p)} has no place in the DeepSeek-V4 checkpoint format")
    writer = _ShardWriter(root, max_shard_bytes)
    for leaf in leaves:
        x = _get_leaf(params, leaf)
        src = x.astype(np.int32) if leaf.kind == "int32" else x.astype(np.float32)
        for name, t in zip(leaf.names, from_leaf(leaf, src, ape_halves)):
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
