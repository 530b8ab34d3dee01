"""Triton kernels of the GPU path, each beside the plain-torch reference it must match.

    decode_attention   one decode query per head group against a KV buffer whose
                       valid length is a device tensor (split-K, flash-decoding)
    gather             per-head token rows of the host slab, read by the device
                       straight from pinned memory (unified virtual addressing)
    candidates         a device selection's clusters' scores, its candidate list,
                       and its rerank on low-bit keys dequantized in registers
    ranking            the clusters it takes and the tokens it keeps, without a sort
    hit_cache          a step hit cache's bookkeeping in one kernel (hits stamped;
                       misses given the least recently used slots)
    layer              a layer's norms, RoPE, SwiGLU and the step's K/V write

The kernels are used on CUDA only (`offload.backend`); on a CPU the references
run. Tests check each kernel against its reference on the CPU with
`TRITON_INTERPRET=1`, which must be set before the kernel module is imported.
"""

from __future__ import annotations

import os

# Whether a kernel's multiplies and adds may fuse (FMA), said at every launch: Triton 3.9
# warns once a process where a launch leaves it to the default ("TRITON_DEFAULT_FP_FUSION
# is unset", on a user's stderr at the first prompt on a GPU), and 3.10 turns that default
# off. On, as every kernel was measured and tested (the int4 dequantization alone off: it
# rounds as its reference does).
FP_FUSION = True


def triton_available() -> bool:
    """Is the `triton` package importable (CUDA builds of torch bring it)?"""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def head_warps(block: int) -> int:
    """Warps of a kernel whose one program per KV head holds `block` values in registers
    (the clusters taken, the tokens kept, the hit cache's lookup)."""
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def supports_head_dim(head_dim: int) -> bool:
    """Do the kernels take this head dim (decode attention's `tl.dot` and the rerank's
    unpacking want a power of two, at least 16: every Llama, Mistral and Qwen2 size)?"""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def interpreted() -> bool:
    """Do the kernels run in Triton's interpreter (the CPU tests)? It runs a launch's
    programs one after another, each operation a numpy call: some launches take other
    settings there, with the same results."""
    return os.environ.get("TRITON_INTERPRET") == "1"
