"""`KVLayout`: the shape of a model's KV cache and every byte count derived from it.

Budgets, tier accounting, the planner and `offload info` all take their
arithmetic from here, so no module multiplies layers by heads on its own.

A chunk is `chunk_size` consecutive tokens of one layer, all KV heads, K and V:
the unit of host slots, disk records, summaries' quantization groups and abstracts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from storage.abstracts import abstract_bytes_per_chunk
from storage.quant import gather_head_rows, summary_bytes_per_token

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"  # of full-precision K and V
    chunk_size: int = 16  # tokens per host/disk chunk and per summary group
    summary_bits: int = 2  # low-bit key summaries kept on the device

    def __post_init__(self):
        assert self.dtype in DTYPE_BYTES, f"unknown KV dtype {self.dtype!r}"
        assert min(self.num_layers, self.num_kv_heads, self.head_dim, self.chunk_size) > 0, self
        assert self.summary_bits in (2, 4), f"summary_bits must be 2 or 4, not {self.summary_bits}"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    # -- full-precision KV ----------------------------------------------------

    @property
    def token_bytes_per_layer(self) -> int:
        """K and V of one token in one layer, all KV heads."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def row_bytes(self) -> int:
        """K and V of one token of one KV head (a selected row)."""
        return 2 * self.head_dim * self.dtype_bytes

    @property
    def token_bytes(self) -> int:
        """K and V of one token across all layers."""
        return self.num_layers * self.token_bytes_per_layer

    @property
    def chunk_bytes(self) -> int:
        """One chunk of one layer: [2, H_kv, chunk_size, D] in `dtype`."""
        return self.chunk_size * self.token_bytes_per_layer

    def kv_bytes(self, num_tokens: int) -> int:
        return num_tokens * self.token_bytes

    def num_chunks(self, num_tokens: int) -> int:
        """Chunks per layer that hold `num_tokens` (the last one may be partial)."""
        return -(-num_tokens // self.chunk_size)

    # -- device-side structures -----------------------------------------------

    @property
    def summary_bytes_per_token(self) -> int:
        """Low-bit key summary of one token, all layers and KV heads."""
        per_head = summary_bytes_per_token(self.head_dim, self.summary_bits, self.chunk_size)
        return self.num_layers * self.num_kv_heads * per_head

    @property
    def abstract_bytes_per_chunk(self) -> int:
        """min/max/mean of one chunk of one layer (float32)."""
        return abstract_bytes_per_chunk(self.num_kv_heads, self.head_dim)

    @property
    def abstract_bytes_per_token(self) -> float:
        return self.num_layers * self.abstract_bytes_per_chunk / self.chunk_size

    def device_bytes(self, num_tokens: int, sink: int, window: int, abstracts: bool = True) -> int:
        """Sink + window at full precision, plus summaries (and, with `abstracts`, the
        chunk abstracts) of every token."""
        resident = min(num_tokens, sink + window)
        full_chunks = num_tokens // self.chunk_size
        return (
            resident * self.token_bytes
            + full_chunks * self.chunk_size * self.summary_bytes_per_token
            + abstracts * self.abstracts_bytes(num_tokens)
        )

    def abstracts_bytes(self, num_tokens: int) -> int:
        """The abstracts of every completed chunk of every layer."""
        return num_tokens // self.chunk_size * self.num_layers * self.abstract_bytes_per_chunk

    def disk_bytes_per_chunk(self) -> int:
        """A chunk record on disk: its KV and its abstract (file framing not counted)."""
        return self.chunk_bytes + self.abstract_bytes_per_chunk

    def session_bytes(self, num_tokens: int) -> int:
        """The least a saved session of `num_tokens` tokens takes on disk: its chunk
        files' KV and abstracts, its key summaries and its abstracts' file, completed
        chunks only (storage/session.py). The cluster index, the manifest and the files'
        framing come on top (a few percent), so a session of that size never fits in
        less."""
        full = num_tokens // self.chunk_size
        per_chunk = self.disk_bytes_per_chunk() + self.abstract_bytes_per_chunk
        return full * (self.num_layers * per_chunk + self.chunk_size * self.summary_bytes_per_token)


@dataclass(frozen=True)
class HeadRows:
    """Per-head rows stored in one contiguous tensor `[H, capacity, D]`, of which the first
    `length` are filled. A gather of per-head ids is one `index_select` on the flattened
    tensor (several times faster on CPU than advanced indexing or an expanded gather)."""

    data: torch.Tensor
    length: int

    def view(self) -> torch.Tensor:
        return self.data[:, : self.length]

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [H, n] (< length) -> rows [H, n, D]."""
        return gather_head_rows(self.data, ids)
