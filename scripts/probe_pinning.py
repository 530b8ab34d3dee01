"""How fast host memory is pinned on this machine, the two ways the project can do it:
torch's pinned allocator (`torch.empty(..., pin_memory=True)`, blocks rounded up to a
power of two) and `storage.host.pinned_empty` (an exactly sized buffer, its pages
touched by a parallel zero_, then registered with CUDA). A 128k-token prefill of the
8B shape pins 16 GiB of host slabs, so this decides seconds of it (docs/gpu.md).

    python scripts/probe_pinning.py [--gib 2] [--out results/probe_pinning.json]

Needs CUDA. Also times a copy of the pinned buffer to the device, the same buffer
read by the device in place (through `storage.host.device_view`), the device writing
it in place the way a decode loop's hand-over does (`HostTier.write_run`: 256 tokens of
each of 32 layers of the 8B shape, one slab's copy of K and of V a layer, strided over
the heads: `handover_write_ms`), and whether pinning
on a thread stalls the main thread's GPU work: the layer-by-layer prefill pins each
layer's slab on a thread while earlier layers compute, which hides the pinning only if
the driver does not hold the launching thread meanwhile (other projects report its
locks held for a registration's length). `work_ms_*` is one round of matmuls and small
kernels, alone and while a thread pins a 0.5 GiB slab (an 8B layer's at 128k). And
`reserved_*`: a slab that grows where it is, registered piece by piece.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

from storage.host import device_view, pinned_empty


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=Path("results/probe_pinning.json"))
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.cuda.init()
    n = int(args.gib * 2**30) // 2
    shape = (n,)
    gb = n * 2 / 1e9
    rows = {}
    s, torch_pinned = timed(lambda: torch.empty(shape, dtype=torch.bfloat16, pin_memory=True))
    rows["torch_pin_memory_gb_s"] = gb / s
    del torch_pinned
    s, mine = timed(lambda: pinned_empty(shape, torch.bfloat16))
    rows["pinned_empty_gb_s"] = gb / s
    rows["pinned_empty_is_pinned"] = mine.is_pinned()
    s, _ = timed(lambda: mine.to("cuda", non_blocking=True))
    rows["h2d_copy_gb_s"] = gb / s
    view = device_view(mine, torch.device("cuda"))
    s, _ = timed(lambda: view.clone())
    rows["device_reads_in_place_gb_s"] = gb / s
    rows.update(writes_in_place(view))
    rows["gib"] = args.gib
    rows.update(pinning_beside_work())
    rows.update(reserved_growth(args.gib))
    print(json.dumps(rows, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


def writes_in_place(view: torch.Tensor, layers: int = 32, tokens: int = 256) -> dict:
    """The device's writes into pinned memory through its UVA view, as slabs [2, 8 heads,
    slots, 16, 128] take a hand-over: the whole view (bandwidth), and `tokens` tokens into
    each of `layers` slabs (one copy of K and of V each, strided over the heads)."""
    slots = view.numel() // (2 * 8 * 16 * 128)
    slab = view[: 2 * 8 * slots * 16 * 128].view(2, 8, slots, 16, 128)
    src = torch.randn(slab.shape, device="cuda").to(slab.dtype)
    slab.copy_(src)  # (warm-up)
    s, _ = timed(lambda: slab.copy_(src))
    n = tokens // 16
    kv = torch.randn(layers, 2, 8, tokens, 128, device="cuda").to(slab.dtype)
    per = slots // layers  # (a part of the buffer a layer: its slab)

    def hand_over() -> None:
        for j in range(layers):
            for i in range(2):
                slab[i, :, j * per : j * per + n].copy_(kv[j, i].view(8, n, 16, 128))

    hand_over()
    t, _ = timed(hand_over)
    ok = torch.equal(slab[0, :, :n].cpu(), kv[0, 0].view(8, n, 16, 128).cpu())
    return {"device_writes_in_place_gb_s": slab.numel() * 2 / 1e9 / s,
            "handover_write_ms": t * 1000, "handover_write_correct": ok}  # fmt: skip


def pinning_beside_work(slab_gib: float = 0.5) -> dict:
    """The main thread's GPU work per round, alone and while a thread pins a slab."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    small = torch.zeros(4096, device="cuda")

    def work() -> None:  # a layer's mix: large matmuls and launch-bound small kernels
        x = a
        for _ in range(50):
            x = (x @ a) * 1e-3
            for _ in range(10):
                small.add_(1.0)
        torch.cuda.synchronize()

    shape = (int(slab_gib * 2**30) // 2,)
    work()
    alone, _ = timed(work)
    pin_alone, slab = timed(lambda: pinned_empty(shape, torch.bfloat16))
    del slab
    pinned = {}

    def pin() -> None:
        t = time.perf_counter()
        b = pinned_empty(shape, torch.bfloat16)
        pinned["seconds"] = time.perf_counter() - t
        pinned["is_pinned"] = b.is_pinned()

    thread = threading.Thread(target=pin)
    rounds, t = 0, time.perf_counter()
    thread.start()
    while thread.is_alive() or not rounds:
        work()
        rounds += 1
    thread.join()
    beside = (time.perf_counter() - t) / rounds
    return {
        "work_ms_alone": alone * 1e3,
        "work_ms_while_a_thread_pins": beside * 1e3,
        "work_rounds_while_pinning": rounds,
        "slab_gib": slab_gib,
        "slab_pin_seconds_alone": pin_alone,
        "slab_pin_seconds_beside_work": pinned.get("seconds"),
        "slab_is_pinned": pinned.get("is_pinned"),
    }


def reserved_growth(gib: float) -> dict:
    """A host slab of the 8B shape's layer layout (2 x 8 planes of 4 KiB slots) reserved
    at `gib` and grown in two halves, each registering one piece per plane
    (storage/pinning.py): the rate, and what the driver does with one memcpy across the
    edge of two registrations (the project never makes one; asked last, in case)."""
    from storage.pinning import ReservedSlab

    slots = int(gib * 2**30) // (16 * 4096)
    r = ReservedSlab((2, 8, slots, 16, 128), torch.bfloat16, pin=True)
    half = gib / 2 * 2**30 / 1e9
    first, ok_first = timed(lambda: r.grow(slots // 2))
    second, ok_second = timed(lambda: r.grow(slots))
    out = {
        "reserved_gib": gib,
        "reserved_grown": ok_first and ok_second,
        "reserved_first_half_gb_s": half / first,
        "reserved_second_half_gb_s": half / second,
        "reserved_registrations": len(r._pieces),
        "reserved_is_pinned": r.tensor.is_pinned(),
    }
    if not out["reserved_grown"]:
        return out
    edge = r.edges[1]
    plane = r.tensor[0, 0]  # [slots, 16, 128], one registration per growth
    view = device_view(r.tensor, torch.device("cuda"))
    plane[edge - 1 : edge + 1] = 3.0
    out["reserved_kernel_read_across_edge"] = (
        float(view[0, 0, edge - 1 : edge + 1].sum()) == 3.0 * 2 * 16 * 128
    )
    try:
        plane[edge - 1 : edge + 1].copy_(
            torch.ones(2, 16, 128, dtype=torch.bfloat16, device="cuda")
        )
        torch.cuda.synchronize()
        out["memcpy_across_registrations"] = (
            "ok" if float(plane[edge - 1 : edge + 1].sum()) == 2 * 16 * 128 else "wrong data"
        )
    except RuntimeError as e:
        out["memcpy_across_registrations"] = str(e).splitlines()[0][:200]
    return out


if __name__ == "__main__":
    main()
