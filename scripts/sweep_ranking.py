"""The tokens-kept kernel (`top_ids`, offload/kernels/ranking.py) under other launch
settings: how many weights a pass reads at a time (`BLOCK_READ`) and the warps of its one
program per KV head, and the whole row in registers (`BLOCK_TOP`) where it fits; beside
torch's `topk` and a gather. On the H200 it took 76 us of a sparse layer's 250 (the
8B shape at 128k: 8 heads x 16,640 candidates, 2,048 kept), the step's largest kernel.

Each setting is checked against `top_ids_ref` and timed as a CUDA graph of 20 calls
replayed (as the decode step runs it). Needs a CUDA GPU.

    python scripts/sweep_ranking.py [--candidates 16640] [--kept 2048] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from offload.kernels import ranking  # noqa: E402

H = 8
CALLS = 20


def graph_us(fn) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / (10 * CALLS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--candidates", type=int, default=16640)
    p.add_argument("--kept", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("results/sweep_ranking.json"))
    a = p.parse_args()
    g = torch.Generator("cuda").manual_seed(0)
    w = torch.randn(H, a.candidates, generator=g, device="cuda")
    ids = torch.randint(0, 1 << 20, (H, a.candidates), generator=g, device="cuda")
    want = ranking.top_ids_ref(w, ids, a.kept)
    rows = []
    topk = lambda: torch.gather(ids, 1, torch.topk(w, a.kept, dim=-1, sorted=False).indices)  # noqa: E731
    rows.append({"variant": "torch topk + gather", "us": graph_us(topk)})
    print(rows[-1], flush=True)
    saved = ranking.BLOCK_READ, ranking.BLOCK_TOP, ranking.head_warps
    settings = [(r, n, False) for r in (1024, 2048, 4096, 8192) for n in (4, 8, 16, 32)]
    settings += [(2048, n, True) for n in (16, 32)]
    for block_read, num_warps, whole in settings:
        ranking.BLOCK_READ = block_read
        ranking.BLOCK_TOP = 32768 if whole else 8192
        ranking.head_warps = lambda block, n=num_warps: n
        row = {"block_read": block_read, "num_warps": num_warps, "whole_row": whole}
        try:
            got = ranking.top_ids(w, ids, a.kept)
            row["equal"] = bool(torch.equal(got, want))
            row["us"] = graph_us(lambda: ranking.top_ids(w, ids, a.kept))
        except Exception as e:  # (a setting that fails to compile must not cost the rest)
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(row, flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(
            json.dumps({"candidates": a.candidates, "kept": a.kept, "rows": rows}, indent=1)
        )
    ranking.BLOCK_READ, ranking.BLOCK_TOP, ranking.head_warps = saved


if __name__ == "__main__":
    main()
