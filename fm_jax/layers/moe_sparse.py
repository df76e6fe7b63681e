"""Sparse (dispatching) MoE compute: each routed expert runs only on the tokens routed to it.

Same function as the dense path in `fm_jax.layers.ffn` (routing from `moe_route`, SPEC §9), different cost:
the `tokens × top_k` token-expert assignments are sorted by expert and the three expert matmuls run as
grouped matmuls (consecutive row groups, one expert's weights each) over exactly those rows:
`jax.lax.ragged_dot`, or for one or two decode tokens `gathered_matmul`, which reads only the routed
experts' weights, or from a few hundred rows on a Hopper GPU the Mosaic-GPU grouped matmul
(`default_grouped_matmul`). Shapes stay static: the capacity is always `tokens × top_k`
rows, whatever the routing.

Numerics against the dense path: `w1` / `w3` outputs in the compute dtype, SwiGLU and the routing weight in
float32, cast to the compute dtype before `w2` (as the dense path and V4), then `w2` and the sum over a
token's `top_k` experts in float32 (V4's MoE accumulator). The dense path instead sums all experts inside
one `w2` contraction in the compute dtype, so the two agree to the rounding of that sum, not bitwise.

Expert parallel: called under a context mesh (`jax.set_mesh(mesh)`) whose `model` axis divides
`n_routed_experts` (the split `fm_jax.sharding` gives the expert weights), every `model` device dispatches
all assignments but computes only those of its own experts (the others sort past its last group and are
zeroed), and a `psum` over `model` adds the partial outputs. Without such a mesh the computation is
single-program (under `jit` with sharded inputs, XLA's propagation places it).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fm_jax.layers.swiglu import swiglu_hidden
from fm_jax.sharding import MODEL

GroupedMatmul = Callable[..., jax.Array]  # (lhs [M, K], rhs [G, K, N], group_sizes [G], **kw) -> [M, N]


def gathered_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, preferred_element_type=None
                    ) -> jax.Array:
    """`jax.lax.ragged_dot`'s contract by gathering each row's expert matrix: [M, K] x [G, K, N] -> [M, N].

    Reads M matrices instead of G, so it is the path for a few tokens over many experts: on the H100 XLA's
    `ragged_dot` reads every expert's weights whatever the routing (V4-Flash MoE layer: 4.7 ms at 1 to 32
    tokens, about the time of reading all 256 experts), this costs about 0.28 ms per row (1.7 ms at 1 token,
    3.1 ms at 2; `benchmarks/results/moe-h100.json`). Rows past the last group are computed with the last
    expert (`ragged_dot` leaves them undefined too; `routed_experts` zeroes them)."""
    row = jnp.arange(lhs.shape[0], dtype=jnp.int32)
    expert = jnp.searchsorted(jnp.cumsum(group_sizes), row, side="right")
    w = rhs[jnp.minimum(expert, rhs.shape[0] - 1)]                                    # [M, K, N]
    return jnp.einsum("mk,mkn->mn", lhs, w, preferred_element_type=preferred_element_type)


MOSAIC_MIN_ROWS = 256   # token-expert rows from which the Hopper kernel beats `ragged_dot` (see below)


def _hopper() -> bool:
    """Whether the default device is a Hopper GPU (wgmma; compute capability 9.x)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def mosaic_suits(lhs: jax.Array, rhs: jax.Array) -> bool:
    """Whether `mosaic_grouped_matmul` takes these operands: bf16, K a multiple of 64 and N of 128 (its
    tiles), on a Hopper GPU."""
    k, n = rhs.shape[1], rhs.shape[2]
    return (_hopper() and lhs.dtype == rhs.dtype == jnp.bfloat16 and k % 64 == 0 and n % 128 == 0)


def mosaic_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, preferred_element_type=None
                          ) -> jax.Array:
    """`jax.lax.ragged_dot`'s contract on the Hopper Mosaic-GPU grouped matmul
    (`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`), falling back to `ragged_dot` where
    `mosaic_suits` says no. On the GPU XLA lowers a large `ragged_dot` as a dense product over every expert
    (an 8K-token V4-Flash prefill asked for a 96 GiB buffer on the H100); this kernel ran it in 21.9 ms
    against the dense MoE's 163.5 ms (`moe-h100.json`, `sparse_mgpu`). Rows are padded to its 64-row tile.
    Its output is in the operands' dtype, so with `preferred_element_type=float32` (the `w2` product) the
    result is bf16-rounded before the cast, where `ragged_dot` accumulates to float32."""
    if not mosaic_suits(lhs, rhs):
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # GPU-only module: imported on use
    m = lhs.shape[0]
    x = jnp.pad(lhs, ((0, -m % 64), (0, 0)))
    out = ragged_dot_mgpu.ragged_dot(x, rhs, group_sizes=group_sizes.astype(jnp.int32), block_m=64, block_n=128,
                                     block_k=64, max_concurrent_steps=4, grid_block_n=1)[:m]
    return out if preferred_element_type is None else out.astype(preferred_element_type)


def default_grouped_matmul(n_rows: int, n_experts: int) -> GroupedMatmul:
    """`gathered_matmul` up to `n_experts // 16` token-expert rows; from `MOSAIC_MIN_ROWS` rows on a Hopper
    GPU `mosaic_grouped_matmul`; `jax.lax.ragged_dot` otherwise. The gathered crossover measured on the
    H100 for V4-Flash (256 experts) lies between 12 rows (gathered 3.1 ms, ragged 4.7) and 24 (4.8 and 4.7):
    the gathered rows cost about 1/17 of a full `ragged_dot` each. The Mosaic kernel was slower than
    `ragged_dot` at 48-192 rows (5.9-6.0 ms against 4.9-5.4) and faster at 384 (6.2 against 7.0)."""
    if n_rows <= n_experts // 16:
        return gathered_matmul
    return mosaic_grouped_matmul if n_rows >= MOSAIC_MIN_ROWS and _hopper() else jax.lax.ragged_dot


def dispatch(ids: jax.Array, n_experts: int, first_expert=0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sort token-expert assignments by expert.

    ids: int32 [tokens, top_k] global expert ids; the experts computed here are
    [first_expert, first_expert + n_experts) (`first_expert` may be traced).
    Returns (order int32 [tokens * top_k]: flat assignment indices `token * top_k + j` sorted by expert,
    stably; group_sizes int32 [n_experts]: assignments per local expert; mine bool [tokens * top_k]:
    whether the sorted row belongs to a local expert). Assignments to other experts sort last."""
    local = ids.reshape(-1).astype(jnp.int32) - first_expert
    key = jnp.where((local >= 0) & (local < n_experts), local, n_experts)  # n_experts = "not here"
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(key, length=n_experts + 1)[:n_experts].astype(jnp.int32)
    return order, group_sizes, key[order] < n_experts


def routed_experts(experts, x: jax.Array, ids: jax.Array, weights: jax.Array, limit: float, *,
                   first_expert=0, grouped_matmul: GroupedMatmul | None = None) -> jax.Array:
    """sum_k weights[:, k] * expert_{ids[:, k]}(x) over the experts held in `experts`, float32.

    experts: {w1, w3 [E_local, d_model, inter], w2 [E_local, inter, d_model]} (global ids first_expert...);
    x: [tokens, d_model]; ids: int32 [tokens, top_k]; weights: float32 [tokens, top_k]; limit: the SwiGLU
    clamp. Assignments to experts not held here contribute 0. `grouped_matmul`: None = by the shapes
    (`default_grouped_matmul`). Returns [tokens, d_model] float32."""
    n, k = ids.shape
    grouped_matmul = grouped_matmul or default_grouped_matmul(n * k, experts["w1"].shape[0])
    dt = jnp.result_type(x.dtype, experts["w1"].dtype)  # the dense einsum's promotion
    w1, w3, w2 = (experts[name].astype(dt) for name in ("w1", "w3", "w2"))
    order, sizes, mine = dispatch(ids, w1.shape[0], first_expert)
    rows = x.astype(dt)[order // k]                                          # [tokens * top_k, d_model]
    h = swiglu_hidden(grouped_matmul(rows, w1, sizes), grouped_matmul(rows, w3, sizes), limit)
    h = h * jnp.where(mine, weights.reshape(-1)[order], 0.0)[:, None]  # the routing weight before w2
    h = h.astype(x.dtype).astype(dt)  # rounded as the dense path rounds it
    y = grouped_matmul(h, w2, sizes, preferred_element_type=jnp.float32)    # [tokens * top_k, d_model]
    y = jnp.where(mine[:, None], y, 0.0)  # rows past the last group: defined as 0 here, whatever the kernel
    # back to (token, j) order by a gather (a scatter-add would sum duplicates in an unspecified order)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=jnp.int32))
    return jnp.sum(y[inverse].reshape(n, k, -1), axis=1)


def _expert_parallel_axis(n_experts: int) -> int:
    """Size of the context mesh's `model` axis when it splits the experts evenly, else 1 (no split)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or MODEL not in mesh.axis_names:
        return 1
    m = int(mesh.shape[MODEL])
    return m if m > 1 and n_experts % m == 0 else 1


def sparse_moe(experts, x: jax.Array, ids: jax.Array, weights: jax.Array, limit: float) -> jax.Array:
    """The routed experts' output [..., d_model] float32, each expert on its own tokens only.
    x: [..., d_model]; ids int32 / weights float32: [..., top_k] (from `ffn.moe_route`)."""
    lead, d, k = x.shape[:-1], x.shape[-1], ids.shape[-1]
    x2, ids2, wt2 = x.reshape(-1, d), ids.reshape(-1, k), weights.reshape(-1, k)
    n_experts = experts["w1"].shape[0]
    m = _expert_parallel_axis(n_experts)
    if m == 1:
        return routed_experts(experts, x2, ids2, wt2, limit).reshape(*lead, d)

    def shard(e_local, x_, ids_, w_):  # one `model` device: its n_experts / m experts
        first = jax.lax.axis_index(MODEL) * (n_experts // m)
        return jax.lax.psum(routed_experts(e_local, x_, ids_, w_, limit, first_expert=first), MODEL)

    espec = jax.tree.map(lambda a: P(MODEL, *([None] * (a.ndim - 1))), experts)
    out = jax.shard_map(shard, in_specs=(espec, P(), P(), P()), out_specs=P(), axis_names={MODEL},
                        check_vma=False)(experts, x2, ids2, wt2)
    return out.reshape(*lead, d)
