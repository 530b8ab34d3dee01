"""Small Triton functions that kernels of several modules call, made on first use (a
CPU build of torch has no Triton). A kernel finds its callees among its own module's
globals: a module assigns what it calls there in its `_kernels()`."""

from __future__ import annotations

import functools
from types import SimpleNamespace


@functools.cache
def helpers() -> SimpleNamespace:
    import triton

    @triton.jit
    def add3(a1, b1, c1, a2, b2, c2):
        """The combine of a reduction of three sums at once (`tl.reduce` of a tuple:
        one round across the program's threads for the three)."""
        return a1 + a2, b1 + b2, c1 + c2

    return SimpleNamespace(add3=add3)
