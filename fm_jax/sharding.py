"""Device mesh and partition rules for parameters and caches (SPEC §7).

Mesh axes are ``("data", "model")``:

* ``data`` splits requests: every cache buffer (and the tokens / lengths fed with it) is split over
  ``data`` along its leading batch axis.
* ``model`` splits heads and experts:

  ==========================================  =====================================================
  parameter                                   spec (when the rule divides evenly)
  ==========================================  =====================================================
  ``attn.wq_b``        ``[q_lora, H*hd]``      ``P(None, "model")``   query heads (column blocks)
  ``attn.sink``        ``[H]``                 ``P("model")``         one sink per query head
  ``attn.wo_a``        ``[G, H/G*hd, o_lora]`` ``P("model", None, None)`` output groups
  ``attn.wo_b``        ``[G*o_lora, d]``       ``P("model", None)``   rows of those groups
  ``attn.indexer.wq_b`` ``[q_lora, HI*di]``    ``P(None, "model")``   indexer heads
  ``attn.indexer.weights_proj`` ``[d, HI]``    ``P(None, "model")``   indexer head weights
  ``ffn.experts.*``    ``[E, ...]``            ``P("model", ...)``    routed experts (expert parallel)
  ``ffn.dense.w1/w3``, ``ffn.shared.w1/w3``    ``P(None, "model")``   SwiGLU hidden units
  ``ffn.dense.w2``, ``ffn.shared.w2``          ``P("model", None)``   (Megatron column/row pair)
  ``embed``            ``[V, d]``              ``P("model", None)``   vocabulary rows
  ``lm_head``          ``[d, V]``              ``P(None, "model")``   vocabulary columns
  everything else                              replicated
  ==========================================  =====================================================

  "Everything else" is the shared KV head (``wkv``, ``kv_norm``), the KV and index-key compressors, the query
  low-rank ``wq_a``/``q_norm``, norms, the MoE router (``router``, ``router_bias``, and the hash layers' int32
  token -> experts table ``tid2eid``: every device routes every token) and the hyper-connection mixers
  (``hc_attn``, ``hc_ffn``, ``hc_head``): they are small, and keeping the single KV head whole (as in V4
  serving) means no device ever needs another device's keys. Caches are never split over ``model`` (every
  model-parallel device holds the whole KV of its requests).

  Embedding / LM head: both are split over the vocabulary (Megatron's vocab-parallel layout): the
  embedding lookup becomes a masked local gather plus an all-reduce over ``model``, and the logits come
  out split over the vocabulary. For V4-Flash this keeps 2 × 1 GiB of bf16 tables off every device.

Routed experts: the dense MoE (``moe_impl="dense"``) runs every expert on every token, so GSPMD splits
its expert contraction by the weights' layout. The sparse MoE (``moe_impl="sparse"``) is expert parallel
when called under ``jax.set_mesh(mesh)``: a ``shard_map`` over ``model`` where each device computes the
token-expert pairs of its own experts, then a ``psum`` (``fm_jax.layers.moe_sparse``); without a context
mesh XLA's propagation places it.

**Fallback.** A rule applies only if it divides evenly: the head / group / expert count must be a
multiple of the ``model`` axis size (so that shard boundaries fall between heads, groups and experts),
and every sharded dimension a multiple of its mesh axes. Otherwise that tensor is *replicated* over
``model`` — e.g. ``o_groups = 2`` on a ``model`` axis of 4 leaves ``wo_a``/``wo_b`` replicated while the
query heads stay split. Likewise a cache whose batch is not a multiple of the ``data`` axis is replicated
over ``data``. Replication never changes results; it only costs memory.

Usage::

    mesh = make_mesh(2, 4)
    params = shard_params(params, config, mesh)
    tokens = shard_batch(tokens, mesh)
    logits, cache = prefill(params, config, tokens, max_len)        # jitted; shardings propagate
    cache = shard_cache(cache, config, mesh)
    logits, cache = decode_step(params, config, cache, tokens[:, -1])

The engine (`serve.engine.generate(..., mesh=mesh)`) does this itself, pins the decode window's carry
with :func:`constrain` and recalls each ``data`` shard's pages straight onto the devices of that shard
(:func:`batch_row_groups`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


def make_mesh(data: int, model: int, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, model)`` mesh over the first ``data * model`` of `devices` (default: `jax.devices()`),
    row-major: devices ``[i * model, (i + 1) * model)`` form data slice `i`."""
    for name, v in (("data", data), ("model", model)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"make_mesh: `{name}` must be a positive int, got {v!r}")
    devices = list(jax.devices() if devices is None else devices)
    n = data * model
    if n > len(devices):
        raise ValueError(f"make_mesh: a ({data}, {model}) mesh needs {n} devices, only {len(devices)} given "
                         "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
    grid = np.empty((data, model), dtype=object)
    for i, d in enumerate(devices[:n]):
        grid[i // model, i % model] = d
    try:  # name the axis types where this jax version has them: "Auto" = sharding by propagation
        from jax.sharding import AxisType
        return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))
    except (ImportError, TypeError):
        return Mesh(grid, AXES)


# ---------------------------------------------------------------------------------------------- helpers
def _names(path) -> tuple:
    """A pytree key path -> tuple of dict keys / sequence indices."""
    out = []
    for k in path:
        if hasattr(k, "key"):
            out.append(k.key)
        elif hasattr(k, "idx"):
            out.append(k.idx)
        elif hasattr(k, "name"):
            out.append(k.name)
        else:
            out.append(str(k))
    return tuple(out)


def _axis_size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape[axis])


def _fits(spec: P, shape: tuple, mesh: Mesh) -> bool:
    """Every named dim of `spec` exists in `shape` and is a multiple of its mesh axes' product."""
    if len(spec) > len(shape):
        return False
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([_axis_size(mesh, a) for a in axes]))
        if dim % size:
            return False
    return True


def _divides(count: int, mesh: Mesh, axis: str = MODEL) -> bool:
    return count % _axis_size(mesh, axis) == 0


def param_spec(names: tuple, shape: tuple, config, mesh: Mesh) -> P:
    """The PartitionSpec of one parameter (path `names`, shape `shape`); see the module docstring."""
    c, leaf = config, names[-1] if names else None
    spec = P()
    if names[:1] == ("embed",):
        spec = P(MODEL, None)
    elif names[:1] == ("lm_head",):
        spec = P(None, MODEL)
    elif "attn" in names:
        sub = names[names.index("attn") + 1:]
        if sub == ("wq_b",) and _divides(c.n_heads, mesh):
            spec = P(None, MODEL)
        elif sub == ("sink",) and _divides(c.n_heads, mesh):
            spec = P(MODEL)
        elif sub == ("wo_a",) and _divides(c.o_groups, mesh):
            spec = P(MODEL, None, None)
        elif sub == ("wo_b",) and _divides(c.o_groups, mesh):
            spec = P(MODEL, None)
        elif sub in (("indexer", "wq_b"), ("indexer", "weights_proj")) and _divides(c.n_index_heads, mesh):
            spec = P(None, MODEL)
    elif "ffn" in names:
        sub = names[names.index("ffn") + 1:]
        if sub[:1] == ("experts",) and _divides(c.n_routed_experts, mesh):
            spec = P(MODEL, *([None] * (len(shape) - 1)))
        elif sub[:1] in (("dense",), ("shared",)) and len(shape) == 2:
            spec = P(None, MODEL) if leaf in ("w1", "w3") else P(MODEL, None) if leaf == "w2" else P()
    return spec if _fits(spec, shape, mesh) else P()


def param_shardings(params, config, mesh: Mesh):
    """NamedSharding pytree matching `params` (arrays or `jax.ShapeDtypeStruct`s)."""
    def one(path, x):
        return NamedSharding(mesh, param_spec(_names(path), tuple(x.shape), config, mesh))
    return jax.tree_util.tree_map_with_path(one, params)


def cache_spec(shape: tuple, batch: int, mesh: Mesh) -> P:
    """Caches: leading batch axis over ``data`` (replicated over ``model``); scalars replicated."""
    if len(shape) >= 1 and shape[0] == batch:
        spec = P(DATA, *([None] * (len(shape) - 1)))
        if _fits(spec, shape, mesh):
            return spec
    return P()


def cache_shardings(cache, config, mesh: Mesh):
    """NamedSharding pytree matching `cache`: every buffer with a leading batch axis (``lengths`` and all
    per-layer buffers) split over ``data`` by request and replicated over ``model``; ``capacity``
    replicated. A batch that ``data`` does not divide is replicated."""
    del config  # the rule is shape-based: the batch is the leading axis of cache["lengths"]
    batch = int(cache["lengths"].shape[0])

    def one(path, x):
        names = _names(path)
        spec = P() if names[:1] == ("capacity",) else cache_spec(tuple(x.shape), batch, mesh)
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(one, cache)


def batch_sharding(mesh: Mesh, shape: tuple) -> NamedSharding:
    """Sharding for a per-request input (tokens [B, T] or [B], lengths [B]): batch over ``data``."""
    return NamedSharding(mesh, cache_spec(tuple(shape), shape[0] if shape else -1, mesh))


def shard_params(params, config, mesh: Mesh):
    """`params` placed on `mesh` according to :func:`param_shardings`."""
    return jax.device_put(params, param_shardings(params, config, mesh))


def shard_cache(cache, config, mesh: Mesh):
    """`cache` placed on `mesh` according to :func:`cache_shardings`."""
    return jax.device_put(cache, cache_shardings(cache, config, mesh))


def shard_batch(x, mesh: Mesh):
    """A per-request array (tokens, lengths) placed with its batch axis over ``data``."""
    return jax.device_put(x, batch_sharding(mesh, tuple(np.shape(x))))


def replicate(tree, mesh: Mesh):
    """`tree` placed whole on every device of `mesh` (e.g. the Memory Indexer's parameters, a PRNG key)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def use_mesh(mesh: Mesh | None):
    """Context: `mesh` as the context mesh (`jax.set_mesh`), which sparse MoE's expert-parallel
    `shard_map` reads; nothing for None."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def check_batch(mesh: Mesh, batch: int) -> None:
    """ValueError unless `batch` requests split evenly over the mesh's ``data`` axis (the engine needs every
    request on exactly one data slice; the silent replication fallback would duplicate its work), or when
    `mesh` is not a ("data", "model") mesh."""
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != AXES:
        raise ValueError(f"expected a {AXES} mesh from fm_jax.sharding.make_mesh, got {mesh!r}")
    d = _axis_size(mesh, DATA)
    if batch % d:
        raise ValueError(f"batch {batch} is not a multiple of the mesh's `data` axis ({d}): "
                         f"pad the batch to a multiple of {d} or use a smaller data axis")


def constrain(tree, mesh: Mesh | None, batch: int):
    """Inside jit: every leaf of `tree` pinned to the cache rule (a leading `batch` axis over ``data``,
    whole over ``model``; anything else replicated), so that a scan's carry and a jitted function's
    outputs keep the shardings they came in with (no resharding, no recompilation between calls).
    Identity when `mesh` is None (one device)."""
    if mesh is None:
        return tree
    shardings = jax.tree_util.tree_map(lambda x: NamedSharding(mesh, cache_spec(tuple(x.shape), batch, mesh)), tree)
    return jax.lax.with_sharding_constraint(tree, shardings)


def batch_row_groups(sharding: jax.sharding.Sharding, batch: int) -> list[tuple[slice, list]]:
    """The data shards of a per-request sharding: (rows of the batch, the addressable devices that hold
    those rows) per shard, in row order. A single-device or replicated sharding gives one group."""
    groups: dict[tuple[int, int], list] = {}
    for dev, idx in sharding.addressable_devices_indices_map((batch,)).items():
        rows = idx[0] if idx else slice(None)
        key = (rows.start or 0, batch if rows.stop is None else rows.stop)
        groups.setdefault(key, []).append(dev)
    return [(slice(*k), sorted(v, key=lambda d: d.id)) for k, v in sorted(groups.items())]
