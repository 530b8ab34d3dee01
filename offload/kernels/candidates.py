"""A device selection's kernels (retrieval/device_index.py): the clusters' scores
(`score_clusters`), the list of the candidates of the clusters taken
(`cluster_candidates`; which are taken: offload/kernels/ranking.py) and the candidates'
rerank on low-bit keys dequantized in registers (`score_candidates`; `rerank_weights`
with the softmax summed over the rows).

    q        [H, R, D]             query rows per KV head (a step's query heads of the
                                   group; a prefill chunk's rows, a block at a time)
    summaries                      `QuantKeys` of the layer: codes [H, T, D * bits / 8]
                                   uint8, scale and zero [H, T / group, D] float16
    ids      [H, N] int64          candidate tokens per KV head
    count    [H] int64             candidates per head that are real (the rest padding;
                                   any stride)
    ->       [H, R, N] float32     q . k_hat * sm_scale, -inf past each head's count

The torch reference (`storage.quant.score_candidates`) gathers each candidate's codes,
scale and zero point into float32 tensors of [H, N, D] and multiplies them out: for
the 8B shape at 128k a step reranks ~17k candidates per KV head, so each of those
tensors is 71 MB and the rerank moves close to 1 GB per sparse layer and step (about
0.3 ms on an H100: 10 ms a step over 30 layers). The kernel reads each candidate's 32
bytes of codes and its group's scale and zero point once, and writes only the logits.
One program per (KV head, block of candidates); its keys are dequantized once for all
the rows.

The rerank's weights (`rerank_weights`): each row's softmax over the candidates, summed
over the rows (the query heads of a group), as `retrieval.base.fine_softmax_sum` of
the logits. The scoring kernel also writes each program's maximum and sum of
exponentials per row; a second kernel combines those of a row (an online softmax) and
sums the rows' probabilities for a block of candidates. Two launches where torch took
four after the logits (the softmax, `nan_to_num`, the sum over rows).

The clusters' scores (`score_clusters`): each cluster's centroid against every query
row, the maximum over the rows, plus the bias that masks the slots past the real
clusters (`-inf`): `retrieval.base.row_max` of `exact_logits` in float32. One
program per (KV head, block of clusters) reads its centroids once for all the rows;
one launch where torch took four (q's cast, the matmul, the maximum, the bias).

The candidate list itself (`cluster_candidates`): each head's tokens in [lo, hi) whose
cluster is taken, in token order, the first N of them, padded with `lo`. In torch that
is a dozen passes over [H, T_cap] (a cumsum, gathers, `where`s: 1.3M entries each for
the 8B shape at 128k); here two kernels over blocks of tokens, the first counting each
block's candidates and the second writing them after those of the blocks before it
(each of its programs sums their counts), in the same order, and the padding.

"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from offload.kernels import FP_FUSION, interpreted, supports_head_dim
from retrieval.base import exact_logits, fine_softmax_sum, row_max
from storage.quant import QuantKeys
from storage.quant import score_candidates as reference_scores

BLOCK_N = 32  # candidates per program
SCORE_WARPS = 4
# Triton's interpreter scores a program's rows in one product (a numpy matmul) where a
# GPU takes them a row at a time: the row loop is a dozen numpy calls per row there, and
# a prefill chunk's selection has up to 256 rows (96 rows of 4,096 candidates: 2.26 s a
# call against 0.19 on this CPU). On the H200 the product (`tl.dot`, "ieee") took 152 to
# 339 us a layer at 128k against the loop's 68 (scripts/sweep_selection.py). Both are
# tested in the interpreter.
INTERPRETED_SCORE_DOT = True
# A GPU's product instead of the loop, on tensor cores: "tf32x3" (three TF32 products,
# about float32's accuracy) or "tf32" where "ieee" was slower than the loop. Not measured
# yet: off until scripts/sweep_selection.py finds it faster and `equal`.
GPU_SCORE_DOT = False
GPU_SCORE_PRECISION = "tf32x3"
# Triton's interpreter (the CPU tests) runs programs one after another, each op a numpy
# call: with blocks of 32 a decode step's rerank took seconds there. It takes larger
# blocks (the same results; tests/test_device_index.py runs the GPU's block size).
INTERPRETED_BLOCK_N = 1024
BLOCK_T = 1024  # tokens per program of the candidate list (on the H200: 9.9 us a layer at
# 128k, 9.7 at 512, which doubles the interpreter's programs)
BLOCK_CS = 32  # clusters per program of `score_clusters` (their centroids in registers)
CLUSTER_WARPS = 8  # (on the H200: 11.0 us a layer at 128k, 12.2 with 4)
BLOCK_W = 1024  # candidates per program of the rerank's softmax sum
BLOCK_STATS = 1024  # (at most) its programs' statistics read at a time


def score_clusters_ref(q, centroids, bias):
    """q [H, R, D] against centroids [H, NC, D] float32 -> [H, NC] float32: each
    cluster's largest logit over the rows (unscaled), plus bias [H, NC]."""
    return row_max(q.float(), lambda rows: exact_logits(rows, centroids)) + bias


def score_clusters(q, centroids, bias):
    """The kernel of `score_clusters_ref`."""
    import triton

    H, R, D = q.shape
    NC = centroids.shape[1]
    assert centroids.dtype == torch.float32 and centroids.stride(2) == 1 and bias.stride(1) == 1
    assert q.stride(2) == 1
    out = torch.empty(H, NC, dtype=torch.float32, device=q.device)
    block = INTERPRETED_BLOCK_N if interpreted() else BLOCK_CS
    _kernels().clusters[(H, triton.cdiv(NC, block))](
        q, centroids, bias, out, R, NC, D, q.stride(0), q.stride(1), centroids.stride(0),
        centroids.stride(1), bias.stride(0),
        BLOCK=block, BLOCK_D=triton.next_power_of_2(D), num_warps=CLUSTER_WARPS,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out


def cluster_candidates_ref(take, assign, lo: int, hi, N: int):
    """take [H, NC + 1] bool (clusters taken), assign [H, T_cap] int32 (each token's
    cluster), lo, hi [1] (a device tensor) -> ids [H, N] int64, count [H] int64 (the
    candidates of each head; more than N: the rest dropped)."""
    H, T_cap = assign.shape
    t = torch.arange(T_cap, device=assign.device)
    mask = torch.gather(take, 1, assign.long()) & (t >= lo) & (t < hi)  # [H, T_cap]
    pos = mask.cumsum(1) - 1
    column = torch.where(mask & (pos < N), pos, N)
    ids = torch.full((H, N + 1), lo, dtype=torch.long, device=assign.device)
    ids.scatter_(1, column, t.expand(H, T_cap))
    return ids[:, :N], mask.sum(1)


def cluster_candidates(take, assign, lo: int, hi, N: int):
    """The kernels of `cluster_candidates_ref`: two launches (the second sums the counts
    of the blocks before its own, and pads its share of the slots past the candidates)."""
    import triton

    H, T_cap = assign.shape
    assert take.stride(1) == 1 and assign.stride(1) == 1 and hi.numel() == 1
    blocks = triton.cdiv(T_cap, BLOCK_T)
    counts = torch.empty(H, blocks, dtype=torch.int32, device=assign.device)
    ids = torch.empty(H, N, dtype=torch.long, device=assign.device)
    count = torch.empty(H, dtype=torch.long, device=assign.device)
    args = (take.view(torch.uint8), assign, hi, lo, T_cap, take.stride(0), assign.stride(0),
            counts, ids, count, N, blocks, triton.cdiv(N, blocks))  # fmt: skip
    kernel = _kernels().candidates
    kernel[(H, blocks)](*args, BLOCK=BLOCK_T, WRITE=False, enable_fp_fusion=FP_FUSION)
    kernel[(H, blocks)](*args, BLOCK=BLOCK_T, WRITE=True, enable_fp_fusion=FP_FUSION)
    return ids, count


def rerank_weights_ref(q, summaries: QuantKeys, ids, count, sm_scale: float) -> torch.Tensor:
    """The rerank's weights [H, N] of rows q [H, R, D] (float32): each row's softmax over
    the candidates' logits (`storage.quant.score_candidates`), summed over the rows."""
    return fine_softmax_sum(reference_scores(q, summaries, ids, count, sm_scale))


def rerank_weights(q, summaries: QuantKeys, ids, count, sm_scale: float) -> torch.Tensor:
    """The kernels of `rerank_weights_ref`: the logits with each program's softmax
    statistics, then their softmax summed over the rows."""
    import triton

    H, R, _ = q.shape
    N = ids.shape[1]
    logits, top, total = score_candidates(q, summaries, ids, count, sm_scale)
    blocks = top.shape[2]
    out = torch.empty(H, N, dtype=torch.float32, device=q.device)
    _kernels().softmax_sum[(H, triton.cdiv(N, BLOCK_W))](
        logits, top, total, out, R, N, blocks,
        BLOCK=BLOCK_W, BLOCK_S=min(BLOCK_STATS, triton.next_power_of_2(blocks)),
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out


def score_candidates(q, summaries: QuantKeys, ids, count, sm_scale: float):
    """The kernel of `storage.quant.score_candidates`: logits [H, R, N], and each
    program's largest logit and sum of exponentials of each row, [H, R, programs] each
    (what `rerank_weights` makes the softmax of)."""
    import triton

    H, R, D = q.shape
    N = ids.shape[1]
    codes, scale, zero = summaries.codes, summaries.scale, summaries.zero
    assert supports_head_dim(D), f"head_dim {D} must be a power of two >= 16"
    assert q.stride(2) == 1 and ids.is_contiguous() and count.dim() == 1
    assert codes.stride(2) == 1 and scale.stride() == zero.stride() and scale.stride(2) == 1
    out = torch.empty(H, R, N, dtype=torch.float32, device=q.device)
    block = INTERPRETED_BLOCK_N if interpreted() else BLOCK_N
    dot = INTERPRETED_SCORE_DOT if interpreted() else GPU_SCORE_DOT
    blocks = triton.cdiv(N, block)
    top = torch.empty(H, R, blocks, dtype=torch.float32, device=q.device)
    total = torch.empty_like(top)
    _kernels().score[(H, blocks)](
        q, codes, scale, zero, ids, count, out, top, total, R, N, summaries.group, sm_scale,
        q.stride(0), q.stride(1), count.stride(0), codes.stride(0), codes.stride(1),
        scale.stride(0), scale.stride(1),
        D=D, BITS=summaries.bits, BLOCK=block, BLOCK_R=max(16, triton.next_power_of_2(R)),
        DOT=dot, PRECISION="ieee" if interpreted() else GPU_SCORE_PRECISION,
        num_warps=SCORE_WARPS, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out, top, total


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def score(Q, CODES, SCALE, ZERO, IDS, COUNT, OUT, TOP, TOTAL, R, N, group, sm_scale,
              s_qh, s_qr, s_count, s_ch, s_ct, s_ph, s_pg, D: tl.constexpr,
              BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
              DOT: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        h = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        n = blk * BLOCK + tl.arange(0, BLOCK)
        ok = n < N
        t = tl.load(IDS + h * N + n, mask=ok, other=0)
        d = tl.arange(0, D)
        PER: tl.constexpr = 8 // BITS  # codes per byte, low bits first
        byte = tl.load(CODES + h * s_ch + t[:, None] * s_ct + (d // PER)[None, :],
                       mask=ok[:, None], other=0)  # fmt: skip
        code = (byte >> ((d % PER) * BITS).to(tl.uint8)[None, :]) & ((1 << BITS) - 1)
        param = h * s_ph + (t // group)[:, None] * s_pg + d[None, :]
        scale = tl.load(SCALE + param, mask=ok[:, None], other=0).to(tl.float32)
        zero = tl.load(ZERO + param, mask=ok[:, None], other=0).to(tl.float32)
        k = zero + scale * code.to(tl.float32)  # [BLOCK, D]
        real = ok & (n < tl.load(COUNT + h * s_count))
        if DOT:  # every row at once: one product (the interpreter; a GPU with GPU_SCORE_DOT)
            rr = tl.arange(0, BLOCK_R)
            qs = tl.load(Q + h * s_qh + rr[None, :] * s_qr + d[:, None], mask=(rr < R)[None, :],
                         other=0.0).to(tl.float32)  # [D, BLOCK_R]  # fmt: skip
            logits = tl.dot(k, qs, input_precision=PRECISION) * sm_scale  # [BLOCK, BLOCK_R]
            logits = tl.where(real[:, None], logits, float("-inf"))
            tl.store(OUT + (h * R + rr[None, :]) * N + n[:, None], logits,
                     mask=ok[:, None] & (rr < R)[None, :])  # fmt: skip
            tops = tl.max(logits, 0)
            bases = tl.where(tops > float("-inf"), tops, 0.0)  # (no -inf - -inf)
            totals = tl.sum(tl.where(real[:, None], tl.exp(logits - bases[None, :]), 0.0), 0)
            stats = (h * R + rr) * tl.num_programs(1) + blk
            tl.store(TOP + stats, tops, mask=rr < R)
            tl.store(TOTAL + stats, totals, mask=rr < R)
        else:  # a row at a time (a GPU's way)
            for r in range(R):
                q = tl.load(Q + h * s_qh + r * s_qr + d).to(tl.float32)
                logit = tl.sum(k * q[None, :], axis=1) * sm_scale
                logit = tl.where(real, logit, float("-inf"))
                tl.store(OUT + (h * R + r) * N + n, logit, mask=ok)
                # the row's largest logit here, and its exponentials' sum below it
                top = tl.max(logit, 0)
                base = tl.where(top > float("-inf"), top, 0.0)  # (no -inf - -inf)
                total = tl.sum(tl.where(real, tl.exp(logit - base), 0.0), 0)
                stat = (h * R + r) * tl.num_programs(1) + blk
                tl.store(TOP + stat, top)
                tl.store(TOTAL + stat, total)

    @triton.jit
    def softmax_sum(LOGITS, TOP, TOTAL, OUT, R, N, blocks,
                    BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
        """Each row's softmax from its programs' statistics, summed over the rows; a row
        with no candidate (its maximum -inf) adds nothing."""
        h = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = n < N
        acc = tl.zeros([BLOCK], tl.float32)
        for r in range(R):
            stats = (h * R + r) * blocks
            top = tl.full([], float("-inf"), tl.float32)
            for start in range(0, blocks, BLOCK_S):
                j = start + tl.arange(0, BLOCK_S)
                top = tl.maximum(top, tl.max(tl.load(TOP + stats + j, mask=j < blocks,
                                                     other=float("-inf")), 0))  # fmt: skip
            base = tl.where(top > float("-inf"), top, 0.0)  # (no -inf - -inf)
            total = tl.zeros([], tl.float32)
            for start in range(0, blocks, BLOCK_S):
                j = start + tl.arange(0, BLOCK_S)
                m = tl.load(TOP + stats + j, mask=j < blocks, other=float("-inf"))
                s = tl.load(TOTAL + stats + j, mask=j < blocks, other=0.0)
                total += tl.sum(s * tl.exp(m - base), 0)  # (a block of no candidate: 0 x 0)
            logit = tl.load(LOGITS + (h * R + r) * N + n, mask=ok, other=float("-inf"))
            if top > float("-inf"):
                acc += tl.exp(logit - top) / total
        tl.store(OUT + h * N + n, acc, mask=ok)

    @triton.jit
    def clusters(Q, C, BIAS, OUT, R, NC, D, s_qh, s_qr, s_ch, s_cc, s_bh,
                 BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        h = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, BLOCK_D)
        ok = c < NC
        cent = tl.load(C + h * s_ch + c[:, None] * s_cc + d[None, :],
                       mask=ok[:, None] & (d < D)[None, :], other=0.0)  # fmt: skip
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        for r in range(R):
            q = tl.load(Q + h * s_qh + r * s_qr + d, mask=d < D, other=0.0).to(tl.float32)
            best = tl.maximum(best, tl.sum(cent * q[None, :], axis=1))
        bias = tl.load(BIAS + h * s_bh + c, mask=ok, other=0.0)
        tl.store(OUT + h * NC + c, best + bias, mask=ok)

    @triton.jit
    def candidates(TAKE, ASSIGN, HI, lo, T_cap, s_take, s_assign, COUNTS, IDS, COUNT, N,
                   blocks, pad_share, BLOCK: tl.constexpr, WRITE: tl.constexpr):  # fmt: skip
        """Pass 1 (WRITE off): each block's candidates counted. Pass 2: written, after
        the candidates of the blocks before; the slots past a head's candidates padded
        with lo, pad_share of them per program; the head's count by its first program."""
        h = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        t = blk * BLOCK + tl.arange(0, BLOCK)
        ok = (t < T_cap) & (t >= lo) & (t < tl.load(HI))
        cluster = tl.load(ASSIGN + h * s_assign + t, mask=ok, other=0)
        m = (ok & (tl.load(TAKE + h * s_take + cluster, mask=ok, other=0) != 0)).to(tl.int32)
        if WRITE:
            before = tl.zeros([], tl.int32)  # candidates of the blocks before this one
            total = tl.zeros([], tl.int32)  # ... and of all of them
            for start in range(0, blocks, BLOCK):
                j = start + tl.arange(0, BLOCK)
                n = tl.load(COUNTS + h * blocks + j, mask=j < blocks, other=0)
                before += tl.sum(tl.where(j < blk, n, 0), 0)
                total += tl.sum(n, 0)
            pos = before + tl.cumsum(m, 0) - 1
            tl.store(IDS + h * N + pos, t.to(tl.int64), mask=(m != 0) & (pos < N))
            first = blk * pad_share
            for start in range(0, pad_share, BLOCK):
                p = first + start + tl.arange(0, BLOCK)
                pad = (p < first + pad_share) & (p < N) & (p >= total)
                tl.store(IDS + h * N + p, tl.full([BLOCK], lo, tl.int64), mask=pad)
            if blk == 0:
                tl.store(COUNT + h, total.to(tl.int64))
        else:
            tl.store(COUNTS + h * blocks + blk, tl.sum(m, 0))

    return SimpleNamespace(
        score=score, softmax_sum=softmax_sum, clusters=clusters, candidates=candidates
    )
