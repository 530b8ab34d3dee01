"""How much pinned host memory a context past the host budget takes on CUDA: the store
of the 8B shape (32 layers, 8 KV heads of 128, bf16) takes each layer's KV of --tokens
tokens at once, as a layer-by-layer prefill hands it over, with a host budget of
--budget times the KV; then the slabs' slots (pinned, registered) are counted beside the
budget and the chunks the host holds. Before each layer kept to its share of the budget
(storage/spill.py), each slab grew to its layer's whole KV. Then --selections rounds of
a decode step's reads: every layer gathers --runs runs of 16 tokens a KV head at random
(a selection's chunks, most of them on disk), and the slots are counted again; before a
selection kept its reads within the layer's share, each slab grew by them.

    python scripts/probe_host_budget.py [--tokens 32768] [--budget 0.25] [--selections 2] [--runs 128] [--out results/probe_host_budget.json]

Needs CUDA, or `python -m tests.emulated_run scripts/probe_host_budget.py` (emulated:
the counts hold, the seconds are the CPU's; the spills write to --dir).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from evalkit import write_json
from rich.console import Console

from storage.layout import KVLayout
from storage.pinning import registered_bytes
from storage.tiered import TieredStore

LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", chunk_size=16)
MiB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--budget", type=float, default=0.25, help="x the context's KV")
    ap.add_argument("--selections", type=int, default=2, help="rounds of a step's reads")
    ap.add_argument("--runs", type=int, default=128, help="runs of 16 tokens a KV head")
    ap.add_argument("--dir", type=Path, default=None, help="where the spills go")
    ap.add_argument("--out", type=Path, default=Path("results/probe_host_budget.json"))
    args = ap.parse_args()
    console = Console()
    assert torch.cuda.is_available(), "needs CUDA (or tests.emulated_run)"
    L, T = LAYOUT, args.tokens
    kv_bytes = T * L.token_bytes
    x = torch.randn(2, L.num_kv_heads, T, L.head_dim, dtype=torch.bfloat16, device="cuda")
    before = registered_bytes()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        store = TieredStore(
            L, torch.bfloat16, torch.device("cuda"), host_bytes=int(args.budget * kv_bytes),
            disk_dir=Path(d) / "kv", disk_bytes=1 << 50, max_tokens=T + 1024,
        ).start()  # fmt: skip
        t0 = time.perf_counter()
        for layer in range(L.num_layers):
            store.append(layer, x[0], x[1])
        store.settle()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        slots_after_prefill = sum(h.capacity for h in store.host)
        g = torch.Generator().manual_seed(0)
        t1 = time.perf_counter()
        for _ in range(args.selections):
            for layer in range(L.num_layers):
                starts = torch.randint(0, T - 16, (L.num_kv_heads, args.runs), generator=g)
                ids = (starts[:, :, None] + torch.arange(16)).flatten(1)
                with store.lock:
                    store.gather_selected(layer, ids.sort(dim=1).values.cuda())
        store.settle()
        torch.cuda.synchronize()
        selection_seconds = (time.perf_counter() - t1) / max(args.selections, 1)
        slots = sum(h.capacity for h in store.host)
        row = {
            "tokens": T,
            "kv_mib": kv_bytes / MiB,
            "host_budget_mib": args.budget * kv_bytes / MiB,
            "host_chunks_mib": store.directory.host_count * L.chunk_bytes / MiB,
            "slab_slots_mib": slots_after_prefill * L.chunk_bytes / MiB,
            "slab_slots_after_selections_mib": slots * L.chunk_bytes / MiB,
            "registered_mib": (registered_bytes() - before) / MiB,
            "spilled_chunks": store.spilled_chunks,
            "seconds": seconds,
            "selection_round_seconds": selection_seconds,
            "disk_reads_mib": store.reads.nbytes["disk"] / MiB,
        }
        store.close()
    console.print(row)
    write_json(console, args.out, {"device": torch.cuda.get_device_name(), "rows": [row]})


if __name__ == "__main__":
    main()
