"""Gather the selected tokens' K and V from the host slab, read by the device itself.

    slab        [2, H, slots, C, D]  a layer's host tier (storage/host.py); on CUDA the
                                     pinned slab seen through `device_view`
    slot_table  [chunks] int64       the slot of each chunk (on the compute device)
    ids         [H, k] int64         token ids per KV head
    ->          [2, H, k, D]         K and V of those tokens, on the compute device

`fetch_into` is the same read for a device hit cache (offload/step_cache.py): only
the rows a mask marks (the misses) are read, each into the cache slot given for it.

Pinned host memory has one address for the CPU and the GPU under unified virtual
addressing, so a kernel can read the selected rows straight from it over PCIe: no
staging copy, no host thread, nothing the host must wait for (ShadowKV and
ClusterKV fetch offloaded KV the same way). Only the k rows cross PCIe.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from offload.kernels import FP_FUSION, interpreted, supports_head_dim
from storage.host import device_view  # noqa: F401  (the view the kernels read through)

BLOCK_K = 32  # token rows per program
INTERPRETED_BLOCK_K = 512  # (in Triton's interpreter, which runs the programs in turn)
GATHER_WARPS = 4


def gather_kv_ref(slab: torch.Tensor, slot_table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference (advanced indexing)."""
    C = slab.shape[3]
    heads = torch.arange(ids.shape[0], device=ids.device)[:, None]
    return slab[:, heads, slot_table[ids // C], ids % C]


def fetch_into_ref(slab, slot_table, ids, rows, dst, cache) -> None:
    """Reference of `fetch_into`: cache[:, h, dst[h, j]] = K/V of ids[h, j] where
    rows[h, j]. (It reads every row; only the kernel reads just the marked ones.)"""
    H = ids.shape[0]
    heads = torch.arange(H, device=ids.device)[:, None]
    kv = gather_kv_ref(slab, slot_table, ids)  # [2, H, k, D]
    old = cache[:, heads, dst]
    cache[:, heads, dst] = torch.where(rows[None, :, :, None], kv, old)


def gather_kv(
    slab: torch.Tensor, slot_table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton kernel: one program per (KV head, block of BLOCK_K ids); slot lookup,
    K and V rows in one launch. `out` [2, H, k, D] may be given (a static buffer)."""
    if out is None:
        _, H, _, _, D = slab.shape
        out = torch.empty(2, H, ids.shape[1], D, dtype=slab.dtype, device=ids.device)
    _launch(slab, slot_table, ids, out, None, None)
    return out


def fetch_into(slab, slot_table, ids, rows, dst, cache) -> None:
    """The Triton kernel of `fetch_into_ref`: rows [H, k] bool, dst [H, k] int64 slots of
    cache [2, H, M, D]. Only the marked rows are read from the slab."""
    _launch(slab, slot_table, ids, cache, rows, dst)


def _launch(slab, slot_table, ids, out, rows, dst) -> None:
    import triton

    _, H, _, C, D = slab.shape
    k = ids.shape[1]
    assert slab.stride(4) == 1 and ids.is_contiguous() and ids.shape[0] == H
    assert supports_head_dim(D), f"head_dim {D} must be a power of two >= 16"
    assert out.stride(3) == 1
    scatter = rows is not None
    if scatter:
        assert rows.is_contiguous() and dst.is_contiguous() and rows.shape == dst.shape == ids.shape
        rows = rows.view(torch.uint8)
    else:  # (unused pointers: any tensor)
        rows = dst = ids
    block = INTERPRETED_BLOCK_K if interpreted() else BLOCK_K
    _kernels().gather[(H, triton.cdiv(k, block))](
        slab, slot_table, ids, out, rows, dst, k,
        slab.stride(0), slab.stride(1), slab.stride(2), slab.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        C=C, D=D, BLOCK=block, SCATTER=scatter, num_warps=GATHER_WARPS,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def gather(SLAB, SLOTS, IDS, OUT, ROWS, DST, k, s_kv, s_h, s_slot, s_c, o_kv, o_h, o_k,
               C: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
               SCATTER: tl.constexpr):  # fmt: skip
        h = tl.program_id(0).to(tl.int64)  # offsets into a large slab need 64 bits
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = j < k
        if SCATTER:  # only the marked rows, each to its own output row
            ok = ok & (tl.load(ROWS + h * k + j, mask=ok, other=0) != 0)
            row = tl.load(DST + h * k + j, mask=ok, other=0)
        else:
            row = j
        t = tl.load(IDS + h * k + j, mask=ok, other=0)
        slot = tl.load(SLOTS + t // C, mask=ok, other=0)
        src = h * s_h + slot * s_slot + (t % C) * s_c
        dst = h * o_h + row * o_k
        d = tl.arange(0, D)
        # both reads issued before either write (a write could alias a later read for all
        # the compiler knows: K's and V's trips over PCIe would follow each other)
        k = tl.load(SLAB + src[:, None] + d[None, :], mask=ok[:, None])
        v = tl.load(SLAB + s_kv + src[:, None] + d[None, :], mask=ok[:, None])
        tl.store(OUT + dst[:, None] + d[None, :], k, mask=ok[:, None])
        tl.store(OUT + o_kv + dst[:, None] + d[None, :], v, mask=ok[:, None])

    return SimpleNamespace(gather=gather)
