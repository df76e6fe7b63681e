"""The trained miniature shipped in the repository (`checkpoints/mini/`), loaded through the public loaders.

Layout: ``backbone/`` (`fm_jax.checkpoint.save_params`: params and their `ModelConfig`),
``memory_indexer.safetensors`` (the FlashMemory joint format, `fm_jax.interop`), ``README.md`` (the
commands that made them).
"""
from __future__ import annotations

from pathlib import Path

from fm_jax import checkpoint, interop

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "mini"
BACKBONE, INDEXER = "backbone", "memory_indexer.safetensors"


def load_shipped(path=None):
    """-> (params, ModelConfig, (IndexerConfig, indexer params)) from a model directory (default: the
    shipped `checkpoints/mini`)."""
    root = Path(path) if path is not None else SHIPPED
    if not (root / BACKBONE).is_dir():
        raise FileNotFoundError(f"{root} holds no trained model ({BACKBONE}/ missing); train one with "
                                "train.pretrain / train.dump / train.fit (see checkpoints/mini/README.md)")
    config = checkpoint.load_config(root / BACKBONE)
    params = checkpoint.restore_params(root / BACKBONE, config)
    indexer = interop.load_flashmemory_checkpoint(str(root / INDEXER))
    return params, config, indexer


def load_model(ckpt=None, params=None, indexer=None):
    """(params, ModelConfig, (IndexerConfig, indexer params)) from a backbone checkpoint `params`
    (`fm_jax.checkpoint`) plus a Memory Indexer `indexer` (FlashMemory .safetensors), else from the model
    directory `ckpt` (default: the shipped `checkpoints/mini`)."""
    if params or indexer:
        if not (params and indexer):
            raise ValueError("--params and --indexer go together (or give a model directory with --ckpt)")
        if ckpt:
            raise ValueError("give a model directory (--ckpt) or --params with --indexer, not both")
        config = checkpoint.load_config(params)
        return checkpoint.restore_params(params, config), config, interop.load_flashmemory_checkpoint(indexer)
    return load_shipped(ckpt)
