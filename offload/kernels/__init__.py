"""Triton kernels of the GPU path, each beside the plain-torch reference it must match.

    decode_attention   one decode query per head group against a KV buffer whose
                       valid length is a device tensor (split-K, flash-decoding)
    gather             per-head token rows of the host slab, read by the device
                       straight from pinned memory (unified virtual addressing)
    candidates         a device selection's clusters taken, their candidate list,
                       and its rerank on low-bit keys dequantized in registers
    hit_cache          a step hit cache's bookkeeping (hits stamped; misses given
                       the least recently used slots)

The kernels are used on CUDA only (`offload.backend`); on a CPU the references
run. Tests check each kernel against its reference on the CPU with
`TRITON_INTERPRET=1`, which must be set before the kernel module is imported.
"""

from __future__ import annotations


def triton_available() -> bool:
    """Is the `triton` package importable (CUDA builds of torch bring it)?"""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
