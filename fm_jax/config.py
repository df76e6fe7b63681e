"""Model configuration: one frozen dataclass with the SPEC field names, and named presets.

`get_config("tiny", window=32)` returns a validated config; every invalid combination raises a
`ValueError` that names the offending field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import jax.numpy as jnp

from fm_jax.layers import key_pages, kv_fp8

KIND_WINDOW, KIND_CSA, KIND_HCA = "window", "csa", "hca"


@dataclass(frozen=True)
class ModelConfig:
    # vocabulary / widths
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4
    # attention (one shared KV head, many query heads)
    n_heads: int = 4
    head_dim: int = 32
    rope_dim: int = 8
    q_lora_rank: int = 32
    o_groups: int = 2
    o_lora_rank: int = 32
    window: int = 16
    # compression: compress_ratios[l] in {0, csa_ratio, hca_ratio}
    compress_ratios: tuple[int, ...] = (0, 4, 16, 4)
    csa_ratio: int = 4
    hca_ratio: int = 16
    # Lightning Indexer (CSA layers)
    n_index_heads: int = 4
    index_head_dim: int = 16
    index_topk: int = 8
    # RoPE (YaRN, interleaved pairs)
    rope_base: float = 10000.0
    compress_rope_base: float = 160000.0
    rope_factor: float = 16.0
    rope_original_len: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1
    max_seq_len: int = 16384  # length of the precomputed RoPE tables; positions must stay below it
    # SPEC (verify): RoPE position of a compressed entry: its first or its last token
    compress_rope_position: Literal["first", "last"] = "first"
    # FFN
    ffn: Literal["dense", "moe"] = "dense"
    dense_inter_dim: int = 128
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    moe_top_k: int = 2
    moe_inter_dim: int = 64
    # how the routed experts are computed (same routing, same function up to float rounding; layers/ffn.py):
    # "dense" = every expert on every token, unrouted ones weighted 0; "sparse" = each expert on its routed
    # tokens only (sort by expert + grouped matmul, expert parallel over the mesh axis `model`)
    moe_impl: Literal["dense", "sparse"] = "dense"
    # the Lightning Indexer's top-k (`pallas_kernels.dispatch.topk`): "auto" = the dispatch's choice (the
    # radix-select kernel on a GPU where it was measured faster than `lax.top_k`, else `lax.top_k`), "pallas" =
    # the kernel (GPU), "xla" = `lax.top_k`. A knob of its own, not the scoring/attention `impl` (same picks
    # either way)
    topk_impl: Literal["auto", "pallas", "xla"] = "auto"
    # MoE routing (SPEC §9): routed weights = renormalised sqrt(softplus) scores x routed_scaling_factor
    # (V4's 1.5 in every preset); layers l < n_hash_layers route by token id (tid2eid) instead of top-k
    routed_scaling_factor: float = 1.5
    n_hash_layers: int = 0
    # SwiGLU clamp (SPEC §9): up to [-limit, limit], gate to <= limit; 0 = no clamp
    swiglu_limit: float = 10.0
    # residual: hc_mult = 1 is the plain residual; > 1 the dynamic hyper-connections (mHC) of SPEC §9
    hc_mult: int = 1
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    # LSA paging: 1 page = page_entries CSA entries
    page_entries: int = 8
    # V4's fp8 KV (SPEC §3, §9): the nope dims of the window KV and of the attention compressor's entries
    # rounded to fp8 e4m3 (blocks of 64, power-of-two scales) in the forward, and stored as packed
    # entry_bytes rows (`fm_jax.layers.kv_fp8`); needs head_dim - rope_dim a multiple of 64
    kv_fp8: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    # XLA precision of the model's matmuls (a `jax.default_matmul_precision` value, applied by
    # `backbone.matmul_precision` around every block and the LM head). None = "highest" for dtype float32:
    # XLA:GPU otherwise runs float32 dots as TF32 (10-bit mantissa, ~1e-3 relative per product), which on
    # the H200s moved logits by up to 6.8 between a mesh and one device and flipped top-k picks (issue 11);
    # with it, float32 means IEEE float32 and a mesh differs from one device by reduction order only.
    # For bfloat16 None keeps XLA's default (bf16 operands are exact on the tensor cores either way).
    # "tensorfloat32" trades that for the GPU's TF32 speed.
    matmul_precision: Literal["highest", "tensorfloat32", "default"] | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        if isinstance(self.compress_ratios, (list, range)):  # keep the config hashable (a static jit arg)
            object.__setattr__(self, "compress_ratios", tuple(self.compress_ratios))
        _validate(self)

    # ---- derived quantities (one definition each) ----
    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def dot_precision(self) -> str | None:
        """The effective `matmul_precision` (None = XLA's default); see the field's comment."""
        if self.matmul_precision is not None:
            return self.matmul_precision
        return "highest" if self.dtype == "float32" else None

    def layer_kind(self, layer: int) -> str:
        r = self.compress_ratios[layer]
        if r == 0:
            return KIND_WINDOW
        return KIND_CSA if r == self.csa_ratio else KIND_HCA

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return tuple(self.layer_kind(i) for i in range(self.n_layers))

    @property
    def csa_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == KIND_CSA)

    @property
    def index_key_bytes(self) -> int:
        """Bytes of one packed index key: index_head_dim fp8 values + one fp32 scale."""
        return self.index_head_dim + 4

    @property
    def index_page_bytes(self) -> int:
        """Bytes of one page of index keys in the cache's page-blocked layout (`fm_jax.layers.key_pages`):
        page_entries * (index_head_dim + 4), the fp8 values of every entry, then every scale."""
        return key_pages.index_page_bytes(self.page_entries, self.index_head_dim)

    @property
    def kv_entry_bytes(self) -> int:
        """Bytes of one stored attention-KV entry (window slot or compressed entry): the packed fp8 layout
        (584 for V4-Flash) with `kv_fp8`, else head_dim values of the compute dtype."""
        if self.kv_fp8:
            return kv_fp8.entry_bytes(self.head_dim, self.rope_dim)
        return self.head_dim * self.compute_dtype.itemsize

    @property
    def heads_per_group(self) -> int:
        return self.n_heads // self.o_groups

    def rope_base_for(self, layer: int) -> float:
        return self.rope_base if self.compress_ratios[layer] == 0 else self.compress_rope_base

    def is_hash_layer(self, layer: int) -> bool:
        """MoE layer routed by token id (`tid2eid`) rather than by its router's top-k."""
        return self.ffn == "moe" and layer < self.n_hash_layers

    def replace(self, **overrides) -> ModelConfig:
        return dataclasses.replace(self, **overrides)


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _validate(c: ModelConfig) -> None:
    def bad(name, why):
        raise ValueError(f"invalid config field `{name}`={getattr(c, name)!r}: {why}")

    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups",
                 "o_lora_rank", "window", "n_index_heads", "index_head_dim", "index_topk", "max_seq_len",
                 "page_entries", "hc_mult", "csa_ratio", "hca_ratio"):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            bad(name, "must be a positive int")
    if c.rope_dim <= 0 or c.rope_dim % 2:
        bad("rope_dim", "must be a positive even int")
    if c.rope_dim >= c.head_dim:
        bad("rope_dim", f"must be < head_dim={c.head_dim}")
    if c.rope_dim >= c.index_head_dim:
        bad("rope_dim", f"must be < index_head_dim={c.index_head_dim}")
    if not _is_pow2(c.index_head_dim):
        bad("index_head_dim", "must be a power of two (Hadamard rotation)")
    if c.n_heads % c.o_groups:
        bad("o_groups", f"must divide n_heads={c.n_heads}")
    if c.csa_ratio == c.hca_ratio:
        bad("hca_ratio", "must differ from csa_ratio")
    if len(c.compress_ratios) != c.n_layers:
        bad("compress_ratios", f"needs one entry per layer (n_layers={c.n_layers})")
    allowed = {0, c.csa_ratio, c.hca_ratio}
    for r in c.compress_ratios:
        if r not in allowed:
            bad("compress_ratios", f"entry {r} is outside {{0, csa_ratio, hca_ratio}} = {sorted(allowed)}")
    if c.max_seq_len % c.hca_ratio or c.max_seq_len % c.csa_ratio:
        bad("max_seq_len", "must be a multiple of csa_ratio and hca_ratio")
    if not c.rope_factor >= 1.0:  # also rejects NaN
        bad("rope_factor", "must be >= 1")
    for name in ("rope_base", "compress_rope_base", "beta_fast", "beta_slow"):
        if not getattr(c, name) > 0:
            bad(name, "must be > 0")
    if not isinstance(c.rope_original_len, int) or c.rope_original_len <= 0:
        bad("rope_original_len", "must be a positive int")
    if not c.norm_eps >= 0:
        bad("norm_eps", "must be >= 0")
    if c.n_shared_experts < 0:
        bad("n_shared_experts", "must be >= 0")
    if c.compress_rope_position not in ("first", "last"):
        bad("compress_rope_position", "must be 'first' or 'last'")
    if c.ffn not in ("dense", "moe"):
        bad("ffn", "must be 'dense' or 'moe'")
    if c.ffn == "moe":
        for name in ("n_routed_experts", "moe_top_k", "moe_inter_dim"):
            if getattr(c, name) <= 0:
                bad(name, "must be positive when ffn='moe'")
        if c.moe_top_k > c.n_routed_experts:
            bad("moe_top_k", f"must be <= n_routed_experts={c.n_routed_experts}")
        if c.n_shared_experts < 0:
            bad("n_shared_experts", "must be >= 0")
    elif c.dense_inter_dim <= 0:
        bad("dense_inter_dim", "must be positive when ffn='dense'")
    if c.moe_impl not in ("dense", "sparse"):
        bad("moe_impl", "must be 'dense' or 'sparse'")
    if c.topk_impl not in ("auto", "pallas", "xla"):
        bad("topk_impl", "must be 'auto', 'pallas' or 'xla'")
    if c.dtype not in ("float32", "bfloat16"):
        bad("dtype", "must be 'float32' or 'bfloat16'")
    if c.matmul_precision not in (None, "highest", "tensorfloat32", "default"):
        bad("matmul_precision", "must be None, 'highest', 'tensorfloat32' or 'default'")
    for name in ("hc_sinkhorn_iters", "n_hash_layers"):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "hc_sinkhorn_iters" else 0):
            bad(name, "must be a positive int" if name == "hc_sinkhorn_iters" else "must be a non-negative int")
    if c.n_hash_layers and c.ffn != "moe":
        bad("n_hash_layers", "hash routing needs ffn='moe'")
    if not c.hc_eps > 0:  # also rejects NaN
        bad("hc_eps", "must be > 0")
    if not c.routed_scaling_factor > 0:
        bad("routed_scaling_factor", "must be > 0")
    if not c.swiglu_limit >= 0:
        bad("swiglu_limit", "must be >= 0 (0 = no clamp)")
    if not isinstance(c.kv_fp8, bool):
        bad("kv_fp8", "must be a bool")
    if c.kv_fp8 and (c.head_dim - c.rope_dim) % kv_fp8.BLOCK:
        bad("kv_fp8", f"needs head_dim - rope_dim (= {c.head_dim - c.rope_dim}) to be a multiple of {kv_fp8.BLOCK}")
    if c.n_hash_layers > c.n_layers:
        bad("n_hash_layers", f"must be <= n_layers={c.n_layers}")


def _v4_flash_ratios() -> tuple[int, ...]:
    # The official config.json's `compress_ratios` without its 44th entry (the MTP layer, not modelled):
    # layers 0, 1 window-only, then CSA (even layers 2-42) and HCA (odd layers 3-41) alternating (SPEC §9).
    return (0, 0) + tuple(4 if i % 2 == 0 else 128 for i in range(41))


PRESETS: dict[str, dict] = {
    "tiny": dict(),
    "small": dict(
        vocab_size=32000, d_model=512, n_layers=8, n_heads=8, head_dim=128, rope_dim=32,
        q_lora_rank=256, o_groups=4, o_lora_rank=256, window=128,
        compress_ratios=(0, 4, 128, 4, 128, 4, 128, 4), csa_ratio=4, hca_ratio=128,
        n_index_heads=8, index_head_dim=64, index_topk=128, max_seq_len=262144,
        ffn="moe", n_routed_experts=8, n_shared_experts=1, moe_top_k=2, moe_inter_dim=448,
        page_entries=64,
    ),
    # The trained miniature (checkpoints/mini, train.pretrain on train.tasks): V4's architecture at
    # ~9M parameters. 2 window-only layers, then CSA/HCA alternating (4 CSA layers, so the release's
    # min_layers=3 vote means something), mHC with 4 streams, every layer MoE (first layer hash-routed),
    # V4's window (128), ratios (4 / 128), RoPE bases and YaRN. head_dim 128 against index_head_dim 32
    # keeps the Memory Indexer's always-resident index keys small next to the attention KV.
    "mini": dict(
        vocab_size=512, d_model=256, n_layers=9, n_heads=4, head_dim=128, rope_dim=16,
        q_lora_rank=128, o_groups=2, o_lora_rank=128, window=128,
        compress_ratios=(0, 0, 4, 128, 4, 128, 4, 128, 4), csa_ratio=4, hca_ratio=128,
        n_index_heads=4, index_head_dim=32, index_topk=64, max_seq_len=131072,
        ffn="moe", n_routed_experts=4, n_shared_experts=1, moe_top_k=2, moe_inter_dim=128,
        page_entries=16, hc_mult=4, hc_sinkhorn_iters=20, n_hash_layers=1, routed_scaling_factor=1.5,
        swiglu_limit=10.0, dtype="bfloat16",
    ),
    # V4-Flash as in its official config.json (SPEC §9). Exact: mHC (hc_mult 4, Sinkhorn 20, eps 1e-6),
    # every layer MoE with sqrt(softplus) routing, 3 hash-routed layers, route scale 1.5, SwiGLU clamp 10,
    # RoPE 10000 plain (window layers) / 160000 + YaRN (compressed layers), entry visibility, the fp8 KV
    # (`kv_fp8`: rounding and 584-byte entries). Not modelled: the MTP layer, fp8/fp4 weight and activation
    # quantisation (QAT) (README "Fidelity to DeepSeek-V4"). `moe_impl` stays "dense" until the GPU numbers
    # of benchmarks/bench_moe.py show the grouped matmul winning: XLA:GPU's default `ragged_dot` lowering
    # can expand to a dense matmul over all groups (more FLOPs than the dense MoE).
    "v4_flash": dict(
        vocab_size=129280, d_model=4096, n_layers=43, n_heads=64, head_dim=512, rope_dim=64,
        q_lora_rank=1024, o_groups=8, o_lora_rank=1024, window=128,
        compress_ratios=_v4_flash_ratios(), csa_ratio=4, hca_ratio=128,
        n_index_heads=64, index_head_dim=128, index_topk=512, max_seq_len=1048576,
        ffn="moe", n_routed_experts=256, n_shared_experts=1, moe_top_k=6, moe_inter_dim=2048,
        page_entries=64, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, n_hash_layers=3,
        routed_scaling_factor=1.5, swiglu_limit=10.0, kv_fp8=True, dtype="bfloat16",
    ),
}


def get_config(name: str = "tiny", **overrides) -> ModelConfig:
    """Preset `name` (`tiny`, `small`, `v4_flash`) with field overrides, validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for k in overrides:
        if k not in fields:
            raise ValueError(f"unknown config field `{k}`")
    kw = {**PRESETS[name], **overrides}
    if "n_layers" in overrides and "compress_ratios" not in overrides:
        base = kw["compress_ratios"] if "compress_ratios" in PRESETS[name] else ModelConfig.compress_ratios
        kw["compress_ratios"] = tuple(base[i % len(base)] for i in range(kw["n_layers"]))
    return ModelConfig(name=name, **kw)
