"""The suite's speed-up of Triton's interpreter (tests/interpreter_calls.py): a device
function called in every program of a launch runs without patching `triton.language`
again (the launch has), and gives what it gave before."""

import torch
import triton.language as tl
from triton.runtime import interpreter

from tests.interpreter_calls import install


def _twice_and_one(x):
    return x * 2 + tl.full(x.shape, 1, x.dtype)


def _kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, twice_and_one(tl.load(x_ptr + offsets)))


# (interpreted on every machine: on a GPU too, where the suite's kernels are compiled)
twice_and_one = interpreter.InterpretedFunction(_twice_and_one)
kernel = interpreter.InterpretedFunction(_kernel)


def test_a_device_function_in_a_launch_patches_the_language_once(monkeypatch):
    install()  # (done by conftest where the interpreter runs the suite's kernels)
    patches, real = [], interpreter._patch_lang

    def counted(fn):
        patches.append(fn.__name__)
        return real(fn)

    monkeypatch.setattr(interpreter, "_patch_lang", counted)
    x = torch.arange(32, dtype=torch.float32)
    out = torch.empty_like(x)
    kernel[(4,)](x, out, BLOCK=8)
    assert torch.equal(out, x * 2 + 1)
    assert patches == ["_kernel"]  # (before: and "_twice_and_one" in each of the 4 programs)
    assert tl.core.is_builtin(tl.load)  # put back when the launch ended
