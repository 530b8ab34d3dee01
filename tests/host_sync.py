"""What a decode step must not do on CUDA, caught on any device.

On CUDA `torch.cuda.set_sync_debug_mode("error")` catches a step that waits on the
host (tests/test_decode_step.py, CUDA-only). On a CPU nothing waits, so `HostReads`
watches the operations instead: those that read a tensor's value on the host
(`.item()`, `int()`, `bool()`, `.tolist()`, `.numpy()`, `.cpu()`), those whose output
shape depends on values (`nonzero`, boolean-mask indexing, `unique`, `masked_select`,
`repeat_interleave` without `output_size`), and tensors made from Python data
(`torch.tensor([...])`: on CUDA a copy from pageable memory, a sync and not allowed in
a captured graph). A scalar assignment (`t[i] = 0`) is not one: on CUDA it is a fill
with the value as a kernel argument.
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
VALUE_READS = {"_local_scalar_dense", "is_nonzero", "equal", "allclose"}
SHAPE_FROM_VALUES = {"nonzero", "masked_select", "bincount", "histc"}
HOST_METHODS = {"tolist", "numpy", "cpu", "item", "__array__"}


class HostReads:
    """Context manager: records each forbidden operation with the project frame it came
    from (`found`, a list of (op, where))."""

    def __init__(self):
        self.found: list[tuple[str, str]] = []
        self._dispatch = _Dispatch(self)
        self._function = _Function(self)

    def record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-3] if _project(f.filename)]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        self.found.append((what, where))

    def __enter__(self) -> HostReads:
        self._function.__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._dispatch.__exit__(*exc)
        self._function.__exit__(*exc)


def _project(filename: str) -> bool:
    return any(f"/{d}/" in filename for d in ("offload", "storage", "retrieval"))


class _Dispatch(TorchDispatchMode):
    def __init__(self, sink: HostReads):
        super().__init__()
        self.sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        bad = name in VALUE_READS or name in SHAPE_FROM_VALUES or "unique" in name
        if name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            bad = True  # boolean-mask indexing: the shape is the mask's count
        if name == "repeat_interleave" and kwargs.get("output_size") is None:
            bad = True
        if name in ("lift_fresh", "lift_fresh_copy") and out.dim() > 0:
            bad = True  # torch.tensor(python data)
        if bad:
            self.sink.record(name)
        return out


class _Function(TorchFunctionMode):
    def __init__(self, sink: HostReads):
        super().__init__()
        self.sink = sink

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in HOST_METHODS:
            self.sink.record(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))
