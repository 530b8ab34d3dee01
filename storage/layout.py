"""`KVLayout`: the shape of a model's KV cache and every byte count derived from it.

Budgets, tier accounting, the planner and `offload info` all take their
arithmetic from here, so no module multiplies layers by heads on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"  # of full-precision K and V
    chunk_size: int = 16  # tokens per host/disk chunk

    def __post_init__(self):
        assert self.dtype in DTYPE_BYTES, f"unknown KV dtype {self.dtype!r}"
        assert min(self.num_layers, self.num_kv_heads, self.head_dim, self.chunk_size) > 0, self

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def token_bytes_per_layer(self) -> int:
        """K and V of one token in one layer, all KV heads."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def token_bytes(self) -> int:
        """K and V of one token across all layers."""
        return self.num_layers * self.token_bytes_per_layer

    @property
    def chunk_bytes_per_layer(self) -> int:
        return self.chunk_size * self.token_bytes_per_layer

    def kv_bytes(self, num_tokens: int) -> int:
        return num_tokens * self.token_bytes
