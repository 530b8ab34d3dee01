"""Small Triton functions that kernels of several modules call, made on first use (a
CPU build of torch has no Triton). A kernel finds its callees among its own module's
globals: a module assigns what it calls there in its `_kernels()`."""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace


def interpreted() -> bool:
    """Do the kernels run in Triton's interpreter (the CPU tests)?"""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def helpers() -> SimpleNamespace:
    import triton

    # (sum3's callee among this module's globals; and triton.language, which the
    # interpreter looks for there)
    global _add3, tl
    import triton.language as tl

    @triton.jit
    def _add3(a1, b1, c1, a2, b2, c2):
        return a1 + a2, b1 + b2, c1 + c2

    @triton.jit
    def sum3(a, b, c, ONE_ROUND: tl.constexpr):
        """The sums of three tensors over axis 0. ONE_ROUND (on a GPU): one reduction
        of the three, a single round across the program's threads where three sums
        take three. Otherwise three `tl.sum`s: the interpreter runs a reduction's own
        combine in Python element by element (35x slower on the clusters taken)."""
        if ONE_ROUND:
            s1, s2, s3 = tl.reduce((a, b, c), 0, _add3)
        else:
            s1, s2, s3 = tl.sum(a, 0), tl.sum(b, 0), tl.sum(c, 0)
        return s1, s2, s3

    return SimpleNamespace(sum3=sum3)
