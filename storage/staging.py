"""Host -> CUDA copies through pinned staging buffers (used only when the device is CUDA).

A gather from the host slab makes a pageable tensor; copying it into a pinned
buffer first lets the device copy run asynchronously (`non_blocking`) on the
current stream, which is the prefetch worker's copy stream while it runs.
"""

from __future__ import annotations

import torch

from storage.pinning import pinned_empty


class PinnedStaging:
    """Host -> CUDA copies through two pinned buffers used in turn, allocated once and
    grown when needed; a buffer is reused only after its previous copy has finished."""

    def __init__(self):
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._events: list = [None, None]
        self._turn = 0

    def to_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        i = self._turn
        self._turn ^= 1
        if self._events[i] is not None:
            self._events[i].synchronize()
        buf = self._bufs[i]
        if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype:
            buf = self._bufs[i] = pinned_empty((2 * t.numel(),), t.dtype)
        staged = buf[: t.numel()].view(t.shape)
        staged.copy_(t)
        out = staged.to(device, non_blocking=True)
        self._events[i] = torch.cuda.Event()
        self._events[i].record()
        return out
