"""Parameter checkpoints with orbax, plus the model config as JSON beside them.

Layout of a checkpoint directory ``path``::

    path/params/          orbax StandardCheckpointer tree (tensorstore; bit-exact for every dtype incl. bf16)
    path/fm_config.json   {"format": "fm_jax.params/1", "config": {ModelConfig fields},
                           "tensors": [[pytree path, shape, dtype], ...]}

A save writes everything into a temporary sibling directory and renames it to ``path`` only when
complete, so a save killed at any point leaves either no ``path`` or the previous checkpoint there
(with ``overwrite``, the old directory is renamed aside first; a kill between the two renames leaves no
``path``), never a half-written one; killed saves leave ``.<name>.tmp-*`` directories that are safe
to delete.

:func:`restore_params` checks the checkpoint against the requested config *before* reading any tensor:

* the expected tensors (``jax.eval_shape`` of ``init_params(config)``) against the stored manifest, in
  pytree order: the first tensor whose shape differs, or that exists on one side only, raises
  ``ValueError`` naming its pytree path and both shapes (and listing the config fields that differ);
* then every config field (``name`` excepted): the first differing field raises ``ValueError`` naming it
  (e.g. a different ``window`` leaves all shapes equal but changes the model).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from fm_jax.config import ModelConfig

FORMAT = "fm_jax.params/1"
CONFIG_FILE = "fm_config.json"
PARAMS_DIR = "params"
# not part of the model: `name` (dataclass field with compare=False) and `topk_impl` (which top-k computes the
# same picks; checkpoints saved before it existed do not store it)
_IGNORED_FIELDS = ("name", "topk_impl")


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: orbax is heavy and only needed here
    return ocp


def _config_dict(config: ModelConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists, as stored


def _expected_tree(config: ModelConfig):
    from fm_jax.model import init_params
    return jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))


def _manifest(tree) -> list:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [[jax.tree_util.keystr(p), list(map(int, x.shape)), str(np.dtype(x.dtype))] for p, x in flat]


def _field_diffs(stored: dict, config: ModelConfig) -> list[str]:
    want = _config_dict(config)
    names = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _IGNORED_FIELDS]
    return [n for n in names if stored.get(n, "<missing>") != want.get(n)]


def _first_tensor_mismatch(stored: list, expected: list) -> str | None:
    """Message for the first tensor (in the expected pytree order) that differs, or None."""
    have = {p: tuple(s) for p, s, _ in stored}
    for p, shape, _ in expected:
        if p not in have:
            return f"tensor {p}: the checkpoint has no such tensor (config expects shape {tuple(shape)})"
        if have[p] != tuple(shape):
            return f"tensor {p}: checkpoint shape {have[p]} != config shape {tuple(shape)}"
    want = {p for p, _, _ in expected}
    for p, shape, _ in stored:
        if p not in want:
            return f"tensor {p}: the checkpoint has shape {tuple(shape)} but the config has no such tensor"
    return None


def save_params(path, params, config: ModelConfig, *, overwrite: bool = False) -> Path:
    """Save `params` (arrays, possibly sharded) and `config` to the directory `path`.

    The params must have the structure, shapes and dtypes of ``init_params(config)`` (ValueError naming
    the first differing tensor otherwise). Raises FileExistsError when `path` exists unless `overwrite`."""
    path = Path(path).absolute()
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    stored, expected = _manifest(params), _manifest(_expected_tree(config))
    mismatch = _first_tensor_mismatch(stored, expected)
    if mismatch:
        raise ValueError(f"params do not match the config: {mismatch}")
    want_dtype = {p: d for p, _, d in expected}
    for p, _, d in stored:
        if d != want_dtype[p]:
            raise ValueError(f"params do not match the config: tensor {p} has dtype {d}, the config "
                             f"(dtype={config.dtype!r}) gives {want_dtype[p]}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"checkpoint path {path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the checkpoint's mode
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / PARAMS_DIR, params)
        ckptr.wait_until_finished()
    meta = {"format": FORMAT, "config": _config_dict(config), "tensors": stored}
    _write_durable(tmp / CONFIG_FILE, json.dumps(meta, indent=1).encode())
    _commit(tmp, path)
    return path


def _write_durable(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _commit(tmp: Path, path: Path) -> None:
    """Rename the finished temporary directory to `path` (moving an existing `path` aside first)."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rename(path, old / "ckpt")
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old)


def read_metadata(path) -> dict:
    """The JSON written beside the params: {"format", "config", "tensors"}."""
    f = Path(path).absolute() / CONFIG_FILE
    if not f.is_file():
        raise ValueError(f"{Path(path)} is not an fm_jax params checkpoint (no {CONFIG_FILE}; "
                         "an interrupted save leaves none)")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT!r})")
    return meta


def load_config(path) -> ModelConfig:
    """The ModelConfig stored with a checkpoint."""
    cfg = dict(read_metadata(path)["config"])
    cfg["compress_ratios"] = tuple(cfg["compress_ratios"])
    return ModelConfig(**cfg)


def restore_params(path, config: ModelConfig, *, shardings=None):
    """Restore params saved by :func:`save_params`, bit-exactly, after checking them against `config`.

    `shardings`: None (default device), a `jax.sharding.Mesh` (placed by `fm_jax.sharding` rules), or a
    pytree of `jax.sharding.Sharding` matching the params. Raises ValueError naming the first differing
    tensor (pytree path and both shapes) or config field."""
    path = Path(path).absolute()
    meta = read_metadata(path)
    expected_tree = _expected_tree(config)
    diffs = _field_diffs(meta["config"], config)
    mismatch = _first_tensor_mismatch(meta["tensors"], _manifest(expected_tree))
    if mismatch:
        fields = ", ".join(f"`{n}` (checkpoint {meta['config'].get(n)!r}, requested {_config_dict(config)[n]!r})"
                           for n in diffs)
        raise ValueError(f"checkpoint {path} does not match the config: {mismatch}"
                         + (f"; differing config fields: {fields}" if fields else ""))
    if diffs:
        n = diffs[0]
        raise ValueError(f"checkpoint {path} was saved with config field `{n}`={meta['config'].get(n)!r}, "
                         f"but the requested config has `{n}`={_config_dict(config)[n]!r}")

    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: dev, expected_tree)
    elif isinstance(shardings, jax.sharding.Mesh):
        from fm_jax.sharding import param_shardings
        shardings = param_shardings(expected_tree, config, shardings)
    dtypes = {p: d for p, _, d in meta["tensors"]}
    flat, treedef = jax.tree_util.tree_flatten_with_path(expected_tree)
    flat_sh = treedef.flatten_up_to(shardings)
    target = treedef.unflatten([
        jax.ShapeDtypeStruct(x.shape, np.dtype(dtypes[jax.tree_util.keystr(p)]), sharding=s)
        for (p, x), s in zip(flat, flat_sh)])
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path / PARAMS_DIR, target)
