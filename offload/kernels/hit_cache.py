"""The bookkeeping of a step hit cache (offload/step_cache.py) in one launch.

A lookup in plain torch is about 45 operations per sparse layer (gathers, scatters,
`where`s, a sort); inside a replayed CUDA graph each is still a kernel of a few
microseconds, over 1,000 per step of the 8B shape. Here it is one kernel, `lookup`, one
program per KV head, in passes over the head's ids and slots:

    1  the clock advanced (now = clock[h] + 1); each id's slot read
       (slot_of[h, ids[h, j]]), the slots hit stamped with now, the misses among the
       first k_valid rows counted
    2  the victims: the `misses` least recently used slots, ties to the lower slot. The
       threshold stamp is found by bisection over the stamps (integers from the oldest
       stamp to now: a count of the slots at or below a trial stamp per pass, about
       log2 of the steps since the oldest slot was used, the stamps held in registers up
       to `BLOCK_SLOTS` slots, read a block at a time past that), then the slots below
       it and the first ties are listed in slot order
    3  the j-th miss takes the j-th victim: its old token forgotten (slot_of = -1)
    4  the new tokens recorded (slot_of, token_of, used); lookups and hits added to
       `counts`, the clock stored

Shapes: ids [H, k] int64, k_valid [1], slot_of [H, T_cap + 1] int32, token_of and used
[H, M + 1] int64 (column M, T_cap: scratch), clock [H] int64, counts [2] int64, M >= k.
With `use` [H, k] bool, a row is used where it is one of the first k_valid and `use`
holds (a step that reuses its last selection: retrieval/base.py `with_successors`), and
an unused row's output row is -1 (attention leaves it out).

`successors` is that step's list of rows in one launch: `with_successors`, which in
torch is about fifteen kernels of a few microseconds each inside a replayed graph.
`lookup_ref` is the torch code the kernel replaces; it writes the scratch columns where
the kernel writes nothing there, and agrees on everything else. Within a head, selected
ids are distinct except where padding repeats one (then which of its slots `slot_of`
names is unspecified in both).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from offload.kernels import FP_FUSION, head_warps
from offload.kernels.ranking import first_ranked

BLOCK_IDS = 1024  # ids per iteration (at most; a power of two)
BLOCK_SLOTS = 8192  # slots whose stamps the bisection holds in registers (at most)


def lookup_ref(ids, k_valid, slot_of, token_of, used, clock, counts, use=None):
    """-> (to, miss, rows) [H, k]: each row's slot if it missed (else the scratch slot
    M), whether it missed (a used row not cached), and the slot that holds its token
    afterwards (the scratch slot for an unused row not cached)."""
    H, k = ids.shape
    M, T_cap = token_of.shape[1] - 1, slot_of.shape[1] - 1
    clock += 1
    now = clock[:, None].expand(H, k)
    slots = slot_of.gather(1, ids)
    hit = slots >= 0
    used.scatter_(1, torch.where(hit, slots.long(), M), now)
    used_row = torch.arange(k, device=ids.device)[None, :] < k_valid  # [1, k]
    if use is not None:
        used_row = used_row & use
    miss = ~hit & used_row
    # the victims: the misses' number of least recently used slots (ties: the lower
    # slot), listed in slot order
    victims = first_ranked(used[:, :M], miss.sum(1, keepdim=True), k)
    rank = (miss.cumsum(1) - 1).clamp_min(0)
    to = torch.where(miss, victims.gather(1, rank), M)  # misses' slots; else scratch
    old = token_of.gather(1, to)
    slot_of.scatter_(1, torch.where(miss & (old >= 0), old, T_cap), -1)
    slot_of.scatter_(1, torch.where(miss, ids, T_cap), to.int())
    token_of.scatter_(1, to, torch.where(miss, ids, -1))
    used.scatter_(1, to, now)
    counts[0] += used_row.expand(H, k).sum()
    counts[1] += (hit & used_row).sum()
    rows = torch.where(miss, to, torch.where(hit, slots.long(), M))
    if use is not None:
        rows = torch.where(used_row, rows, -1)
    return to, miss, rows


def lookup(ids, k_valid, slot_of, token_of, used, clock, counts, use=None):
    """The kernel of `lookup_ref`."""
    import triton

    H, k = ids.shape
    M = token_of.shape[1] - 1
    assert ids.is_contiguous() and ids.dtype == torch.long and slot_of.dtype == torch.int32
    assert slot_of.stride(1) == 1 and used.stride(1) == 1 and token_of.stride(1) == 1
    assert clock.shape == (H,) and clock.stride(0) == 1 and counts.stride(0) == 1
    assert k_valid.numel() == 1 and M >= k
    assert use is None or use.shape == (H, k) and use.is_contiguous()
    dev = ids.device
    slots = torch.empty(H, k, dtype=torch.int32, device=dev)  # scratch of passes 1 and 3
    victims = torch.empty(H, k, dtype=torch.long, device=dev)  # scratch of passes 2 and 3
    to = torch.empty(H, k, dtype=torch.long, device=dev)
    miss = torch.empty(H, k, dtype=torch.bool, device=dev)
    rows = torch.empty(H, k, dtype=torch.long, device=dev)
    block_m = max(16, min(BLOCK_SLOTS, triton.next_power_of_2(M)))
    _kernels().lookup[(H,)](
        ids, k_valid, ids if use is None else use.view(torch.uint8), slot_of, token_of, used,
        clock, counts, slots, victims, to, miss.view(torch.uint8), rows, k, M,
        slot_of.stride(0), token_of.stride(0), used.stride(0),
        BLOCK=min(BLOCK_IDS, triton.next_power_of_2(k)), BLOCK_M=block_m, WHOLE=M <= block_m,
        HAS_USE=use is not None,
        num_warps=head_warps(block_m), enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return to, miss, rows


def successors(ids, valid):
    """The kernel of `retrieval.base.with_successors` (valid a [1] device tensor)."""
    import triton

    H, k = ids.shape
    assert ids.is_contiguous() and valid.numel() == 1
    both = torch.empty(H, 2 * k, dtype=ids.dtype, device=ids.device)
    use = torch.empty(H, 2 * k, dtype=torch.bool, device=ids.device)
    block = min(BLOCK_IDS, triton.next_power_of_2(k))
    _kernels().successors[(H, triton.cdiv(k, block))](
        ids, valid, both, use.view(torch.uint8), k, BLOCK=block, enable_fp_fusion=FP_FUSION
    )
    return both, use


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def lookup(IDS, K_VALID, USE, SLOT_OF, TOKEN_OF, USED, CLOCK, COUNTS, SLOTS, VICTIMS,
               TO, MISS, ROWS, k, M, s_slot_of, s_token_of, s_used, BLOCK: tl.constexpr,
               BLOCK_M: tl.constexpr, WHOLE: tl.constexpr, HAS_USE: tl.constexpr):  # fmt: skip
        h = tl.program_id(0).to(tl.int64)
        valid = tl.load(K_VALID)
        now = tl.load(CLOCK + h) + 1
        misses = tl.zeros([], tl.int32)  # running counts
        hits = misses
        looked = misses
        # Pass 1: the hits stamped, the misses counted.
        for start in range(0, k, BLOCK):
            j = start + tl.arange(0, BLOCK)
            ok = j < k
            t = tl.load(IDS + h * k + j, mask=ok, other=0)
            slot = tl.load(SLOT_OF + h * s_slot_of + t, mask=ok, other=-1)
            tl.store(SLOTS + h * k + j, slot, mask=ok)
            tl.store(USED + h * s_used + slot, now + tl.zeros_like(t), mask=ok & (slot >= 0))
            row_used = ok & (j < valid)
            if HAS_USE:
                row_used = row_used & (tl.load(USE + h * k + j, mask=ok, other=0) != 0)
            misses += tl.sum((row_used & (slot < 0)).to(tl.int32), axis=0)
            hits += tl.sum((row_used & (slot >= 0)).to(tl.int32), axis=0)
            looked += tl.sum(row_used.to(tl.int32), axis=0)
        tl.debug_barrier()  # pass 1's stamps are seen by all the program's threads
        # Pass 2: the threshold stamp, the least in (lo, hi] with at least `misses` slots
        # at or below it (none at or below lo, below the oldest stamp; all of them at or
        # below now). The stamps span the steps since the oldest slot was used, so the
        # passes are about log2 of that, not of the steps decoded.
        c = tl.arange(0, BLOCK_M)
        if WHOLE:
            u = tl.load(USED + h * s_used + c, mask=c < M, other=2**62)
            lo = tl.min(u, axis=0) - 1
        else:
            lo = now
            for start in range(0, M, BLOCK_M):
                x = tl.load(USED + h * s_used + start + c, mask=start + c < M, other=2**62)
                lo = tl.minimum(lo, tl.min(x, axis=0) - 1)
        hi = tl.where(misses > 0, now, lo + 1)  # (no miss: no victim, no pass)
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            if WHOLE:
                n = tl.sum((u <= mid).to(tl.int32), axis=0)
            else:
                n = tl.zeros([], tl.int32)
                for start in range(0, M, BLOCK_M):
                    x = tl.load(USED + h * s_used + start + c, mask=start + c < M, other=2**62)
                    n += tl.sum((x <= mid).to(tl.int32), axis=0)
            if n >= misses:
                hi = mid
            else:
                lo = mid
        # The victims in slot order: every slot below the threshold, then the first ties
        # (BLOCK slots at a time: a scan over a block of BLOCK_M would take more registers).
        ties = misses
        c = tl.arange(0, BLOCK)
        for start in range(0, M, BLOCK):
            x = tl.load(USED + h * s_used + start + c, mask=start + c < M, other=2**62)
            ties -= tl.sum((x < hi).to(tl.int32), axis=0)
        taken = tl.zeros([], tl.int32)
        tied = taken
        for start in range(0, M, BLOCK):
            x = tl.load(USED + h * s_used + start + c, mask=start + c < M, other=2**62)
            eq = x == hi
            chosen = (x < hi) | (eq & (tied + tl.cumsum(eq.to(tl.int32), axis=0) <= ties))
            rank = taken + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
            tl.store(VICTIMS + h * k + rank, start + c, mask=chosen)
            taken += tl.sum(chosen.to(tl.int32), axis=0)
            tied += tl.sum(eq.to(tl.int32), axis=0)
        tl.debug_barrier()
        # Pass 3: the j-th miss takes the j-th victim, whose old token is forgotten. Every
        # read of token_of and slot_of comes before pass 4 writes them (as in the
        # reference: the forgetting first, then the recording).
        ranked = tl.zeros([], tl.int32)
        for start in range(0, k, BLOCK):
            j = start + tl.arange(0, BLOCK)
            ok = j < k
            slot = tl.load(SLOTS + h * k + j, mask=ok, other=-1)
            miss = ok & (j < valid) & (slot < 0)
            if HAS_USE:
                miss = miss & (tl.load(USE + h * k + j, mask=ok, other=0) != 0)
            m = miss.to(tl.int32)
            victim = tl.load(VICTIMS + h * k + ranked + tl.cumsum(m, axis=0) - 1, mask=miss,
                             other=0)  # fmt: skip
            to = tl.where(miss, victim, M)
            old = tl.load(TOKEN_OF + h * s_token_of + to, mask=miss, other=-1)
            tl.store(SLOT_OF + h * s_slot_of + old, tl.full([BLOCK], -1, tl.int32),
                     mask=miss & (old >= 0))  # fmt: skip
            tl.store(TO + h * k + j, to, mask=ok)
            tl.store(MISS + h * k + j, m.to(tl.uint8), mask=ok)
            row = tl.where(slot >= 0, slot.to(tl.int64), to)
            if HAS_USE:  # (an unused row: -1)
                use = tl.load(USE + h * k + j, mask=ok, other=0) != 0
                row = tl.where((j < valid) & use, row, -1)
            tl.store(ROWS + h * k + j, row, mask=ok)
            ranked += tl.sum(m, axis=0)
        tl.debug_barrier()  # pass 3's writes are seen by all the program's threads
        # Pass 4: the new tokens recorded in their slots.
        for start in range(0, k, BLOCK):
            j = start + tl.arange(0, BLOCK)
            ok = j < k
            miss = tl.load(MISS + h * k + j, mask=ok, other=0) != 0
            to = tl.load(TO + h * k + j, mask=miss, other=0)
            t = tl.load(IDS + h * k + j, mask=miss, other=0)
            tl.store(SLOT_OF + h * s_slot_of + t, to.to(tl.int32), mask=miss)
            tl.store(TOKEN_OF + h * s_token_of + to, t, mask=miss)
            tl.store(USED + h * s_used + to, now + tl.zeros_like(t), mask=miss)
        tl.store(CLOCK + h, now)
        tl.atomic_add(COUNTS, looked.to(tl.int64))
        tl.atomic_add(COUNTS + 1, hits.to(tl.int64))

    @triton.jit
    def successors(IDS, VALID, BOTH, USE, k, BLOCK: tl.constexpr):
        h = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = j < k
        valid = tl.load(VALID)
        first = tl.load(IDS + h * k)
        t = tl.load(IDS + h * k + j, mask=ok, other=0)
        nxt = tl.load(IDS + h * k + j + 1, mask=ok & (j + 1 < k), other=-1)
        row = j < valid
        fresh = row & ~((j + 1 < valid) & (nxt == t + 1))
        tl.store(BOTH + h * 2 * k + j, tl.where(row, t, first), mask=ok)
        tl.store(BOTH + h * 2 * k + k + j, tl.where(fresh, t + 1, first), mask=ok)
        tl.store(USE + h * 2 * k + j, row.to(tl.uint8), mask=ok)
        tl.store(USE + h * 2 * k + k + j, fresh.to(tl.uint8), mask=ok)

    return SimpleNamespace(lookup=lookup, successors=successors)
