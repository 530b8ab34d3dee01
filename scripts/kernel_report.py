"""What each Triton kernel of a decode step uses on the GPUs this runtime is for,
compiled here without a GPU (offload/kernels/aot.py): registers per thread, spills,
stack, shared memory, warps and pipeline stages, per architecture and dtype.

    python scripts/kernel_report.py [--archs 80,86,89,90] [--out results/kernel_report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from offload.kernels.aot import SHARED_LIMIT, compile_launch, resources, runtime_launches  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,86,89,90", help="compute capabilities")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--out", default="results/kernel_report.json")
    args = ap.parse_args()
    rows = []
    print(f"{'arch':>4} {'dtype':9} {'launch':70} {'regs':>4} {'spill':>5} {'shared':>7} w s")
    for arch in (int(a) for a in args.archs.split(",")):
        for name in args.dtypes.split(","):
            seen = set()
            for what, launch in runtime_launches(DTYPES[name], arch):
                if what in seen:
                    continue
                seen.add(what)
                used = resources(compile_launch(launch, arch))
                rows.append({"arch": arch, "dtype": name, "launch": what, **used,
                             "shared_limit": SHARED_LIMIT[arch]})  # fmt: skip
                print(f"{arch:>4} {name:9} {what:70} {used['registers']:>4} "
                      f"{used['spill_bytes']:>5} {used['shared_bytes']:>7} "
                      f"{used['num_warps']} {used['num_stages']}")  # fmt: skip
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
