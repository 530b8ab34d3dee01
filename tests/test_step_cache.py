"""The tiered step's device hit cache (offload/step_cache.py) and its fetch kernel."""

import pytest
import torch

from offload.backend import Backend
from offload.kernels import hit_cache
from offload.kernels.gather import fetch_into, fetch_into_ref
from offload.step_cache import StepHitCache
from tests.conftest import DEVICE

H, C, D = 2, 16, 64


def _slab(slots=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, H, slots, C, D, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("block", ["as on a GPU", "as interpreted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fetch_kernel_reads_only_the_marked_rows_into_their_slots(dtype, block, monkeypatch):
    from offload.kernels import gather

    if block == "as on a GPU":  # (programs of 32 ids; the interpreter's take more)
        monkeypatch.setattr(gather, "INTERPRETED_BLOCK_K", gather.BLOCK_K)
    gen = torch.Generator().manual_seed(1)
    slab = _slab(dtype=dtype)
    slot_table = torch.randperm(8, generator=gen).to(DEVICE)
    k, M = 40, 64
    ids = torch.randint(0, 8 * C, (H, k), generator=gen).to(DEVICE)
    rows = (torch.rand(H, k, generator=gen) < 0.5).to(DEVICE)
    dst = torch.stack([torch.randperm(M, generator=gen)[:k] for _ in range(H)]).to(DEVICE)
    want = torch.full((2, H, M, D), 7.0, dtype=dtype, device=DEVICE)
    got = want.clone()
    fetch_into_ref(slab, slot_table, ids, rows, dst, want)
    fetch_into(slab, slot_table, ids, rows, dst, got)
    assert torch.equal(got, want)
    assert int((want != 7.0).any(-1).any(0).sum()) == int(rows.sum())  # only marked rows


def _cache(M, T_cap=8 * C):
    counts = torch.zeros(2, dtype=torch.long, device=DEVICE)
    hc = StepHitCache(H, D, torch.float32, DEVICE, counts)
    hc.reserve(M, T_cap)
    return hc, counts


BACKEND = Backend(DEVICE, kernels=True)  # the fetch kernel (in the interpreter on a CPU)


def _lookup(hc, slab, ids, k_valid=None):
    """`hc.lookup` over `slab`, a slab as the device reads it (on CUDA in device memory
    here: tests/test_decode_step.py reads a pinned one through its UVA view)."""
    ids = torch.tensor(ids, device=DEVICE)
    k_valid = torch.tensor([ids.shape[1] if k_valid is None else k_valid], device=DEVICE)
    slots = torch.arange(slab.shape[2], device=DEVICE)
    return ids, hc.lookup(ids, k_valid, slab, slots, BACKEND)


def _cached(hc, head=0) -> list[int]:
    return sorted(t for t in hc.token_of[head, : hc.slots].tolist() if t >= 0)


def test_least_recently_selected_tokens_are_evicted():
    slab = _slab()
    hc, counts = _cache(M=4)
    for step, (ids, hits) in enumerate(
        [([0, 1], 0), ([2, 3], 0), ([0, 4], 1), ([1, 2], 1), ([0, 2], 2), ([5, 6], 0)]
    ):
        before = counts.clone()
        _lookup(hc, slab, [ids, ids])
        assert int(counts[1] - before[1]) == 2 * hits, step
    # step 2 evicts 1 (last used at step 0), step 3 evicts 3; before step 5 the clocks
    # are 0 @4, 2 @4, 1 @3, 4 @2: 5 and 6 take the slots of 4 and 1
    assert _cached(hc) == [0, 2, 5, 6]
    assert counts.tolist() == [24, 8]


def test_lookups_return_the_slab_rows_over_random_selections_and_truncations():
    gen = torch.Generator().manual_seed(3)
    slab = _slab(seed=3)
    hc, counts = _cache(M=24)
    T = 8 * C
    for step in range(40):
        k, k_valid = 12, int(torch.randint(1, 13, (1,), generator=gen))
        ids = [torch.randperm(T, generator=gen)[:k].tolist() for _ in range(H)]
        ids[1][-2:] = [ids[1][0]] * 2  # duplicates (padding repeats a token)
        ids_t, kv = _lookup(hc, slab, ids, k_valid)
        heads = torch.arange(H, device=DEVICE)[:, None]
        want = slab[:, heads, ids_t // C, ids_t % C]
        assert torch.equal(kv[:, :, :k_valid], want[:, :, :k_valid]), step
        if step % 10 == 9:  # tokens past n are cut and rewritten with other K/V
            n = int(torch.randint(0, T, (1,), generator=gen))
            hc.truncate(n)
            assert all(t < n for t in _cached(hc, 0) + _cached(hc, 1))
            fresh = _slab(seed=100 + step)
            for t in range(n, T):
                slab[:, :, t // C, t % C] = fresh[:, :, t // C, t % C]
    lookups, hits = counts.tolist()
    assert 0 < hits < lookups


def test_repeated_selection_is_all_hits_and_reads_nothing(monkeypatch):
    slab = _slab()
    hc, counts = _cache(M=8)
    _lookup(hc, slab, [[3, 9, 17, 40], [1, 2, 3, 4]])
    reads = []
    real = BACKEND.fetch_into

    def counting(slab, slot_table, ids, rows, dst, cache):
        reads.append(int(rows.sum()))
        real(slab, slot_table, ids, rows, dst, cache)

    monkeypatch.setattr(Backend, "fetch_into", lambda self, *a: counting(*a))
    _, kv = _lookup(hc, slab, [[40, 17, 9, 3], [4, 3, 2, 1]])
    assert reads == [0] and counts.tolist() == [16, 8]
    assert torch.equal(kv[:, 0, 0], slab[:, 0, 40 // C, 40 % C])


def test_growing_the_token_capacity_keeps_what_is_cached():
    slab = _slab()
    hc, counts = _cache(M=8, T_cap=64)
    _lookup(hc, slab, [[3, 9], [1, 2]])
    hc.reserve(8, 8 * C)
    _lookup(hc, slab, [[3, 100], [1, 2]])
    assert counts.tolist() == [8, 3]


@pytest.mark.parametrize("blocks, use", [(None, False), ((4, 16), False), (None, True)])
def test_lookup_kernel_matches_its_torch_reference(blocks, use, monkeypatch):
    """The lookup kernel against the torch code it replaces: the same tables, clocks,
    counts, slots fetched and output rows, step after step, with evictions (ties among
    the least recent stamps: a step's misses share one), partial k_valid and
    truncations (distinct ids per head: with repeated ones which of a token's slots
    `slot_of` names is unspecified). With blocks of 4 ids and 16 slots: several
    iterations of each pass (its running counts), the slots' stamps read a block at a
    time in the bisection. With `use`: only the rows it marks are looked up (a step
    that reuses its last selection leaves some out)."""
    if blocks:
        monkeypatch.setattr(hit_cache, "BLOCK_IDS", blocks[0])
        monkeypatch.setattr(hit_cache, "BLOCK_SLOTS", blocks[1])
    gen = torch.Generator().manual_seed(5)
    slab = _slab(seed=5)
    T, k = 8 * C, 12
    caches = {kernels: _cache(M=40) for kernels in (False, True)}
    for step in range(30):
        ids = torch.stack([torch.randperm(T // 2, generator=gen)[:k] for _ in range(H)])
        ids = ids.to(DEVICE) + (T // 2 if step % 3 == 0 else 0)  # some steps all misses
        k_valid = torch.tensor([int(torch.randint(1, k + 1, (1,), generator=gen))], device=DEVICE)
        marked = (torch.rand(H, k, generator=gen) < 0.6).to(DEVICE) if use else None
        out = {}
        for kernels, (hc, counts) in caches.items():
            backend = Backend(DEVICE, kernels=kernels)
            fetched = []
            real = backend.fetch_into

            def spy(*a, real=real, fetched=fetched):
                fetched.append((a[3].clone(), torch.where(a[3], a[4], -1)))
                real(*a)

            object.__setattr__(backend, "fetch_into", spy)
            kv = hc.lookup(ids, k_valid, slab, torch.arange(8, device=DEVICE), backend, marked)
            M, T_cap = hc.slots, hc.token_capacity
            out[kernels] = (kv, hc.slot_of[:, :T_cap], hc.token_of[:, :M], hc.used[:, :M],
                            hc.clock, counts, *fetched[0])  # fmt: skip
        for a, b in zip(out[False], out[True], strict=True):
            assert torch.equal(a, b), step
        if step % 10 == 7:
            n = int(torch.randint(0, T, (1,), generator=gen))
            for hc, _ in caches.values():
                hc.truncate(n)
    assert 0 < int(caches[True][1][1]) < int(caches[True][1][0])  # hits and misses


def test_victims_are_the_least_recent_slots_and_ties_go_to_the_lower_slot():
    """Stamps 5 3 3 -1 3 7 in slots 0-5 (slot 3 never used), three misses: slot 3 (never
    used), then of the three slots last used at 3 the two lower (1, 2), in slot order."""
    for kernels in (False, True):
        hc, counts = _cache(M=6)
        hc.used[:, :6] = torch.tensor([5, 3, 3, -1, 3, 7])
        hc.clock.fill_(7)
        ids = torch.tensor([[100, 101, 102]] * H, device=DEVICE)
        to, miss, rows = Backend(DEVICE, kernels=kernels).hit_lookup(
            ids,
            torch.tensor([3], device=DEVICE),
            hc.slot_of,
            hc.token_of,
            hc.used,
            hc.clock,
            counts,
        )
        assert to.tolist() == [[1, 2, 3]] * H and miss.all() and torch.equal(rows, to)
        assert hc.used[0, :6].tolist() == [5, 8, 8, 8, 3, 7] and hc.clock.tolist() == [8] * H


def test_successors_kernel_is_with_successors():
    """A reusing step's rows in one launch (`Backend.successors`), as the torch code:
    several blocks of ids a head, runs of consecutive ids across a block's edge, rows
    past `valid` padded with the head's first id."""
    from retrieval.base import with_successors

    gen = torch.Generator().manual_seed(3)
    k, valid = 40, 33
    ids = torch.stack([torch.randperm(60, generator=gen)[:valid].sort().values for _ in range(H)])
    ids = torch.cat([ids, ids[:, :1].expand(H, k - valid)], dim=1).to(DEVICE)
    n = torch.tensor([valid], device=DEVICE)
    both, use = Backend(DEVICE, kernels=True).successors(ids, n)
    ref = with_successors(ids, n)
    assert torch.equal(both, ref[0]) and torch.equal(use, ref[1])
    assert use[:, k:].sum() < valid * H  # (some successors were there already)
