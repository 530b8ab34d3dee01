"""What torch does in C++ before any dispatch for a CUDA tensor or device, which a CPU-only
build refuses, done for CUDA emulated on the CPU (tests/cuda_emulation.py): indexing,
`.to`, `torch.tensor(..., device=)` and the bindings that take the device's guard."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from tests import cuda_emulation
from tests.cuda_emulation import (
    CPU,
    CUDA,
    DeviceMismatch,
    Emulator,
    OnCuda,
    _frames,
    _is_cuda_target,
    aten,
)


class Functions(TorchFunctionMode):
    """What torch does in C++ before any dispatch for a CUDA tensor or device (indexing,
    `.to`, `torch.tensor(..., device=)`), which a CPU-only build refuses: done on the
    CPU, the result wrapped."""

    def __init__(self, emu: Emulator):
        super().__init__()
        self.emu = emu

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.tolist, torch.Tensor.numpy) and self.emu.races is not None:
            if not isinstance(args[0], OnCuda):  # (the host reads it; through numpy, writes)
                self.emu.races.host(args[0], func is torch.Tensor.numpy, func.__name__)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            flat, _ = tree_flatten(args)
            if any(isinstance(t, OnCuda) for t in flat):
                if not isinstance(args[0], OnCuda):
                    raise DeviceMismatch(f"a host tensor indexed with CUDA tensors\n{_frames()}")
                if func is torch.Tensor.__setitem__:
                    self._check_setitem(args)
                # (indices may be host tensors: CUDA moves them to the device)
                return self.emu.call_on_host(func, args, kwargs, check=False)
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            return self._to(func, args, kwargs)
        if args and isinstance(args[0], OnCuda) and func in _GUARDED:
            return _GUARDED[func](*args, **kwargs)
        if func in (torch.tensor, torch.as_tensor) and _is_cuda_target(kwargs.get("device")):
            return _from_data(func, *args, **kwargs)
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            if "not linked with support for cuda" not in str(e):
                raise
        return self.emu.call_on_host(func, args, kwargs)

    def _check_setitem(self, args) -> None:
        """`t[index] = host tensor`: a copy into a view where the index is basic (numbers,
        slices), which CUDA does (waiting for it); with tensor indices, `index_put_`,
        which wants its values on the device."""
        index, value = args[1], args[2]
        if not isinstance(value, torch.Tensor) or isinstance(value, OnCuda) or not value.dim():
            return
        if any(isinstance(i, torch.Tensor) for i in tree_flatten(index)[0]):
            raise DeviceMismatch(f"t[tensor indices] = a CPU tensor of shape "
                                 f"{tuple(value.shape)} into a CUDA tensor\n{_frames()}")  # fmt: skip
        if not self.emu.is_pinned(value):
            self.emu.sync("copy from pageable host memory")

    def _to(self, func, args, kwargs):
        t, rest = args[0], list(args[1:])
        target = kwargs.get("device")
        if func is torch.Tensor.cuda:
            target = CUDA
        for i, a in enumerate(rest):  # .to(device), .to(device, dtype), .to(other tensor)
            if isinstance(a, (str, torch.device)):
                target = a
                rest[i] = CPU
            elif isinstance(a, torch.Tensor):
                target, rest[i] = a.device, a.dtype
        if not _is_cuda_target(target):
            return func(*args, **kwargs)
        dtype = kwargs.get("dtype") or next((a for a in rest if isinstance(a, torch.dtype)), None)
        if isinstance(t, OnCuda):
            out = t if dtype in (None, t.dtype) else t.to(dtype)
            return out.clone() if out is t and kwargs.get("copy") else out
        if not (kwargs.get("non_blocking") and self.emu.is_pinned(t)):
            self.emu.sync("copy from pageable host memory")
        with self.emu.inner():
            out = t.to(dtype=dtype, copy=True) if dtype else t.clone()
        self.emu.record((aten.copy_.default, (out, t), {}, None, True))
        out = OnCuda(out)
        self.emu.copied(t, out)
        return out


def _contiguous(t, memory_format=torch.contiguous_format):
    if t.is_contiguous(memory_format=memory_format):
        return t
    return aten.clone.default(t, memory_format=memory_format)


def _from_data(func, data, **kwargs):
    """torch.tensor / as_tensor of Python or host data onto the device: a copy from
    pageable memory (unless `data` is already a CUDA tensor)."""
    if isinstance(data, OnCuda):
        dtype = kwargs.get("dtype")
        return data if dtype in (None, data.dtype) else data.to(dtype)
    t = func(data, **{**kwargs, "device": CPU})
    cuda_emulation.EMULATOR.sync("copy from pageable host memory")
    return OnCuda(t.clone() if func is torch.as_tensor else t)


def _new_tensor(t, data, dtype=None, device=None, requires_grad=False):
    if device is not None and not _is_cuda_target(device):
        return torch.tensor(data, dtype=dtype or t.dtype, device=device)
    return _from_data(torch.tensor, data, dtype=dtype or t.dtype)


# Tensor methods whose binding takes the device's guard before dispatch (which a CPU-only
# build refuses for "cuda"): the same operations, from the dispatcher.
_GUARDED = {
    torch.Tensor.copy_: lambda t, src, non_blocking=False: aten.copy_.default(t, src, non_blocking),
    torch.Tensor.__int__: lambda t: int(t.item()),
    torch.Tensor.__index__: lambda t: int(t.item()),
    torch.Tensor.__float__: lambda t: float(t.item()),
    torch.Tensor.tolist: lambda t: (t.cpu()).tolist(),
    torch.Tensor.nonzero: lambda t, **k: aten.nonzero.default(t),
    torch.Tensor.contiguous: _contiguous,
    torch.Tensor.new_tensor: _new_tensor,
}
