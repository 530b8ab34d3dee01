"""Low-bit key summaries, KIVI-style: per-channel scale and zero point over groups of tokens.

Keys have a few outlier channels, so the quantization range is set per channel
(not per token), over a group of `group` consecutive tokens:

    codes[t, c] = round((k[t, c] - zero[g, c]) / scale[g, c])      g = t // group
    k_hat[t, c] = zero[g, c] + scale[g, c] * codes[t, c]

Scale and zero point are float16 (on the 8B shape at 128k, float32 ones would be
2 GiB of GPU memory, twice the codes), rounded outward (zero down, scale up) so
that every key of the group stays within the code range: the error is still at
most half a step. Codes are packed along channels, 8 // bits codes per uint8. Scoring a query
against the summaries never rebuilds float keys for the whole cache:

    q . k_hat[t] = q . zero[g] + sum_c (q[c] * scale[g, c]) * codes[t, c]

and it runs over blocks of tokens so the float temporaries stay small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORE_BLOCK = 4096  # tokens unpacked at a time while scoring


@dataclass
class QuantKeys:
    """Packed low-bit keys of T tokens for H heads.

    codes: [H, T, D * bits / 8] uint8
    scale, zero: [H, T / group, D] float16 (per group of tokens, per channel)
    """

    bits: int
    group: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


PARAM_DTYPE = torch.float16  # scale and zero point
PARAM_MAX = torch.finfo(PARAM_DTYPE).max
PARAM_TINY = torch.finfo(PARAM_DTYPE).tiny  # the smallest scale (a constant channel's)


def summary_bytes_per_token(head_dim: int, bits: int, group: int) -> int:
    """Bytes of one token's summary for one KV head (codes plus its share of scale/zero)."""
    return head_dim * bits // 8 + (2 * head_dim * PARAM_DTYPE.itemsize) // group


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> QuantKeys:
    """k: [H, T, D] float, T a multiple of `group` -> QuantKeys."""
    assert bits in (2, 4), f"bits must be 2 or 4, got {bits}"
    H, T, D = k.shape
    assert T % group == 0, f"T={T} is not a multiple of the group size {group}"
    assert D * bits % 8 == 0, f"head_dim {D} cannot be packed at {bits} bits"
    kg = k.float().reshape(H, T // group, group, D)
    levels = (1 << bits) - 1
    lo = _round(kg.amin(dim=2).clamp(-PARAM_MAX, PARAM_MAX), down=True)
    hi = kg.amax(dim=2)
    scale = _round(((hi - lo.float()) / levels).clamp(PARAM_TINY, PARAM_MAX), down=False)
    codes = torch.round((kg - lo.float()[:, :, None]) / scale.float()[:, :, None]).clamp_(0, levels)
    codes = codes.to(torch.uint8).reshape(H, T, D)
    return QuantKeys(bits, group, pack(codes, bits), scale, lo)


def _round(x: torch.Tensor, down: bool) -> torch.Tensor:
    """float32 -> PARAM_DTYPE, rounded toward -inf (`down`) or +inf."""
    y = x.to(PARAM_DTYPE)
    inf = torch.full_like(y, float("-inf") if down else float("inf"))  # (a fill: no copy)
    wrong = y.float() > x if down else y.float() < x
    return torch.where(wrong, torch.nextafter(y, inf), y)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D] uint8 codes < 2**bits -> [..., D * bits / 8] uint8 (low bits first)."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for j in range(per):
        out |= c[..., j] << (j * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: [..., P] uint8 -> [..., P * 8 / bits] uint8 codes."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (j * bits)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)


def dequantize_keys(qk: QuantKeys) -> torch.Tensor:
    """[H, T, D] float32 approximation of the keys (for tests and small slices)."""
    codes = unpack(qk.codes, qk.bits).float()
    H, T, D = codes.shape
    g = qk.group
    zero, scale = qk.zero.float()[:, :, None], qk.scale.float()[:, :, None]
    return (zero + scale * codes.reshape(H, T // g, g, D)).reshape(H, T, D)


def score_keys(qk: QuantKeys, q: torch.Tensor) -> torch.Tensor:
    """Approximate logits q . k_hat.

    q: [H, G, D] (G query heads per KV head, as in GQA)
    returns [H, G, T] float32
    """
    H, G, D = q.shape
    qf = q.float()
    g = qk.group
    T = qk.num_tokens
    # q . zero per group of tokens: [H, G, T/g]
    base = torch.einsum("hgd,hnd->hgn", qf, qk.zero.float())
    out = torch.empty(H, G, T, dtype=torch.float32, device=q.device)
    for start in range(0, T, SCORE_BLOCK):
        stop = min(start + SCORE_BLOCK, T)
        n0, n1 = start // g, stop // g
        codes = unpack(qk.codes[:, start:stop], qk.bits).float()  # [H, B, D]
        codes = codes.reshape(H, n1 - n0, g, D)
        qs = qf[:, :, None, :] * qk.scale[:, None, n0:n1, :].float()  # [H, G, B/g, D]
        part = torch.einsum("hgnd,hnkd->hgnk", qs, codes)  # [H, G, B/g, g]
        out[:, :, start:stop] = (part + base[:, :, n0:n1, None]).reshape(H, G, stop - start)
    return out


def score_keys_at(qk: QuantKeys, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Approximate logits of chosen tokens only.

    q: [H, G, D]; ids: [H, N] token ids (< qk.num_tokens; pad with any valid id)
    returns [H, G, N] float32
    """
    return score_dequantized(q, keys_at(qk, ids))


def gather_head_rows(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows [H, n, X] of t [H, T, X] at per-head ids [H, n] (< T): one `index_select` over
    the rows of every head seen as one 2-D view, no copy of t, where its rows are
    contiguous and its heads a whole number of rows apart (a [H, capacity, X] buffer
    narrowed to T: the summaries' growable buffers); an expanded `gather` otherwise.
    (`keys_at` of 2,832 candidates of 3 heads, the embedded model's cluster rerank at 7k
    tokens: 1.87 ms with expanded gathers, 0.78 ms so, on this CPU.)"""
    H, T, X = t.shape
    step = t.stride(0) // X if H > 1 else 0
    if t.stride(2) != 1 or t.stride(1) != X or (H > 1 and t.stride(0) % X):
        return torch.gather(t, 1, ids[:, :, None].expand(-1, -1, X))
    rows = t.as_strided(((H - 1) * step + T, X), (X, 1))
    flat = ids + torch.arange(H, device=ids.device)[:, None] * step
    return rows.index_select(0, flat.reshape(-1)).view(H, -1, X)


def keys_at(qk: QuantKeys, ids: torch.Tensor) -> torch.Tensor:
    """The dequantized keys k_hat [H, N, D] float32 of token ids [H, N]."""
    codes = unpack(gather_head_rows(qk.codes, ids), qk.bits).float()  # [H, N, D]
    groups = ids // qk.group
    scale = gather_head_rows(qk.scale, groups).float()
    zero = gather_head_rows(qk.zero, groups).float()
    return zero + scale * codes


def score_dequantized(q: torch.Tensor, k_hat: torch.Tensor) -> torch.Tensor:
    """q [H, G, D] against dequantized keys [H, N, D] -> [H, G, N] float32."""
    return torch.einsum("hgd,hnd->hgn", q.float(), k_hat)


def score_candidates(
    q: torch.Tensor, qk: QuantKeys, ids: torch.Tensor, count: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """q [H, R, D] against the keys of candidates ids [H, N] -> logits [H, R, N] float32,
    times `sm_scale`, -inf past the first count[h] candidates of each head (padding).
    (On CUDA a Triton kernel computes it without the [H, N, D] temporaries:
    offload/kernels/candidates.py.)"""
    N = ids.shape[1]
    padding = torch.arange(N, device=ids.device)[None, None, :] >= count[:, None, None]
    return (score_keys_at(qk, q, ids) * sm_scale).masked_fill(padding, float("-inf"))
