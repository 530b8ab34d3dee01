"""Host -> CUDA copies through pinned staging buffers (used only when the device is CUDA).

A gather from the host slab makes a pageable tensor; copying it into a pinned
buffer first lets the device copy run asynchronously (`non_blocking`) on the
current stream, which is the prefetch worker's copy stream while it runs. A gather
may also write into the next pinned buffer itself (`empty`), and no copy is made.
"""

from __future__ import annotations

import math

import torch

from storage.pinning import pinned_empty


class PinnedStaging:
    """Host -> CUDA copies through two pinned buffers used in turn, allocated once and
    grown when needed; a buffer is reused only after its previous copy has finished."""

    def __init__(self):
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._events: list = [None, None]
        self._turn = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next buffer (once its previous copy has finished) as an empty tensor of
        `shape`, for a gather to write into: `to_device` of it then copies nothing on
        the host (a selection's rows read from the session files: 8 MiB a layer and
        step for the 8B shape)."""
        i = self._turn
        if self._events[i] is not None:
            self._events[i].synchronize()
            self._events[i] = None
        n = math.prod(shape)
        buf = self._bufs[i]
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._bufs[i] = pinned_empty((2 * n,), dtype)
        return buf[:n].view(shape)

    def to_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        staged = self.empty(tuple(t.shape), t.dtype)
        i = self._turn
        self._turn ^= 1
        if not (t.data_ptr() == staged.data_ptr() and t.is_contiguous()):  # (else: `empty`'s)
            staged.copy_(t)
        out = staged.to(device, non_blocking=True)
        self._events[i] = torch.cuda.Event()
        self._events[i].record()
        return out
