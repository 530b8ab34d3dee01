"""What a device selection keeps (retrieval/device_index.py), found without a sort: the
clusters taken (`take_clusters`) and the tokens kept after the rerank (`top_ids`). Each is
one program per KV head that finds a threshold over the 32-bit patterns of float32
values, mapped to integers in the floats' order (the negatives' magnitude bits flipped),
with the head's values held in registers (up to `BLOCK_C`, `BLOCK_TOP` of them; past
that read a block at a time in each pass), then lists or marks what lies above it.

Which clusters are taken (`take_clusters`): a head's clusters in the order of their
scores, taken while the tokens of the clusters before them are fewer than `want`
(and the best one always). In torch, an argsort (on a GPU a segmented radix sort of
several kernels once a head has more than 4,096 clusters: past 64k tokens) and ten
kernels on [H, NC] (a gather, a cumsum, comparisons, a scatter). Without the sort: a
cluster is taken when the clusters scoring strictly higher hold fewer than `want`
tokens, so what is taken is every cluster scoring at or above a threshold, the lowest
score at which that holds (each pass sums the counts of the clusters above a trial
value). The same clusters as the ranking takes, but where scores tie at the
threshold: there it takes every tied cluster where the ranking takes the tied ones it
happened to rank first (both are "the best clusters"; more candidates than counted
are then dropped past N, as ever).

The tokens kept (`top_ids`): the ids of each head's `want` largest weights (ties: the
earlier candidate), in candidate order (the token order), the rows after them the head's
first candidate. In torch, `topk` (on a GPU a radix select and, for the best first, a
sort: a few kernels) and a gather. Here a radix select in one program per head: the
want-th largest weight's pattern 8 bits a pass, from a histogram (`tl.histogram`) of the
digits of the weights that share the bits found so far (4 passes, where a bisection would
take 32 over 16,896 weights), then one pass lists the ids of the weights above it and of
the first ones equal to it.

Past `SPLIT_ABOVE` weights a head's select is spread over programs of `BLOCK_SPLIT`
weights each (`top_ids_split`; on the H200 one program per head took 76 us of a
sparse layer's 250 at 128k, 8 of the 132 SMs busy): a launch per pass, in which each
program histograms its own weights' digits into global memory after summing the
histograms of the passes before (all the head's programs find the same digits), then a
launch that lists: each program finds from the same histograms how many of the weights
above the cut and of the ties lie in the programs before its own (a key above the cut
is one whose digit is above the cut's in the first pass where it differs), and writes
its ids after theirs. Five launches, the same ids.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from offload.kernels import FP_FUSION, head_warps, interpreted
from retrieval.base import clusters_taken

BLOCK_C = 16384  # clusters `take_clusters`' one program per head holds in registers (at
# most: past it, it reads them a block at a time in each of its 32 passes)
BLOCK_TOP = 8192  # weights `top_ids`' holds, past it read a block at a time in each
# pass (as a step's 16,896 candidates of the 8B shape at 128k are: with Triton 3.6, 16,384
# in registers spilled, 32,768 spilled 6.7 KB; with 3.9 neither)
BLOCK_READ = 4096  # values read at a time by the passes that list the tokens kept (on
# an H200, 8 heads x 16,640 weights: 72 us against 77 at 2048 and 81 for torch's topk and
# a gather; 8 warps, `head_warps`, were the best at each size: scripts/sweep_selection.py)
LIST_PER_THREAD = 8  # weights a thread reads at a time in the pass that lists the
# tokens kept (a block of 4,096 in 8 warps read 16: Triton 3.6, torch 2.11's and the GPU
# machine's, then spilled 24 bytes on sm_89 at 128 registers; in two reads of 2,048,
# 99-107 registers, no spill; Triton 3.9: 120 and 64-80)
SPLIT_ABOVE = 4096  # weights per head past which `top_ids` spreads a head over programs
# Triton's interpreter (the CPU tests) runs one program a head up to more: its five
# launches of many programs took 14x as long there (0.66 s a call at 4,352 weights), the
# same ids. Tests of the split set both.
INTERPRETED_SPLIT_ABOVE = 32768
BLOCK_SPLIT = 2048  # weights per program there (on the H200, a step's 16,640 a head at
# 128k: 30 us with 2,048, 39 with 1,024, 71 in one program a head, 81 for torch's topk)
SPLIT_WARPS = 4
SPLIT_ROWS = 8  # programs' histograms summed at a time (in registers: ROWS x 256)
# Trial thresholds a pass of `take_clusters` tries: 1 is a bisection (32 passes, each a
# sum over the head's clusters: 18 us a layer at 128k on the H200, 8 programs); with
# more, each pass sums the counts above TAKE_TRIALS trials, spread evenly over the range
# left, in one reduction of [trials, clusters], and keeps the part between two of them
# (14 passes with 4, 11 with 8: fewer of the reductions' syncs, more arithmetic). The
# same clusters (tests/test_device_index.py); which is faster is for
# scripts/sweep_selection.py to say on a GPU (not measured yet).
TAKE_TRIALS = 1


def take_clusters_ref(scores, counts, factor: int, k: int, k_valid=None):
    """scores [H, NC] (of each cluster), counts [H, NC] (float: tokens per cluster; any
    row stride) -> take [H, NC + 1] bool: in the order of the scores, the clusters before
    the running count of tokens reaches want = factor x (k_valid if given, a device
    tensor [1], else k), and the one that reaches it (at least one); the last column,
    the tokens not indexed yet, always."""
    want = factor * (k if k_valid is None else k_valid)
    taken = clusters_taken(scores, counts, want)
    return torch.cat([taken, taken.new_ones(taken.shape[0], 1)], dim=1)


def take_clusters(scores, counts, factor: int, k: int, k_valid=None):
    """The kernel of `take_clusters_ref` (but for ties at the threshold: see above)."""
    import triton

    H, NC = scores.shape
    assert scores.is_contiguous() and counts.stride(1) == 1
    take = torch.empty(H, NC + 1, dtype=torch.bool, device=scores.device)
    block = max(16, min(BLOCK_C, triton.next_power_of_2(NC)))
    valid = scores if k_valid is None else k_valid  # (a pointer the kernel does not read)
    trials = TAKE_TRIALS
    assert trials & (trials - 1) == 0, f"TAKE_TRIALS {trials} must be a power of two"
    passes, span = 0, 2**32  # (each pass keeps at most ceil(span / (trials + 1)))
    while span > 1:
        passes, span = passes + 1, -(-span // (trials + 1))
    _kernels().take[(H,)](
        scores, counts, valid, take.view(torch.uint8), NC, counts.stride(0), factor, k,
        K_VALID=k_valid is not None, BLOCK=block, WHOLE=NC <= block, TRIALS=trials,
        PASSES=passes, num_warps=head_warps(block), enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return take


def first_ranked(values, n, k: int, descending: bool = False) -> torch.Tensor:
    """values [H, N] -> [H, k]: the positions of each row's first n values (a number, or
    [H, 1]) in the order of the values (ties: the earlier position), listed in position
    order, then N. What the one-program-per-head kernels pick (here and the hit cache's
    victims), in torch."""
    H, N = values.shape
    at = torch.arange(N, device=values.device).expand(H, N)
    order = torch.sort(values, dim=1, descending=descending, stable=True).indices
    chosen = torch.empty_like(order).scatter_(1, order, at) < n
    return torch.sort(torch.where(chosen, at, N), dim=1).values[:, :k]


def top_ids_ref(weights, ids, k: int, k_valid=None):
    """weights [H, N] float32 (none -0.0 or NaN), ids [H, N] (N >= k) -> [H, k]: the ids
    of the want = k_valid (a device tensor [1] <= k) or k largest weights (ties: the
    earlier), in their order in ids; the rows after them ids[:, 0]."""
    kept = first_ranked(weights, k if k_valid is None else k_valid, k, descending=True)
    return torch.cat([ids, ids[:, :1]], dim=1).gather(1, kept)


def top_ids(weights, ids, k: int, k_valid=None):
    """The kernel of `top_ids_ref` (past `SPLIT_ABOVE` weights a head, `top_ids_split`)."""
    import triton

    H, N = weights.shape
    assert weights.is_contiguous() and weights.dtype == torch.float32 and ids.stride(1) == 1
    assert N >= k
    if N > (INTERPRETED_SPLIT_ABOVE if interpreted() else SPLIT_ABOVE):
        return top_ids_split(weights, ids, k, k_valid)
    out = torch.empty(H, k, dtype=ids.dtype, device=ids.device)
    whole = N <= BLOCK_TOP
    block = max(16, triton.next_power_of_2(N)) if whole else BLOCK_READ
    valid = weights if k_valid is None else k_valid  # (a pointer the kernel does not read)
    warps = head_warps(block)
    _kernels().top[(H,)](
        weights, ids, valid, out, N, k, ids.stride(0),
        K_VALID=k_valid is not None, BLOCK=block, WHOLE=whole,
        BLOCK_K=min(BLOCK_READ, block, LIST_PER_THREAD * 32 * warps), num_warps=warps,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out


def top_ids_split(weights, ids, k: int, k_valid=None):
    """`top_ids` with each head's weights spread over programs of `BLOCK_SPLIT`: four
    launches of a histogram pass, one that lists."""
    import triton

    H, N = weights.shape
    P = triton.cdiv(N, BLOCK_SPLIT)
    out = torch.empty(H, k, dtype=ids.dtype, device=ids.device)
    hist = torch.empty(H, 4, P, 256, dtype=torch.int32, device=weights.device)
    valid = weights if k_valid is None else k_valid  # (a pointer the kernel does not read)
    kernels, grid = _kernels(), (H, P)
    common = dict(K_VALID=k_valid is not None, BLOCK=BLOCK_SPLIT, ROWS=SPLIT_ROWS,
                  num_warps=SPLIT_WARPS, enable_fp_fusion=FP_FUSION)  # fmt: skip
    for p in range(4):
        kernels.top_pass[grid](weights, hist, valid, N, k, P, PASS=p, **common)
    kernels.top_list[grid](
        weights, ids, hist, valid, out, N, k, P, ids.stride(0), triton.cdiv(k, P), **common
    )
    return out


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    global _ordered  # (Triton looks a kernel's callees up among its module's globals)

    @triton.jit
    def _ordered(x):
        """float32 -> int32 in the floats' order (the negatives' magnitude bits flipped)."""
        x = x.to(tl.int32, bitcast=True)
        return tl.where(x >= 0, x, x ^ 0x7FFFFFFF)

    @triton.jit
    def take(SCORES, COUNTS, K_VALID_PTR, TAKE, NC, s_counts, factor, k,
             K_VALID: tl.constexpr, BLOCK: tl.constexpr, WHOLE: tl.constexpr,
             TRIALS: tl.constexpr, PASSES: tl.constexpr):  # fmt: skip
        h = tl.program_id(0).to(tl.int64)
        if K_VALID:
            k = tl.load(K_VALID_PTR)
        want = (factor * k).to(tl.float32)
        r = tl.arange(0, BLOCK)
        # the threshold lies in (lo, hi]: above lo the clusters hold >= want tokens (lo
        # below every score: all of them), above hi fewer (hi the best score: none)
        lo = tl.full([], -(2**31) - 1, tl.int64)
        if WHOLE:
            key = tl.load(SCORES + h * NC + r, mask=r < NC, other=float("-inf"))
            key = _ordered(key)
            n = tl.load(COUNTS + h * s_counts + r, mask=r < NC, other=0.0)
            hi = tl.max(key, 0).to(tl.int64)
        else:
            hi = tl.full([], -(2**31), tl.int64)
            for start in range(0, NC, BLOCK):
                c = start + r
                x = tl.load(SCORES + h * NC + c, mask=c < NC, other=float("-inf"))
                x = _ordered(x)
                hi = tl.maximum(hi, tl.max(x, 0).to(tl.int64))
        if TRIALS == 1:  # (the bisection as measured: the general form below at one
            # trial gives the same clusters but compiles otherwise, 79 registers against
            # 93 on sm_90, and is not timed)
            for _ in range(32):  # (hi - lo <= 2^32: halved 32 times, it is 1)
                mid = lo + (hi - lo) // 2
                # (integer counts: float32 sums are exact, as the reference's cumsum)
                if WHOLE:
                    above = tl.sum(tl.where(key > mid, n, 0.0), 0)
                else:
                    above = tl.zeros([], tl.float32)
                    for start in range(0, NC, BLOCK):
                        c = start + r
                        x = tl.load(SCORES + h * NC + c, mask=c < NC, other=float("-inf"))
                        x = _ordered(x)
                        m = tl.load(COUNTS + h * s_counts + c, mask=c < NC, other=0.0)
                        above += tl.sum(tl.where(x > mid, m, 0.0), 0)
                if above < want:
                    hi = mid
                else:
                    lo = mid
        else:
            # trial j at lo + (hi - lo) * (j + 1) / (TRIALS + 1); the range kept runs from
            # the last trial with >= want tokens above it (or lo) to the next (or hi)
            j = tl.arange(0, TRIALS)
            for _ in range(PASSES):
                mids = lo + ((hi - lo) * (j + 1)) // (TRIALS + 1)  # [TRIALS] int64
                if WHOLE:
                    above = tl.sum(tl.where(key[None, :] > mids[:, None], n[None, :], 0.0), 1)
                else:
                    above = tl.zeros([TRIALS], tl.float32)
                    for start in range(0, NC, BLOCK):
                        c = start + r
                        x = tl.load(SCORES + h * NC + c, mask=c < NC, other=float("-inf"))
                        x = _ordered(x)
                        m = tl.load(COUNTS + h * s_counts + c, mask=c < NC, other=0.0)
                        above += tl.sum(tl.where(x[None, :] > mids[:, None], m[None, :], 0.0), 1)
                last = tl.max(tl.where(above >= want, j, -1), 0)  # (-1: none, lo stays)
                hi = tl.where(last == TRIALS - 1, hi, tl.sum(tl.where(j == last + 1, mids, 0), 0))
                lo = tl.where(last < 0, lo, tl.sum(tl.where(j == last, mids, 0), 0))
        for start in range(0, NC, BLOCK):
            c = start + r
            x = tl.load(SCORES + h * NC + c, mask=c < NC, other=float("-inf"))
            x = _ordered(x)
            tl.store(TAKE + h * (NC + 1) + c, (x >= hi).to(tl.uint8), mask=c < NC)
        tl.store(TAKE + h * (NC + 1) + NC, tl.full([], 1, tl.uint8))

    @triton.jit
    def top(WEIGHTS, IDS, K_VALID_PTR, OUT, N, k, s_ids, K_VALID: tl.constexpr,
            BLOCK: tl.constexpr, WHOLE: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        h = tl.program_id(0).to(tl.int64)
        want = k
        if K_VALID:
            want = tl.load(K_VALID_PTR).to(tl.int32)
        c = tl.arange(0, BLOCK)
        key = c  # (read only where WHOLE)
        if WHOLE:
            key = _ordered(tl.load(WEIGHTS + h * N + c, mask=c < N, other=0.0))
        # The want-th largest key, 8 bits a pass from the top: of the keys that share the
        # bits found so far, the digit at which the count from the largest down reaches
        # `need` (those above it are taken; need counts the rest to take). The top digit
        # has its sign bit flipped, so that digits rise with the keys.
        found = tl.zeros([], tl.int32)  # the key's bits found so far
        need = want
        bins = tl.arange(0, 256)
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            flip = 128 if p == 0 else 0
            hist = tl.zeros([256], tl.int32)  # the digits at `shift` of the keys in play
            if WHOLE:
                play = c < N
                if p > 0:
                    play = play & ((key >> (shift + 8)) == (found >> (shift + 8)))
                hist += tl.histogram(((key >> shift) & 255) ^ flip, 256, mask=play)
            else:
                for start in range(0, N, BLOCK):
                    x = tl.load(WEIGHTS + h * N + start + c, mask=start + c < N, other=0.0)
                    x = _ordered(x)
                    play = start + c < N
                    if p > 0:
                        play = play & ((x >> (shift + 8)) == (found >> (shift + 8)))
                    hist += tl.histogram(((x >> shift) & 255) ^ flip, 256, mask=play)
            at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
            digit = tl.sum((at_or_above >= need).to(tl.int32), 0) - 1
            need -= tl.sum(tl.where(bins > digit, hist, 0), 0)
            found = found | ((digit ^ flip) << shift)
        # The keys above it, then the first `need` equal to it, in their order.
        rk = tl.arange(0, BLOCK_K)
        kept = tl.zeros([], tl.int32)
        tied = kept
        for start in range(0, N, BLOCK_K):
            j = start + rk
            x = _ordered(tl.load(WEIGHTS + h * N + j, mask=j < N, other=0.0))
            eq = (x == found) & (j < N)
            chosen = ((x > found) & (j < N)) | (eq & (tied + tl.cumsum(eq.to(tl.int32), 0) <= need))
            t = tl.load(IDS + h * s_ids + j, mask=chosen, other=0)
            tl.store(OUT + h * k + kept + tl.cumsum(chosen.to(tl.int32), 0) - 1, t, mask=chosen)
            kept += tl.sum(chosen.to(tl.int32), 0)
            tied += tl.sum(eq.to(tl.int32), 0)
        first = tl.load(IDS + h * s_ids)
        for start in range(0, k, BLOCK_K):
            j = start + rk
            tl.store(OUT + h * k + j, first + tl.zeros_like(j).to(first.dtype),
                     mask=(j >= want) & (j < k))  # fmt: skip

    global _cut  # (as _ordered)

    @triton.jit
    def _cut(HIST, h, j, P, need, PASSES: tl.constexpr, ROWS: tl.constexpr):
        """The want-th largest key's digits from passes 0..PASSES-1 (their histograms
        [H, 4, P, 256], each program's, summed over the head's, ROWS programs' at a
        time): the bits found, the ties still to take after the keys above (`need`,
        from want), and of the head's programs before program j, the keys above the
        cut and the keys equal to it."""
        bins = tl.arange(0, 256)
        rows = tl.arange(0, ROWS)
        found = tl.zeros([], tl.int32)
        above = tl.zeros([], tl.int32)
        equal = above
        for p in tl.static_range(PASSES):
            flip = 128 if p == 0 else 0
            hist = tl.zeros([256], tl.int32)  # the head's
            before = hist  # the programs' before j
            for start in range(0, P, ROWS):
                r = start + rows
                part = tl.load(HIST + ((h * 4 + p) * P + r[:, None]) * 256 + bins[None, :],
                               mask=(r < P)[:, None], other=0)  # fmt: skip
                hist += tl.sum(part, 0)
                before += tl.sum(tl.where((r < j)[:, None], part, 0), 0)
            at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
            digit = tl.sum((at_or_above >= need).to(tl.int32), 0) - 1
            need -= tl.sum(tl.where(bins > digit, hist, 0), 0)
            above += tl.sum(tl.where(bins > digit, before, 0), 0)
            equal = tl.sum(tl.where(bins == digit, before, 0), 0)
            found = found | ((digit ^ flip) << (24 - 8 * p))
        return found, need, above, equal

    @triton.jit
    def top_pass(WEIGHTS, HIST, K_VALID_PTR, N, k, P, PASS: tl.constexpr,
                 K_VALID: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
        """A program's histogram of the digits at pass PASS of its keys that share the
        bits the passes before found."""
        h = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        c = j * BLOCK + tl.arange(0, BLOCK)
        key = _ordered(tl.load(WEIGHTS + h * N + c, mask=c < N, other=0.0))
        play = c < N
        if PASS > 0:
            want = k
            if K_VALID:
                want = tl.load(K_VALID_PTR).to(tl.int32)
            found, _, _, _ = _cut(HIST, h, j, P, want, PASS, ROWS)
            play = play & ((key >> (32 - 8 * PASS)) == (found >> (32 - 8 * PASS)))
        flip = 128 if PASS == 0 else 0
        hist = tl.histogram(((key >> (24 - 8 * PASS)) & 255) ^ flip, 256, mask=play)
        tl.store(HIST + ((h * 4 + PASS) * P + j) * 256 + tl.arange(0, 256), hist)

    @triton.jit
    def top_list(WEIGHTS, IDS, HIST, K_VALID_PTR, OUT, N, k, P, s_ids, pad_share,
                 K_VALID: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
        """A program's ids above the cut and its share of the first ties, after those of
        the programs before; its share of the rows past want padded."""
        h = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        want = k
        if K_VALID:
            want = tl.load(K_VALID_PTR).to(tl.int32)
        # (above, tied: of the programs before this one)
        found, need, above, tied = _cut(HIST, h, j, P, want, 4, ROWS)
        start = above + tl.minimum(tied, need)
        c = j * BLOCK + tl.arange(0, BLOCK)
        x = _ordered(tl.load(WEIGHTS + h * N + c, mask=c < N, other=0.0))
        eq = (x == found) & (c < N)
        chosen = ((x > found) & (c < N)) | (eq & (tied + tl.cumsum(eq.to(tl.int32), 0) <= need))
        t = tl.load(IDS + h * s_ids + c, mask=chosen, other=0)
        tl.store(OUT + h * k + start + tl.cumsum(chosen.to(tl.int32), 0) - 1, t, mask=chosen)
        first = tl.load(IDS + h * s_ids)
        for s in range(0, pad_share, BLOCK):
            r = j * pad_share + s + tl.arange(0, BLOCK)
            pad = (r >= want) & (r < k) & (r < (j + 1) * pad_share)
            tl.store(OUT + h * k + r, first + tl.zeros_like(r).to(first.dtype), mask=pad)

    return SimpleNamespace(take=take, top=top, top_pass=top_pass, top_list=top_list)
