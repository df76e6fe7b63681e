"""Pallas GPU kernels for the two LSA hot loops, each beside a plain-jnp reference.

Model code calls :func:`indexer_scores` and :func:`sparse_attention` (the dispatch); never a kernel directly.
"""
from pallas_kernels.dispatch import indexer_scores, sparse_attention
from pallas_kernels.reference import (
                                      indexer_scores_reference,
                                      indexer_scores_xla,
                                      sparse_attention_reference,
                                      sparse_attention_xla,
)

__all__ = [
                                      "indexer_scores",
                                      "indexer_scores_reference",
                                      "indexer_scores_xla",
                                      "sparse_attention",
                                      "sparse_attention_reference",
                                      "sparse_attention_xla",
]
