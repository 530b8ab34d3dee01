"""Decode attention: one query position per KV-head group against a KV buffer whose
valid length is a device tensor, so the call has fixed shapes and a CUDA graph can
replay it while the context grows.

    q       [H, G, D]   the G query heads of each of the H KV heads (one position)
    k, v    [H, N, D]   N rows of capacity (last dim contiguous); rows >= length ignored
    length  [1] int64   valid rows, on the device (an int is accepted by the reference)
    ->      [H, G, D]   softmax(q k^T / sqrt(D)) v over rows 0 .. length-1

A second set of rows may join the first (`k2, v2, length2`: its rows 0 .. length2-1),
read through a per-head table of row numbers where `idx2` [H, N2] is given: the
tiered step attends to its sink and window (one buffer) and to the tokens it selected
where they lie in its hit cache, without first copying them all into one buffer. A row
whose number is negative is left out (`skip`: a step that reuses its last selection
has rows it does not use among them).

The Triton kernel is flash-decoding: the N rows are cut into splits, one program
per (KV head, split) keeps a running max, sum and weighted V sum over its rows
(the G query heads as the rows of one `tl.dot`, padded to 16), and a second kernel
merges the splits by their log-sum-exps. Splits past `length` do no work. One program per
head, as SDPA runs a single decode query, would leave most of a GPU idle.

    rows  0 ........................................ N-1
          |split 0|split 1| ... |split s|  ...  |split S-1|
                                    ^ length: later splits exit at once
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch

from offload.kernels import FP_FUSION, interpreted, supports_head_dim

BLOCK_N = 64  # rows per inner iteration
MAX_SPLITS = 128  # partial results merged per (head, query)
COMBINE_ROWS = 1  # query rows per merging program
# Triton's interpreter (the CPU tests) runs the programs one after another, each with
# its set-up (a split past the length too), and each operation of each iteration as a
# numpy call: there a buffer is cut into a few splits, read in larger blocks, and the
# merge takes a head's query rows in one program. The same results.
INTERPRETED_MAX_SPLITS = 4
INTERPRETED_BLOCK_N = 256
INTERPRETED_COMBINE_ROWS = 16


def _setting() -> tuple[int, int, int]:
    """(rows per inner iteration, most splits, query rows a merge) where the kernel runs."""
    if interpreted():
        return INTERPRETED_BLOCK_N, INTERPRETED_MAX_SPLITS, INTERPRETED_COMBINE_ROWS
    return BLOCK_N, MAX_SPLITS, COMBINE_ROWS


# Shared memory of the split kernel beside its pipelined K and V tiles (an upper bound
# of what compiling it for sm_86/89/90 showed: 8-12.5 KiB), and the least a block may
# use on the GPUs this runtime is for (an RTX 3090/4090: 99 KiB).
SHARED_SLACK = 16 * 1024
SHARED_MIN = 99 * 1024


def decode_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor | int,
    k2=None, v2=None, length2=None, idx2=None,
) -> torch.Tensor:  # fmt: skip
    """Plain-torch reference (and the CPU path): float32 softmax over the valid rows."""
    H = k.shape[0]
    valid = _valid(k.shape[1], length, q.device).expand(H, -1)  # [H, N]
    if k2 is not None:
        valid2 = _valid(k2.shape[1] if idx2 is None else idx2.shape[1], length2, q.device)
        valid2 = valid2.expand(H, -1)
        if idx2 is not None:  # (a row numbered below zero: left out)
            heads = torch.arange(H, device=q.device)[:, None]
            k2, v2 = k2[heads, idx2.clamp_min(0)], v2[heads, idx2.clamp_min(0)]
            valid2 = valid2 & (idx2 >= 0)
        k, v = torch.cat([k, k2], dim=1), torch.cat([v, v2], dim=1)
        valid = torch.cat([valid, valid2], dim=1)
    D = q.shape[2]
    logits = torch.matmul(q.float(), k.float().transpose(1, 2)) * D**-0.5  # [H, G, N]
    logits = logits.masked_fill(~valid[:, None], float("-inf"))
    # Rows past the length may hold anything (an uninitialized buffer: NaN too), and
    # 0 * NaN is NaN: zero them rather than rely on their weight being 0.
    v = v.float().masked_fill(~valid[..., None], 0.0)
    return torch.matmul(torch.softmax(logits, dim=-1), v).to(q.dtype)


def _valid(N: int, length, device) -> torch.Tensor:
    if not isinstance(length, int):
        length = length.reshape(())
    return torch.arange(N, device=device) < length


def split_rows(N: int) -> int:
    """Rows per split for a buffer of N rows: a multiple of BLOCK_N, at most MAX_SPLITS
    splits (the INTERPRETED_ settings in the interpreter)."""
    block, most, _ = _setting()
    return block * max(1, math.ceil(math.ceil(N / block) / most))


def launch_config(D: int, itemsize: int, shared_limit: int, skip: bool = False) -> tuple[int, int]:
    """(num_warps, num_stages) of the split kernel for head dim D, KV elements of
    `itemsize` bytes, and a GPU whose blocks may use `shared_limit` bytes of shared memory.

    Triton pipelines the K and V tiles' loads through `num_stages` buffers in shared
    memory, (stages - 1) x 2 x BLOCK_N x D x itemsize bytes and a little more. The 3
    stages Triton defaults to take 143 KiB for float32 at head dim 128, past the 99 KiB of
    an RTX 4090 (the launch would fail), so fewer are taken where that many do not fit.
    Float32 tiles spill registers with 4 warps (255 per thread and a stack) and do not
    with 8. (Compiled for sm_86/89/90 without a GPU: offload/kernels/aot.py.)"""
    warps = 8 if itemsize >= 4 else 4
    for stages in (3, 2, 1):
        if (max(stages, 2) - 1) * 2 * BLOCK_N * D * itemsize + SHARED_SLACK <= shared_limit:
            break
    if skip and itemsize >= 4 and stages == 2:
        # (the test of left-out rows: float32 tiles in two stages spill 8 bytes on sm_86/89
        # at head dim 128, in one stage none)
        stages = 1
    return warps, stages


@functools.cache
def shared_limit(device: torch.device) -> int:
    """Bytes of shared memory a block may use on `device` (opted in); elsewhere the least
    of the GPUs this runtime is for."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return getattr(props, "shared_memory_per_block_optin", SHARED_MIN)
    return SHARED_MIN


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor,
    k2=None, v2=None, length2=None, idx2=None, skip: bool = False,
) -> torch.Tensor:  # fmt: skip
    """The Triton kernel (see the module docstring); same contract as the reference. The
    second rows' splits follow the first's, so the merge sees one list of splits. Rows
    numbered below zero are left out only with `skip` (a specialization of its own: the
    test costs registers, and float32 tiles then take one pipeline stage, `launch_config`)."""
    import triton

    H, G, D = q.shape
    N = k.shape[1]
    assert k.shape == v.shape == (H, N, D), (q.shape, k.shape, v.shape)
    assert k.stride(2) == 1 and v.stride(2) == 1 and q.stride(2) == 1, "last dim contiguous"
    assert supports_head_dim(D), f"head_dim {D} must be a power of two >= 16"
    assert length.dtype == torch.int64 and length.numel() == 1
    N2 = 0
    if k2 is not None:
        assert k2.shape == v2.shape and k2.shape[0] == H and k2.shape[2] == D, (k2.shape, v2.shape)
        assert k2.stride(2) == 1 and v2.stride(2) == 1 and k2.dtype == k.dtype
        assert length2.dtype == torch.int64 and length2.numel() == 1
        N2 = k2.shape[1] if idx2 is None else idx2.shape[1]
        assert idx2 is None or idx2.shape == (H, N2) and idx2.stride(1) == 1, idx2.shape
    else:  # (placeholders: no split reads them)
        k2, v2, length2 = k, v, length
    block_n, _, combine_rows = _setting()
    split = split_rows(N + N2)
    splits1 = math.ceil(N / split)
    num_splits = splits1 + math.ceil(N2 / split)
    GP = max(16, triton.next_power_of_2(G))  # tl.dot needs at least 16 rows
    m = torch.empty(H, GP, num_splits, dtype=torch.float32, device=q.device)
    s = torch.empty_like(m)
    acc = torch.empty(H, GP, num_splits, D, dtype=torch.float32, device=q.device)
    warps, stages = launch_config(D, k.element_size(), shared_limit(q.device), skip)
    _kernels().split[(H, num_splits)](
        q, k, v, length, k2, v2, length2, k2 if idx2 is None else idx2, m, s, acc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k2.stride(0), k2.stride(1), v2.stride(0), v2.stride(1),
        0 if idx2 is None else idx2.stride(0), D**-0.5, G, split, splits1,
        GP=GP, D=D, BLOCK_N=block_n, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_IDX=idx2 is not None, SKIP=skip, num_warps=warps, num_stages=stages,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    # Merge the splits (one launch: in a replayed graph each launch still costs a few us).
    out = torch.empty(H, G, D, dtype=q.dtype, device=q.device)
    rows = min(combine_rows, triton.next_power_of_2(G))  # (<= GP: rows the splits wrote)
    _kernels().combine[(H, triton.cdiv(G, rows))](
        m, s, acc, out, num_splits, G, out.stride(0), out.stride(1),
        GP=GP, D=D, SP=triton.next_power_of_2(num_splits), ROWS=rows, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out


@functools.cache
def _kernels() -> SimpleNamespace:
    """Define the Triton kernels on first use (so importing this module needs no triton,
    and `TRITON_INTERPRET` is read when the kernel is first wanted)."""
    import triton
    import triton.language as tl

    # (SPLITS1 follows the buffer's capacity: specialized, its values 1 and multiples of
    # 16 would each compile the kernel again as the buffer grows)
    @triton.jit(do_not_specialize=["SPLITS1"])
    def split(Q, K, V, LEN, K2, V2, LEN2, IDX, M, S, ACC, sq_h, sq_g, sk_h, sk_t, sv_h, sv_t,
              sk2_h, sk2_t, sv2_h, sv2_t, si_h, scale, G, SPLIT, SPLITS1,
              GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
              HAS_IDX: tl.constexpr, SKIP: tl.constexpr):  # fmt: skip
        h = tl.program_id(0)
        sp = tl.program_id(1)
        num_splits = tl.num_programs(1)
        # A split of the first rows, or past SPLITS1 of the second: its buffers and strides
        second = sp >= SPLITS1
        start = tl.where(second, sp - SPLITS1, sp) * SPLIT
        stop = tl.minimum(start + SPLIT, tl.where(second, tl.load(LEN2), tl.load(LEN)))
        Kx, Vx = tl.where(second, K2, K), tl.where(second, V2, V)
        kh, kt = tl.where(second, sk2_h, sk_h), tl.where(second, sk2_t, sk_t)
        vh, vt = tl.where(second, sv2_h, sv_h), tl.where(second, sv2_t, sv_t)
        idx_stop = tl.where(second, stop, 0)  # rows whose number IDX holds: the second's
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        q = tl.load(Q + h * sq_h + g[:, None] * sq_g + d[None, :], mask=g[:, None] < G, other=0.0)
        q = q.to(tl.float32) * scale
        if SKIP:  # (finite: a block whose rows are all left out, before any row was seen,
            # gives exp(-inf - -1e30) = 0, not NaN; a split with no row keeps -1e30, weight 0)
            m_i = tl.full([GP], -1e30, tl.float32)
        else:
            m_i = tl.full([GP], float("-inf"), tl.float32)
        s_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for n0 in range(start, stop, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            ok = n < stop
            r = n.to(tl.int64)
            if HAS_IDX:  # the second rows' row j is row IDX[h, j] of its buffers (< 0: none)
                i = tl.load(IDX + h * si_h + n, mask=n < idx_stop, other=0)
                if SKIP:
                    ok = ok & (i >= 0)
                    i = tl.maximum(i, 0)
                r = tl.where(second, i, r)
            k = tl.load(Kx + h * kh + r[:, None] * kt + d[None, :], mask=ok[:, None], other=0.0)
            # float32 operands: 16-bit inputs go through tf32 (the kernel is bound by its
            # reads, not its math); float32 inputs are multiplied exactly.
            logits = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION)
            logits = tl.where(ok[None, :], logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(logits - m_new[:, None])
            s_i = s_i * alpha + tl.sum(p, 1)
            v = tl.load(Vx + h * vh + r[:, None] * vt + d[None, :], mask=ok[:, None], other=0.0)
            pv = tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        row = (h * GP + g) * num_splits + sp  # m, s: [H, GP, splits]
        tl.store(M + row, m_i)
        tl.store(S + row, s_i)
        tl.store(ACC + row[:, None] * D + d[None, :], acc)

    @triton.jit
    def combine(M, S, ACC, OUT, num_splits, G, so_h, so_g,
                GP: tl.constexpr, D: tl.constexpr, SP: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
        # ROWS query rows of a KV head: the splits' partial sums weighted by
        # exp(m - max m); a split with no rows has m = -inf, weight 0. (Rows from G to
        # GP were written by the splits too: read, not stored.)
        h = tl.program_id(0)
        g = (tl.program_id(1) * ROWS + tl.arange(0, ROWS))[:, None]  # [ROWS, 1]
        sp = tl.arange(0, SP)[None, :]  # [1, SP]
        ok = (sp < num_splits) & (g < GP)
        row = (h * GP + g) * num_splits + sp  # [ROWS, SP]
        m = tl.load(M + row, mask=ok, other=float("-inf"))
        s = tl.load(S + row, mask=ok, other=0.0)
        w = tl.exp(m - tl.max(m, 1)[:, None])
        d = tl.arange(0, D)[None, None, :]
        acc = tl.load(ACC + row[:, :, None] * D + d, mask=ok[:, :, None], other=0.0)
        out = tl.sum(acc * w[:, :, None], 1) / tl.sum(s * w, 1)[:, None]  # [ROWS, D]
        dst = OUT + h * so_h + g * so_g + tl.arange(0, D)[None, :]
        tl.store(dst, out.to(OUT.dtype.element_ty), mask=g < G)

    return SimpleNamespace(split=split, combine=combine)
