"""The cache-layer interface the model calls, and the in-memory dense cache.

Each attention layer is handed one cache-layer object and calls two verbs:

    append(k, v)   k, v: [H_kv, S, D]   the new tokens' keys and values (after RoPE)
    attend(q)      q: [H_q, S, D]       -> [H_q, S, D] attention output of the S newest tokens

so where the keys live (one tensor, or device / host / disk tiers) and which of
them are attended (all, or a selected subset) is the cache's business, not the
model's. `KVCache` groups the layers and keeps the shared token count.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


class CacheLayer(Protocol):
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def attend(self, q: torch.Tensor) -> torch.Tensor: ...

    def truncate(self, num_tokens: int) -> None: ...

    def tier_bytes(self) -> dict[str, int]: ...


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact causal softmax attention of the S newest positions over all T keys.

    q: [H_q, S, D], the queries of positions T-S .. T-1
    k, v: [H_kv, T, D]
    returns [H_q, S, D]

    Both paths keep SDPA's inputs 4-D: with 3-D inputs and a mask it falls back to
    a math kernel about 10x slower on CPU (measured in docs/performance.md).
    - decode (S == 1): the G = H_q / H_kv query heads of a group become G rows,
      q -> [1, H_kv, G, D], so K/V are read once per group and no mask is needed.
    - prefill chunk (S > 1): a lower-right causal bias (row s sees keys
      0 .. T-S+s) and `enable_gqa`, which dispatch to the flash kernel.
    """
    Hq, S, D = q.shape
    Hkv, T, _ = k.shape
    if S == 1:
        out = F.scaled_dot_product_attention(q.reshape(1, Hkv, Hq // Hkv, D), k[None], v[None])
        return out.reshape(Hq, 1, D)
    bias = causal_lower_right(S, T)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias, enable_gqa=True)
    return out[0]


class DenseLayer:
    """All keys and values of one layer in two growable tensors `[H_kv, capacity, D]`."""

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.k = torch.empty(num_kv_heads, 0, head_dim, dtype=dtype, device=self.device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def _reserve(self, needed: int) -> None:
        cap = self.k.shape[1]
        if needed <= cap:
            return
        # Grow geometrically so a long prefill costs O(T) copies in all.
        new_cap = max(needed, 2 * cap, 256)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty(self.num_kv_heads, new_cap, self.head_dim)
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        S = k.shape[1]
        self._reserve(self.length + S)
        self.k[:, self.length : self.length + S] = k
        self.v[:, self.length : self.length + S] = v
        self.length += S

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        T = self.length
        return gqa_attention(q, self.k[:, :T], self.v[:, :T])

    def truncate(self, num_tokens: int) -> None:
        assert 0 <= num_tokens <= self.length, (num_tokens, self.length)
        self.length = num_tokens

    def tier_bytes(self) -> dict[str, int]:
        per_token = 2 * self.num_kv_heads * self.head_dim * self.k.element_size()
        return {"device": self.length * per_token}


class KVCache:
    """One cache layer per model layer, plus the count of tokens they all hold."""

    def __init__(self, layers: list):
        self.layers = layers
        self.num_tokens = 0

    @classmethod
    def dense(cls, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device) -> KVCache:
        return cls([DenseLayer(num_kv_heads, head_dim, dtype, device) for _ in range(num_layers)])

    def advance(self, num_new: int) -> None:
        """Called by the model once every layer has appended `num_new` tokens."""
        self.num_tokens += num_new

    def truncate(self, num_tokens: int) -> None:
        """Drop every token from position `num_tokens` on (reuse a shared prefix)."""
        for layer in self.layers:
            layer.truncate(num_tokens)
        self.num_tokens = num_tokens

    def tier_bytes(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for layer in self.layers:
            for tier, n in layer.tier_bytes().items():
                total[tier] = total.get(tier, 0) + n
        return total
