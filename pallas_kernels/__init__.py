"""Pallas GPU kernels for the LSA hot loops, each beside a plain-jnp reference.

Model code calls :func:`indexer_scores`, :func:`topk` and :func:`sparse_attention` (the dispatch); never a
kernel directly.
"""
from pallas_kernels.dispatch import indexer_scores, sparse_attention, topk
from pallas_kernels.reference import (
                                      indexer_scores_reference,
                                      indexer_scores_xla,
                                      sparse_attention_reference,
                                      sparse_attention_xla,
                                      topk_reference,
                                      topk_xla,
)

__all__ = [
                                      "indexer_scores",
                                      "indexer_scores_reference",
                                      "indexer_scores_xla",
                                      "sparse_attention",
                                      "sparse_attention_reference",
                                      "sparse_attention_xla",
                                      "topk",
                                      "topk_reference",
                                      "topk_xla",
]
