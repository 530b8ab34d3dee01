"""Shared pieces of the evaluation scripts: real prose, needle prompts, and a prefilled
context that can be decoded under many selection settings without re-prefilling.
"""

from __future__ import annotations

import contextlib
import cProfile
import dataclasses
import math
import pstats
import statistics
import threading
import time
import traceback
from pathlib import Path

import torch

from offload import Runtime
from offload.attention import SelectionStats, SparsePolicy
from offload.config import REUSE_MODES
from offload.generate import generate_steps, make_sampler, prefill
from offload.loading import LoadedModel
from offload.model import Transformer
from offload.model_args import ModelArgs
from offload.quantize import quantize_model
from storage.errors import first_line

DEFAULT_TEXTS = Path(__file__).resolve().parent.parent.parent / "shared" / "texts"
# The random-weight models of the GPU benchmarks (bench_gpu.py, bench_int4.py)
SHAPES = {
    "llama-8b": dict(dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                     hidden_dim=14336, vocab_size=128256, rope_theta=500000.0),
    "qwen-14b": dict(dim=5120, num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128,
                     hidden_dim=13824, vocab_size=152064, rope_theta=1000000.0),
    "tiny": dict(dim=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                 hidden_dim=512, vocab_size=1000),
}  # fmt: skip


def device_of() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synthetic_args(shape: str, max_len: int) -> ModelArgs:
    return ModelArgs(arch="llama", max_seq_len=max_len, **SHAPES[shape])


def synthetic_runtime(shape: str, max_len: int, config, tokenizer=None, int4=False) -> Runtime:
    """A Runtime of our model of SHAPES[shape] with random bf16 weights, built on the meta
    device and materialized on the GPU directly (no host copy of 16 GB); `int4`: its
    block linears then quantized there (`model.weights = "int4"`, offload/quantize.py)."""
    a = synthetic_args(shape, max_len)
    with torch.device("meta"):
        model = Transformer(a).fuse().to(torch.bfloat16)
    model = model.to_empty(device=device_of())
    gen = torch.Generator(device=device_of()).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
    if int4:
        quantize_model(model, "int4", device=device_of())
    loaded = LoadedModel(model, tokenizer, a, Path(f"synthetic-{shape}"), "synthetic")
    return Runtime(loaded, config, device_of())


NEEDLE = "The secret passphrase is {}. "
PASSPHRASES = [
    "purple elephant",
    "silver lighthouse",
    "quiet volcano",
    "amber bicycle",
    "frozen orchard",
]


def prose(texts_dir: Path | None = DEFAULT_TEXTS) -> str:
    """Real English prose (../shared/texts when present), else a repetitive stand-in."""
    if texts_dir is not None and Path(texts_dir).is_dir():
        files = sorted(Path(texts_dir).glob("*.txt"))
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    sentences = (
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    )
    return sentences * 2000


def needle_prompt(
    rt: Runtime, filler: str, n_tokens: int, depth: float, passphrase: str
) -> list[int]:
    """Chat-template ids of about n_tokens: question, filler with the needle at `depth`,
    question again, and the answer primed with 'The secret passphrase is'."""
    question = "What is the secret passphrase?"
    head = f"{question} Read the text below.\n\n"
    tail = f"\n{question}"
    frame = rt.encode_prompt(
        [{"role": "user", "content": head + tail}, {"role": "assistant", "content": "X"}]
    )
    needle = NEEDLE.format(passphrase)
    budget = n_tokens - len(frame) - len(rt.tokenizer.encode(needle)) - 4
    body = rt.tokenizer.encode(filler)[:budget]
    cut = int(len(body) * depth)
    text = rt.tokenizer.decode(body[:cut]) + " " + needle + rt.tokenizer.decode(body[cut:])
    messages = [
        {"role": "user", "content": head + text + tail},
        {"role": "assistant", "content": "The secret passphrase is"},
    ]
    return rt.encode_prompt(messages)


class PrefilledContext:
    """A tiered cache prefilled once with all but the last prompt token; `decode` runs a
    few steps under a given selection setting and then rewinds to the prefilled state."""

    def __init__(self, rt: Runtime, ids: list[int]):
        self.rt, self.ids = rt, ids
        self.cache = rt.new_cache()
        assert self.cache.store is not None, (
            "PrefilledContext needs a tiered mode (dense/sparse/auto)"
        )
        prefill(rt.model, self.cache, ids[:-1], rt.config.generation.prefill_chunk)
        self.base = self.cache.num_tokens
        self._policies: dict[str, SparsePolicy] = {}

    def set_selection(self, selection) -> SparsePolicy:
        """Decode under `selection` from now on. One policy (and index) per selector is kept,
        so trying several budgets with the same selector builds its index once."""
        policy = self._policies.get(selection.selector)
        if policy is None:
            a = self.rt.args
            policy = SparsePolicy(selection, a.num_layers, a.num_kv_heads, a.head_dim)
            self._policies[selection.selector] = policy
        policy.selection = selection
        policy.reuse = selection.reuses(self.rt.device)
        self.cache.policy = policy
        for layer in self.cache.layers:
            layer.policy = policy
        if self.cache.prefetcher is not None:
            self.cache.prefetcher.policy = policy
        policy.build_index(self.cache.store, len(self.ids))
        return policy

    def rewind(self) -> None:
        self.cache.truncate(self.base)

    def decode(self, selection, max_new_tokens: int, probe_recall: bool = False):
        """Greedy tokens and the policy's stats (with per-step recall when asked)."""
        policy = self.set_selection(selection)
        policy.stats = SelectionStats(recall=[] if probe_recall else None)
        tok = dataclasses.replace(self.rt.tokenizer, stop_ids=())
        steps = generate_steps(
            self.rt.model, self.cache, tok, self.ids[-1:], max_new_tokens, make_sampler()
        )
        tokens = [s.token_id for s in steps]
        self.rewind()
        return tokens, policy.stats

    def perplexity(self, selection, continuation: list[int]) -> float:
        """Teacher-forced perplexity of `continuation` after the prompt, decoded token by token."""
        self.set_selection(selection)
        model = self.rt.model
        nll = 0.0
        inputs = self.ids[-1:] + continuation[:-1]
        for x, y in zip(inputs, continuation, strict=True):
            logits = model(torch.tensor([x], device=model.device), self.cache)[-1]
            nll -= float(torch.log_softmax(logits, -1)[y])
        self.rewind()
        return math.exp(nll / len(continuation))

    def close(self) -> None:
        self.cache.close()


def sparse_runtime_args(ap) -> None:
    """The eval scripts' model and `selection.reuse` options (`sparse_runtime`)."""
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--reuse", default="auto", choices=REUSE_MODES,
                    help="selection.reuse: every other step reuses the last selection")  # fmt: skip


def sparse_runtime(args) -> Runtime:
    """The model of `sparse_runtime_args`' options, in sparse mode."""
    return Runtime.from_pretrained(args.model, mode="sparse", reuse=args.reuse)


def sparse_variants(base, selectors, budgets) -> list[tuple[str, float, object]]:
    """(selector, budget, selection) for every selector x retrieved-fraction pair."""
    return [
        (
            s,
            b,
            dataclasses.replace(base, mode="sparse", selector=s, retrieved=0, retrieve_fraction=b),
        )
        for s in selectors
        for b in budgets
    ]


def dense_variant(base) -> tuple[str, float, object]:
    return ("dense", 1.0, dataclasses.replace(base, mode="dense"))


class _Clock:
    """A transformers streamer that timestamps every batch of tokens it is handed."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def bench_hf(model, ids: list[int], decode_tokens: int, **generate_kwargs) -> dict:
    """transformers `generate` on `ids`, timed per token; `generate_kwargs` choose its
    cache (e.g. `cache_implementation="static"` or `"offloaded"`)."""
    clock = _Clock()
    x = torch.tensor([ids], device=model.device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=decode_tokens + 1,
            min_new_tokens=decode_tokens + 1, do_sample=False, streamer=clock, pad_token_id=2,
            **generate_kwargs,
        )  # fmt: skip
    # put() is called once with the prompt, then once per generated token.
    first = clock.times[1]
    prefill = first - start
    decode_s = clock.times[-1] - first
    n = len(clock.times) - 2
    return {
        "prefill_seconds": prefill,
        "prefill_tok_s": len(ids) / prefill,
        "decode_ms_per_token": 1000 * decode_s / n,
        "decode_tok_s": n / decode_s,
    }


def decode_steps(cache, model, token: int, n: int) -> tuple[int, list[float]]:
    """`n` greedy steps, each waited for (its token read, so the host's work between
    steps counts) -> the last token, each step's milliseconds."""
    ms = []
    for _ in range(n):
        t = time.perf_counter()
        token = int(cache.decode(model, token).argmax())
        ms.append(1000 * (time.perf_counter() - t))
    return token, ms


def step_figures(timed: list[float], sustained: list[float]) -> dict:
    """The `--tokens` steps' mean; the `--sustained` steps' mean, median and longest."""
    out = {"decode_ms_per_token": statistics.fmean(timed)}
    if sustained:
        out |= {
            "sustained_ms_per_token": statistics.fmean(sustained),
            "sustained_steps": len(sustained),
            "step_ms_median": statistics.median(sustained),
            "step_ms_max": max(sustained),
        }
    return out


def kernel_table(events, calls: int, top: int = 12) -> dict:
    """The GPU kernels of profiler events (`torch.profiler.profile(...).events()`) over
    `calls` calls of what was profiled: per call, their count and summed GPU time, and
    the `top` kernels by time (name, launches and microseconds per call), which says
    what to fuse or replace next."""
    kernels = [e for e in events if e.device_type.name == "CUDA" and "emcpy" not in e.name]
    by_name: dict[str, list] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += e.device_time
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    return {
        "kernels_per_call": len(kernels) / calls,
        "kernel_ms_per_call": sum(e.device_time for e in kernels) / 1000 / calls,
        "top_kernels": [
            {"name": name[:120], "launches": n / calls, "us": round(t / calls, 2)}
            for name, (n, t) in ranked
        ],
    }


def captured(run, calls: int = 1):
    """A CUDA graph of `calls` calls of `run`, captured after one call on a side stream
    (as torch asks: the allocator and lazy initialisations warmed outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            run()
    return graph


def profile_kernels(run, calls: int, per: str) -> dict:
    """The GPU kernels of `run` (which makes `calls` calls), from torch's profiler: launches
    and GPU time per call (keys named `per` it) and the kernels that took most of it. Where
    the profiler cannot record (no CUPTI), why: the row has the rest of its figures."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
    except RuntimeError as e:
        return {"kernels_error": str(e).splitlines()[0][:200]}
    table = kernel_table(prof.events(), calls)
    return {f"kernels_per_{per}": table["kernels_per_call"],
            f"kernel_ms_per_{per}": table["kernel_ms_per_call"], "top_kernels": table["top_kernels"]}  # fmt: skip


def profiled(run, top: int = 25):
    """run() under cProfile -> (its result, the `top` functions with the most cumulative
    time, each "seconds calls file:line(name)")."""
    profiler = cProfile.Profile()
    result = profiler.runcall(run)
    rows = sorted(pstats.Stats(profiler).stats.items(), key=lambda kv: -kv[1][3])[:top]
    return result, [
        f"{ct:.3f} {nc} {Path(f).name}:{line}({name})"
        for (f, line, name), (_, nc, _, ct, _) in rows
    ]


@contextlib.contextmanager
def triton_compiles():
    """{"compile_seconds", "compiled_kernels"} of Triton's compiles in the block (each timed between its
    hooks before and after a compile, a load from its cache on disk included): what a
    fresh machine's first request pays once and a later process reads from the cache.
    Zeros where Triton has no such hooks or runs interpreted."""
    out = {"compile_seconds": 0.0, "compiled_kernels": 0}
    try:
        from triton import knobs

        hooks = knobs.runtime
        saved = hooks.jit_cache_hook, hooks.jit_post_compile_hook
    except (ImportError, AttributeError):
        yield out
        return
    began: dict[int, float] = {}

    def before(*args, **kwargs) -> bool:
        began[threading.get_ident()] = time.perf_counter()
        return False  # (True would skip the compile)

    def after(*args, **kwargs) -> None:
        start = began.pop(threading.get_ident(), None)
        if start is not None:
            out["compile_seconds"] += time.perf_counter() - start
            out["compiled_kernels"] += 1

    hooks.jit_cache_hook, hooks.jit_post_compile_hook = before, after
    try:
        yield out
    finally:
        hooks.jit_cache_hook, hooks.jit_post_compile_hook = saved


def row_error(e: Exception) -> dict:
    """A row that failed: what failed, and where (the run goes on with the next row)."""
    where = traceback.extract_tb(e.__traceback__)[-1]
    first = first_line(e)[:300]
    return {"error": f"{type(e).__name__}: {first}", "at": f"{where.filename}:{where.lineno}"}


def write_json(console, path: Path, payload: dict) -> None:
    """Save a script's results and say where."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {path}")


def plot_decode(results: dict, path: Path, console) -> None:
    """bench_gpu.py's rows: decode ms/token against the context, a line per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for system in dict.fromkeys(r["system"] for r in results["rows"] if r["context"]):
        pts = [(r["context"], r["decode_ms_per_token"]) for r in results["rows"]
               if r["system"] == system and "decode_ms_per_token" in r]  # fmt: skip
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode ms/token")
    ax.set_title(f"{results['shape']} on {results['gpu']}")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    console.print(f"wrote {path}")
