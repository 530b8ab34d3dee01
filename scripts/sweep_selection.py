"""A sparse layer's selection kernels under other launch settings, on this GPU: the
clusters' scores (`clusters`), the clusters taken (`take`: its warps, and `TAKE_TRIALS`
thresholds a pass against the bisection), the candidate list
(`candidates`), the rerank (`score` and its softmax sum), the tokens kept (`top`: one
program per KV head, or spread over programs of `BLOCK_SPLIT`, and torch's `topk` and
a gather beside them) and the fetch of the hit cache's misses from pinned host memory
(`fetch`, a third of the rows and all of them). On the H200 these took 7.5 ms of the 8B
shape's 14.2 ms step at 128k, `top` 2.3 of it with one program per head (8 of 132 SMs).

The inputs are one layer's at the 8B shape (scripts/bench_selection.py's random index of
--tokens tokens, the rtx4090 preset's selection of --retrieved tokens a head), each
kernel's inputs what the kernels before it computed. Each setting is checked against the
default's output (the tokens kept: against `top_ids_ref`) and timed as a CUDA graph of 20
calls replayed, as the decode step runs it. Then the tokens kept at fewer candidates, one
program a head against the split (where `SPLIT_ABOVE` should be; one program a head with
its listing pass reading 8 weights a thread at a time, `LIST_PER_THREAD`, and 16). Needs a CUDA GPU (or
tests/emulated_run.py, with --quick: one setting a kernel at a tiny shape).

    python scripts/sweep_selection.py [--tokens 131072] [--retrieved 2048] [--quick]
        [--out results/sweep_selection.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selection import FACTOR, SINK, WINDOW, H, layer_state  # noqa: E402
from evalkit import captured, row_error, write_json  # noqa: E402

from offload.backend import Backend  # noqa: E402
from offload.kernels import candidates as candidate_kernels  # noqa: E402
from offload.kernels import gather as gather_kernels  # noqa: E402
from offload.kernels import ranking  # noqa: E402

CALLS, REPLAYS = 20, 10  # (--quick: 1, 1)
# the module whose settings a kernel's best row names (`apply_best`)
MODULES = {"clusters": candidate_kernels, "candidates": candidate_kernels,
           "rerank": candidate_kernels, "top": ranking, "take": ranking,
           "fetch a third": gather_kernels}  # fmt: skip


def graph_us(fn) -> float:
    """us per call of `fn`, captured 20 times in a CUDA graph and replayed."""
    graph = captured(fn, CALLS)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / (REPLAYS * CALLS)


def layer_inputs(T: int, K: int) -> dict:
    """Each kernel's inputs at one layer, computed by the kernels before it."""
    dev = torch.device("cuda")
    state = layer_state(T, dev)
    index, backend = state["index"], Backend(dev, kernels=True)
    q = state["queries"][0].contiguous()
    hi = torch.tensor([T - WINDOW], device=dev)
    k_valid = torch.tensor([K], device=dev)
    N = index.candidate_count(K)
    cscore = backend.score_clusters(q, index.centroids, index.bias)
    take = backend.take_clusters(cscore, index.counts[:, :-1], FACTOR, K, k_valid)
    ids, count = backend.cluster_candidates(take, index.assign, SINK, hi, N)
    weights = backend.rerank_weights(q, state["summaries"], ids, count, q.shape[-1] ** -0.5)
    kept = backend.top_ids(weights, ids, K, k_valid)
    C, D = state["slab"].shape[3], state["slab"].shape[4]
    gen = torch.Generator(dev).manual_seed(1)
    return {
        **state, "backend": backend, "q": q, "hi": hi, "k_valid": k_valid, "N": N,
        "cscore": cscore, "take": take, "ids": ids, "count": count, "weights": weights,
        "kept": kept, "K": K, "view": backend.host_view(state["slab"]),
        "slots": torch.arange(T // C, device=dev),
        "third": torch.rand(H, K, generator=gen, device=dev) < 1 / 3,
        "all": torch.ones(H, K, dtype=torch.bool, device=dev),
        "dst": torch.arange(K, device=dev).repeat(H, 1),
        "cache": torch.zeros(2, H, 2 * K, D, dtype=torch.bfloat16, device=dev),
    }  # fmt: skip


def product(**axes) -> list[dict]:
    """Every combination of the settings' values (the first of each: the default)."""
    rows = [{}]
    for name, values in axes.items():
        rows = [{**row, name: v} for row in rows for v in values]
    return rows


def kernels(x: dict) -> dict:
    """name -> (what it runs, its module, the settings to try: the first is the one the
    others are checked against)."""
    sm = x["q"].shape[-1] ** -0.5
    index, K, k_valid = x["index"], x["K"], x["k_valid"]

    def fetch(rows):
        def run():
            view, slots, kept, dst, cache = (
                x[n] for n in ("view", "slots", "kept", "dst", "cache")
            )
            gather_kernels.fetch_into(view, slots, kept, x[rows], dst, cache)
            return cache

        return run

    ck, rk = candidate_kernels, ranking
    split = dict(SPLIT_ABOVE=[0])
    # (the kernels that took most of the step first: a run stopped at its time limit
    # keeps those; the split's settings compile five kernels each)
    return {
        "top": (
            lambda: rk.top_ids(x["weights"], x["ids"], K, k_valid),
            rk,
            product(**split, BLOCK_SPLIT=(2048, 1024, 4096), SPLIT_WARPS=(4, 8))
            + product(**split, SPLIT_ROWS=(2, 16))
            + product(SPLIT_ABOVE=[10**9]),  # one program a head (until 12-04)
        ),
        "rerank": (
            lambda: ck.rerank_weights(x["q"], x["summaries"], x["ids"], x["count"], sm),
            ck,
            product(BLOCK_N=(32, 16, 64), SCORE_WARPS=(4, 2, 1, 8))
            + product(BLOCK_W=(512, 2048))
            + product(
                GPU_SCORE_DOT=[True], GPU_SCORE_PRECISION=("tf32x3", "tf32"), BLOCK_N=(32, 64)
            ),
        ),
        "fetch a third": (
            fetch("third"),
            gather_kernels,
            product(BLOCK_K=(32, 16, 64), GATHER_WARPS=(4, 2, 8)),
        ),
        "take": (
            lambda: rk.take_clusters(x["cscore"], index.counts[:, :-1], FACTOR, K, k_valid),
            rk,
            [{}]
            + [{"head_warps": lambda block, n=n: n} for n in (8, 32)]
            + product(TAKE_TRIALS=(4, 8)),  # (16 spills registers at 8,192 clusters)
        ),
        "clusters": (
            lambda: ck.score_clusters(x["q"], index.centroids, index.bias),
            ck,
            product(BLOCK_CS=(32, 16, 64), CLUSTER_WARPS=(4, 8)),
        ),
        "candidates": (
            lambda: ck.cluster_candidates(x["take"], index.assign, SINK, x["hi"], x["N"]),
            ck,
            product(BLOCK_T=(1024, 512, 2048)),
        ),
        "fetch all": (
            fetch("all"),
            gather_kernels,
            product(BLOCK_K=(32, 64), GATHER_WARPS=(4, 8)),
        ),
    }


def same(a, b) -> bool:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return all(
        torch.allclose(u, v, rtol=1e-5, atol=1e-6) if u.is_floating_point() else torch.equal(u, v)
        for u, v in zip(a, b, strict=True)
    )


def with_settings(module, setting: dict, fn):
    saved = {name: getattr(module, name) for name in setting}
    for name, value in setting.items():
        setattr(module, name, value)
    try:
        return fn()
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def sweep(name, run, module, settings, check) -> list[dict]:
    rows, want = [], None
    for setting in settings:
        row = {"kernel": name, **{k: v for k, v in setting.items() if k != "head_warps"}}
        if "head_warps" in setting:
            row["warps"] = setting["head_warps"](0)
        try:

            def measure():
                got = run()
                got = tuple(t.clone() for t in got) if isinstance(got, tuple) else got.clone()
                return got, graph_us(run)

            got, row["us"] = with_settings(module, setting, measure)
            want = got if want is None else want
            row["equal"] = bool(check(got) if check else same(got, want))
        except Exception as e:  # (a setting that fails to compile must not cost the rest)
            row.update(row_error(e))
        rows.append(row)
    return rows


def apply_best(path: Path) -> dict:
    """Set the fastest settings a sweep's results (`path`) found for each kernel -> the
    settings set. Not the clusters taken's warps (`head_warps`, which other kernels
    share), nor where the split starts (the sweep splits every head, `SPLIT_ABOVE` 0;
    the rows at fewer candidates say where it should), unless one program a head won.
    """
    best = json.loads(path.read_text()).get("best", {})
    applied = {}
    for name, module in MODULES.items():
        for key, value in best.get(name, {}).items():
            if key == "SPLIT_ABOVE" and value == 0:
                continue
            if key.isupper() and hasattr(module, key):
                setattr(module, key, value)
                applied[key] = value
    return applied


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--retrieved", type=int, default=2048, help="tokens kept per KV head")
    p.add_argument("--quick", action="store_true", help="one setting a kernel, timed once")
    p.add_argument("--out", type=Path, default=Path("results/sweep_selection.json"))
    a = p.parse_args()
    if a.quick:
        global CALLS, REPLAYS
        CALLS = REPLAYS = 1
    console = Console()
    x = layer_inputs(a.tokens, a.retrieved)
    K = a.retrieved
    results = {"device": torch.cuda.get_device_name(), "tokens": a.tokens, "retrieved": K,
               "candidates": x["N"], "rows": []}  # fmt: skip
    want_kept = ranking.top_ids_ref(x["weights"], x["ids"], K, x["k_valid"])
    for name, (run, module, settings) in kernels(x).items():
        check = (lambda got: torch.equal(got, want_kept)) if name == "top" else None
        rows = sweep(name, run, module, settings[:1] if a.quick else settings, check)
        if name == "top":

            def topk():
                return torch.gather(x["ids"], 1, torch.topk(x["weights"], K, sorted=False).indices)

            rows.append({"kernel": name, "variant": "torch topk + gather", "us": graph_us(topk)})
        record(console, a.out, results, rows)
    # Where a head's select should be split: fewer candidates (shorter contexts).
    g = torch.Generator("cuda").manual_seed(2)
    for n in (K + 256, 2 * K + 256, 4 * K + 256) if not a.quick else ():
        w = torch.rand(H, n, generator=g, device="cuda")
        ids = torch.randint(0, 1 << 20, (H, n), generator=g, device="cuda")
        want = ranking.top_ids_ref(w, ids, K)
        # (one program a head: its listing pass reading 8 weights a thread, or 16 as
        # until 12-07, which spills on sm_89 with Triton 3.6 at 2,304 weights)
        settings = product(SPLIT_ABOVE=[10**9], LIST_PER_THREAD=(8, 16)) + product(
            SPLIT_ABOVE=[0], BLOCK_SPLIT=(512, 1024)
        )
        rows = sweep(f"top at {n}", lambda w=w, ids=ids: ranking.top_ids(w, ids, K), ranking,
                     settings, lambda got, want=want: torch.equal(got, want))  # fmt: skip
        record(console, a.out, results, rows)
    for row in results.get("best", {}).values():
        console.print("best", row)


def record(console, path: Path, results: dict, rows: list[dict]) -> None:
    """Add a kernel's rows and the fastest of each kernel so far; write the results
    (after every kernel: a run stopped at its time limit keeps what it measured)."""
    for row in rows:
        console.print(row)
    results["rows"] += rows
    best = {}
    for row in results["rows"]:
        if row.get("equal") and row["us"] < best.get(row["kernel"], {"us": 1e9})["us"]:
            best[row["kernel"]] = row
    results["best"] = best
    write_json(console, path, results)


if __name__ == "__main__":
    main()
