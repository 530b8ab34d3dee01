"""GPU benchmark: decode ms/token, prefill seconds and peak device memory, every system
in one run, on a random-weight Llama-3.1-8B-shaped model; plus the embedded model's
decode tokens/s on the GPU.

    python scripts/bench_gpu.py [--lengths 8192,32768,131072] [--tokens 32]
        [--systems device,offloaded,tiered,session,embedded,hf,hf-static,hf-offloaded,
                   device-compiled,offloaded-compiled,embedded-compiled,
                   device-torch-ops,embedded-torch-ops,device-int4,offloaded-int4]
        [--shape llama-8b|qwen-14b] [--fill-above 32768] [--session-lengths 8192,131072]
        [--session-dir /tmp/offload-bench-session] [--out results/bench_gpu.json]
        [--plot docs/gpu_decode_ms_per_token.png] [--set hit_cache=4.0 ...]
        [--profile-question]

Systems:
  device        ours, all KV on the device (`mode = "full"`): each decode step one CUDA
                graph replay (offload/graphs.py)
  offloaded     ours with the rtx4090-llama3.1-8b preset (mode "auto"): the KV on the
                device while it fits the preset's 6 GiB (47,662 tokens), beyond that in
                pinned host memory, dense layers mirrored on the device, sparse layers
                select 2048 tokens per KV head on the device and gather them straight
                from host memory (offload/tiered_step.py); a prompt past the bound is
                prefilled layer by layer. Above `--fill-above` tokens its KV is written
                straight into the cache instead (random K/V, index built), and its
                prefill seconds are then not reported.
  tiered        the same preset with `mode = "sparse"`: the tiered path at the lengths
                where "auto" keeps the KV on the device (skipped above the bound, where
                `offloaded` is this path)
  embedded      the embedded SmolLM2-135M with the default config, an 8k prompt
  *-compiled    device, offloaded, embedded with `model.compile_step = true`: the step
                goes through torch.compile before it is captured (the compile falls in
                the warm-up steps, whose seconds the rows report)
  *-int4        device, offloaded, tiered with the block linears at int4, quantized on
                the device (`model.weights = "int4"`, offload/kernels/int4.py)
  *-torch-ops   device, embedded with the layers' norms, RoPE and SwiGLU in torch's
                operations instead of their Triton kernels (offload/kernels/layer.py):
                what those kernels gain
  hf            transformers `generate`, DynamicCache on the GPU
  hf-static     ... StaticCache with its decode step compiled (lengths <= 32k)
  hf-offloaded  ... its offloaded cache (every layer's KV moves every step)
  session       ours offloaded: a session of each `--session-lengths` is saved, loaded
                in a fresh runtime, and asked a new 24-token question at once: load
                seconds and time to its first token; then, once the session is read into
                host memory (the rest of that read timed), another new question (the
                embedded model's tokenizer; random KV above `--fill-above`). Written
                under `--session-dir` and removed after. The peak device memory of the
                load and of the questions beside the row's; `--profile-question`: where
                the host time of a load and of a question asked at once goes (cProfile,
                over another load and question after the row's own, unprofiled ones).

`--set KEY=VALUE` changes the preset's config (offloaded, tiered, session rows), as
`offload --set` does; the JSON records it.

Random token ids (speed does not depend on them); greedy decoding. Each figure is
the mean over `--tokens` steps after two warm-up steps (capture happens there). Our
rows then decode `--sustained` more steps (256: the hand-overs of the steps' tokens to
the store and an index refresh fall in them, as they do in every 256 tokens of an
answer, while the first `--tokens` steps may hold none): `sustained_ms_per_token` is their mean,
with the median and the longest step (a hand-over's pause). Where the steps reuse
selections (`selection.reuse`, on with CUDA), the row's cache then runs as many steps
again without the reusing steps' side-stream fetch (`without_side_fetch`), then with
every step selecting (`without_reuse`): the same figures.
Needs a CUDA GPU; `--shape tiny --lengths 512` runs a smoke test anywhere.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evalkit  # noqa: E402
from evalkit import (  # noqa: E402
    SHAPES,
    bench_hf,
    decode_steps,
    device_of,
    plot_decode,
    profile_kernels,
    profiled,
    row_error,
    step_figures,
    synthetic_runtime,
    write_json,
)

from offload import Runtime  # noqa: E402
from offload.config import RuntimeConfig  # noqa: E402
from offload.generate import layer_times, prefill  # noqa: E402
from offload.kernels import layer as layer_kernels  # noqa: E402
from offload.model_args import ModelArgs  # noqa: E402
from offload.plan import plan_for_config  # noqa: E402

OFFLOADED_PRESET = "rtx4090-llama3.1-8b"
HF_STATIC_MAX = 32768


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def fill_kv(cache, num_tokens: int, args: ModelArgs) -> None:
    """Random K/V straight into every layer of a cache (keys share a direction so
    attention is peaked, as in real models), then the index is built."""
    gen = torch.Generator(device=device_of()).manual_seed(1)
    H, D = args.num_kv_heads, args.head_dim
    for start in range(0, num_tokens, 4096):
        n = min(4096, num_tokens - start)
        cache.make_room(n)  # a device cache past its budget moves to the tiers here
        for layer in cache.layers:
            k = torch.randn(H, n, D, generator=gen, device=device_of()).to(torch.bfloat16)
            v = torch.randn(H, n, D, generator=gen, device=device_of()).to(torch.bfloat16)
            layer.append(k + 2.0, v)
        cache.advance(n)
    cache.finish_prefill()


def bench_ours(rt: Runtime, length: int, tokens: int, fill: bool, sustained: int = 0) -> dict:
    reset_peak()
    cache = rt.new_cache()
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, rt.args.vocab_size, (length,), generator=gen).tolist()
    sync()
    t = time.perf_counter()
    if fill:
        fill_kv(cache, length - 1, rt.args)
        logits = cache.decode(rt.model, ids[-1])
    else:
        logits = prefill(rt.model, cache, ids, rt.config.generation.prefill_chunk)
        cache.finish_prefill()
    sync()
    prefill_s = time.perf_counter() - t
    # a layer-by-layer prefill: the layers' compute, and the GPU's idle time between them
    # (the hand-overs that did not hide behind the next layer, the host's lateness)
    layers = layer_times(cache) or {}
    token = int(logits.argmax())
    with cache.decoding():
        t = time.perf_counter()  # warm-up: graph capture, Triton compilation (torch.compile)
        token, _ = decode_steps(cache, rt.model, token, 2)
        warmup_s = time.perf_counter() - t
        token, timed = decode_steps(cache, rt.model, token, tokens)
        kernels = step_kernels(cache, rt.model, token)
        token, steps_ms = decode_steps(cache, rt.model, token, sustained)
        policy = cache.policy
        reused_share = policy.stats.reused_share if policy is not None else None
        # The same steps again in this cache (no second prefill) with a part turned off where
        # it was on: a reusing step's side-stream fetch, then reuse (reused_steps 0)
        without, plan = {}, getattr(cache.step, "plan", None)
        for name, owner, part in (("without_side_fetch", plan, "side_fetch"),
                                  ("without_reuse", policy, "reuse")):  # fmt: skip
            if sustained and getattr(owner, part, False):
                setattr(owner, part, False)
                before = policy.stats.reused_steps
                token, _ = decode_steps(cache, rt.model, token, 2)  # (a capture)
                token, timed_off = decode_steps(cache, rt.model, token, tokens)
                token, off = decode_steps(cache, rt.model, token, sustained)
                without[name] = step_figures(timed_off, off)
                without[name]["reused_steps"] = policy.stats.reused_steps - before
    # what `offload plan` predicts for this context with this config (decode; the
    # layer-by-layer prefill's peak), beside the measured peak
    p = plan_for_config(rt.args, length, 0, 0, rt.config)
    # (where the KV stays on the device: the weights, the reserve, the KV and its room)
    tiered, GiB = cache.store is not None, 2**30
    out = {
        **step_figures(timed, steps_ms),
        "warmup_seconds": warmup_s,
        "prefill_seconds": None if fill else prefill_s,
        "prefill_layers_ms": layers.get("layers_ms"),
        "prefill_between_layers_ms": layers.get("between_layers_ms"),
        "peak_device_gib": peak_gib(),
        "plan_device_gib": (p.tier_total("device") if tiered else p.resident_device_bytes) / GiB,
        "plan_prefill_peak_gib": p.prefill_peak_bytes / GiB if tiered else None,
        "captures": cache.step.captures if cache.step is not None else 0,
        # the index builds' host time (with the device's work it waits for: the k-means)
        "index_seconds": cache.policy.stats.index_seconds if cache.policy is not None else None,
        "reused_share": reused_share,
        **without,
        "kv": "tiers" if tiered else "device",
        "kv_filled": fill,
        **kernels,
    }
    cache.close()
    return out


def step_kernels(cache, model, token: int, steps: int = 4) -> dict:
    """GPU kernels per decode step and their summed GPU time, from the profiler over a
    few steps: many kernels whose time is small against the step's means the step is
    bound by their count, not by memory (docs/gpu.md, "What a step launches"). (Where
    the profiler records a graph replay as one event, the count says so: about one.)"""
    if device_of().type != "cuda":
        return {}

    return profile_kernels(lambda: decode_steps(cache, model, token, steps), steps, "step")


def bench_session(rt: Runtime, length: int, fill: bool, path: Path, profile: bool = False) -> dict:
    """A saved session of `length` tokens: save, load in a fresh runtime, and the time
    to the first token of a new 24-token question asked at once, and of another after
    the session is read into host memory."""
    from offload.conversation import KVState

    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, rt.args.vocab_size, (length,), generator=gen).tolist()
    cache = rt.new_cache(tiered=True)
    t = time.perf_counter()
    if fill:
        fill_kv(cache, length, rt.args)
    else:
        prefill(rt.model, cache, ids, rt.config.generation.prefill_chunk)
        cache.finish_prefill()
    sync()
    made_s = time.perf_counter() - t
    layers = layer_times(cache) or {}
    rt._state.cache.close()
    rt._state = KVState(cache)
    rt._state.ids = list(ids)
    t = time.perf_counter()
    saved = rt.save_session(path)
    save_s = time.perf_counter() - t
    rt._state.cache.close()
    reset_peak()
    t = time.perf_counter()
    # With this run's config: a session's own leaves out the machine's budgets, and on a
    # large GPU the free memory would then take a 128k session into the device cache, as
    # it did on an H200 (not the 24 GB card the preset is for).
    loaded = Runtime.load_session(path, config=rt.config, model=rt)
    sync()
    load_s = time.perf_counter() - t
    load_peak = peak_gib()
    reset_peak()

    first_s, first_parts = _first_token(loaded, ids, gen)  # asked at once: the warmer reads too
    question_peak = peak_gib()
    t = time.perf_counter()
    store = loaded._state.cache.store
    if store is not None:
        store.warm().wait()  # the rest of the read-in (storage/warm.py)
    warm_s = time.perf_counter() - t
    reset_peak()
    warm_first_s, warm_parts = _first_token(loaded, ids, gen)  # a question after the read-in
    loaded._state.cache.close()
    peaks = [load_peak, question_peak, peak_gib()]
    profiles = {}
    if profile:  # where the time goes: another load, and a question asked at once after
        # it, each under cProfile (the row's own figures are not slowed by the profiler,
        # nor lost where the profiling fails)
        from offload.session import load_state  # (`load_session` runs it on a thread)

        again = None
        try:
            again, profiles["load_profile"] = profiled(lambda: load_state(path, rt.config, rt))
            _, profiles["question_profile"] = profiled(lambda: _first_token(again, ids, gen))
        except Exception as e:
            profiles["profile_error"] = row_error(e)  # (what failed, and where)
        finally:
            if again is not None:
                again._state.cache.close()
    return {"prefill_seconds": None if fill else made_s,
            "prefill_between_layers_ms": layers.get("between_layers_ms"), "save_seconds": save_s,
            "session_gib": saved["bytes"] / 2**30, "load_seconds": load_s,
            "question_first_token_seconds": first_s, "ttft_seconds": load_s + first_s,
            "warm_rest_seconds": warm_s, "warm_question_first_token_seconds": warm_first_s,
            "question_parts": first_parts, "warm_question_parts": warm_parts,
            "peak_device_gib": None if peaks[0] is None else max(peaks),
            "load_peak_gib": peaks[0], "question_peak_gib": peaks[1],
            "warm_question_peak_gib": peaks[2], "kv_filled": fill,
            **profiles}  # fmt: skip


def _first_token(rt: Runtime, ids: list[int], gen: torch.Generator) -> tuple[float, dict]:
    """Seconds to the first token of a new 24-token question after `ids`, and where they
    went: the selection and the fetch of the far tokens (host time: a fetch from files
    includes their reads and the pinning of host memory), the index updates, the bytes
    each tier served, and Triton's compiles (a fresh machine's first question compiles
    the prefill chunk's kernels; a later process loads them from Triton's cache)."""
    question = torch.randint(0, rt.args.vocab_size, (24,), generator=gen).tolist()
    cache = rt._state.cache
    tiered = cache.store is not None  # (a session that fits the device cache went there)
    with evalkit.triton_compiles() as compiles:
        t = time.perf_counter()
        steps = rt._run(rt._state, ids + question, 1, {}, None)
        next(steps)
        sync()
        seconds = time.perf_counter() - t
    steps.close()
    parts: dict = {"kv": "tiers" if tiered else "device", **compiles}
    if tiered:  # (a request starts its own counts: `Runtime._run`)
        st = cache.policy.stats
        parts.update({k: getattr(st, k) for k in ("selection_seconds", "fetch_seconds",
                                                  "index_seconds")})  # fmt: skip
        for tier, n in cache.store.reads.nbytes.items():
            parts[f"{tier}_read_gib"] = n / 2**30
    return seconds, parts


def bench_embedded(tokens: int, compile_step: bool = False, torch_ops: bool = False) -> dict:
    rt = Runtime.from_pretrained("smollm2", compile_step=compile_step)
    if torch_ops:
        rt.model.use_ops(layer_kernels.REFERENCE)
    t = time.perf_counter()
    rt.generate("Hello.", max_new_tokens=4)  # warm-up: Triton's and torch.compile's compiles
    warmup_s = time.perf_counter() - t
    # 8,000 tokens of prompt (30,000 characters of it were 5,546 tokens: short of the
    # issue's 8k), and room in the 8,192-token window for the chat template and the reply
    ids = rt.tokenizer.encode("The river carries light over seven quiet stones. " * 1200)[:8000]
    text = rt.tokenizer.decode(ids)
    steps = list(rt.stream(text + "\nSummarize.", max_new_tokens=tokens + 1))
    s = rt.stats()
    return {"prompt_tokens": s["prompt_tokens"], "decode_tokens": len(steps),
            "decode_tok_s": s["decode_tokens_per_second"],
            "prefill_seconds": s["prefill_seconds"], "warmup_seconds": warmup_s,
            "kv_on_device": rt._state.cache.store is None}  # fmt: skip


def hf_model(shape: str, max_len: int):
    import transformers

    s = SHAPES[shape]
    config = transformers.LlamaConfig(
        hidden_size=s["dim"], num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"], head_dim=s["head_dim"],
        intermediate_size=s["hidden_dim"], vocab_size=s["vocab_size"],
        rope_theta=s.get("rope_theta", 10000.0), max_position_embeddings=max_len,
    )  # fmt: skip
    with torch.device(device_of()):
        model = transformers.LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16)
    return model.eval()


HF_CACHES = {"hf": {}, "hf-static": {"cache_implementation": "static"},
             "hf-offloaded": {"cache_implementation": "offloaded"}}  # fmt: skip
OURS = ("device", "offloaded", "tiered")
SYSTEMS = {*OURS, *(f"{s}-compiled" for s in OURS), *(f"{s}-int4" for s in OURS),
           "device-torch-ops", "session", "embedded",
           "embedded-compiled", "embedded-torch-ops", *HF_CACHES}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--sustained", type=int, default=256, help="our rows' further steps")
    p.add_argument(
        "--systems",
        default="device,offloaded,tiered,session,embedded,hf,hf-static,hf-offloaded",
    )
    p.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    p.add_argument("--fill-above", type=int, default=32768)
    p.add_argument("--session-lengths", default="8192,131072")
    p.add_argument("--session-dir", type=Path, default=Path("/tmp/offload-bench-session"))
    p.add_argument("--out", type=Path, default=Path("results/bench_gpu.json"))
    p.add_argument("--plot", type=Path, default=Path("docs/gpu_decode_ms_per_token.png"))
    p.add_argument("--kernel-settings", type=Path, help="scripts/sweep_selection.py's results: "
                   "its fastest launch settings are used (where the file exists)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a change to the preset's config (offloaded, tiered, session)")  # fmt: skip
    p.add_argument("--profile-question", action="store_true",
                   help="the session rows: another load and question at once, under cProfile")  # fmt: skip
    args = p.parse_args()
    console = Console()
    lengths = [int(x) for x in args.lengths.split(",")]
    systems = args.systems.split(",")
    if unknown := [s for s in systems if s not in SYSTEMS]:
        p.error(f"--systems: unknown {', '.join(unknown)} (known: {', '.join(sorted(SYSTEMS))})")
    max_len = max(lengths) + 3 * (args.tokens + args.sustained + 2) + 8  # (bench_ours' passes)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    results: dict = {"gpu": gpu, "shape": args.shape, "tokens": args.tokens, "rows": []}
    preset = RuntimeConfig.from_toml(OFFLOADED_PRESET)
    if args.set:
        from cli.main import parse_overrides

        results["set"] = parse_overrides(tuple(args.set))
        preset = preset.replace(**results["set"])
    if args.kernel_settings and args.kernel_settings.exists():
        from sweep_selection import apply_best

        results["kernel_settings"] = apply_best(args.kernel_settings)
        console.print("kernel settings", results["kernel_settings"])

    def record(system: str, length: int | None, figures: dict) -> None:
        row = {"system": system, "context": length, **figures}
        results["rows"].append(row)
        console.print(row)
        write_json(console, args.out, results)  # after every row: a crash keeps the rest

    ours = [s for s in systems if s.split("-")[0] in OURS]
    for system in ours:
        if system.startswith("device"):
            config = RuntimeConfig().replace(mode="full")
        else:
            config = preset
            if system.startswith("tiered"):
                config = config.replace(mode="sparse")
        if system.endswith("-compiled"):
            config = config.replace(compile_step=True)
        if device_of().type != "cuda":
            config = config.replace(device="cpu", dtype="bfloat16")
        rt = synthetic_runtime(args.shape, max_len, config, int4=system.endswith("-int4"))
        if system.endswith("-torch-ops"):
            rt.model.use_ops(layer_kernels.REFERENCE)
        for n in lengths:
            if system.startswith("tiered") and n > rt.device_kv_tokens():
                continue
            fill = not system.startswith("device") and n > args.fill_above
            try:
                record(system, n, bench_ours(rt, n, args.tokens, fill, args.sustained))
            except Exception as e:  # (a row's failure must not cost the rest of the run)
                record(system, n, row_error(e))
        del rt
        reset_peak()
    if "session" in systems:
        import shutil

        config = preset
        if device_of().type != "cuda":
            config = config.replace(device="cpu", dtype="bfloat16")
        tok = Runtime.from_pretrained("smollm2", device="cpu").tokenizer
        session_lengths = [int(x) for x in args.session_lengths.split(",")]
        rt = synthetic_runtime(args.shape, max(session_lengths) + 64, config, tok)
        for n in session_lengths:
            path = args.session_dir / f"s{n}"
            try:
                figures = bench_session(rt, n, n > args.fill_above, path, args.profile_question)
                record("session", n, figures)
            except Exception as e:
                record("session", n, row_error(e))
            finally:
                shutil.rmtree(path, ignore_errors=True)
        del rt
        reset_peak()
    for system in [s for s in systems if s.startswith("embedded")]:
        try:
            figures = bench_embedded(
                args.tokens * 4, system.endswith("-compiled"), system.endswith("-torch-ops")
            )
        except Exception as e:
            figures = row_error(e)
        record(system, None, figures)
    for system in [s for s in systems if s in HF_CACHES]:
        model = hf_model(args.shape, max_len)
        for n in lengths:
            if system == "hf-static" and n > HF_STATIC_MAX:
                continue
            reset_peak()
            gen = torch.Generator().manual_seed(n)
            ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (n,), generator=gen).tolist()
            try:
                figures = bench_hf(model, ids, args.tokens, **HF_CACHES[system])
                record(system, n, {**figures, "peak_device_gib": peak_gib()})
            except Exception as e:  # (a row's failure must not cost the rest of the run)
                record(system, n, row_error(e))
        del model
        reset_peak()
    table = Table(title=f"decode ms/token, {args.shape}, {gpu}")
    cols = ("system", "context", "decode ms/token", "sustained", "prefill s", "first token s",
            "peak GiB")  # fmt: skip
    for col in cols:
        table.add_column(col)
    for r in results["rows"]:
        fmt = lambda v: "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
        table.add_row(r["system"], fmt(r["context"]), fmt(r.get("decode_ms_per_token", r.get("error"))),
                      fmt(r.get("sustained_ms_per_token")), fmt(r.get("prefill_seconds")), fmt(r.get("ttft_seconds")),
                      fmt(r.get("peak_device_gib")))  # fmt: skip
    console.print(table)
    plot_decode(results, args.plot, console)


if __name__ == "__main__":
    main()
