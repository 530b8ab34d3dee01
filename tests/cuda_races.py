"""Races between the host and the device's streams, for CUDA emulated on the CPU
(tests/cuda_emulation.py).

The emulator runs every operation at once, in program order; a GPU runs each stream's
work later than the host asks for it, and the streams side by side. What a GPU does
order is tracked here with vector clocks (as torch's CUDA sanitizer does): the host and
each stream count their operations, and each knows how far every other one has got by
what orders them:

- a launch comes after everything the host did before it (the stream takes the host's
  clock), and after earlier work on its stream;
- `wait_stream`, `wait_event`: a stream takes the other's clock (an event's, as recorded);
- the host takes a stream's clock when it waits for it: `synchronize()` (of the device,
  a stream or an event), a value read on the host, a copy to the host or from pageable
  memory (a synchronous copy waits for its stream).

Each memory access of a device operation is kept (its stream, its count, the bytes, read
or write) until the host knows it happened; aten operations touch the span of their
tensors' views (by their schema: which arguments they write), Triton kernels the bytes
their loads and stores address (from the interpreter). An access that meets another
one of a different actor, one of them a write, with neither known to the other first,
is a race: `Race`. So is freeing memory the device may still use: a pinned buffer freed
or unregistered before the host waited for the work reading it, or a device tensor that
another stream used freed without `record_stream` (the caching allocator hands it to the
allocating stream's next tensor at once). All host threads are one actor here (a race
between two host threads' device work is seen, not one between their host accesses).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten

HOST = "host"
MAX_RUNS = 4096


class Race(RuntimeError):  # device work that the host and the streams leave unordered
    pass


@dataclass
class _Access:
    actor: object  # HOST or a stream
    epoch: int  # the actor's count at this access
    starts: np.ndarray  # sorted byte addresses, each `size` bytes on
    size: int
    write: bool
    what: str


def _overlap(a: _Access, b: _Access) -> bool:
    # the last start of `a` before each end of `b`, and whether it reaches into it
    i = np.searchsorted(a.starts, b.starts + b.size, side="left") - 1
    ok = i >= 0
    return bool(np.any(a.starts[i[ok]] + a.size > b.starts[ok]))


def _sorted_set(a: np.ndarray) -> np.ndarray:
    """`a`'s values sorted, each once: `np.unique`, but by a stable sort (Timsort merges the
    sorted runs a kernel's loads and a view's rows come in, where `np.unique`'s sort and
    hashing took 0.4 s for half a million addresses, 13% of an emulated benchmark)."""
    a = np.sort(a, kind="stable")
    if a.size > 1:
        keep = np.empty(a.size, bool)
        keep[0] = True
        np.not_equal(a[1:], a[:-1], out=keep[1:])
        a = a[keep]
    return a


def _span(t: torch.Tensor) -> tuple[int, np.ndarray, int] | None:
    """A view's storage and the bytes it covers: the starts of its contiguous runs and
    their length (a narrowed [H, T, D] buffer: a run per head, not the gaps between
    them); past `MAX_RUNS` runs, one span from its first byte to its last."""
    if t.numel() == 0:
        return None
    dims = [(n, s) for n, s in zip(t.shape, t.stride(), strict=True) if n != 1]
    run = 1  # elements in a contiguous run (the innermost dims that are dense)
    while dims and dims[-1][1] == run:
        run *= dims.pop()[0]
    key, size = t.untyped_storage().data_ptr(), t.element_size()
    if not dims:
        return key, np.array([t.data_ptr()], np.uint64), run * size
    if math.prod(n for n, _ in dims) > MAX_RUNS:
        last = sum((n - 1) * s for n, s in dims) + run
        return key, np.array([t.data_ptr()], np.uint64), last * size
    offsets = np.zeros(1, np.int64)
    for n, s in dims:
        offsets = (offsets[:, None] + np.arange(n, dtype=np.int64)[None, :] * s).ravel()
    return key, _sorted_set(t.data_ptr() + offsets * size).astype(np.uint64), run * size


def _rows(t: torch.Tensor, dim: int, index: torch.Tensor) -> tuple | None:
    """The runs of `t`'s rows `index` along `dim` (what an index_select reads), or its
    whole span past `MAX_RUNS` times 16 runs."""
    with torch._C.DisableTorchFunction(), _disable_current_modes():  # (not operations)
        first = _span(t.narrow(dim, 0, 1)) if t.shape[dim] else None
        if first is None or index.numel() == 0:
            return None
        rows = _sorted_set(index.reshape(-1).numpy().astype(np.int64))
    key, starts, size = first
    if rows.size * starts.size > 16 * MAX_RUNS:
        return _span(t)
    step = (rows * t.stride(dim) * t.element_size()).astype(np.uint64)
    return key, _sorted_set((starts[None, :] + step[:, None]).ravel()), size


class Races:
    """The clocks and the unsettled accesses of one emulated device (see the docstring)."""

    def __init__(self, default_stream, pinned_at):
        self.default = default_stream
        self.pinned_at = pinned_at  # whether an address is pinned host memory (`Emulator`)
        self.clocks: dict[object, dict[object, int]] = {HOST: {HOST: 0}}
        self.accesses: dict[int, list[_Access]] = {}  # storage address -> accesses
        self.local = threading.local()  # .stream: the thread's current stream
        self.lock = threading.RLock()
        self.owner: dict[int, tuple[object, set]] = {}  # device storage -> stream, recorded
        self.pending: list[str] = []  # races found in a free (raised at the next operation)
        self.reused: dict[object, list[_Access]] = {}  # stream -> uses of memory it may reuse
        self.kernel: list | None = None  # a Triton launch's accesses, as it runs

    # -- clocks ---------------------------------------------------------------------------
    def current(self):
        return getattr(self.local, "stream", None) or self.default

    def clock(self, actor) -> dict:
        """What `actor` knows: each actor's count."""
        return self.clocks.setdefault(actor, {actor: 0})

    def _join(self, into, clock: dict) -> None:
        mine = self.clock(into)
        for actor, n in clock.items():
            if mine.get(actor, 0) < n:
                mine[actor] = n

    def _launch(self, stream) -> int:
        """The stream's next operation, after what the host did so far: its count."""
        self._join(stream, self.clocks[HOST])
        clock = self.clock(stream)
        clock[stream] += 1
        return clock[stream]

    def wait(self, stream, clock: dict) -> None:  # stream.wait_stream / wait_event
        with self.lock:
            self._launch(stream)
            self._join(stream, clock)

    def snapshot(self, stream) -> dict:  # event.record(stream)
        with self.lock:
            self._launch(stream)
            return dict(self.clocks[stream])

    def host_waits(self, clock: dict) -> None:
        """The host waited for work up to `clock`: what it knows of is settled."""
        with self.lock:
            self._join(HOST, clock)
            known = self.clocks[HOST]
            for stream in list(self.reused):
                left = [a for a in self.reused.pop(stream, ()) if not self._known(HOST, a)]
                if left:
                    self.reused[stream] = left
            for key in list(self.accesses):
                left = [a for a in self.accesses.get(key, ()) if known.get(a.actor, 0) < a.epoch]
                if left:
                    self.accesses[key] = left
                else:
                    self.accesses.pop(key, None)

    def host_waits_stream(self, stream=None) -> None:
        self.host_waits(dict(self.clock(stream or self.current())))

    def host_waits_all(self) -> None:
        merged: dict = {}
        with self.lock:  # (another thread's launch adds actors to the clocks meanwhile)
            for clock in self.clocks.values():
                for actor, n in clock.items():
                    merged[actor] = max(merged.get(actor, 0), n)
            self.host_waits(merged)

    # -- accesses ---------------------------------------------------------------------------
    def device(self, touched, what: str) -> None:
        """A device operation on the current stream: `touched` (storage, starts, size,
        write) each. Checked against the unsettled accesses, then kept."""
        stream = self.current()
        with self.lock:
            epoch = self._launch(stream)
            known = self.clocks[stream]
            if self.reused:
                self._reuse(stream)
            for key, starts, size, write in touched:
                if key not in self.owner and not self.pinned_at(key):
                    continue  # (pageable memory: a copy from or to it waits, and its end is not seen)
                new = _Access(stream, epoch, starts, size, write, what)
                self._check(key, new, known)
                self._keep(key, new)

    def device_tensors(self, touched, what: str) -> None:
        """`device` for (tensor, write) pairs: each touches its view's span (or the span
        given in its place)."""
        spans = [(_span(t) if isinstance(t, torch.Tensor) else t, write) for t, write in touched]
        self.device([(*s, write) for s, write in spans if s is not None], what)

    def host(self, t: torch.Tensor | tuple | None, write: bool, what: str) -> None:
        """A host operation on `t` (host memory the device may use: pinned), or on a
        span given in its place."""
        if not self.accesses:
            return
        span = _span(t) if isinstance(t, torch.Tensor) else t
        if span is None or span[0] not in self.accesses:
            return
        with self.lock:
            self.clocks[HOST][HOST] += 1
            new = _Access(HOST, self.clocks[HOST][HOST], span[1], span[2], write, what)
            self._check(span[0], new, self.clocks[HOST])

    def _check(self, key: int, new: _Access, known: dict) -> None:
        for old in self.accesses.get(key, ()):
            if old.actor is new.actor or not (old.write or new.write):
                continue
            if known.get(old.actor, 0) < old.epoch and _overlap(old, new):
                raise Race(
                    f"{_name(new.actor)} {'writes' if new.write else 'reads'} memory that "
                    f"{_name(old.actor)} {'writes' if old.write else 'reads'}, unordered: "
                    f"{new.what} after {old.what}"
                )

    def _keep(self, key: int, new: _Access) -> None:
        kept = self.accesses.setdefault(key, [])
        for i, old in enumerate(kept):  # (the same bytes again: the newer one says it all)
            if (old.actor is new.actor and old.size == new.size and (new.write or not old.write)
                    and np.array_equal(old.starts, new.starts)):  # fmt: skip
                kept[i] = new
                return
        kept.append(new)

    # -- memory ---------------------------------------------------------------------------
    def allocated(self, key: int) -> None:
        self.owner[key] = (self.current(), set())

    def record_stream(self, t: torch.Tensor, stream) -> None:
        owner = self.owner.get(t.untyped_storage().data_ptr())
        if owner is not None:
            owner[1].add(stream)

    def freed(self, key: int, what: str, device: bool) -> None:
        """Memory freed. Pinned host memory: the host must know that the device is done
        with it. A device tensor: the caching allocator may hand its memory to the next
        tensor of the stream that allocated it, so that stream's next operation must
        come after every other stream's use of it (unless `record_stream` named them)."""
        with self.lock:
            stream, recorded = self.owner.pop(key, (None, set()))
            left = [a for a in self.accesses.pop(key, []) if a.actor is not stream
                    and a.actor not in recorded and not self._known(HOST, a)]  # fmt: skip
            if not left:
                return
            if device:
                self.reused.setdefault(stream, []).extend(left)
            else:
                self.pending.append(f"{what} freed while {_name(left[0].actor)} may still use "
                                    f"it ({left[0].what})")  # fmt: skip

    def _known(self, actor, a: _Access) -> bool:
        return self.clock(actor).get(a.actor, 0) >= a.epoch

    def _reuse(self, stream) -> None:
        """The stream's operation may have memory freed with uses of other streams still
        unordered before it (`freed`)."""
        left = [a for a in self.reused.pop(stream, []) if not self._known(stream, a)]
        if left:
            raise Race(f"device memory freed while {_name(left[0].actor)} may still use it "
                       f"({left[0].what}), and {_name(stream)}, which the allocator may give it "
                       f"to, runs on before waiting for that: record_stream() it")  # fmt: skip

    def raise_pending(self) -> None:
        if self.pending:
            found, self.pending = self.pending, []
            raise Race("; ".join(found))

    # -- Triton launches --------------------------------------------------------------------
    def kernel_touch(self, ptrs, mask, size: int, write: bool) -> None:
        if self.kernel is not None:
            p = np.asarray(ptrs)[np.asarray(mask, bool)] if mask is not None else np.asarray(ptrs)
            if p.size:  # (sorted and made unique once, at the launch's end)
                self.kernel.append((p.astype(np.uint64), size, write))

    def kernel_done(self, args, what: str) -> None:
        """A launch ended: its loads and stores, by storage of its tensor arguments."""
        touched, self.kernel = self.kernel or [], None
        spans = {}
        for a in tree_flatten(list(args))[0]:
            if isinstance(a, torch.Tensor) and a.numel():
                s = a.untyped_storage()
                spans[s.data_ptr()] = s.data_ptr() + s.nbytes()
        merged: dict = {}
        for p, size, write in touched:
            for key, end in spans.items():
                inside = p[(p >= key) & (p < end)]
                if inside.size:
                    merged.setdefault((key, size, write), []).append(inside)
        self.device(
            [(k, _sorted_set(np.concatenate(ps)), size, write)
             for (k, size, write), ps in merged.items()], what)  # fmt: skip


class Touches:
    """The Triton interpreter's memory operations (`interpreter._interpreter`), each
    reported to `races` while a launch runs (`Races.kernel`)."""

    def __init__(self, real, races: Races):
        self.real, self.races = real, races

    def __getattr__(self, name):
        return getattr(self.real, name)

    def load(self, ptrs, mask, other, dtype):
        self.races.kernel_touch(ptrs, mask, np.dtype(dtype).itemsize, False)
        return self.real.load(ptrs, mask, other, dtype)

    def store(self, ptrs, value, mask):
        self.races.kernel_touch(ptrs, mask, value.dtype.itemsize, True)
        return self.real.store(ptrs, value, mask)

    def atomic_rmw(self, op, ptrs, value, mask, sem):
        self.races.kernel_touch(ptrs, mask, value.dtype.itemsize, True)
        return self.real.atomic_rmw(op, ptrs, value, mask, sem)

    def atomic_cas(self, ptrs, cmp, value, sem):
        self.races.kernel_touch(ptrs, None, value.dtype.itemsize, True)
        return self.real.atomic_cas(ptrs, cmp, value, sem)


def _name(actor) -> str:
    return "the host" if actor == HOST else f"stream {getattr(actor, 'name', '?')}"


_NO_READ = ("empty_like", "new_empty", "new_empty_strided", "zeros_like", "ones_like",
            "full_like", "new_zeros", "new_ones", "new_full", "rand_like", "randn_like")  # fmt: skip


def aten_touches(func, args, kwargs, out) -> list[tuple] | None:
    """The tensors an aten operation reads and writes (by its schema; an index_select's
    rows as a span), or None for a view (it touches no memory)."""
    schema = func._schema
    if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
        return None
    name = func.overloadpacket.__name__
    touched = []
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        write = arg.alias_info is not None and arg.alias_info.is_write
        if name in _NO_READ and not write:
            continue
        if name == "index_select" and arg.name == "self":  # (the rows it selects)
            touched.append((_rows(value, args[1], args[2]), False))
            continue
        touched += [(t, write) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    if not any(r.alias_info is not None for r in schema.returns):
        touched += [(t, True) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return touched


# Copies that CUDA runs as one memcpy (contiguous on both sides), by operation.
MEMCPY = {"copy_", "_to_copy", "clone"}


def registrations(spans: list, start: int, end: int) -> list[tuple[int, int]]:
    """The (start, end) of each registration in `spans` that [start, end) overlaps."""
    return [(s, e) for s, e in spans if s < end and start < e]


def check_registrations(pinned_spans, name: str, tensors: list, to_device: bool) -> None:
    """A copy between the device and pinned host memory (or through a device view of it)
    that CUDA would run as one memcpy must lie within one registration: the driver refuses
    a transfer over memory registered in part, and does not promise one over two
    registrations (storage/pinning.py). Raises where one would cross an edge.
    (`pinned_spans()`: the registrations now, asked only for such a copy.)"""
    if name not in MEMCPY:
        return
    if not (to_device or any(hasattr(t, "elem") for t in tensors)):  # (`OnCuda`: a twin)
        return
    spans = pinned_spans()
    for t in tensors:
        elem = getattr(t, "elem", t)
        if not elem.is_contiguous() or not elem.numel():
            continue
        start = elem.data_ptr()
        end = start + elem.numel() * elem.element_size()
        inside = registrations(spans, start, end)
        if inside and not any(s <= start and end <= e for s, e in inside):
            raise RuntimeError(
                f"{name}: one memcpy over {end - start:,} bytes of pinned host memory that "
                f"cross the edge of a registration (CUDA_ERROR_INVALID_VALUE on a GPU): "
                f"split it at the registrations' edges (storage/pinning.py)"
            )
