"""Host memory the GPU reads: exactly sized pinned buffers, and slabs that grow in place.

    pinned_empty(shape, dtype)   page-locked memory of exactly this size (registered)
    device_view(t, device)       a CUDA tensor over pinned host memory (the GPU reads it)
    ReservedSlab(shape, dtype)   a slab of its largest size, reserved as address space
                                 only; its first n slots are made usable (on CUDA:
                                 registered) as it grows, so it never moves; without
                                 CUDA, the memory of slots let go is given back
    resident_bytes(t)            how much of a tensor's memory is resident (measured)

A host tier's slab (storage/host.py) grows with the context. Grown by reallocation,
every growth allocates and pins a bigger slab, copies the old one into it and gives the
decode step a new address to capture again; pinning runs at about 1.5 GB/s on the H100
machine (../shared/gpu/README.md), so at 64k tokens of an 8B model (8 GiB of KV) that is
seconds of a chat turn, every 1.25x. A `ReservedSlab` is mapped once at the largest size
the layer can reach (the model's window: untouched pages take no memory), and growth
registers only the new slots of each (K/V, head) plane.

One copy between the device and such a slab must stay within one registration: the CUDA
driver refuses a transfer over memory that is registered in part (CUDA_ERROR_INVALID_VALUE)
and does not promise one over two registrations. `runs` splits a plane's slots at the
edges of its registrations; tests/cuda_emulation.py raises on a contiguous copy that
crosses one.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import threading
import weakref
from types import SimpleNamespace

import numpy as np
import torch

from storage.errors import HostMemoryError, first_line

PAGE = 4096


def _cudart():
    """CUDA's runtime API as torch binds it (None in a build without CUDA)."""
    try:
        return torch.cuda.cudart()
    except (AttributeError, RuntimeError, AssertionError):
        return None


_registered: dict[int, int] = {}  # address -> bytes, of what `_register` page-locked
_registered_lock = threading.Lock()


def _register(cudart, ptr: int, nbytes: int) -> bool:
    """Page-lock [ptr, ptr + nbytes) for the GPU: portable (1) and mapped (2), one address
    for the CPU and every device (unified virtual addressing)."""
    try:
        done = cudart is not None and int(cudart.cudaHostRegister(ptr, nbytes, 3)) == 0
    except (AttributeError, RuntimeError, TypeError):  # no such binding here
        return False
    if done:
        with _registered_lock:
            _registered[ptr] = nbytes
    return done


def _unregister(cudart, pieces: list[int]) -> None:
    for ptr in pieces:
        cudart.cudaHostUnregister(ptr)
        with _registered_lock:
            _registered.pop(ptr, None)
    pieces.clear()


def registered_bytes() -> int:
    """The host memory page-locked for the KV now (by `pinned_empty` and `ReservedSlab`)."""
    with _registered_lock:
        return sum(_registered.values())


def refused(nbytes: int, e: BaseException) -> HostMemoryError:
    """The error for a page-lock of `nbytes` more that the driver refused (`e`, torch's)."""
    from offload.config import human_bytes

    said = first_line(e)
    return HostMemoryError(
        f"could not page-lock {human_bytes(nbytes)} more of host memory for the KV cache "
        f"after {human_bytes(registered_bytes())} ({said}): this machine allows less than "
        "the host budget (WSL2 limits it, and so can a container); set kv.host_bytes "
        "below what was locked, and the KV past it stays on disk"
    )


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory of exactly this size, readable by the GPU (UVA).

    torch's pinned allocator rounds every block up to a power of two: a slab of 2^k
    chunks plus one would take twice the memory, and a power-of-two context (128k
    tokens) lands on exactly such an edge. So the memory is an ordinary buffer
    registered with CUDA (as sglang's host KV pools do), unregistered by the
    finalizer of the array that owns it, which lives as long as any view of it.
    Where registration is refused, torch's pinned allocator is used after all."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes:
        buf = np.empty(nbytes + PAGE, dtype=np.uint8)
        start = -buf.ctypes.data % PAGE  # page-aligned, as registration wants
        mem = buf[start : start + nbytes]
        # Touch every page first, with torch's threads (zero_ runs in parallel): a
        # registration then locks pages that exist instead of faulting them in one by one
        # (whether that is faster on the GPU machine is to be measured), and the slab
        # holds no stale memory.
        t = torch.from_numpy(mem)
        t.zero_()
        ptr, cudart = mem.ctypes.data, _cudart()
        if _register(cudart, ptr, nbytes):
            weakref.finalize(buf, _unregister, cudart, [ptr])
            if t.is_pinned():  # (what the rest of the store and `device_view` rely on)
                return t.view(dtype).view(shape)
    try:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    except RuntimeError as e:  # (cudaHostAlloc refused too)
        raise refused(nbytes, e) from e


def device_view(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over the memory of the pinned host tensor `t` (same address, unified
    virtual addressing): the device reads it over PCIe, no copy is made. The caller
    keeps `t` alive for as long as the view is used."""
    assert t.is_pinned() and t.is_contiguous(), "device_view needs a contiguous pinned tensor"
    nbytes = t.numel() * t.element_size()
    iface = SimpleNamespace(
        __cuda_array_interface__={
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (t.data_ptr(), False),
            "version": 3,
            "strides": None,
        }  # fmt: skip
    )
    return torch.as_tensor(iface, device=device).view(t.dtype).view(t.shape)


def wait_for(event: torch.cuda.Event | None) -> None:
    """The host waits for the device work before `event` (copies into host memory, queued
    without waiting), unless it has passed or there is none (None: nothing was queued).
    `query` first: where the work is done, as a rule by the time the host reads its
    result, nothing is called that waits."""
    if event is not None and not event.query():
        event.synchronize()


def slot_multiple(plane_slot_bytes: int) -> int:
    """The fewest slots whose bytes are a whole number of pages: a registration's edges
    fall on page edges (two registrations may not share a page)."""
    return PAGE // math.gcd(plane_slot_bytes, PAGE)


class ReservedSlab:
    """A slab `[planes..., slots, ...]` (`shape[:2]` the (K/V, head) planes, `shape[2]` the
    slots) mapped at its largest size, whose first `slots` slots are usable. With `pin`
    each growth registers the new slots of every plane with CUDA (one registration per
    plane and growth); without, growth only counts (the pages appear when written).

    `grow` may run on a thread while another uses the usable slots (a layer-by-layer
    prefill reserves the next layers' slabs so); two growths take turns."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool):
        self.pin = pin
        self.planes, self.max_slots = shape[0] * shape[1], shape[2]
        self.slot_bytes = math.prod(shape[3:]) * dtype.itemsize  # one slot of one plane
        # (registrations begin and end on page edges: two may not share a page)
        self.multiple = slot_multiple(self.slot_bytes) if pin else 1
        assert self.max_slots % self.multiple == 0, "a plane must end on a page edge"
        nbytes = max(math.prod(shape) * dtype.itemsize, PAGE)
        # Address space only: no memory until a page is written, none reserved in swap.
        # Small pages: registrations begin and end on 4 KiB edges, inside a huge page too.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        mapped = mmap.mmap(-1, nbytes, flags=flags)
        try:
            mapped.madvise(mmap.MADV_NOHUGEPAGE)
        except (AttributeError, OSError):  # (no transparent huge pages here)
            pass
        self._mapped = mapped  # (`release`)
        owner = np.frombuffer(mapped, dtype=np.uint8)  # (the mapping lives as long as it)
        self.tensor = torch.from_numpy(owner)[: math.prod(shape) * dtype.itemsize]
        self.tensor = self.tensor.view(dtype).view(shape)
        self.slots = 0
        self.edges: list[int] = []  # the slot each registration of a plane begins at
        self._pieces: list[int] = []  # their addresses, unregistered with the owner
        self._cudart = _cudart() if pin else None
        if pin:
            weakref.finalize(owner, _unregister, self._cudart, self._pieces)
        self._growing = threading.Lock()

    def grow(self, slots: int) -> bool:
        """Make the first `slots` slots usable (at least; rounded up to whole pages). With
        `pin` the new slots are zeroed (their pages made) and registered; False, with
        nothing of this growth registered, where the driver refuses."""
        with self._growing:
            old = self.slots
            new = min(self.max_slots, -(-slots // self.multiple) * self.multiple)
            if new <= old:
                return True
            if self.pin:
                planes = self.tensor.view(self.planes, self.max_slots, -1)
                planes[:, old:new].zero_()  # (with torch's threads; registration then locks)
                base, plane_bytes = self.tensor.data_ptr(), self.max_slots * self.slot_bytes
                done = []
                for p in range(self.planes):
                    ptr = base + p * plane_bytes + old * self.slot_bytes
                    if not _register(self._cudart, ptr, (new - old) * self.slot_bytes):
                        _unregister(self._cudart, done)
                        return False
                    done.append(ptr)
                self._pieces += done
                self.edges.append(old)
            self.slots = new
            return True

    def runs(self, s0: int, n: int) -> list[tuple[int, int]]:
        """Slots s0 .. s0+n-1 as (first, count) runs, each inside one registration of every
        plane: one copy each between the device and a plane."""
        out, s, end = [], s0, s0 + n
        for edge in [*self.edges[1:], self.slots]:
            if s >= end:
                break
            if s < edge:
                stop = min(edge, end)
                out.append((s, stop - s))
                s = stop
        if s < end:  # (past the usable slots: the caller's bug, left to the copy to say)
            out.append((s, end - s))
        return out

    def release(self, runs: list[tuple[int, int]]) -> int:
        """Give the memory of slots s .. s+n-1 of every plane back, for each (s, n) in
        `runs` (slots left free: their contents are not needed again; a page written
        later reads zeros until then). Only whole pages go, and only where nothing is
        registered (on CUDA a slab keeps its pages: they are locked). Without this a
        CPU's slabs kept the memory of every slot they had ever used: a context past the
        host budget moves its chunks between layers (one global LRU), and each layer's
        slab grew to what it had held at most, most of the layer's KV, whatever the
        budget. Returns the bytes given back."""
        if self.pin or not runs:
            return 0
        plane_bytes, sb, done = self.max_slots * self.slot_bytes, self.slot_bytes, 0
        page = mmap.PAGESIZE  # (the system's: 4 KiB here, larger on some ARM machines)
        for p in range(self.planes):
            for s, n in runs:
                a = p * plane_bytes + s * sb
                a, b = -(-a // page) * page, (a + n * sb) // page * page
                if b > a:
                    try:
                        self._mapped.madvise(mmap.MADV_DONTNEED, a, b - a)
                    except (AttributeError, OSError):  # (not here: the memory stays, as before)
                        return done
                    done += b - a
        return done


def resident_bytes(t: torch.Tensor) -> int:
    """How many bytes of the pages under tensor `t`'s memory are resident in RAM now
    (Linux `mincore`): what a slab takes, where its size says what it may take."""
    libc, page = ctypes.CDLL(None, use_errno=True), mmap.PAGESIZE
    start = t.data_ptr() // page * page
    end = t.data_ptr() + t.numel() * t.element_size()
    pages = -(-(end - start) // page)
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec) * page
