"""CUDA emulated on the CPU, so that the suite runs the runtime's CUDA paths without a GPU.

A tensor "on CUDA" here is an `OnCuda`: a CPU tensor (same storage, same data pointer)
that says it is on `cuda:0`, so every `is_cuda` / `device.type == "cuda"` branch is taken.
In an `emulated_cuda()` block a dispatch mode runs each operation on the CPU and checks
what a GPU would refuse or wait for:

- tensors of two devices in one operation (a CPU tensor of one or more dimensions with a
  CUDA one; CUDA takes only a 0-dim CPU tensor, as a scalar): `DeviceMismatch`;
- host synchronisations (a value read on the host, a copy to pageable host memory or from
  it): counted in `syncs`, refused under `set_sync_debug_mode("error")` and in a capture;
- CUDA graphs: a capture records the device work (operations on CUDA tensors, each Triton
  launch as one) and `replay()` runs the record again; a Python value or host computation
  stays as captured. The record keeps what the capture allocated (its pool) and only the
  addresses of tensors made outside it: a replay after one was freed raises `FreedMemory`.
Pinned host memory is tracked by address; a pinned tensor's unified-address view
(`storage.host.device_view`) is an `OnCuda` over it. Device memory is counted as torch's
allocator counts it (`memory_allocated`, its peak): each storage an `OnCuda` was made over,
until torch frees it (pinned views aside), without rounding or caching. Work runs at once,
in order; what a GPU would leave unordered between the host and the streams (streams, events,
waits) is checked by tests/cuda_races.py: `Race`. Triton kernels run in its interpreter.
Not shown: speed, the compiled kernels (`scripts/kernel_report.py` compiles them), a graph
pool's reuse (the record keeps every tensor the capture made). `torch.cuda`'s stand-ins are
in tests/cuda_standins.py; what torch does before dispatch, in tests/cuda_functions.py.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
import weakref
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from tests.cuda_races import Races, Touches, aten_touches, check_registrations

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten
# Operations that take tensors of both devices on a GPU: copies, advanced indexing.
CROSS_DEVICE = {"copy_", "_to_copy", "index", "index_put_", "_index_put_impl_", "index_put",
                "_copy_from", "_copy_from_and_resize", "lift_fresh", "set_"}  # fmt: skip
# Operations on a CUDA tensor whose result the host waits for.
HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal", "allclose", "nonzero",
              "masked_select", "unique", "_unique2", "unique_consecutive", "bincount"}  # fmt: skip


class DeviceMismatch(RuntimeError):  # tensors of two devices in one operation
    pass


class FreedMemory(RuntimeError):  # a graph replay after a tensor it uses was freed
    pass


EMULATOR: Emulator | None = None  # that of the `emulated_cuda()` block open now


class OnCuda(torch.Tensor):
    """A CPU tensor (`elem`, sharing its storage) that says it is on `cuda:0`."""

    elem: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        assert type(elem) is torch.Tensor and elem.device.type == "cpu", type(elem)
        r = torch.Tensor._make_subclass(
            cls, elem, elem.requires_grad, dispatch_device=True, device_for_backend_keys=CUDA
        )
        r.elem = elem
        if EMULATOR is not None:
            EMULATOR.allocate(elem)
        return r

    @property
    def device(self) -> torch.device:
        return CUDA

    def __repr__(self) -> str:
        return f"OnCuda({self.elem!r})"

    def __format__(self, spec: str) -> str:
        return format(self.elem, spec)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: a tensor on emulated CUDA used outside emulated_cuda()")


def _unwrap(x):
    return x.elem if isinstance(x, OnCuda) else x


def _tensors(args, kwargs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors of an operation's arguments, and those of them on the host (a 0-dim
    one aside: CUDA takes it as a scalar)."""
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    return tensors, [t for t in tensors if not isinstance(t, OnCuda) and t.dim() > 0]


def _same_memory(t: torch.Tensor, others) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(_unwrap(o).untyped_storage().data_ptr() == ptr for o in others)


def _is_cuda_target(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _frames() -> str:
    keep = [
        f
        for f in traceback.extract_stack()[:-2]
        if any(f"/{d}/" in f.filename for d in ("offload", "storage", "retrieval", "cli"))
    ]
    return "".join(traceback.format_list(keep[-4:]))


class Emulator:
    """The state of one `emulated_cuda()` block (see the module's docstring)."""

    def __init__(self, free_bytes: int, total_bytes: int):
        self.free_bytes, self.total_bytes = free_bytes, total_bytes
        self.pinned: dict[int, int] = {}  # start address -> end, of pinned host memory
        self.syncs: list[str] = []  # what waited on the device, with where
        self.sync_debug = 0  # torch.cuda.set_sync_debug_mode: 0 off, 1 warn, 2 error
        self.capture: list | None = None  # the record of the graph being captured
        self.capture_thread: int | None = None
        self.pool: set[int] = set()  # the storages the capture under way allocated
        self.local = threading.local()  # .inner: in one device operation run on the host
        self.races: Races | None = None  # (tests/cuda_races.py)
        self.allocated = self.peak = 0  # bytes of device memory, now and at most
        self.live: dict[int, int] = {}  # a device storage's C address -> its bytes
        self.lock = threading.Lock()
        # `pinned` is read and written from several threads (a pinning thread, the
        # finalizers a collection runs: reentrant, since one may run inside a read).
        # A finalizer only queues its address (`unpin`): run by a collection inside a
        # read of `pinned` in the same thread, it would change the dict under it.
        self.pin_lock = threading.RLock()
        self.unpinned: list[int] = []

    # -- device memory --------------------------------------------------------------------
    def allocate(self, elem: torch.Tensor) -> None:
        """Count the storage under a new `OnCuda` (once; until torch frees it)."""
        storage = elem.untyped_storage()
        key, ptr = storage._cdata, storage.data_ptr()
        if key in self.live or self.is_pinned(elem):
            return
        if self.races is not None:
            self.races.allocated(ptr)
        if self._capturing():
            self.pool.add(key)
        with self.lock:
            self.live[key] = storage.nbytes()
            self.allocated += storage.nbytes()
            self.peak = max(self.peak, self.allocated)
        # (torch keeps a storage's Python object as long as its memory: runs at the free)
        weakref.finalize(storage, self.free, key, ptr)

    def free(self, key: int, ptr: int) -> None:
        with self.lock:
            self.allocated -= self.live.pop(key, 0)
        if self.races is not None:
            self.races.freed(ptr, "device memory", device=True)

    def reset_peak(self) -> None:
        self.peak = self.allocated

    # -- pinned host memory ---------------------------------------------------------------
    def pin(self, t: torch.Tensor) -> torch.Tensor:
        start = t.untyped_storage().data_ptr()
        with self.pin_lock:
            self._drop_unpinned()  # (first: a freed address may be pinned again)
            self.pinned[start] = start + t.untyped_storage().nbytes()
        weakref.finalize(t.untyped_storage(), self.unpin, start)
        return t

    def unpin(self, start: int) -> None:
        self.unpinned.append(start)
        if self.races is not None:
            self.races.freed(start, "pinned host memory", device=False)

    def is_pinned(self, t: torch.Tensor) -> bool:
        if isinstance(t, OnCuda) or t.device.type != "cpu":
            return False
        return self.pinned_at(t.untyped_storage().data_ptr())

    def pinned_spans(self) -> list[tuple[int, int]]:
        """(start, end) of each piece of pinned host memory, as of now."""
        with self.pin_lock:
            self._drop_unpinned()
            return list(self.pinned.items())

    def _drop_unpinned(self) -> None:
        while self.unpinned:
            self.pinned.pop(self.unpinned.pop(0), None)

    def pinned_at(self, ptr: int) -> bool:
        return any(s <= ptr < e for s, e in self.pinned_spans())

    # -- synchronisation and capture --------------------------------------------------------
    def _capturing(self) -> bool:
        return self.capture is not None and self.capture_thread == threading.get_ident()

    def sync(self, what: str) -> None:
        if self._capturing():
            raise RuntimeError(f"CUDA error: operation not permitted when stream is capturing "
                               f"({what})\n{_frames()}")  # fmt: skip
        if self.sync_debug == 2:
            raise RuntimeError(f"called a synchronizing CUDA operation ({what})\n{_frames()}")
        self.syncs.append(f"{what}\n{_frames()}")
        self.local.synced = True  # (the host waits for the stream once the operation is on it)

    def record(self, node) -> None:
        if self._capturing() and not getattr(self.local, "inner", False):
            fn, args, kwargs, out, in_place = node
            self.capture.append((fn, *tree_map(self._hold, (args, kwargs, out)), in_place))

    def _hold(self, x):
        """A tensor in a record: those the capture allocated as they are (its pool), those
        made outside it by address (`_Address`), a 0-dim host one (a scalar) by value."""
        if not isinstance(x, torch.Tensor) or not isinstance(x, OnCuda) and not x.dim():
            return x
        if isinstance(x, OnCuda) and x.elem.untyped_storage()._cdata in self.pool:
            return x
        return _Address(x)

    # -- operations ---------------------------------------------------------------------------
    def dispatch(self, func, args, kwargs):
        kwargs = dict(kwargs or {})
        name = func.overloadpacket.__name__
        if func is torch.ops.prim.device.default:
            return CUDA if isinstance(args[0], OnCuda) else func(*args)
        if name == "record_stream":
            return None
        if name == "is_pinned":
            return self.is_pinned(args[0])
        if name == "_pin_memory":
            return self.pin(args[0].clone())
        if name == "set_" and isinstance(args[0], OnCuda):
            raise RuntimeError(
                "set_ of an emulated CUDA tensor (it would part it from its CPU twin)"
            )
        to_cuda = _is_cuda_target(kwargs.get("device"))
        if to_cuda:
            kwargs["device"] = CPU
        pin = bool(kwargs.get("pin_memory"))
        if pin:
            kwargs["pin_memory"] = False
        tensors, host = _tensors(args, kwargs)
        cuda_in = any(isinstance(t, OnCuda) for t in tensors)
        if name == "_to_copy" and cuda_in and kwargs.get("non_blocking") and not to_cuda:
            pin = kwargs.get("device") is not None  # (torch pins a non-blocking copy's host side)
        if cuda_in and host and name not in CROSS_DEVICE:
            raise DeviceMismatch(
                f"{func}: tensors on cuda:0 and cpu (shapes "
                f"{[tuple(t.shape) for t in host]} on the CPU)\n{_frames()}")  # fmt: skip
        self._check_sync(name, args, kwargs, cuda_in, to_cuda)
        check_registrations(self.pinned_spans, name, tensors, to_cuda)
        un_args, un_kwargs = tree_map(_unwrap, args), tree_map(_unwrap, kwargs)
        out = func(*un_args, **un_kwargs)
        # device="cpu" said: a copy to the host, a new host tensor (`new_empty`)
        to_host = not to_cuda and kwargs.get("device") is not None
        if (cuda_in or to_cuda) and not to_host:
            out = self._wrap(out, args, un_args)
            if name not in HOST_READS:
                in_place = any(r.alias_info is not None for r in func._schema.returns)
                self.record((func, args, kwargs, out, in_place))
        if pin:
            self.pin(out)
        if self.races is not None:  # (once the result is known as device or pinned memory)
            on_device = cuda_in or to_cuda or getattr(self.local, "replaying", False)
            self._race_check(func, un_args, un_kwargs, out, on_device)
        return out

    def _race_check(self, func, args, kwargs, out, on_device: bool) -> None:
        local, races = self.local, self.races
        races.raise_pending()
        if getattr(local, "inner", False) or self._capturing():
            return
        if on_device or races.accesses:  # (a host operation matters only near device work)
            touched = aten_touches(func, args, kwargs, tree_map(_unwrap, out))
            if touched is not None and on_device:
                races.device_tensors(touched, func.overloadpacket.__name__)
            elif touched is not None:
                for t, write in touched:
                    races.host(t, write, func.overloadpacket.__name__)
        self._waited()

    def _waited(self) -> None:
        """The operation just checked synchronised: the host has waited for its stream."""
        if getattr(self.local, "synced", False):
            self.local.synced = False
            self.races.host_waits_stream()

    def copied(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """A copy to the device that `Functions` made (`.to`), as a device operation."""
        if self.races is not None and not self._capturing():
            self.races.device_tensors([(_unwrap(src), False), (_unwrap(dst), True)], "copy")
            self._waited()

    def _check_sync(self, name, args, kwargs, cuda_in, to_cuda) -> None:
        src = args[0] if args else None
        if cuda_in and name in HOST_READS and isinstance(src, OnCuda):
            self.sync(name)
        elif name == "_to_copy":
            if isinstance(src, OnCuda) and kwargs.get("device") is not None and not to_cuda:
                if not kwargs.get("non_blocking"):  # (else into new pinned memory: no wait)
                    self.sync("copy to the host")
            elif to_cuda and not isinstance(src, OnCuda) and not self.is_pinned(src):
                self.sync("copy from pageable host memory")
        elif name == "copy_" and len(args) > 1:
            dst, src = args[0], args[1]
            if isinstance(src, OnCuda) and not isinstance(dst, OnCuda):
                if not (len(args) > 2 and args[2] and self.is_pinned(dst)):
                    self.sync("copy to the host")  # (into pinned memory, non_blocking: none)
            elif isinstance(dst, OnCuda) and not isinstance(src, OnCuda) and src.dim() > 0:
                if not self.is_pinned(src):
                    self.sync("copy from pageable host memory")

    @staticmethod
    def _wrap(out, args, un_args):
        def wrap(t):
            if not isinstance(t, torch.Tensor) or isinstance(t, OnCuda):
                return t
            for a, u in zip(args, un_args, strict=True):  # its own argument (in place, out=)
                if u is t:
                    return a
            return OnCuda(t)

        return tree_map(wrap, out)

    def replay(self, nodes) -> None:
        """Run a capture's record again: each node's function on the tensors it had, its
        results written where they were (where it wrote in place, or is a view or a
        kernel, running it again is all)."""
        self.local.replaying = True  # (the nodes' tensors are the host's twins: on the device)
        try:
            for fn, args, kwargs, out, in_place in nodes:
                args, kwargs, out = tree_map(_resolve, (args, kwargs, out))
                res = fn(*args, **kwargs)
                if not in_place:
                    for o, r in zip(tree_flatten(out)[0], tree_flatten(res)[0], strict=True):
                        if isinstance(o, torch.Tensor):
                            o.copy_(r)
        finally:
            self.local.replaying = False

    def call_on_host(self, func, args, kwargs, check: bool = True):
        """`func` (a Python binding that a CPU build refuses for CUDA tensors) on the host
        tensors under `args`, as one device operation: checked, wrapped, recorded."""
        tensors, host = _tensors(args, kwargs)
        if host and check:
            raise DeviceMismatch(f"{func}: tensors on cuda:0 and cpu\n{_frames()}")
        un_args, un_kwargs = tree_map(_unwrap, args), tree_map(_unwrap, kwargs)
        with self.inner():
            out = self._wrap(func(*un_args, **un_kwargs), args, un_args)
        in_place = any(o is a for o in tree_flatten(out)[0] for a in tensors)
        self.record((func, args, kwargs, out, in_place))
        if self.races is not None and not self._capturing():
            outs = [_unwrap(o) for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            written = [t for t in outs if not _same_memory(t, tensors)]  # (not a view)
            if func is torch.Tensor.__setitem__:
                written.append(_unwrap(args[0]))
            self.races.device_tensors([(_unwrap(t), False) for t in tensors]
                                      + [(t, True) for t in written], func.__name__)  # fmt: skip
        return out

    @contextlib.contextmanager
    def inner(self):
        """Operations run on the host for one device operation (a Triton kernel's, an
        indexing's): not device operations of their own."""
        before, self.local.inner = getattr(self.local, "inner", False), True
        try:
            yield
        finally:
            self.local.inner = before


class _Address:
    """A tensor made outside a capture, as its graph holds it: where it is (its storage,
    weakly, and its view of it), not its memory."""

    def __init__(self, t: torch.Tensor):
        elem = _unwrap(t)
        self.storage = weakref.ref(elem.untyped_storage())
        self.view = (elem.storage_offset(), elem.shape, elem.stride())
        self.dtype, self.what = elem.dtype, f"{type(t).__name__} {tuple(t.shape)} {t.dtype}"

    def resolve(self) -> torch.Tensor:
        storage = self.storage()
        if storage is None:
            raise FreedMemory(f"a graph replay uses a tensor freed since its capture "
                              f"({self.what}): on a GPU it would read or write freed memory")  # fmt: skip
        with _disable_current_modes():
            return torch.empty(0, dtype=self.dtype).set_(storage, *self.view)


def _resolve(x):
    return x.resolve() if isinstance(x, _Address) else _unwrap(x)


class _Dispatch(TorchDispatchMode):
    def __init__(self, emu: Emulator):
        super().__init__()
        self.emu = emu

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.emu.dispatch(func, args, kwargs)


@contextlib.contextmanager
def emulated_cuda(free_bytes: int = 70 << 30, total_bytes: int = 80 << 30):
    """A block in which `torch.cuda` says one device is there (an H100-sized one: free and
    total memory as given) and tensors on it are `OnCuda`s. Threads started inside the
    block run under it too. Yields the `Emulator` (its `syncs`)."""
    from torch.nn.attention import bias
    from triton.runtime import interpreter

    import offload.backend
    import offload.kernels.gather
    import storage.host
    from tests.cuda_functions import Functions
    from tests.cuda_standins import CudaGenerator, cuda_module_patches

    global EMULATOR
    emu = EMULATOR = Emulator(free_bytes, total_bytes)

    def device_view(t: torch.Tensor, device) -> torch.Tensor:
        assert emu.is_pinned(t) and t.is_contiguous(), (
            "device_view needs a contiguous pinned tensor"
        )
        return OnCuda(t)

    launch, one_at_a_time = interpreter.GridExecutor.__call__, threading.Lock()

    def recorded_launch(self, *args, **kwargs):  # a Triton launch: one device operation
        emu.record((self, args, kwargs, None, True))
        races = None if emu.races is None or emu._capturing() else emu.races
        # (the interpreter patches triton.language for a launch: not thread-safe)
        with one_at_a_time, emu.inner():
            if races is not None:
                races.kernel = []  # (its loads and stores, from `Touches`)
            out = launch(self, *args, **kwargs)
            if races is not None:
                races.kernel_done((args, kwargs), self.fn.__name__)
        return out

    lower_right = bias.causal_lower_right

    def causal_lower_right(*a):  # (a tensor subclass of its own: made outside the modes)
        with torch._C.DisableTorchFunction(), _disable_current_modes():
            return lower_right(*a)

    compatible = torch._has_compatible_shallow_copy_type

    def shallow_copy_type(a, b) -> bool:  # (module.to("cuda") makes new parameters then)
        return compatible(a, b) and isinstance(a, OnCuda) == isinstance(b, OnCuda)

    def recorded_stream(t, stream) -> None:
        assert isinstance(t, OnCuda), "record_stream of a host tensor"
        emu.races.record_stream(t.elem, stream)

    run = threading.Thread.run

    def run_emulated(self):
        with torch.no_grad(), Functions(emu), _Dispatch(emu):
            run(self)

    views = [offload.backend, offload.kernels.gather, storage.host]
    patches = [(torch.cuda, k, v) for k, v in cuda_module_patches(emu).items()]
    patches.append((interpreter, "_interpreter", Touches(interpreter._interpreter, emu.races)))
    patches += [(m, "device_view", device_view) for m in views]
    patches += [(interpreter.GridExecutor, "__call__", recorded_launch),
                (bias, "causal_lower_right", causal_lower_right),
                (threading.Thread, "run", run_emulated),
                (torch.Tensor, "record_stream", recorded_stream),
                (torch, "Generator", CudaGenerator),
                (torch, "_has_compatible_shallow_copy_type", shallow_copy_type)]  # fmt: skip
    try:
        with contextlib.ExitStack() as stack:
            for obj, name, value in patches:
                stack.enter_context(mock.patch.object(obj, name, value))
            # (no autograd: it asks for the device's guard, which a CPU build lacks)
            with torch.no_grad(), Functions(emu), _Dispatch(emu):
                yield emu
    finally:
        EMULATOR = None
