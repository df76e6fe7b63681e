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
