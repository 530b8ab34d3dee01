"""Run a script with CUDA emulated on the CPU (tests/cuda_emulation.py), as it would run
on a GPU:

    python -m tests.emulated_run scripts/bench_gpu.py --shape tiny ...

Torch's profiler cannot record an emulated device: it fails as it does on a GPU
without CUPTI (a RuntimeError, which the scripts record and go past)."""

from __future__ import annotations

import os
import runpy
import sys
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")  # (before any kernel is defined)


def main() -> None:
    import torch.profiler

    from tests.cuda_emulation import emulated_cuda
    from tests.interpreter_calls import install

    install()

    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(script))  # as `python script.py` has it

    def no_profiler(*args, **kwargs):
        raise RuntimeError("torch's profiler does not record an emulated device")

    with emulated_cuda(), mock.patch.object(torch.profiler, "profile", no_profiler):
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
