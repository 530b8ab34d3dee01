"""One sparse layer's share of a tiered decode step, with the Triton kernels and with
their torch references: the device selection (clusters ranked, the candidate list, the
rerank on low-bit keys, top-k) and the hit cache's lookup (bookkeeping, and the fetch
of the misses from pinned host memory).

At the 8B shape (8 KV heads x 128, 4 query heads each, bf16) and the rtx4090 preset's
selection (2048 tokens, `--retrieved`; candidate_factor 8, a hit cache of twice that
per head), over a random index of --tokens tokens (clusters of 16 tokens on average;
what the clusters mean does not change what the step computes per token). Each step's
query is new, so the hit cache sees misses as a decode would.

On CUDA each variant is captured as a CUDA graph and replayed, as the decode step runs
(`ms_per_layer`; times 30 sparse layers is its share of an 8B step), and also run
eagerly; `kernels_per_layer` counts the launches (profiler). On a CPU only the
references run (a smoke check; the interpreter is too slow for these sizes).

    python scripts/bench_selection.py [--tokens 131072] [--steps 50] [--retrieved 2048]
        [--warmup 3] [--out results/bench_selection.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evalkit import captured, profile_kernels, row_error, write_json  # noqa: E402

from offload.backend import Backend  # noqa: E402
from offload.step_cache import StepHitCache  # noqa: E402
from retrieval.device_index import DeviceClusterIndex  # noqa: E402
from storage.quant import quantize_keys  # noqa: E402

H, G, D, C = 8, 4, 128, 16  # KV heads, query heads per KV head, head dim, chunk size
FACTOR, SINK, WINDOW = 8, 16, 256


class TopkBackend(Backend):
    """The kernels, but torch's `topk` and a gather for the tokens kept (what `top_ids`
    replaced; its ids in another order, which the timing does not depend on): whether
    the one-program-per-head radix select beats it on this GPU."""

    def top_ids(self, weights, ids, k, k_valid=None):
        return torch.gather(ids, 1, torch.topk(weights, k, dim=-1, sorted=False).indices)


def layer_state(T: int, device: torch.device) -> dict:
    """A sparse layer of T tokens: its device index, summaries, host slab, hit cache."""
    gen = torch.Generator(device).manual_seed(0)  # (made on the device: seconds on a CPU)
    NC = T // 16
    index = DeviceClusterIndex(H, D, FACTOR, device)
    assign = torch.randint(0, NC, (H, T), generator=gen, device=device, dtype=torch.int32)
    index.centroids = torch.randn(H, NC, D, generator=gen, device=device)
    index.bias = torch.zeros(H, NC, device=device)
    counts = torch.zeros(H, NC + 1, device=device)
    counts.scatter_add_(1, assign.long(), torch.ones(H, T, device=device))
    index.counts, index.assign = counts, assign
    index.max_count, index.tail = int(counts.max()), 0
    scales = torch.linspace(0.3, 3, D, device=device)
    summaries = quantize_keys(torch.randn(H, T, D, generator=gen, device=device) * scales, 2, C)
    slab = torch.randn(2, H, T // C, C, D, generator=gen, device=device, dtype=torch.bfloat16)
    slab = slab.cpu().pin_memory() if device.type == "cuda" else slab
    counts_hc = torch.zeros(2, dtype=torch.long, device=device)
    queries = torch.randn(8, H, G, D, generator=gen, device=device).bfloat16()
    return {"index": index, "summaries": summaries, "slab": slab, "counts": counts_hc,
            "queries": queries, "T": T}  # fmt: skip


def layer_step(state: dict, backend: Backend, device: torch.device, K: int):
    """The layer's selection and lookup as the step runs them, on static buffers: K tokens
    kept per KV head, a hit cache of 2K slots."""
    index, T = state["index"], state["T"]
    hc = StepHitCache(H, D, torch.bfloat16, device, state["counts"])
    hc.reserve(2 * K, T)
    slab = backend.host_view(state["slab"])
    slots = torch.arange(T // C, device=device)
    q = state["queries"][0].clone()
    hi = torch.tensor([T - WINDOW], device=device)
    k_valid = torch.tensor([K], device=device)
    N = index.candidate_count(K)

    def run():
        ids = index.select(q, state["summaries"], SINK, hi, K, N, k_valid, backend=backend)
        return hc.lookup(ids, k_valid, slab, slots, backend)

    return q, run


def timed(state, q, run, steps: int, device) -> list[float]:
    """ms per call, each call with a new query (copied in, as a step's is)."""
    times = []
    for i in range(steps):
        q.copy_(state["queries"][i % len(state["queries"])])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def measure(state, backend, steps, device, K, warmup: int) -> dict:
    q, run = layer_step(state, backend, device, K)
    for _ in range(warmup):  # Triton compiles, the hit cache fills
        run()
    row = {"eager_ms_per_layer": statistics.median(timed(state, q, run, steps, device))}
    if device.type == "cuda":
        row.update(profile_kernels(run, 1, "layer"))
        graph = captured(run)
        row["ms_per_layer"] = statistics.median(timed(state, q, graph.replay, steps, device))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--retrieved", type=int, default=2048, help="tokens kept per KV head")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs of each variant first")
    p.add_argument("--out", type=Path, default=Path("results/bench_selection.json"))
    args = p.parse_args()
    console = Console()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = layer_state(args.tokens, device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "tokens": args.tokens, "retrieved": args.retrieved,
               "candidates": state["index"].candidate_count(args.retrieved),
               "rows": []}  # fmt: skip
    variants = [("torch references", Backend(device))]
    if device.type == "cuda":
        variants += [("Triton kernels", Backend(device, kernels=True)),
                     ("Triton kernels, torch's topk for the tokens kept", TopkBackend(device, kernels=True))]  # fmt: skip
    for name, backend in variants:
        try:
            row = {
                "variant": name,
                **measure(state, backend, args.steps, device, args.retrieved, args.warmup),
            }
        except Exception as e:  # (a variant's failure must not cost the others)
            row = {"variant": name, **row_error(e)}
        console.print(row)
        results["rows"].append(row)
        write_json(console, args.out, results)  # after every row: a crash keeps the rest


if __name__ == "__main__":
    main()
