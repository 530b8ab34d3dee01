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


class CacheLayer(Protocol):
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def attend(self, q: torch.Tensor) -> torch.Tensor: ...

    def truncate(self, num_tokens: int) -> None: ...

    def tier_bytes(self) -> dict[str, int]: ...


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int) -> torch.Tensor:
    """Exact causal softmax attention for grouped queries.

    q: [H_q, S, D] at absolute positions q_start .. q_start+S-1
    k, v: [H_kv, T, D] at positions 0 .. T-1 (T >= q_start + S)
    returns [H_q, S, D]

    The G = H_q / H_kv query heads that share a KV head are folded into the row
    axis, q -> [H_kv, G*S, D], so one SDPA call covers a group without repeating
    K/V (SDPA's own `enable_gqa` is very slow for one-token decode in bf16).
    """
    Hq, S, D = q.shape
    Hkv, T, _ = k.shape
    G = Hq // Hkv
    qg = q.reshape(Hkv, G * S, D)
    mask = None
    if S > 1 or q_start + S < T:
        # Row (g, s) sees keys 0 .. q_start+s.
        rows = torch.arange(q_start, q_start + S, device=q.device)
        cols = torch.arange(T, device=q.device)
        mask = (cols[None, :] <= rows[:, None]).repeat(G, 1)  # [G*S, T]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    return out.reshape(Hq, S, D)


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
        S = q.shape[1]
        return gqa_attention(q, self.k[:, :T], self.v[:, :T], T - S)

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
