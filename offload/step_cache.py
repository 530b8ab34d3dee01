"""`StepHitCache`: a device hit cache of one sparse layer inside the fixed-shape tiered
step (offload/tiered_step.py), so that only the selected tokens not already on the
device cross PCIe. Every shape is fixed and nothing waits on the host, so a CUDA
graph captures it; its bookkeeping lives in device tensors.

    kv        [2, H, M + 1, D]  K/V of the cached tokens; slot M is scratch
    slot_of   [H, T_cap + 1]    int32: the slot of token t, or -1; column T_cap is scratch
    token_of  [H, M + 1]        the token in each slot, or -1
    used      [H, M + 1]        the step (clock) that last selected each slot
    clock     [H]               the head's lookups so far

A step (`lookup`), per KV head, for the selected ids [H, k] (the first `k_valid` used):

    hit    slot_of[ids] >= 0                         -> stamp those slots with the clock
    miss   not a hit, and a used row (j < k_valid)   -> the misses take as many least
           recently used slots (ties: the lower slot; the j-th miss the j-th of them in
           slot order); their old tokens are forgotten, the new ones recorded, and the
           fetch kernel reads just the missed rows from the pinned host slab into
           their slots
    out    the slot of each row [H, k]: the step's attention reads kv there
           (`lookup_slots`); or kv[:, h, slot of each row] [2, H, k, D] (`lookup`)

A slot a hit stamped in this step is never a victim (its clock is the newest, and
a head has at most k - hits misses for M - hits >= k - hits other slots). Writes
that must not land anywhere go to the scratch column or slot, so no step needs a
data-dependent shape. Rows past `k_valid` are not fetched (a hit among them is
stamped all the same): they read whatever their slot holds and attention cuts them
off by length. The bookkeeping is one kernel on CUDA (offload/kernels/hit_cache.py),
its torch reference elsewhere.

Tokens keep their ids while they are cached: the host slab row of a token never
changes until a truncation, and `truncate` forgets the tokens past it.
"""

from __future__ import annotations

import torch

from offload.backend import Backend
from storage.pinning import wait_for


class StepHitCache:
    def __init__(
        self, num_heads: int, head_dim: int, dtype: torch.dtype, device, counts: torch.Tensor
    ):
        """`counts` [2] int64 on the device: lookups and hits are added to it inside steps
        (the owner reads many caches' counts at once, between steps: `LookupCounts`)."""
        self.H, self.D, self.dtype, self.device = num_heads, head_dim, dtype, device
        self._alloc_slots(0)
        self.slot_of = torch.full((num_heads, 1), -1, dtype=torch.int32, device=device)
        self.clock = torch.zeros(num_heads, dtype=torch.long, device=device)
        self.counts = counts
        self._heads = torch.arange(num_heads, device=device)[:, None]

    @property
    def slots(self) -> int:
        return self.kv.shape[2] - 1

    @property
    def token_capacity(self) -> int:
        return self.slot_of.shape[1] - 1

    def _alloc_slots(self, M: int) -> None:
        H, dev = self.H, self.device
        self.kv = torch.zeros(2, H, M + 1, self.D, dtype=self.dtype, device=dev)
        self.token_of = torch.full((H, M + 1), -1, dtype=torch.long, device=dev)
        self.used = torch.full((H, M + 1), -1, dtype=torch.long, device=dev)

    def reserve(self, slots: int, token_capacity: int) -> None:
        """At least `slots` slots per head (more start the cache empty), and ids below
        `token_capacity` (grown keeping what is cached). A reallocation moves the
        buffers' addresses: a captured step must be captured again."""
        if slots > self.slots:
            self._alloc_slots(slots)
            self.slot_of.fill_(-1)
        if token_capacity > self.token_capacity:
            T = self.token_capacity
            grown = torch.full((self.H, token_capacity + 1), -1, dtype=torch.int32,
                               device=self.device)  # fmt: skip
            grown[:, :T] = self.slot_of[:, :T]
            self.slot_of = grown

    def addresses(self) -> tuple[int, ...]:
        return self.kv.data_ptr(), self.slot_of.data_ptr()

    def lookup_slots(
        self,
        ids: torch.Tensor,
        k_valid: torch.Tensor,
        slab: torch.Tensor,
        slot_table: torch.Tensor,
        backend: Backend,
        use: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The slots [H, k] of `kv` that hold the tokens ids [H, k] (see the module
        docstring) once the misses among the first k_valid rows (and of those, the rows
        `use` marks, where given: the others' slot is -1) are read from `slab`
        (`Backend.host_view`): the step's attention reads them there."""
        H, k = ids.shape
        assert k <= self.slots, f"a hit cache of {self.slots} slots cannot serve {k} tokens"
        to, miss, rows = backend.hit_lookup(ids, k_valid, self.slot_of, self.token_of,
                                            self.used, self.clock, self.counts, use)  # fmt: skip
        backend.fetch_into(slab, slot_table, ids, miss, to, self.kv)
        return rows

    def lookup(self, ids, k_valid, slab, slot_table, backend, use=None) -> torch.Tensor:
        """`lookup_slots`, and K/V [2, H, k, D] of the tokens ids [H, k] copied out."""
        rows = self.lookup_slots(ids, k_valid, slab, slot_table, backend, use)
        return self.kv[:, self._heads, rows]

    def truncate(self, num_tokens: int) -> None:
        """Forget the tokens from `num_tokens` on (their ids will name other tokens)."""
        gone = self.token_of >= num_tokens
        self.slot_of.scatter_(1, torch.where(gone, self.token_of, self.token_capacity), -1)
        self.token_of.masked_fill_(gone, -1)
        self.used.masked_fill_(gone, -1)


class LookupCounts:
    """The lookups and hits of several hit caches, counted on the device inside steps
    (`rows[n]` [2] for the n-th cache). Read between steps without waiting for the step
    in flight: `collect` zeroes them after a copy to the host (pinned memory on CUDA,
    queued after the step), which the next `collect`, or `drain`, reads."""

    def __init__(self, caches: int, device: torch.device):
        self.rows = torch.zeros(caches, 2, dtype=torch.long, device=device)
        self._host = torch.zeros(2, dtype=torch.long, pin_memory=device.type == "cuda")
        self._copied: torch.cuda.Event | None = None
        self._pending = False

    def collect(self) -> tuple[int, int]:
        """(lookups, hits) copied at the last call (by now done: a decode loop reads its
        tokens after it), and a copy of those counted since, queued."""
        done = self.drain()
        self._host.copy_(self.rows.sum(0), non_blocking=self.rows.is_cuda)
        self.rows.zero_()
        if self.rows.is_cuda:
            self._copied = torch.cuda.current_stream(self.rows.device).record_event()
        self._pending = True
        return done

    def drain(self) -> tuple[int, int]:
        """(lookups, hits) of the last `collect`'s copy, waited for; (0, 0) after the first."""
        if not self._pending:
            return 0, 0
        copied, self._copied, self._pending = self._copied, None, False
        wait_for(copied)
        lookups, hits = self._host.tolist()
        return lookups, hits
