"""A decode step's matmul with 4-bit weights, dequantized in registers (CUDA).

    int4_matmul(x, nibbles, scale, lo)   x [M, K] @ w.T -> [M, N] in x's dtype, where
        w[n, 32 g + j]      = scale[n, g] * q + lo[n, g]   (float16 scale and minimum)
        q of j < 16         = nibbles[n, g, j] & 15
        q of j >= 16        = nibbles[n, g, j - 16] >> 4

That is offload/quantize.py's int4 form (llama.cpp's Q4_1 blocks of 32): 0.625 bytes a
weight against bfloat16's 2. A decode step at batch 1 reads every weight once and is
bound by memory bandwidth, so a model whose bfloat16 weights do not fit the card (a
12-14B model on 24 GB) runs with its block linears in this form
(`model.weights = "int4"`, which `auto` picks on CUDA when the dense weights would not
leave room for the KV).

One program takes BLOCK_N outputs of one row of x and walks K a few groups at a time:
per group, the dot product of x with the codes and the sum of x, scaled by the group's
scale and minimum (sum_j x_j (s q_j + m) = s sum_j x_j q_j + m sum_j x_j), all in
float32. Rows of x past `MAX_ROWS` (a prefill chunk) are not for it: there the weight
is dequantized once for the chunk and multiplied by cuBLAS (`Int4Linear.forward`).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from offload.kernels import FP_FUSION, interpreted

GROUP = 32  # inputs per scale and minimum
BLOCK_N = 32  # outputs per program
BLOCK_G = 8  # groups per step along K: 128 contiguous bytes of each weight row
WARPS = 4
MAX_ROWS = 8  # rows of x the kernel takes (a decode step has 1)
INTERPRETED_BLOCK_N = 128
DEQUANT_BLOCK_N = 16  # a dequantization program's rows and groups: 16 x 16 x 32 weights
DEQUANT_BLOCK_G = 16


def unpacked(nibbles: torch.Tensor) -> torch.Tensor:
    """The codes [N, K] (0..15, uint8) of nibbles [N, G, 16]: byte j of a group holds
    codes j (low half) and j + 16 (high half)."""
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1)  # [N, G, 32]
    return q.reshape(q.shape[0], -1)


def dequantize_ref(nibbles: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The weight [N, K] in float32: nibbles [N, G, 16] uint8, scale and lo [N, G]."""
    return dequantize_codes(unpacked(nibbles), scale, lo)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The weight [N, K] in float32 from its codes [N, K] (0..15), scale and lo [N, G]."""
    n, g = scale.shape
    w = q.reshape(n, g, -1).float().mul_(scale.float()[..., None]).add_(lo.float()[..., None])
    return w.reshape(n, -1)


def int4_matmul_ref(x, nibbles, scale, lo) -> torch.Tensor:
    """Plain-torch reference: the dequantized weight, multiplied in float32."""
    return (x.float() @ dequantize_ref(nibbles, scale, lo).t()).to(x.dtype)


def int4_matmul(x: torch.Tensor, nibbles: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor):
    """The Triton kernel of `int4_matmul_ref`: x [M, K] (M <= MAX_ROWS, last dim
    contiguous), nibbles [N, K / 32, 16] uint8, scale and lo [N, K / 32] contiguous."""
    import triton

    M, K = x.shape
    N, G, half = nibbles.shape
    assert half == GROUP // 2 and G * GROUP == K and M <= MAX_ROWS and x.stride(1) == 1
    assert nibbles.is_contiguous() and scale.is_contiguous() and lo.is_contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    # (the interpreter runs the programs one after another: fewer, larger ones there)
    block_n = INTERPRETED_BLOCK_N if interpreted() else BLOCK_N
    _kernels().int4_matmul[(triton.cdiv(N, block_n), M)](
        x, nibbles, scale, lo, out, N, G, x.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_G=BLOCK_G, HALF=GROUP // 2, num_warps=WARPS,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out


def dequantize(nibbles: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype):
    """The Triton kernel of `dequantize_ref(...).to(dtype)`, without its float32 copies:
    it reads 0.625 bytes a weight and writes the weight once (a prefill chunk's weight,
    offload/quantize.py). Products and sums rounded as the reference rounds them (no
    fused multiply-add), so the weight is the reference's."""
    import triton

    N, G, half = nibbles.shape
    assert half == GROUP // 2 and nibbles.is_contiguous()
    assert scale.is_contiguous() and lo.is_contiguous()
    out = torch.empty(N, G * GROUP, dtype=dtype, device=nibbles.device)
    grid = (triton.cdiv(N, DEQUANT_BLOCK_N), triton.cdiv(G, DEQUANT_BLOCK_G))
    _kernels().int4_dequantize[grid](
        nibbles, scale, lo, out, N, G, BLOCK_N=DEQUANT_BLOCK_N, BLOCK_G=DEQUANT_BLOCK_G,
        HALF=GROUP // 2, num_warps=WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    return out


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def int4_matmul(X, NIB, SCALE, LO, OUT, N, G, s_xm, s_om, BLOCK_N: tl.constexpr,
               BLOCK_G: tl.constexpr, HALF: tl.constexpr):  # fmt: skip
        m = tl.program_id(1)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        rows = n.to(tl.int64) * G  # (a weight of 14B parameters has more than 2^31 bytes)
        j = tl.arange(0, HALF)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g0 in range(0, G, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G)
            g_ok = g < G
            ok = n_ok[:, None] & g_ok[None, :]
            at = rows[:, None] + g[None, :]  # [BLOCK_N, BLOCK_G]
            b = tl.load(NIB + at[:, :, None] * HALF + j[None, None, :], mask=ok[:, :, None],
                        other=0)  # fmt: skip
            xk = X + m * s_xm + g[:, None] * (2 * HALF) + j[None, :]
            x_lo = tl.load(xk, mask=g_ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_G, HALF]
            x_hi = tl.load(xk + HALF, mask=g_ok[:, None], other=0.0).to(tl.float32)
            dot = tl.sum((b & 15).to(tl.float32) * x_lo[None, :, :]
                         + (b >> 4).to(tl.float32) * x_hi[None, :, :], axis=2)  # fmt: skip
            s = tl.load(SCALE + at, mask=ok, other=0.0).to(tl.float32)
            mn = tl.load(LO + at, mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(s * dot + mn * tl.sum(x_lo + x_hi, axis=1)[None, :], axis=1)
        tl.store(OUT + m * s_om + n, acc.to(OUT.dtype.element_ty), mask=n_ok)

    @triton.jit
    def int4_dequantize(NIB, SCALE, LO, OUT, N, G, BLOCK_N: tl.constexpr,
                        BLOCK_G: tl.constexpr, HALF: tl.constexpr):  # fmt: skip
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        ok = (n < N)[:, None] & (g < G)[None, :]
        at = n.to(tl.int64)[:, None] * G + g[None, :]  # [BLOCK_N, BLOCK_G]
        j = tl.arange(0, HALF)[None, None, :]
        b = tl.load(NIB + at[:, :, None] * HALF + j, mask=ok[:, :, None], other=0)
        s = tl.load(SCALE + at, mask=ok, other=0.0).to(tl.float32)[:, :, None]
        mn = tl.load(LO + at, mask=ok, other=0.0).to(tl.float32)[:, :, None]
        w = OUT + at[:, :, None] * (2 * HALF) + j
        tl.store(w, ((b & 15).to(tl.float32) * s + mn).to(OUT.dtype.element_ty),
                 mask=ok[:, :, None])  # fmt: skip
        tl.store(w + HALF, ((b >> 4).to(tl.float32) * s + mn).to(OUT.dtype.element_ty),
                 mask=ok[:, :, None])  # fmt: skip

    return SimpleNamespace(int4_matmul=int4_matmul, int4_dequantize=int4_dequantize)
