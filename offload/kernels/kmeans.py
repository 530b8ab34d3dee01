"""The index build's assignment step on the GPU: each point's nearest centroid, without
the scores in memory.

A layer-by-layer prefill builds each sparse layer's cluster index from its keys on the
device (retrieval/cluster.py, `spherical_kmeans`): for the 8B shape at 128k tokens, 8
heads x 131,072 points are assigned to the 512 centroids of their 8,192-token segment 11
times per layer (10 iterations and the last assignment), 1.5 TFLOP. In torch an
assignment is a batched matmul, whose 2 GiB of float32 scores go to memory, and an
argmax that reads them back: on an H100, at float32's throughput (the matmul does not
use the tensor cores unless TF32 is switched on for the whole process) and with 4 GiB of
traffic, about 40-50 ms a layer, 1.2-1.5 s of a 128k prefill (estimated from the FLOPs
and bytes; not measured). `nearest` keeps a block of scores in registers and carries the
best centroid per point from block to block: one launch per assignment, 8 bytes written
per point. Its dot products run at TF32 (Triton's default for float32 `tl.dot`: inputs
rounded to 10 bits of mantissa), so a point whose two best centroids score within about
1e-3 of each other may join the other one; either is a centroid it is about as close to,
and the index built on a GPU was not the CPU's anyway (faiss there).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from offload.kernels import FP_FUSION, interpreted

BLOCK_M = 64  # points per program
BLOCK_N = 64  # centroids scored at a time
# (Triton's interpreter runs the programs one after another, each operation of each
# iteration a numpy call: there a program takes more points, and more centroids a time.)
INTERPRETED_BLOCK_M = 512
INTERPRETED_BLOCK_N = 256


def blocks() -> tuple[int, int]:
    """(points per program, centroids a time) where the kernel runs."""
    return (INTERPRETED_BLOCK_M, INTERPRETED_BLOCK_N) if interpreted() else (BLOCK_M, BLOCK_N)


def nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x [B, m, D] float32, c [B, nc, D] float32 (D a power of two, at least 16) ->
    [B, m] int64: for each point of row b, the centroid of row b with the largest dot
    product (the first of equal ones), as `retrieval.cluster.nearest_centroids`."""
    import triton

    B, m, D = x.shape
    nc = c.shape[1]
    assert x.dtype == c.dtype == torch.float32 and x.is_contiguous() and c.is_contiguous()
    out = torch.empty(B, m, dtype=torch.int64, device=x.device)
    block_m, block_n = blocks()
    _kernels().nearest[(triton.cdiv(m, block_m), B)](
        x, c, out, m, nc, D=D, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def nearest(X, C, OUT, m, nc, D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):  # fmt: skip
        b = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        x = tl.load(X + (b * m + rows[:, None]) * D + d[None, :], mask=rows[:, None] < m, other=0.0)
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        arg = tl.zeros([BLOCK_M], tl.int32)
        cols = tl.arange(0, BLOCK_N)
        for n0 in range(0, nc, BLOCK_N):
            j = n0 + cols
            c = tl.load(C + (b * nc + j[:, None]) * D + d[None, :], mask=j[:, None] < nc, other=0.0)
            s = tl.dot(x, tl.trans(c))  # [BLOCK_M, BLOCK_N]
            s = tl.where(j[None, :] < nc, s, float("-inf"))
            top = tl.max(s, 1)
            at = tl.argmax(s, 1, tie_break_left=True) + n0
            better = top > best  # (strictly: an earlier block wins a tie)
            best = tl.where(better, top, best)
            arg = tl.where(better, at, arg)
        tl.store(OUT + b * m + rows, arg.to(tl.int64), mask=rows < m)

    return SimpleNamespace(nearest=nearest)
