"""Choosing tokens: selectors by name, GQA aggregation, the faiss cluster index."""

from retrieval.base import LayerView, Selector
from retrieval.cluster import ClusterIndex, make_cluster_index
from retrieval.selectors import ChunkBound, ExactTopK, SummaryScan


def make_selector(name: str, num_kv_heads: int, head_dim: int, selection, nearest=None) -> Selector:
    """A selector for one layer. `selection` carries the cluster settings (duck-typed);
    `nearest` is the cluster index's k-means assignment where keys are on a GPU."""
    if name == "exact":
        return ExactTopK()
    if name == "summary":
        return SummaryScan()
    if name == "chunk":
        return ChunkBound()
    if name == "cluster":
        return make_cluster_index(num_kv_heads, head_dim, selection, nearest)
    raise ValueError(f"unknown selector {name!r}")


__all__ = [
    "ChunkBound",
    "ClusterIndex",
    "ExactTopK",
    "LayerView",
    "Selector",
    "SummaryScan",
    "make_selector",
]
