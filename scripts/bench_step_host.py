"""The host's share of a decode step over the tiered store (offload/tiered_step.py):
what `TieredPlan.prepare` and `finish` cost per token, without the forward itself.

On a GPU the forward is one graph replay; the plan's work between replays (sizes and
addresses checked every step; every few chunks the new tokens handed to the store,
then the index updated and its device copy synced over the next steps) adds to each
token's time, since the token is read back before the next step; but for the index
updates, which run in `finish` while the step computes (`hidden_ms_per_token`).
Measured here on a model of the Llama-3.1-8B KV shape (32 layers, 8 KV heads x 128,
bf16) with the `rtx4090-llama3.1-8b` preset's selection, over random KV of --tokens
tokens.

    python scripts/bench_step_host.py [--tokens 10240] [--steps 512] [--layers 32]
        [--out results/bench_step_host.json]

On a CPU the step is driven as CUDA drives it (fixed shapes, dense layers mirrored)
with the kernels' references; on CUDA each step's device work is awaited before its
time is taken. `flush_ops` counts the torch calls of one hand-over (on CUDA most are
launches); `flush_step_profile` lists the functions that a step with a
hand-over spends its host time in (cProfile), `index_step_profile` those of the step
after it, whose index updates run while the device computes the step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from torch.utils._python_dispatch import TorchDispatchMode

from offload import Runtime
from offload.backend import Backend
from offload.config import RuntimeConfig
from offload.loading import LoadedModel
from offload.model import Transformer
from offload.model_args import ModelArgs

PRESET = Path(__file__).resolve().parent.parent / "offload" / "configs" / "rtx4090-llama3.1-8b.toml"


class CountCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


def tiered_cache(tokens: int, disk: Path, layers: int = 32):
    """A tiered cache of `tokens` random tokens of the 8B KV shape, decoding through the
    fixed-shape step (the model is thin: its weights are never used here)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a = ModelArgs(arch="llama", max_seq_len=131072, dim=1024, num_layers=layers, num_heads=8,
                  num_kv_heads=8, head_dim=128, hidden_dim=256, vocab_size=1000)  # fmt: skip
    model = Transformer(a).fuse().to(device, torch.bfloat16)
    loaded = LoadedModel(model, None, a, Path("synthetic"), "synthetic")
    config = RuntimeConfig.from_toml(PRESET).replace(
        device=device.type, mode="sparse", prefetch="cache", disk_dir=str(disk)
    )
    rt = Runtime(loaded, config, device)
    cuda = device.type == "cuda"
    rt.backend = Backend(device, kernels=cuda, fixed_shape=True, graphs=cuda, remote_host=True)
    cache = rt.new_cache(tiered=True)
    gen = torch.Generator(device=device).manual_seed(1)
    for start in range(0, tokens, 4096):
        n = min(4096, tokens - start)
        for layer in cache.layers:
            k, v = (torch.randn(8, n, 128, generator=gen, device=device) for _ in range(2))
            layer.append(k.bfloat16() + 2.0, v.bfloat16())
        cache.advance(n)
    cache.finish_prefill()
    return cache


def step(cache, sync) -> tuple[float, float]:
    """One step's plan work (the window write of the forward stands in for it)."""
    plan, n = cache.step.plan, cache.num_tokens
    t0 = time.perf_counter()
    assert plan.prepare(n) is not None, "the fixed-shape step does not apply"
    sync()
    t1 = time.perf_counter()
    for i in plan.dense:
        cache.layers[i].mirror.k.data[:, n] = 1
    plan.finish(n + 1)
    cache.num_tokens += 1
    sync()
    return t1 - t0, time.perf_counter() - t1


def timed(obj, name: str, sync) -> list[float]:
    """Wrap `obj.name` to record each call's seconds into the list returned."""
    seconds, method = [], getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        out = method(*a, **k)
        sync()
        seconds.append(time.perf_counter() - t)
        return out

    setattr(obj, name, wrapper)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=10240)
    p.add_argument("--steps", type=int, default=512)
    p.add_argument("--layers", type=int, default=32, help="fewer: a long context on a small host")
    p.add_argument("--out", type=Path, default=Path("results/bench_step_host.json"))
    args = p.parse_args()
    console = Console()
    from evalkit import profiled, write_json  # (scripts/ is on sys.path when run as a script)

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with tempfile.TemporaryDirectory() as disk:
        t = time.perf_counter()
        cache = tiered_cache(args.tokens, Path(disk), args.layers)
        console.print(f"filled and indexed {args.tokens} tokens in {time.perf_counter() - t:.1f} s")
        for _ in range(4):
            step(cache, sync)
        plan = cache.step.plan
        parts = {
            "flush": timed(plan, "_hand_over", sync),
            "index": timed(cache.policy, "update", sync),
        }
        times, overlapped = [], []  # (steps' finish without a hand-over: see `hidden_ms...`)
        for _ in range(args.steps):
            handed = len(parts["flush"])
            times.append(step(cache, sync))
            if len(parts["flush"]) == handed:
                overlapped.append(1000 * times[-1][1])
        flushes = [1000 * x for x in parts["flush"]]  # (a rare one grows buffers: median)
        parts = {key: 1000 * sum(seconds) / args.steps for key, seconds in parts.items()}
        while (cache.num_tokens + 1) % 64:  # to the step before a hand-over
            step(cache, sync)
        plan.prepare(cache.num_tokens)
        with CountCalls() as counted:
            plan._hand_over(cache.num_tokens + 1)
        while (cache.num_tokens + 1) % 256:  # to the step before a hand-over whose tokens
            # the index takes in (its refresh: 256 tokens)
            step(cache, sync)
        _, flush_profile = profiled(lambda: step(cache, sync), top=20)
        _, index_profile = profiled(lambda: step(cache, sync), top=12)
        cache.close()
    prepare, finish = ([1000 * x for x in col] for col in zip(*times, strict=True))

    out = {
        "device": str(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"),
        "tokens": args.tokens,
        "layers": args.layers,
        "steps": args.steps,
        "host_ms_per_token": statistics.fmean(a + b for a, b in zip(prepare, finish, strict=True)),
        # of which, on a GPU, runs while the step does (`finish` of a step that hands
        # nothing over: the index updates, offload/tiered_step.py), so hidden behind a step
        # longer than it
        "hidden_ms_per_token": sum(overlapped) / args.steps,
        "prepare_ms_mean": statistics.fmean(prepare),
        "finish_ms_mean": statistics.fmean(finish),
        "finish_ms_median": statistics.median(finish),
        "finish_ms_max": max(finish),
        # of the two: handing tokens to the store; updating the index and its device copy
        "flush_ms_per_token": parts["flush"],
        "flush_ms_median": statistics.median(flushes) if flushes else None,  # (one per 64 steps)
        "flushes": len(flushes),
        "index_ms_per_token": parts["index"],
        "flush_ops": sum(counted.calls.values()),
        "flush_top_ops": dict(counted.calls.most_common(8)),
        # a step with a hand-over under cProfile, and the step after it (its first index
        # updates): where their host time goes
        "flush_step_profile": flush_profile,
        "index_step_profile": index_profile,
    }
    console.print(out)
    write_json(console, args.out, out)


if __name__ == "__main__":
    main()
