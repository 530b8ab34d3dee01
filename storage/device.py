"""Device tier of one layer: sink and recent window at full precision, plus the
low-bit key summaries and the abstracts of every completed chunk.

On CUDA these are CUDA tensors; on CPU ordinary ones. The window is a ring of
`window` slots: token t lives in slot t % window.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from storage.abstracts import ChunkAbstracts, chunk_abstracts
from storage.layout import KVLayout
from storage.pinning import wait_for
from storage.quant import PARAM_DTYPE, QuantKeys, quantize_keys

CONTEXT_GROWTH = 1.125  # of device buffers that grow with the whole context (`Growable`)


class Growable:
    """A tensor that grows along `dim` with geometric reallocation; `view()` is the filled part.

    `most` bounds the geometric growth (a request for more is still granted exactly):
    a cache with a byte budget never reserves beyond it; `reserve` may bound it further
    (a cache never reserves past the model's window). `growth` is the factor: 2 by
    default; the device tier's summaries and the dense layers' device mirrors, which grow
    for the whole context, use 1.125 (`CONTEXT_GROWTH`), so that their capacity stays
    within an eighth of their size (doubling at a power-of-two context, 128k tokens,
    would hold twice what they need)."""

    def __init__(
        self, shape: tuple[int, ...], dim: int, dtype: torch.dtype, device,
        most: int | None = None, growth: float = 2.0,
    ):  # fmt: skip
        self.dim, self.most, self.growth = dim, most, growth
        self.data = torch.empty(shape, dtype=dtype, device=device)
        self.length = shape[dim]  # starts full (shape[dim] is usually 0)

    def reserve(self, needed: int, most: int | None = None) -> None:
        cap = self.data.shape[self.dim]
        if needed <= cap:
            return
        shape = list(self.data.shape)
        grown = max(needed, int(self.growth * cap), 16)
        for bound in (self.most, most):
            if bound is not None:
                grown = max(needed, min(grown, bound))
        shape[self.dim] = grown
        bigger = self.data.new_empty(shape)
        bigger.narrow(self.dim, 0, self.length).copy_(self.view())
        self.data = bigger

    def append(self, t: torch.Tensor) -> None:
        n = t.shape[self.dim]
        self.reserve(self.length + n)
        self.data.narrow(self.dim, self.length, n).copy_(t)
        self.length += n

    def view(self) -> torch.Tensor:
        return self.data.narrow(self.dim, 0, self.length)

    def truncate(self, n: int) -> None:
        assert 0 <= n <= self.length, (n, self.length)
        self.length = n


class DeviceTier:
    """Sink and window KV, key summaries and chunk abstracts of one layer. The abstracts
    are read only by the chunk selector (and written to disk records), so they may be
    kept in host memory instead (`abstracts_device`): 3 GiB of GPU memory for the 8B
    shape at 128k."""

    def __init__(
        self, layout: KVLayout, dtype: torch.dtype, device, sink: int, window: int,
        abstracts_device=None, max_chunks: int | None = None,
    ):  # fmt: skip
        H, D = layout.num_kv_heads, layout.head_dim
        self.layout, self.sink, self.window = layout, sink, window
        # Sink and window ring in one buffer (views of it), which the fixed-shape step's
        # attention reads as one set of rows (offload/tiered_step.py).
        self.recent = torch.empty(2, H, sink + window, D, dtype=dtype, device=device)
        self.sink_kv, self.ring = self.recent[:, :, :sink], self.recent[:, :, sink:]
        bits = layout.summary_bits
        f32 = torch.float32
        # Growth by an eighth, never past the chunks of the model's window (`max_chunks`).
        self.max_chunks = max_chunks
        g, most = CONTEXT_GROWTH, max_chunks
        tokens = None if most is None else most * layout.chunk_size
        self.codes = Growable((H, 0, D * bits // 8), 1, torch.uint8, device, tokens, g)
        self.scale = Growable((H, 0, D), 1, PARAM_DTYPE, device, most, g)
        self.zero = Growable((H, 0, D), 1, PARAM_DTYPE, device, most, g)
        where = device if abstracts_device is None else abstracts_device
        self.abstracts_on_device = torch.device(where) == torch.device(device)
        self.kmin = Growable((0, H, D), 0, f32, where, most, g)
        self.kmax = Growable((0, H, D), 0, f32, where, most, g)
        self.kmean = Growable((0, H, D), 0, f32, where, most, g)
        # A loaded session's abstracts, not read yet (`abstracts_later`): (what reads
        # them, how many chunks they hold, the chunks their buffers will have room for);
        # meanwhile the buffers above hold the chunks after those.
        self._pending: tuple[Callable, int, int] | None = None
        # Abstracts of the last chunks on their way from the device to host memory (an
        # event for the copies, the abstracts): appended once there (`_arrived`).
        self._arriving: list[tuple[torch.cuda.Event | None, ChunkAbstracts]] = []

    def write_recent(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens start .. start+S-1 (k, v [H, S, D]) into the sink and the window ring."""
        S = k.shape[1]
        if start < self.sink:
            n = min(S, self.sink - start)
            self.sink_kv[0, :, start : start + n] = k[:, :n]
            self.sink_kv[1, :, start : start + n] = v[:, :n]
        W = self.window
        if W == 0:
            return
        if S == 1:  # a decode step: one slot, two plain copies
            self.ring[0, :, start % W] = k[:, 0]
            self.ring[1, :, start % W] = v[:, 0]
            return
        keep = min(S, W)  # only the last W tokens can stay
        pos = torch.arange(start + S - keep, start + S, device=k.device) % W
        self.ring[0].index_copy_(1, pos, k[:, S - keep :])
        self.ring[1].index_copy_(1, pos, v[:, S - keep :])

    def read_window(self, t0: int, t1: int) -> torch.Tensor:
        """[2, H, t1-t0, D] of tokens t0..t1-1, which must be in the ring."""
        pos = torch.arange(t0, t1, device=self.ring.device) % self.window
        return self.ring.index_select(2, pos)

    def add_chunks(self, keys: torch.Tensor) -> None:
        """Summaries and abstracts of completed chunks, the next ones in order
        (keys [H, n * C, D])."""
        C = self.layout.chunk_size
        self.add_summaries(
            quantize_keys(keys, self.layout.summary_bits, C), chunk_abstracts(keys, C)
        )

    def add_summaries(
        self, qk: QuantKeys, a: ChunkAbstracts, ready: torch.cuda.Event | None = None
    ) -> None:
        """The summaries and abstracts of the next completed chunks, computed elsewhere.
        `ready`: the abstracts are host memory that copies from the device, queued, are
        still filling (non-blocking); they join the others once the event has passed."""
        self.codes.append(qk.codes)
        self.scale.append(qk.scale)
        self.zero.append(qk.zero)
        if ready is not None or self._arriving:  # (in order, after those on their way)
            self._arriving.append((ready, a))
        else:
            self._append_abstracts(a)

    def _append_abstracts(self, a: ChunkAbstracts) -> None:
        self.kmin.append(a.kmin)
        self.kmax.append(a.kmax)
        self.kmean.append(a.kmean)

    def _arrived(self) -> None:
        """Append the abstracts still on their way (`add_summaries`), once their copies are
        done: by the time the host reads them, as a rule (a decode loop reads its tokens)."""
        arriving, self._arriving = self._arriving, []
        for ready, a in arriving:
            wait_for(ready)
            self._append_abstracts(a)

    def room_for(self, n: int) -> int:
        """Chunks to reserve for n chunks with room to grow: an eighth more, up to the
        model's window."""
        room = n + n // 8
        return room if self.max_chunks is None else max(n, min(room, self.max_chunks))

    def reserve_chunks(self, n: int) -> None:
        """Room for n chunks' summaries and abstracts in all, ahead of a long append that
        adds them block by block (growing by an eighth at each block would copy the
        layer's abstracts, host memory, several times over)."""
        self.codes.reserve(n * self.layout.chunk_size)
        for g in (self.scale, self.zero):
            g.reserve(n)
        if self._pending is None:  # (else the saved abstracts come in buffers with room)
            for g in (self.kmin, self.kmax, self.kmean):
                g.reserve(n)

    @property
    def num_chunks(self) -> int:
        return self.scale.length

    @property
    def chunk_capacity(self) -> int:
        """Chunks the summaries hold before they grow (and move)."""
        C = self.layout.chunk_size
        return min(self.scale.data.shape[1], self.codes.data.shape[1] // C)

    def truncate_chunks(self, n: int) -> None:
        self._arrived()
        C = self.layout.chunk_size
        self.codes.truncate(n * C)
        for g in (self.scale, self.zero):
            g.truncate(n)
        first = 0
        if self._pending is not None:  # a cut needs none of the saved abstracts read
            later, saved, room = self._pending
            self._pending = (later, min(saved, n), room)
            first = saved
        for g in (self.kmin, self.kmax, self.kmean):
            g.truncate(max(n - first, 0))

    def abstracts_later(self, later: Callable[[], ChunkAbstracts], n: int, room: int) -> None:
        """The first `n` chunks' abstracts (a loaded session's) are `later()`
        (`ChunkAbstracts`, read then: `storage.abstracts.SavedAbstracts`), put in buffers
        with room for `room` chunks when first read: a load does not read them (3 GiB for
        the 8B shape at 128k). Appends and cuts go on meanwhile; the first read of the
        abstracts reads them (and raises what their read raised, a damaged file named)."""
        assert self.scale.length == n and self.kmin.length == 0 and self._pending is None
        self._pending = (later, n, room)

    def abstract_buffers(self, saved: ChunkAbstracts, room: int) -> list[torch.Tensor]:
        """`abstracts_later`'s buffers: the saved abstracts, on the abstracts' device, with
        room for `room` chunks."""
        out = []
        mine, theirs = (self.kmin, self.kmax, self.kmean), (saved.kmin, saved.kmax, saved.kmean)
        for g, t in zip(mine, theirs, strict=True):
            buf = g.data.new_empty((max(room, t.shape[0]), *t.shape[1:]))
            buf[: t.shape[0]].copy_(t)
            out.append(buf)
        return out

    def _settle_abstracts(self) -> None:
        if self._pending is None:
            return
        later, n, room = self._pending
        buffers = self.abstract_buffers(later(), room)
        for g, buf in zip((self.kmin, self.kmax, self.kmean), buffers, strict=True):
            after = g.view().to(buf.device)  # chunks appended since (usually a few)
            g.data, g.length = buf, n
            g.append(after)
        self._pending = None

    def summaries(self) -> QuantKeys:
        L = self.layout
        return QuantKeys(
            L.summary_bits, L.chunk_size, self.codes.view(), self.scale.view(), self.zero.view()
        )

    def abstracts(self, chunks: list[int] | None = None) -> ChunkAbstracts:
        self._arrived()
        self._settle_abstracts()
        a = ChunkAbstracts(self.kmin.view(), self.kmax.view(), self.kmean.view())
        if chunks is None:
            return a
        idx = torch.tensor(chunks, dtype=torch.long, device=a.kmin.device)
        return ChunkAbstracts(a.kmin[idx], a.kmax[idx], a.kmean[idx])

    def nbytes(self, num_tokens: int) -> int:
        return (
            self.layout.device_bytes(num_tokens, self.sink, self.window, self.abstracts_on_device)
            // self.layout.num_layers
        )
