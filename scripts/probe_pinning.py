"""How fast host memory is pinned on this machine, the two ways the project can do it:
torch's pinned allocator (`torch.empty(..., pin_memory=True)`, blocks rounded up to a
power of two) and `storage.host.pinned_empty` (an exactly sized buffer, its pages
touched by a parallel zero_, then registered with CUDA). A 128k-token prefill of the
8B shape pins 16 GiB of host slabs, so this decides seconds of it (docs/gpu.md).

    python scripts/probe_pinning.py [--gib 2] [--out results/probe_pinning.json]

Needs CUDA. Also times a copy of the pinned buffer to the device, and the same
buffer read by the device in place (through `storage.host.device_view`).
"""

from __future__ import annotations

import argparse
import json
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
    rows["gib"] = args.gib
    print(json.dumps(rows, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
