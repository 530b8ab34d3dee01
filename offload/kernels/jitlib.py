"""What the Triton kernels' launches ask of where they run."""

from __future__ import annotations

import os


def interpreted() -> bool:
    """Do the kernels run in Triton's interpreter (the CPU tests)? It runs a launch's
    programs one after another, each operation a numpy call: some launches take other
    settings there, with the same results."""
    return os.environ.get("TRITON_INTERPRET") == "1"
