"""Chunk abstracts: per chunk and KV head, the per-channel min, max and mean of its keys.

Quest-style selectors bound q . k over a chunk by sum_c max(q_c * min_c, q_c * max_c);
the disk tier stores a chunk's abstract beside its KV so a chunk can be judged
without reading it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

ABSTRACT_KEYS = ("kmin", "kmax", "kmean")  # ChunkAbstracts' fields, as sessions name them


@dataclass
class ChunkAbstracts:
    """kmin, kmax, kmean: [num_chunks, H, D] float32."""

    kmin: torch.Tensor
    kmax: torch.Tensor
    kmean: torch.Tensor


def abstract_bytes_per_chunk(num_kv_heads: int, head_dim: int) -> int:
    return 3 * num_kv_heads * head_dim * 4


def chunk_abstracts(k: torch.Tensor, chunk_size: int) -> ChunkAbstracts:
    """k: [H, n * chunk_size, D] -> abstracts of the n chunks."""
    H, T, D = k.shape
    assert T % chunk_size == 0, f"T={T} is not a multiple of chunk_size={chunk_size}"
    kc = k.float().reshape(H, T // chunk_size, chunk_size, D).transpose(0, 1)  # [n, H, C, D]
    return ChunkAbstracts(kc.amin(dim=2), kc.amax(dim=2), kc.mean(dim=2))


def upper_bound_scores(abstracts: ChunkAbstracts, q: torch.Tensor) -> torch.Tensor:
    """An upper bound of q . k over each chunk. q: [H, G, D] -> [H, G, n] float32."""
    qf = q.float()[:, :, None, :]  # [H, G, 1, D]
    lo = abstracts.kmin.transpose(0, 1)[:, None]  # [H, 1, n, D]
    hi = abstracts.kmax.transpose(0, 1)[:, None]
    return torch.maximum(qf * lo, qf * hi).sum(-1)


class SavedAbstracts:
    """A loaded session's chunk abstracts, read and checked when first asked for, by the
    thread that asks, for every layer at once; each layer's handed over once. Only the
    chunk selector, a save and a spill of new chunks read them: for the 8B shape at 128k
    they are 3 GiB, which a load read and hashed on a thread (until 2026-12-04) beside
    the question the user asked at once, and then held in host memory."""

    def __init__(self, read: Callable[[], dict]):
        self._read = read
        self._lock = threading.Lock()
        self._saved: dict | None = None
        self._error: Exception | None = None  # (a damaged file: named at every read)

    def _layer(self, i: int) -> ChunkAbstracts:
        with self._lock:
            if self._saved is None and self._error is None:
                try:
                    self._saved = self._read()
                except Exception as e:
                    self._error = e
            if self._error is not None:
                raise self._error
            return ChunkAbstracts(*(self._saved.pop(f"L{i}.{k}") for k in ABSTRACT_KEYS))

    def layer(self, i: int) -> Callable[[], ChunkAbstracts]:
        """What `DeviceTier.abstracts_later` takes for layer i: reads them when called."""
        return partial(self._layer, i)
