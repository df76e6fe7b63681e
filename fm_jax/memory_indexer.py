"""Memory Indexer (SPEC §4): the Level-1 dual encoder that scores every compressed CSA entry.

One scorer per target CSA layer, keyed ``"l{ID}"``. For a decode token with hidden state ``h`` at
position ``t`` and the layer's frozen index keys ``K`` (packed ``[D + 4]``-byte fp8 layout):

    q     = Hadamard(RoPE_t(RMSNorm(h @ wq_a; q_norm_weight) @ wq_b))      [n_heads, head_dim]
    w     = (h @ weights_proj) * head_dim**-0.5 * n_heads**-0.5              [n_heads]
    k_s   = fp8(K[s]).astype(f32) * scale(K[s])                              [head_dim]
    score = sigmoid(sum_h w[h] * relu(q[h] . k_s))                           in [0, 1]

The projections and RoPE live here; ``sum_h w * relu(q . k)`` and the sigmoid are computed by
``pallas_kernels.indexer_scores`` (``impl`` passed through). Entries ``s >= lengths[b]`` are masked to
0.0. Per-entry scores of the target layers are ensembled by ``max`` (default) or ``mean``; the keep set
is ``score >= threshold`` (SPEC §5).

Parameters are a plain dict pytree in JAX ``[in, out]`` layout::

    {"l10": {"wq_a": [d_model, q_lora_rank], "q_norm_weight": [q_lora_rank],
             "wq_b": [q_lora_rank, n_heads * head_dim], "weights_proj": [d_model, n_heads]}, ...}

Compatibility with the public FlashMemory DS-V4 release (``retriever.py``, ``FlashMemoryRetriever`` /
``_LayerScorer.logits``, and the same path in its sglang ``retriever_hook_impl._TrainedScorer``)
------------------------------------------------------------------------------------------------
Matched (read from the release's PyTorch source):

* Order of the query tower: ``wq_a`` -> RMSNorm with weight ``q_norm_weight`` (eps 1e-6, float32,
  *before* ``wq_b``) -> ``wq_b`` -> reshape ``[B, n_heads, head_dim]`` -> RoPE on the **last**
  ``rope_dim`` (64) dims, interleaved pairs (``view_as_complex`` of ``[..., rope_dim/2, 2]``) ->
  normalised Walsh-Hadamard over ``head_dim`` (Sylvester order, ``/ sqrt(d)``). No per-head norm.
* RoPE "in bf16": the release casts the *whole* q (rope and non-rope dims) to bfloat16, rotates the
  bf16 values with float32 arithmetic against a complex64 table, casts the rotated dims back to
  bfloat16 and then the whole q to float32 before the Hadamard. With ``rope_dtype="bfloat16"`` this
  module does exactly that (``apply_rope`` on a bf16 input with ``dtype=float32``, which rounds the
  result back to bf16). ``rope_dtype="float32"`` keeps q in float32 throughout (the backbone's path).
* Angles ``float32(position) * float32(inv_freq)`` rounded to float32 (``torch.outer`` on float32).
  YaRN table with base 160000, factor 16, original length 65536, beta 32/1: ``yarn_inv_freq`` gives a
  table bit-identical to the release's ``precompute_freqs_cis`` at these constants with rope_dim 64
  (checked against PyTorch 2.13 CPU with numpy 2.4; see the optional torch test) -- but only where
  numpy's float32 ``pow`` is correctly rounded: on an AVX-512 host (numpy 2.5.2) 6 of 32 entries were
  one ulp off the release's table, which at positions near 1M moves a float32 angle by ~0.03 rad.
  ``yarn_inv_freq`` (fm_jax.layers.rope) would need its pow in float64 to be platform-independent.
* ``weights_proj`` scale ``head_dim**-0.5 * n_heads**-0.5`` with ``n_heads = wq_b.rows // head_dim``
  and ``head_dim`` 128 by default; no softmax scale on ``q . k``.
* Score ``sigmoid(sum_h w_h * relu(q_h . k))`` in float32; keys dequantised as ``fp8 * scale`` from
  the 132-byte layout (bytes[:128] e4m3fn, bytes[128:132] one float32 scale).
* Ensemble across layers per entry by ``max`` (``retriever.py`` default) or ``mean``.
* The release casts weights to float32 before use; so does ``score_layer`` (params keep their dtype).
  Its checkpoint files (``retrievers.l{ID}.*``) are read and written by ``fm_jax.interop``.

Differences and what could not be verified:

* Positions past the RoPE table: the release clamps them to ``max_position - 1``; here
  ``score_layer`` raises ``ValueError`` for positions outside ``[0, max_seq_len)`` when they are
  concrete (inside ``jax.jit`` the check cannot run and callers must keep positions in range).
* Threshold: the release's ``select_topk`` keeps ``score > threshold``; SPEC §5 (and ``select`` here)
  keep ``score >= threshold`` so that threshold 0 keeps every valid entry.
* The release clamps the YaRN ramp's upper index at ``rope_dim // 2 - 1``; ``yarn_inv_freq`` follows
  DeepSeek-V4's rule (upper index clamped at ``rope_dim - 1``). Both apply YaRN unconditionally (as V4's
  compressed layers do). The tables coincide for the release's constants (rope_dim 64, base 160000); for
  other dims they may differ (those configs do not exist in the release).
* RMSNorm divides by ``sqrt(mean + eps)`` in the release and multiplies by ``rsqrt`` here; Hadamard
  divides by ``sqrt(d)`` there and multiplies by ``d**-0.5`` here; reduction orders differ. These are
  float32 rounding differences, but q is then rounded to bf16, so a rare element (about 40 of 16384 per
  query at the release's dims, measured) lands one bf16 ulp apart; the logits then agree to ~2e-6 of
  their scale (median) and ~3e-4 (worst entry), sigmoid scores to ~4e-4 at worst.
* The head-weighted relu sum runs in ``pallas_kernels.indexer_scores`` (the single implementation shared
  with the engine); its off-GPU XLA path splits the float32 q into two bf16 parts (~2^-17 relative),
  and it factors the fp8 per-entry scale out of the relu (exact for scale >= 0).
* The release's sglang hook calls ``l10/l12/l20`` "CSA layer index (not transformer layer ID)"; here
  target layer ids are backbone layer ids, and the ``v4_flash`` preset places CSA layers so that 10,
  12 and 20 are CSA layers. Its serving hook defaults to ``mean`` ensembling (retriever.py: ``max``)
  and may add a logit offset from an environment variable (default 0); neither is modelled here.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fm_jax.layers.hadamard import hadamard
from fm_jax.layers.key_pages import check_index_pages
from fm_jax.layers.norm import rms_norm
from fm_jax.layers.rope import apply_rope, yarn_inv_freq
from pallas_kernels import indexer_scores

PARAM_NAMES = ("wq_a", "q_norm_weight", "wq_b", "weights_proj")
V4_FLASH_TARGET_LAYERS = (10, 12, 20)
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexerConfig:
    """Memory Indexer hyper-parameters. Defaults are the FlashMemory DS-V4 release's."""

    d_model: int = 4096
    q_lora_rank: int = 2048
    n_heads: int = 128
    head_dim: int = 128
    rope_dim: int = 64
    rope_base: float = 160000.0
    rope_factor: float = 16.0
    rope_original_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_seq_len: int = 1048576  # RoPE table length; scored positions must be < max_seq_len
    target_layers: tuple[int, ...] = V4_FLASH_TARGET_LAYERS
    norm_eps: float = 1e-6
    rope_dtype: str = "bfloat16"  # "bfloat16": the release's bf16 round trip around RoPE
    threshold: float = 0.5
    ensemble: str = "max"
    param_dtype: str = "float32"  # dtype of freshly initialised / copied params

    def __post_init__(self):
        if isinstance(self.target_layers, (list, range)):
            object.__setattr__(self, "target_layers", tuple(self.target_layers))
        _validate_indexer_config(self)

    # ---- derived quantities ----
    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(f"l{i}" for i in self.target_layers)

    @property
    def weight_scale(self) -> float:
        return float(self.head_dim) ** -0.5 * float(self.n_heads) ** -0.5

    @property
    def index_key_bytes(self) -> int:
        return self.head_dim + 4

    @property
    def inv_freq(self) -> np.ndarray:
        """Per-pair YaRN inverse frequencies ``[rope_dim // 2]`` float32."""
        return yarn_inv_freq(self.rope_dim, float(self.rope_base), self.rope_original_len,
                             float(self.rope_factor), float(self.beta_fast), float(self.beta_slow))

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "wq_a": (self.d_model, self.q_lora_rank),
            "q_norm_weight": (self.q_lora_rank,),
            "wq_b": (self.q_lora_rank, self.n_heads * self.head_dim),
            "weights_proj": (self.d_model, self.n_heads),
        }

    def replace(self, **overrides) -> IndexerConfig:
        check_field_names(overrides)
        return dataclasses.replace(self, **overrides)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _validate_indexer_config(c: IndexerConfig) -> None:
    def bad(name, why):
        raise ValueError(f"invalid IndexerConfig field `{name}`={getattr(c, name)!r}: {why}")

    for name in ("d_model", "q_lora_rank", "n_heads", "head_dim", "rope_original_len", "max_seq_len"):
        v = getattr(c, name)
        if not _is_int(v) or v <= 0:
            bad(name, "must be a positive int")
    if c.head_dim & (c.head_dim - 1):
        bad("head_dim", "must be a power of two (Hadamard rotation)")
    if not _is_int(c.rope_dim) or c.rope_dim <= 0 or c.rope_dim % 2:
        bad("rope_dim", "must be a positive even int")
    if c.rope_dim > c.head_dim:
        bad("rope_dim", f"must be <= head_dim={c.head_dim}")
    for name in ("rope_base", "beta_fast", "beta_slow", "norm_eps"):
        v = getattr(c, name)
        if not _is_num(v) or not v > 0:
            bad(name, "must be a positive number")
    if not _is_num(c.rope_factor) or c.rope_factor < 1:
        bad("rope_factor", "must be a number >= 1")
    if not isinstance(c.target_layers, tuple) or not c.target_layers:
        bad("target_layers", "must be a non-empty tuple of layer ids")
    if any(not _is_int(i) or i < 0 for i in c.target_layers):
        bad("target_layers", "every layer id must be a non-negative int")
    if len(set(c.target_layers)) != len(c.target_layers):
        bad("target_layers", "layer ids must be distinct")
    if c.rope_dtype not in ("bfloat16", "float32"):
        bad("rope_dtype", "must be 'bfloat16' or 'float32'")
    if not _is_num(c.threshold) or not 0.0 <= c.threshold <= 1.0:
        bad("threshold", "must be a number in [0, 1]")
    if c.ensemble not in ("max", "mean"):
        bad("ensemble", "must be 'max' or 'mean'")
    if c.param_dtype not in ("float32", "bfloat16"):
        bad("param_dtype", "must be 'float32' or 'bfloat16'")


def check_field_names(overrides: Mapping[str, Any]) -> None:
    """ValueError naming the first key of `overrides` that is not an `IndexerConfig` field."""
    fields = {f.name for f in dataclasses.fields(IndexerConfig)}
    for k in overrides:
        if k not in fields:
            raise ValueError(f"unknown IndexerConfig field `{k}`")


def config_from_model(model_config, **overrides) -> IndexerConfig:
    """An `IndexerConfig` whose query tower has the backbone Lightning Indexer's dims.

    Defaults: ``d_model``, ``q_lora_rank``, ``n_heads = n_index_heads``, ``head_dim = index_head_dim``,
    the model's ``rope_dim`` and the RoPE parameters of its compressed layers (``compress_rope_base``,
    YaRN factor / original length / betas, ``max_seq_len``), ``norm_eps``; target layers = the model's
    CSA layers, or (10, 12, 20) for the ``v4_flash`` preset. Any field can be overridden.
    """
    check_field_names(overrides)
    csa = tuple(model_config.csa_layers)
    if getattr(model_config, "name", None) == "v4_flash" and set(V4_FLASH_TARGET_LAYERS) <= set(csa):
        targets = V4_FLASH_TARGET_LAYERS
    else:
        targets = csa
    kw = {
        "d_model": model_config.d_model, "q_lora_rank": model_config.q_lora_rank,
        "n_heads": model_config.n_index_heads, "head_dim": model_config.index_head_dim,
        "rope_dim": model_config.rope_dim, "rope_base": float(model_config.compress_rope_base),
        "rope_factor": float(model_config.rope_factor), "rope_original_len": model_config.rope_original_len,
        "beta_fast": float(model_config.beta_fast), "beta_slow": float(model_config.beta_slow),
        "max_seq_len": model_config.max_seq_len, "target_layers": targets,
        "norm_eps": float(model_config.norm_eps),
    }
    kw.update(overrides)
    cfg = IndexerConfig(**kw)
    not_csa = [i for i in cfg.target_layers if i not in csa]
    if not_csa:
        raise ValueError(f"invalid IndexerConfig field `target_layers`={cfg.target_layers!r}: layers "
                         f"{not_csa} are not CSA layers of the model (CSA layers: {csa})")
    return cfg


# ----------------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------------
def init_params(indexer_config: IndexerConfig, key: jax.Array) -> dict:
    """Random scorers for every target layer: ``{"l{ID}": {wq_a, q_norm_weight, wq_b, weights_proj}}``.

    Projections ~ N(0, 1/fan_in), ``q_norm_weight`` = ones; dtype ``param_dtype``.
    """
    c = indexer_config
    dt = jnp.dtype(c.param_dtype)
    shapes = c.param_shapes()
    params = {}
    for name, k in zip(c.layer_names, jax.random.split(key, len(c.layer_names))):
        ka, kb, kw = jax.random.split(k, 3)
        params[name] = {
            "wq_a": (jax.random.normal(ka, shapes["wq_a"], jnp.float32) * c.d_model ** -0.5).astype(dt),
            "q_norm_weight": jnp.ones(shapes["q_norm_weight"], dt),
            "wq_b": (jax.random.normal(kb, shapes["wq_b"], jnp.float32) * c.q_lora_rank ** -0.5).astype(dt),
            "weights_proj": (jax.random.normal(kw, shapes["weights_proj"], jnp.float32)
                             * c.d_model ** -0.5).astype(dt),
        }
    return params


def _get_path(tree, path: Sequence):
    node = tree
    for i, p in enumerate(path):
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            where = "".join(f"[{q!r}]" for q in path[: i + 1])
            raise ValueError(f"model params have no entry params{where}") from None
    return node


def init_from_lightning_indexer(indexer_config: IndexerConfig, model_params, model_config) -> dict:
    """Copy the backbone Lightning Indexer's query tower into a Memory Indexer, one scorer per target layer.

    Reads ``params["layers"][l]["attn"]["wq_a"]``, ``["attn"]["q_norm"]``, ``["attn"]["indexer"]["wq_b"]``
    and ``["attn"]["indexer"]["weights_proj"]``. Every dim must match (d_model, q_lora_rank, n_heads =
    n_index_heads, head_dim = index_head_dim, rope_dim) and every target must be a CSA layer; otherwise a
    ``ValueError`` names the mismatch. With the RoPE table of ``config_from_model`` and
    ``rope_dtype="float32"``, the copied scorer's query equals the backbone's LI query.
    """
    c, m = indexer_config, model_config
    pairs = [("d_model", "d_model"), ("q_lora_rank", "q_lora_rank"), ("n_heads", "n_index_heads"),
             ("head_dim", "index_head_dim"), ("rope_dim", "rope_dim")]
    for ours, theirs in pairs:
        if getattr(c, ours) != getattr(m, theirs):
            raise ValueError(f"cannot initialise from the Lightning Indexer: IndexerConfig `{ours}`="
                             f"{getattr(c, ours)} differs from the model's `{theirs}`={getattr(m, theirs)}")
    csa = set(m.csa_layers)
    shapes = c.param_shapes()
    dt = jnp.dtype(c.param_dtype)
    out = {}
    for layer, name in zip(c.target_layers, c.layer_names):
        if layer not in csa:
            raise ValueError(f"cannot initialise from the Lightning Indexer: target layer {layer} is not a "
                             f"CSA layer of the model (CSA layers: {tuple(m.csa_layers)})")
        src = {
            "wq_a": ("layers", layer, "attn", "wq_a"),
            "q_norm_weight": ("layers", layer, "attn", "q_norm"),
            "wq_b": ("layers", layer, "attn", "indexer", "wq_b"),
            "weights_proj": ("layers", layer, "attn", "indexer", "weights_proj"),
        }
        layer_params = {}
        for pname, path in src.items():
            arr = _get_path(model_params, path)
            if tuple(arr.shape) != shapes[pname]:
                where = "".join(f"[{q!r}]" for q in path)
                raise ValueError(f"model params{where} has shape {tuple(arr.shape)}, the Memory Indexer's "
                                 f"`{pname}` needs {shapes[pname]}")
            layer_params[pname] = jnp.asarray(arr).astype(dt)
        out[name] = layer_params
    return out


def check_layer_params(layer_params, c: IndexerConfig, where: str = "layer_params") -> None:
    """ValueError naming `where` and the missing or misshaped tensor of one scorer's params."""
    if not isinstance(layer_params, Mapping):
        raise ValueError(f"{where} must be a dict with keys {PARAM_NAMES}")  # noqa: TRY004
    for pname, shape in c.param_shapes().items():
        if pname not in layer_params:
            raise ValueError(f"{where} is missing `{pname}`")
        got = tuple(np.shape(layer_params[pname]))
        if got != shape:
            raise ValueError(f"{where}[{pname!r}] has shape {got}, expected {shape}")


# ----------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------
def query_tower(layer_params, indexer_config: IndexerConfig, hidden: jax.Array, positions: jax.Array):
    """hidden [B, d] + positions [B] -> (q float32 [B, n_heads, head_dim], w float32 [B, n_heads]).

    ``w`` already carries the ``head_dim**-0.5 * n_heads**-0.5`` scale. Pure jnp; jit-safe.
    """
    c = indexer_config
    f32 = jnp.float32
    x = hidden.astype(f32)
    b = x.shape[0]
    q_lora = jnp.matmul(x, layer_params["wq_a"].astype(f32), precision=_HIGHEST)
    q_lora = rms_norm(q_lora, layer_params["q_norm_weight"].astype(f32), c.norm_eps)
    q = jnp.matmul(q_lora, layer_params["wq_b"].astype(f32), precision=_HIGHEST)
    q = q.reshape(b, c.n_heads, c.head_dim)
    pos = positions.astype(jnp.int32)[:, None]  # broadcast over heads
    if c.rope_dtype == "bfloat16":
        # release: q.to(bf16) -> rotate in float32 arithmetic -> rotated dims back to bf16 -> .float()
        q = apply_rope(q.astype(jnp.bfloat16), pos, c.inv_freq, dtype=f32).astype(f32)
    else:
        q = apply_rope(q, pos, c.inv_freq, dtype=f32)
    q = hadamard(q)
    w = jnp.matmul(x, layer_params["weights_proj"].astype(f32), precision=_HIGHEST) * np.float32(c.weight_scale)
    return q, w


def _kernel_scores(q, weights, keys, lengths, act, impl, page_entries=None):
    """``sum_h w[h] * relu(q[h] . k[s])`` (+ sigmoid), masked past ``lengths``: the one implementation,
    ``pallas_kernels.indexer_scores`` (Pallas on GPU, XLA elsewhere; ``impl`` "auto" | "pallas" | "xla")."""
    if keys.dtype != jnp.uint8 and keys.dtype not in (jnp.bfloat16, jnp.float32):
        keys = keys.astype(jnp.float32)
    return indexer_scores(q, weights, keys, lengths, act=act, impl=impl, page_entries=page_entries)


def _score_impl(layer_params, hidden, index_keys, positions, lengths, c: IndexerConfig, impl: str, act: str,
                page_entries=None):
    q, w = query_tower(layer_params, c, hidden, positions)
    return _kernel_scores(q, w, index_keys, lengths, act, impl, page_entries)


_score_jit = jax.jit(_score_impl, static_argnames=("c", "impl", "act", "page_entries"))


def _concrete(x) -> np.ndarray | None:
    """The host value of ``x``, or None under tracing (checks then cannot run)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_score_inputs(c: IndexerConfig, hidden, index_keys, positions, lengths, page_entries=None):
    if np.ndim(hidden) != 2 or np.shape(hidden)[1] != c.d_model:
        raise ValueError(f"hidden must be [B, d_model={c.d_model}], got shape {tuple(np.shape(hidden))}")
    if not jnp.issubdtype(hidden.dtype, jnp.floating):
        raise ValueError(f"hidden must be floating, got {hidden.dtype}")
    b = np.shape(hidden)[0]
    if np.ndim(index_keys) != 3:
        raise ValueError(f"index_keys must be uint8 [B, N, {c.index_key_bytes}] (or float [B, N, "
                         f"{c.head_dim}]), got rank {np.ndim(index_keys)} shape {tuple(np.shape(index_keys))}")
    kdt = jnp.dtype(index_keys.dtype)
    n = index_keys.shape[1]
    if page_entries is not None:
        try:
            check_index_pages("index_keys (page_entries given)", index_keys, page_entries, c.head_dim)
        except ValueError as err:
            raise ValueError(f"{err}: page-blocked index_keys are uint8 [B, n_pages, page_entries * "
                             f"(head_dim + 4)]; pass page_entries=None for rows [B, N, {c.index_key_bytes}]"
                             ) from None
        n = index_keys.shape[1] * page_entries
    elif kdt == jnp.uint8:
        if index_keys.shape[-1] != c.index_key_bytes:
            raise ValueError(f"packed index_keys need last dim head_dim + 4 = {c.index_key_bytes}, "
                             f"got {index_keys.shape[-1]}")
    elif jnp.issubdtype(kdt, jnp.floating):
        if index_keys.shape[-1] != c.head_dim:
            raise ValueError(f"float index_keys need last dim head_dim = {c.head_dim}, got {index_keys.shape[-1]}")
    else:
        raise ValueError(f"index_keys must be uint8 (packed fp8 + scale) or float, got dtype {kdt}")
    if index_keys.shape[0] != b:
        raise ValueError(f"index_keys batch {index_keys.shape[0]} != hidden batch {b}")
    if np.shape(positions) != (b,):
        raise ValueError(f"positions must be [B={b}], got shape {tuple(np.shape(positions))}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be integer, got {positions.dtype}")
    pv = _concrete(positions)
    if pv is not None and pv.size and (pv.min() < 0 or pv.max() >= c.max_seq_len):
        raise ValueError(f"positions must lie in [0, max_seq_len={c.max_seq_len}); got min {pv.min()} "
                         f"max {pv.max()}")
    if lengths is not None:
        if np.shape(lengths) != (b,):
            raise ValueError(f"lengths must be [B={b}], got shape {tuple(np.shape(lengths))}")
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be integer, got {lengths.dtype}")
        lv = _concrete(lengths)
        if lv is not None and lv.size and (lv.min() < 0 or lv.max() > n):
            raise ValueError(f"lengths must lie in [0, N={n}]; got min {lv.min()} max {lv.max()}")


def _prepare(c, hidden, index_keys, positions, lengths, page_entries=None):
    hidden, index_keys, positions = jnp.asarray(hidden), jnp.asarray(index_keys), jnp.asarray(positions)
    if lengths is not None:
        lengths = jnp.asarray(lengths)
    _check_score_inputs(c, hidden, index_keys, positions, lengths, page_entries)
    if lengths is None:
        lengths = jnp.full((hidden.shape[0],), index_keys.shape[1] * (page_entries or 1), jnp.int32)
    return hidden, index_keys, positions.astype(jnp.int32), lengths.astype(jnp.int32)


def score_layer(layer_params, indexer_config: IndexerConfig, hidden, index_keys, positions, lengths=None,
                impl: str = "auto", page_entries: int | None = None) -> jax.Array:
    """Sigmoid scores float32 ``[B, N]`` of one target layer's scorer.

    hidden [B, d_model] (any float dtype); index_keys uint8 [B, N, head_dim + 4] (packed fp8 + float32
    scale; float [B, N, head_dim] already-dequantised keys are accepted too); positions int [B] (the
    query token's position, < max_seq_len); lengths int [B] or None (= N): entries ``s >= lengths[b]``
    score 0.0. ``impl`` is passed to ``pallas_kernels.indexer_scores``. ``page_entries=P``: index_keys are
    the decode cache's page-blocked layout uint8 [B, n_pages, P * (head_dim + 4)] (``fm_jax.layers.key_pages``;
    N = n_pages * P), read without conversion. Input checks run eagerly (and are skipped for traced values);
    the computation is jitted.
    """
    c = indexer_config
    check_layer_params(layer_params, c)
    hidden, index_keys, positions, lengths = _prepare(c, hidden, index_keys, positions, lengths, page_entries)
    return _score_jit(layer_params, hidden, index_keys, positions, lengths, c=c, impl=impl, act="sigmoid",
                      page_entries=page_entries)


def layer_logits(layer_params, indexer_config: IndexerConfig, hidden, index_keys, positions, lengths=None,
                 impl: str = "auto", page_entries: int | None = None) -> jax.Array:
    """Pre-sigmoid logits float32 ``[B, N]`` (masked entries ``-inf``); for losses on logits. Arguments as
    ``score_layer``."""
    c = indexer_config
    check_layer_params(layer_params, c)
    hidden, index_keys, positions, lengths = _prepare(c, hidden, index_keys, positions, lengths, page_entries)
    return _score_jit(layer_params, hidden, index_keys, positions, lengths, c=c, impl=impl, act="none",
                      page_entries=page_entries)


def _per_layer(value, layer: int, name: str, what: str):
    """``value`` is one array shared by all layers or a mapping keyed by layer id or "l{ID}"."""
    if isinstance(value, Mapping):
        if layer in value:
            return value[layer]
        if name in value:
            return value[name]
        raise ValueError(f"{what} has no entry for target layer {layer} ({name!r})")
    return value


def score_all(params, indexer_config: IndexerConfig, hidden_by_layer, keys_by_layer, positions, lengths=None,
              impl: str = "auto", page_entries: int | None = None) -> dict[str, jax.Array]:
    """Scores of every target layer: ``{"l{ID}": float32 [B, N]}``.

    ``hidden_by_layer`` / ``keys_by_layer``: a mapping keyed by layer id (int) or ``"l{ID}"``, or a single
    array used for every layer (the release's standalone demo shares one hidden state and one key set).
    ``page_entries``: every layer's keys are page-blocked (see ``score_layer``).
    """
    c = indexer_config
    out = {}
    for layer, name in zip(c.target_layers, c.layer_names):
        if name not in params:
            raise ValueError(f"params have no scorer {name!r} (target layer {layer})")
        out[name] = score_layer(params[name], c, _per_layer(hidden_by_layer, layer, name, "hidden_by_layer"),
                                _per_layer(keys_by_layer, layer, name, "keys_by_layer"), positions, lengths,
                                impl=impl, page_entries=page_entries)
    return out


def ensemble_scores(scores_by_layer, mode: str = "max") -> jax.Array:
    """Per-entry ensemble over layers: ``max`` (default) or ``mean``.

    ``scores_by_layer``: mapping name -> [B, N], a sequence of [B, N], or a stacked [L, B, N] array.
    """
    if mode not in ("max", "mean"):
        raise ValueError(f"ensemble mode must be 'max' or 'mean', got {mode!r}")
    if isinstance(scores_by_layer, Mapping):
        arrs = list(scores_by_layer.values())
    elif isinstance(scores_by_layer, (list, tuple)):
        arrs = list(scores_by_layer)
    else:
        arrs = None
    if arrs is not None:
        if not arrs:
            raise ValueError("ensemble_scores needs at least one layer")
        shapes = {tuple(np.shape(a)) for a in arrs}
        if len(shapes) != 1:
            raise ValueError(f"per-layer scores disagree in shape: {sorted(shapes)}")
        stacked = jnp.stack([jnp.asarray(a, jnp.float32) for a in arrs])
    else:
        stacked = jnp.asarray(scores_by_layer, jnp.float32)
        if stacked.ndim < 1 or stacked.shape[0] == 0:
            raise ValueError("ensemble_scores needs a leading layer axis with at least one layer")
    return jnp.max(stacked, axis=0) if mode == "max" else jnp.mean(stacked, axis=0)


def select(scores, threshold: float, lengths=None) -> jax.Array:
    """Keep mask bool ``[B, N]``: ``scores >= threshold`` (SPEC §5), and ``s < lengths[b]`` when given."""
    scores = jnp.asarray(scores)
    keep = scores >= jnp.asarray(threshold, scores.dtype)
    if lengths is not None:
        n = scores.shape[-1]
        keep = keep & (jnp.arange(n, dtype=jnp.int32) < jnp.asarray(lengths, jnp.int32)[..., None])
    return keep
