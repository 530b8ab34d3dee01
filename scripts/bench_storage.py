"""Disk tier read throughput beside a raw sequential read of a file of the same size.

    python scripts/bench_storage.py [--chunks 8192] [--dir /path/on/nvme] [--out results/bench_storage.json]

Writes --chunks chunks of the embedded model's layout (bf16, 16 tokens, 3 KV
heads x 64: 12 KiB each) through `DiskTier` in files of --per-file chunks, then
reads every chunk back (memory-mapped, checksum verified) in file order and in a
random order, and reads a plain file of the same total size sequentially in 1 MiB
blocks. All reads hit the page cache unless the caches can be dropped (root);
the JSON says which.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from storage.abstracts import chunk_abstracts
from storage.disk import DiskTier
from storage.layout import KVLayout


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--chunks", type=int, default=8192)
    ap.add_argument("--per-file", type=int, default=64)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("results/bench_storage.json"))
    args = ap.parse_args()
    L = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16", chunk_size=16)
    root = Path(tempfile.mkdtemp(prefix="bench-storage-", dir=args.dir))
    tier = DiskTier(root / "tier", L, torch.bfloat16, budget_bytes=1 << 40)
    tier.start()
    g = torch.Generator().manual_seed(0)
    records = []
    t = time.perf_counter()
    for start in range(0, args.chunks, args.per_file):
        n = min(args.per_file, args.chunks - start)
        data = torch.randn(n, 2, 3, 16, 64, generator=g).to(torch.bfloat16)
        keys = data[:, 0].permute(1, 0, 2, 3).reshape(3, n * 16, 64)
        name = tier.write_chunks(0, list(range(start, start + n)), data, chunk_abstracts(keys, 16))
        records += [(name, i) for i in range(n)]
    write_s = time.perf_counter() - t
    total = args.chunks * L.chunk_bytes

    results = {"chunks": args.chunks, "chunk_bytes": L.chunk_bytes, "total_bytes": total,
               "write_seconds": write_s, "write_MBps": total / write_s / 1e6}  # fmt: skip
    cold = drop_caches()
    results["page_cache_dropped"] = cold
    for label, order in (
        ("chunks, file order", records),
        ("chunks, random order", random.Random(1).sample(records, len(records))),
    ):
        reader = DiskTier(root / "tier", L, torch.bfloat16, budget_bytes=1 << 40)
        drop_caches()
        t = time.perf_counter()
        for name, batch in order:
            reader.read_chunk(name, batch)
        dt = time.perf_counter() - t
        results[label] = {
            "seconds": dt,
            "MBps": total / dt / 1e6,
            "us_per_chunk": dt / len(order) * 1e6,
        }

    raw = root / "raw.bin"
    with open(raw, "wb") as f:
        f.write(os.urandom(total))
    drop_caches()
    t = time.perf_counter()
    with open(raw, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    dt = time.perf_counter() - t
    results["raw sequential read"] = {"seconds": dt, "MBps": total / dt / 1e6}

    table = Table(
        title=f"disk tier reads, {args.chunks} chunks x {L.chunk_bytes} B ({total / 2**20:.0f} MiB)"
    )
    for col in ("read", "MB/s", "us/chunk"):
        table.add_column(col, justify="right")
    for label in ("chunks, file order", "chunks, random order", "raw sequential read"):
        r = results[label]
        table.add_row(
            label,
            f"{r['MBps']:.0f}",
            f"{r.get('us_per_chunk', 0):.1f}" if "us_per_chunk" in r else "",
        )
    Console().print(table)
    Console().print(
        f"write {results['write_MBps']:.0f} MB/s (fsync per file); page cache dropped: {cold}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    for p in sorted(root.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    root.rmdir()


if __name__ == "__main__":
    main()
