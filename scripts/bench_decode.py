"""Decode ms/token against context length, every system in one run, plus a synthetic
Llama-3.1-8B-shaped model at 32k-128k and a GPU projection from its measured bytes.

    python scripts/bench_decode.py [--lengths 512,1024,2048,4096,8000] [--tokens 16]
        [--systems offload,hf,llama.cpp] [--synthetic 8192,32768,131072]
        [--out results/bench_decode.json] [--plot docs/decode_ms_per_token.png]

Embedded model (SmolLM2-135M GGUF), greedy, end-of-turn ignored, this machine's
threads. Real prose from ../shared/texts, cut to each length. Columns:
  full                 the in-memory cache, every token attended
  tiered dense         the three-tier store, every token attended
  sparse S / prefetch P  selector S (5% + sink + window), fetch mode P:
                       off (direct gathers), cache (device hit cache),
                       on (hit cache + the worker speculating one layer ahead)
  hf                   transformers `generate` on the same GGUF (bf16, dense weights)
  llama.cpp            llama-cpp-python on the same GGUF (Q4_1), in a child process
                       (a crash of the native library is reported, not fatal)
One prefill per length serves every tiered setting (the cache is rewound after each).

Synthetic: random weights with Llama-3.1-8B layer shapes (dim 4096, 32/8 heads,
head_dim 128, FFN 14336; a 32k vocabulary), `--synthetic-layers` layers at int4,
every layer sparse. Its KV is written straight into the cache (no prefill: a
128k prefill of an 8B-shaped layer takes hours on 2 cores), so it measures the
cost of attention, selection and fetch at scale, not answer quality.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evalkit import DEFAULT_TEXTS, PrefilledContext, bench_hf, prose, write_json  # noqa: E402

from offload import Runtime  # noqa: E402
from offload.config import RuntimeConfig  # noqa: E402
from offload.generate import generate_steps, make_sampler, prefill  # noqa: E402
from offload.loading import LoadedModel  # noqa: E402
from offload.model import Transformer  # noqa: E402
from offload.model_args import ModelArgs  # noqa: E402
from offload.quantize import quantize_model  # noqa: E402

# Stated assumptions of the GPU projection (an RTX 4090-class card).
PCIE_GBPS = 25.0  # PCIe 4.0 x16: 32 GB/s theoretical, ~25 GB/s achieved host -> device
GPU_MEM_GBPS = 1000.0  # GDDR6X, about 1 TB/s
LLAMA8B = {"layers": 32, "weights_bytes": 16.06e9, "kv_bytes_per_token": 131072}


# -- the embedded model ----------------------------------------------------------------


def full_ms_per_token(rt: Runtime, ids: list[int], tokens: int) -> float:
    full = Runtime(rt.loaded, rt.config.replace(mode="full"), rt.device)
    cache = full.new_cache()
    prefill(full.model, cache, ids[:-1], full.config.generation.prefill_chunk)
    tok = dataclasses.replace(full.tokenizer, stop_ids=())
    steps = list(generate_steps(full.model, cache, tok, ids[-1:], tokens + 1, make_sampler()))
    return 1000 * sum(s.step_seconds for s in steps[1:]) / tokens


def tiered_ms_per_token(ctx: PrefilledContext, selection, prefetch: str, tokens: int):
    ctx.cache.set_prefetch(ctx.rt.model, prefetch, selection.hit_cache)
    ctx.decode(selection, 2)  # warm up (and build the index outside the timing)
    store = ctx.cache.store
    store.reads.count = dict.fromkeys(store.reads.count, 0)
    store.reads.nbytes = dict.fromkeys(store.reads.nbytes, 0)
    t = time.perf_counter()
    _, stats = ctx.decode(selection, tokens + 1)
    n = tokens + 1
    out = {"ms": 1000 * (time.perf_counter() - t) / n,
           "selection_ms": 1000 * stats.selection_seconds / n,
           "fetch_ms": 1000 * stats.fetch_seconds / n,
           "read_bytes_per_token": {k: v / n for k, v in store.reads.nbytes.items()}}  # fmt: skip
    if ctx.cache.prefetcher is not None:
        out["prefetch"] = ctx.cache.prefetcher.stats.summary()
    ctx.cache.set_prefetch(ctx.rt.model, "off")
    return out


def llamacpp_worker(path: str, ids: list[int], tokens: int, threads: int) -> float:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=path, n_ctx=8192, n_threads=threads, n_batch=512,
                          verbose=False)  # fmt: skip
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))
        return int(np.argmax(logits))

    llm.eval(ids)
    tok = next_token()
    llm.eval([tok])  # warm-up step
    tok = next_token()
    t = time.perf_counter()
    for _ in range(tokens):
        llm.eval([tok])
        tok = next_token()
    return 1000 * (time.perf_counter() - t) / tokens


def llamacpp_ms_per_token(path: Path, ids: list[int], tokens: int) -> float | str:
    """In a child process: a crash of the native library becomes a reason, not the end."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install -e '.[bench]')"
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(
                llamacpp_worker, str(path), ids, tokens, torch.get_num_threads()
            ).result()
        except BrokenProcessPool:
            return "llama.cpp crashed (see docs/performance.md: build it for this CPU)"


def embedded(args, console) -> list[dict]:
    rt = Runtime.from_pretrained(args.model, mode="sparse")
    systems = args.systems.split(",")
    hf = None
    if "hf" in systems:
        from transformers import AutoModelForCausalLM

        src = rt.loaded.source
        hf = AutoModelForCausalLM.from_pretrained(
            src.parent, gguf_file=src.name, dtype=torch.bfloat16
        ).eval()
    text_ids = rt.tokenizer.encode(prose(args.texts))
    base = rt.config.selection
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        ids = text_ids[:length]
        row: dict = {"context": length}
        if "offload" in systems:
            row["full"] = full_ms_per_token(rt, ids, args.tokens)
            ctx = PrefilledContext(rt, ids)
            row["tiered dense"] = tiered_ms_per_token(
                ctx, dataclasses.replace(base, mode="dense"), "off", args.tokens
            )
            for sel in filter(None, args.selectors.split(",")):
                selection = dataclasses.replace(base, mode="sparse", selector=sel)
                for prefetch in ("off", "cache", "on"):
                    row[f"sparse {sel} / prefetch {prefetch}"] = tiered_ms_per_token(
                        ctx, selection, prefetch, args.tokens
                    )
            ctx.close()
        if hf is not None:
            row["hf"] = bench_hf(hf, ids, args.tokens)["decode_ms_per_token"]
        if "llama.cpp" in systems:
            row["llama.cpp"] = llamacpp_ms_per_token(rt.loaded.source, ids, args.tokens)
        rows.append(row)
        console.print({k: (v["ms"] if isinstance(v, dict) else v) for k, v in row.items()})
    return rows


# -- the synthetic 8B-shaped model -------------------------------------------------------


def synthetic_runtime(layers: int, max_len: int) -> Runtime:
    a = ModelArgs(arch="llama", dim=4096, num_layers=layers, num_heads=32, num_kv_heads=8,
                  head_dim=128, hidden_dim=14336, vocab_size=32000, rope_theta=500000.0,
                  max_seq_len=max_len)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(a)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model = model.fuse().to(torch.bfloat16)
    quantize_model(model, "int4")
    model.weights = "int4"
    loaded = LoadedModel(model, None, a, Path("synthetic-llama-3.1-8b-shape"), "synthetic")
    config = RuntimeConfig().replace(mode="sparse", dense_layers=0)
    return Runtime(loaded, config, torch.device("cpu"))


def fill_kv(cache, num_tokens: int, seed: int = 0) -> None:
    """Write num_tokens of synthetic K/V (keys with a shared direction and per-token noise,
    so that attention is peaked as in real models) straight into every layer."""
    gen = torch.Generator().manual_seed(seed)
    layers = cache.layers
    H, D = 8, 128
    for start in range(0, num_tokens, 4096):
        n = min(4096, num_tokens - start)
        for layer in layers:
            k = torch.randn(H, n, D, generator=gen).to(torch.bfloat16)
            v = torch.randn(H, n, D, generator=gen).to(torch.bfloat16)
            layer.append(k, v)
        cache.advance(n)


def synthetic_step_ms(rt: Runtime, cache, tokens: int) -> float:
    x = torch.tensor([1])
    with cache.decoding():
        rt.model(x, cache)  # warm-up
        t = time.perf_counter()
        for _ in range(tokens):
            rt.model(x, cache)
        ms = 1000 * (time.perf_counter() - t) / tokens
    cache.truncate(cache.num_tokens - tokens - 1)
    return ms


def synthetic(args, console) -> list[dict]:
    lengths = [int(x) for x in args.synthetic.split(",")]
    rt = synthetic_runtime(args.synthetic_layers, max(lengths) + 64)
    rows = []
    for length in lengths:
        row: dict = {"context": length, "layers": args.synthetic_layers}
        full = Runtime(rt.loaded, rt.config.replace(mode="full"), rt.device).new_cache()
        fill_kv(full, length)
        row["full"] = synthetic_step_ms(rt, full, args.tokens)
        del full
        cache = rt.new_cache()
        fill_kv(cache, length)
        t = time.perf_counter()
        cache.finish_prefill()
        row["index_seconds"] = time.perf_counter() - t
        for prefetch in ("off", "cache"):
            cache.set_prefetch(rt.model, prefetch)
            store = cache.store
            store.reads.nbytes = dict.fromkeys(store.reads.nbytes, 0)
            cache.policy.stats.selection_seconds = cache.policy.stats.fetch_seconds = 0.0
            row[f"sparse cluster / prefetch {prefetch}"] = {
                "ms": synthetic_step_ms(rt, cache, args.tokens),
                "selection_ms": 1000 * cache.policy.stats.selection_seconds / (args.tokens + 1),
                "fetch_ms": 1000 * cache.policy.stats.fetch_seconds / (args.tokens + 1),
                "read_bytes_per_token": {
                    k: v / (args.tokens + 1) for k, v in store.reads.nbytes.items()
                },
                **({"prefetch": cache.prefetcher.stats.summary()} if cache.prefetcher else {}),
            }
        cache.set_prefetch(rt.model, "off")
        cache.policy.selection = dataclasses.replace(cache.policy.selection, mode="dense")
        row["tiered dense"] = synthetic_step_ms(rt, cache, args.tokens)
        cache.close()
        rows.append(row)
        console.print({k: (v["ms"] if isinstance(v, dict) else v) for k, v in row.items()})
    return rows


def gpu_projection(row: dict, selection) -> dict:
    """Projected ms/token of Llama-3.1-8B at this context on a 24 GB card: a PROJECTION.

    From the synthetic run's measured host reads per layer (hit-cache misses, which
    cross PCIe on a GPU) and the device bytes a sparse step reads, at the stated
    bandwidths; weights read once per token."""
    T, layers = row["context"], row["layers"]
    m = row["sparse cluster / prefetch cache"]
    H, D = 8, 128
    k = selection.retrieved_for(T)
    host_per_layer = m["read_bytes_per_token"]["host"] / layers
    attended = (selection.sink + selection.window + k) * H * D * 2 * 2  # K and V, bf16
    index = (T // selection.cluster_size) * H * D * 4  # centroids, fp32
    rerank = selection.candidate_factor * k * H * (D * 2 // 8 + 2 * D * 4 // 16)  # 2-bit
    L = LLAMA8B["layers"]
    weights_ms = LLAMA8B["weights_bytes"] / GPU_MEM_GBPS / 1e6
    device_ms = L * (attended + index + rerank) / GPU_MEM_GBPS / 1e6
    pcie_ms = L * host_per_layer / PCIE_GBPS / 1e6
    return {
        "context": T,
        "assumed_GB_per_s": {"pcie": PCIE_GBPS, "gpu_memory": GPU_MEM_GBPS},
        "pcie_bytes_per_token": L * host_per_layer,
        "ms_weights": weights_ms,
        "ms_kv_on_device": device_ms,
        "ms_pcie": pcie_ms,
        "ms_per_token_no_overlap": weights_ms + device_ms + pcie_ms,
        "ms_per_token_overlapped": weights_ms + device_ms + max(0.0, pcie_ms - weights_ms),
        "ms_per_token_all_kv_over_pcie": weights_ms
        + T * LLAMA8B["kv_bytes_per_token"] / PCIE_GBPS / 1e6,
    }


# -- output ----------------------------------------------------------------------------


def ms(v) -> float | None:
    if isinstance(v, dict):
        return v["ms"]
    return v if isinstance(v, float) else None


def print_table(console, title: str, rows: list[dict]) -> None:
    cols = [c for c in rows[0] if c not in ("context", "layers", "index_seconds")]
    table = Table(title=title)
    table.add_column("context", justify="right")
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        cells = [f"{ms(r[c]):.1f}" if ms(r.get(c)) is not None else str(r.get(c)) for c in cols]
        table.add_row(str(r["context"]), *cells)
    console.print(table)


def plot(path: Path, panels: list[tuple[str, list[dict]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels, strict=True):
        for c in rows[0]:
            pts = [(r["context"], ms(r.get(c))) for r in rows if ms(r.get(c)) is not None]
            if c in ("context", "layers", "index_seconds") or not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=c)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel("decode ms / token")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", default="512,1024,2048,4096,8000", help="'' to skip")
    ap.add_argument("--selectors", default="exact,cluster")
    ap.add_argument("--systems", default="offload,hf,llama.cpp")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--synthetic", default="8192,32768,131072", help="'' to skip")
    ap.add_argument("--synthetic-layers", type=int, default=2)
    ap.add_argument("--texts", type=Path, default=DEFAULT_TEXTS)
    ap.add_argument("--out", type=Path, default=Path("results/bench_decode.json"))
    ap.add_argument("--plot", default="docs/decode_ms_per_token.png", help="'' to skip")
    args = ap.parse_args()
    console = Console()
    threads = torch.get_num_threads()
    result: dict = {"threads": threads, "torch": torch.__version__}
    panels = []
    if args.lengths:
        result["embedded"] = embedded(args, console)
        print_table(
            console, f"decode ms/token, {args.model}, {threads} threads", result["embedded"]
        )
        panels.append((f"{args.model}, {threads} CPU threads", result["embedded"]))
    if args.synthetic:
        rows = synthetic(args, console)
        result["synthetic"] = rows
        print_table(console, f"Llama-3.1-8B shape, {args.synthetic_layers} layers, int4", rows)
        panels.append((f"Llama-3.1-8B shape, {args.synthetic_layers} layers, int4", rows))
        sel = RuntimeConfig().selection
        result["gpu_projection"] = [gpu_projection(r, sel) for r in rows]
        console.print("PROJECTION (not measured): Llama-3.1-8B on a 24 GB card")
        for p in result["gpu_projection"]:
            console.print(p)
    write_json(console, args.out, result)
    if panels and args.plot:
        plot(Path(args.plot), panels)
        console.print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
