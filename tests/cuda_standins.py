"""Stand-ins for what `torch.cuda` holds, for CUDA emulated on the CPU
(tests/cuda_emulation.py): streams and events that order nothing (the CPU runs in order)
but tell the race check (tests/cuda_races.py) what they would order on a GPU, graphs that
the emulator records and replays, pinned-memory registration on its table, generators
that say they are on CUDA, and one device's properties."""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from types import SimpleNamespace

import torch

from storage.pinning import PAGE
from tests.cuda_emulation import CUDA, Emulator
from tests.cuda_races import Races, registrations


class CudaGenerator(torch.Generator):
    """torch.Generator(device="cuda"): a CPU generator that says it is on CUDA. (Not
    checked against the device of the tensors it makes: an operation receives another
    Python object for the same generator, without what this one says.)"""

    def __new__(cls, device="cpu"):
        g = super().__new__(cls)
        g.emulated = torch.device(device)
        return g

    def __init__(self, device="cpu"):
        pass

    @property
    def device(self) -> torch.device:
        return CUDA if self.emulated.type == "cuda" else self.emulated

    def manual_seed(self, seed: int) -> CudaGenerator:
        super().manual_seed(seed)
        return self


class _Graph:
    """A captured graph: the emulator's record of its device work (`graph` fills it)."""

    def __init__(self, *a, **k):
        self.nodes: list = []
        self.emu: Emulator | None = None

    def replay(self) -> None:
        self.emu.replay(self.nodes)

    def reset(self) -> None:
        self.nodes = []
        for pool in _Pool.all:
            pool.graphs.discard(self)


class _Pool:
    """`torch.cuda.graph_pool_handle()`: the graphs captured into it. On torch 2.11 a
    capture into a pool whose graphs were all freed while memory of it was still held
    (a graph's output) fails an internal assert (seen on an H200); the emulator refuses
    any capture into a pool whose graphs are all gone."""

    all: weakref.WeakSet = weakref.WeakSet()

    def __init__(self):
        self.graphs: weakref.WeakSet = weakref.WeakSet()
        self.used = False
        _Pool.all.add(self)

    def take(self, graph: _Graph) -> None:
        if self.used and not self.graphs:
            raise RuntimeError(
                "capture into a graph pool whose graphs are all freed (torch 2.11: "
                "'it->second->use_count > 0 INTERNAL ASSERT FAILED')"
            )
        self.used = True
        self.graphs.add(graph)


class _Stream:
    """A stream: what orders it, for the race check (`emu.races`; the work itself runs
    at once, in order)."""

    races: Races | None = None  # (of the emulator open now)
    count = 0

    def __init__(self, *a, name: str | None = None, **k):
        if name is None:
            _Stream.count += 1
        self.name = name or f"side {_Stream.count}"

    def wait_stream(self, other) -> None:
        if self.races is not None:
            self.races.wait(self, dict(self.races.clock(other)))

    def wait_event(self, event) -> None:
        if self.races is not None and event.clock is not None:
            self.races.wait(self, event.clock)

    def record_event(self, event=None):
        event = event or _Event()
        event.record(self)
        return event

    def synchronize(self) -> None:
        if self.races is not None:
            self.races.host_waits_stream(self)

    def query(self) -> bool:  # (done at once: the host may go on as if it waited)
        self.synchronize()
        return True


class _Event:
    def __init__(self, *a, **k):
        self.t = None
        self.clock: dict | None = None  # the recording stream's, for the race check

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()
        races = _Stream.races
        if races is not None:
            self.clock = races.snapshot(stream or races.current())

    def wait(self, stream=None) -> None:
        races = _Stream.races
        if stream is not None or races is not None:
            (stream or races.current()).wait_event(self)

    def query(self) -> bool:
        self.synchronize()
        return True

    def synchronize(self) -> None:
        if _Stream.races is not None and self.clock is not None:
            _Stream.races.host_waits(self.clock)

    def elapsed_time(self, end) -> float:
        return (end.t - self.t) * 1000


ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered


class _Cudart:
    """`cudaHostRegister` and `cudaHostUnregister`, on the emulator's table. As the driver,
    it refuses a registration that shares a page with another."""

    def __init__(self, emu: Emulator):
        self.emu = emu

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        first, end = ptr - ptr % PAGE, -(-(ptr + nbytes) // PAGE) * PAGE
        with self.emu.pin_lock:
            if registrations(self.emu.pinned_spans(), first, end):
                return ALREADY_REGISTERED
            self.emu.pinned[ptr] = ptr + nbytes
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        self.emu.unpin(ptr)
        return 0


def cuda_module_patches(emu: Emulator) -> dict:
    """`torch.cuda`'s attributes as the emulator has them: one device with the free and
    total memory of `emu`; its race check (`emu.races`) set up."""
    default = _Stream(name="default")
    races = _Stream.races = emu.races = Races(default, emu.pinned_at)

    def current_stream(device=None):
        return races.current()

    @contextlib.contextmanager
    def in_stream(s=None):
        before = getattr(races.local, "stream", None)
        if s is not None:
            races.local.stream = s
        try:
            yield
        finally:
            races.local.stream = before

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode="global"):
        races.host_waits_all()  # (torch.cuda.graph synchronizes before it captures)
        if pool is not None:
            pool.take(g)
        emu.capture, emu.capture_thread, g.emu = g.nodes, threading.get_ident(), emu
        emu.pool = set()
        try:
            yield g
        finally:
            emu.capture = emu.capture_thread = None
            emu.pool = set()

    def set_sync_debug_mode(mode) -> None:
        emu.sync_debug = {"default": 0, "warn": 1, "error": 2}.get(mode, mode)

    props = SimpleNamespace(name="emulated (CPU)", total_memory=emu.total_bytes, major=9,
                            minor=0, multi_processor_count=132)  # fmt: skip
    return {
        "is_available": lambda: True, "is_initialized": lambda: True, "_initialized": True,
        "device_count": lambda: 1, "current_device": lambda: 0, "set_device": lambda d: None,
        "get_device_properties": lambda d=None: props,
        "get_device_capability": lambda d=None: (9, 0),
        "get_device_name": lambda d=None: props.name,
        "mem_get_info": lambda d=None: (emu.free_bytes, emu.total_bytes),
        "memory_allocated": lambda d=None: emu.allocated,
        "max_memory_allocated": lambda d=None: emu.peak,
        "memory_reserved": lambda d=None: emu.allocated,
        "reset_peak_memory_stats": lambda d=None: emu.reset_peak(),
        "empty_cache": lambda: None, "synchronize": lambda d=None: races.host_waits_all(),
        "Stream": _Stream, "Event": _Event, "current_stream": current_stream,
        "default_stream": lambda d=None: default, "stream": in_stream,
        "CUDAGraph": _Graph, "graph": graph, "graph_pool_handle": _Pool,
        "cudart": lambda: _Cudart(emu), "set_sync_debug_mode": set_sync_debug_mode,
        "get_sync_debug_mode": lambda: emu.sync_debug,
    }  # fmt: skip
