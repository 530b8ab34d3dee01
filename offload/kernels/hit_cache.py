"""The bookkeeping of a step hit cache (offload/step_cache.py) in two launches.

A lookup in plain torch is about 45 operations per sparse layer (gathers, scatters,
`where`s, a cumsum); inside a replayed CUDA graph each is still a kernel of a few
microseconds, over 1,000 per step of the 8B shape. Here they are two kernels, with the
choice of victims (`topk`, least recently used first) between them:

    stamp    slots[h, j] = slot_of[h, ids[h, j]]; the slots hit are stamped with the clock
             (one program per KV head and block of ids)
    assign   the j-th miss of a head among the first k_valid rows takes the j-th victim:
             its old token forgotten (slot_of = -1), the new one recorded (slot_of,
             token_of, used); `to`, `miss` and the output's cache rows written; lookups
             and hits added to `counts` (one program per KV head: a running count ranks
             the misses, block after block)

Shapes: ids [H, k] int64, slot_of [H, T_cap + 1] int32, token_of and used [H, M + 1]
int64 (column M, T_cap: scratch), clock [1] int64 (already advanced), k_valid [1],
victims [H, k] int64, counts [2] int64. The references below are the torch code the
kernels replace; they write the scratch columns where the kernels write nothing there,
and agree on everything else. Within a head, selected ids are distinct except where
padding repeats one (then which of its slots `slot_of` names is unspecified in both).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

BLOCK_STAMP = 128  # ids per program of `stamp`
BLOCK_ASSIGN = 1024  # ids per iteration of `assign` (at most; a power of two)


def stamp_ref(ids, slot_of, used, clock) -> torch.Tensor:
    slots = slot_of.gather(1, ids)
    M = used.shape[1] - 1
    used.scatter_(1, torch.where(slots >= 0, slots.long(), M), clock.expand(ids.shape))
    return slots


def assign_ref(ids, slots, victims, k_valid, slot_of, token_of, used, clock, counts):
    H, k = ids.shape
    M, T_cap = token_of.shape[1] - 1, slot_of.shape[1] - 1
    hit = slots >= 0
    used_row = torch.arange(k, device=ids.device)[None, :] < k_valid  # [1, k]
    miss = ~hit & used_row
    rank = (miss.cumsum(1) - 1).clamp_min(0)
    to = torch.where(miss, victims.gather(1, rank), M)  # misses' slots; else scratch
    old = token_of.gather(1, to)
    slot_of.scatter_(1, torch.where(miss & (old >= 0), old, T_cap), -1)
    slot_of.scatter_(1, torch.where(miss, ids, T_cap), to.int())
    token_of.scatter_(1, to, torch.where(miss, ids, -1))
    used.scatter_(1, to, clock.expand(H, k))
    counts[0] += used_row.sum() * H
    counts[1] += (hit & used_row).sum()
    rows = torch.where(miss, to, torch.where(hit, slots.long(), M))
    return to, miss, rows


def stamp(ids, slot_of, used, clock) -> torch.Tensor:
    import triton

    H, k = ids.shape
    _check(ids, slot_of, used)
    slots = torch.empty(H, k, dtype=torch.int32, device=ids.device)
    _kernels().stamp[(H, triton.cdiv(k, BLOCK_STAMP))](
        ids, slot_of, used, clock, slots, k, slot_of.stride(0), used.stride(0),
        BLOCK=BLOCK_STAMP,
    )  # fmt: skip
    return slots


def assign(ids, slots, victims, k_valid, slot_of, token_of, used, clock, counts):
    import triton

    H, k = ids.shape
    _check(ids, slot_of, used)
    assert token_of.stride(1) == 1 and victims.stride(1) == 1 and slots.is_contiguous()
    assert counts.stride(0) == 1 and k_valid.numel() == 1 and victims.shape[1] >= k
    dev = ids.device
    to = torch.empty(H, k, dtype=torch.long, device=dev)
    miss = torch.empty(H, k, dtype=torch.bool, device=dev)
    rows = torch.empty(H, k, dtype=torch.long, device=dev)
    _kernels().assign[(H,)](
        ids, slots, victims, k_valid, slot_of, token_of, used, clock, counts,
        to, miss.view(torch.uint8), rows, k, token_of.shape[1] - 1,
        slot_of.stride(0), token_of.stride(0), used.stride(0), victims.stride(0),
        BLOCK=min(BLOCK_ASSIGN, triton.next_power_of_2(k)),
    )  # fmt: skip
    return to, miss, rows


def _check(ids, slot_of, used) -> None:
    assert ids.is_contiguous() and ids.dtype == torch.long
    assert slot_of.dtype == torch.int32 and slot_of.stride(1) == 1 and used.stride(1) == 1


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def stamp(IDS, SLOT_OF, USED, CLOCK, SLOTS, k, s_slot_of, s_used, BLOCK: tl.constexpr):
        h = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = j < k
        t = tl.load(IDS + h * k + j, mask=ok, other=0)
        slot = tl.load(SLOT_OF + h * s_slot_of + t, mask=ok, other=-1)
        tl.store(SLOTS + h * k + j, slot, mask=ok)
        now = tl.load(CLOCK)
        tl.store(USED + h * s_used + slot, now + tl.zeros_like(t), mask=ok & (slot >= 0))

    @triton.jit
    def assign(IDS, SLOTS, VICTIMS, K_VALID, SLOT_OF, TOKEN_OF, USED, CLOCK, COUNTS,
               TO, MISS, ROWS, k, M, s_slot_of, s_token_of, s_used, s_victims,
               BLOCK: tl.constexpr):  # fmt: skip
        h = tl.program_id(0).to(tl.int64)
        valid = tl.load(K_VALID)
        now = tl.load(CLOCK)
        misses = tl.zeros([], tl.int32)  # a running count
        hits = misses
        looked = misses
        # Pass 1: rank the misses, pick their slots, forget the victims' old tokens. Every
        # read of token_of and slot_of comes before pass 2 writes them (as in the
        # reference: the forgetting first, then the recording).
        for start in range(0, k, BLOCK):
            j = start + tl.arange(0, BLOCK)
            ok = j < k
            slot = tl.load(SLOTS + h * k + j, mask=ok, other=-1)
            hit = slot >= 0
            row_used = ok & (j < valid)
            miss = row_used & (slot < 0)
            m = miss.to(tl.int32)
            rank = misses + tl.cumsum(m, axis=0) - 1
            victim = tl.load(VICTIMS + h * s_victims + rank, mask=miss, other=0)
            to = tl.where(miss, victim, M)
            old = tl.load(TOKEN_OF + h * s_token_of + to, mask=miss, other=-1)
            tl.store(SLOT_OF + h * s_slot_of + old, tl.full([BLOCK], -1, tl.int32),
                     mask=miss & (old >= 0))  # fmt: skip
            tl.store(TO + h * k + j, to, mask=ok)
            tl.store(MISS + h * k + j, m.to(tl.uint8), mask=ok)
            tl.store(ROWS + h * k + j, tl.where(hit, slot.to(tl.int64), to), mask=ok)
            misses += tl.sum(m, axis=0)
            hits += tl.sum((hit & row_used).to(tl.int32), axis=0)
            looked += tl.sum(row_used.to(tl.int32), axis=0)
        tl.debug_barrier()  # pass 1's writes of this program are seen by all its threads
        # Pass 2: record the new tokens in their slots.
        for start in range(0, k, BLOCK):
            j = start + tl.arange(0, BLOCK)
            ok = j < k
            miss = tl.load(MISS + h * k + j, mask=ok, other=0) != 0
            to = tl.load(TO + h * k + j, mask=miss, other=0)
            t = tl.load(IDS + h * k + j, mask=miss, other=0)
            tl.store(SLOT_OF + h * s_slot_of + t, to.to(tl.int32), mask=miss)
            tl.store(TOKEN_OF + h * s_token_of + to, t, mask=miss)
            tl.store(USED + h * s_used + to, now + tl.zeros_like(t), mask=miss)
        tl.atomic_add(COUNTS, looked.to(tl.int64))
        tl.atomic_add(COUNTS + 1, hits.to(tl.int64))

    return SimpleNamespace(stamp=stamp, assign=assign)
