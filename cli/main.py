"""`offload` command line: parse, call the library, render with rich. Nothing else."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.inputs import read_prompt, read_questions
from cli.interrupts import interrupt_flag
from cli.loading import load_runtime, load_session_runtime, parse_overrides
from cli.render import PrefillBar, cut_note, decode_rate, thinking_stream
from offload import __version__
from offload.config import DEFAULT_MODEL, human_bytes
from offload.documents import read_documents
from offload.errors import OffloadError
from offload.thinking import ThinkingStream, split_thinking, thinks
from storage.errors import StorageError

err_console = Console(stderr=True)


def friendly_errors(fn):
    """Turn the runtime's own errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (OffloadError, StorageError) as e:
            err_console.print(
                f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True
            )
            sys.exit(2)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)

    return wrapper


def model_options(fn):
    fn = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override a config key, e.g. --set dtype=float32 (repeatable).",
    )(fn)  # fmt: skip
    fn = click.option(
        "--config", "-c", default=None, help="TOML file or preset name in offload/configs/."
    )(fn)
    fn = click.option(
        "--model", "-m", default=DEFAULT_MODEL, show_default=True,
        help="HF model directory, .gguf file, or embedded model name.",
    )(fn)  # fmt: skip
    return fn


def print_steps(steps, window: int, thinking: ThinkingStream | None = None) -> None:
    """Stream generated text to stdout as it comes, then end the line. An answer cut at
    the token limit or the context window (`window`) says so on stderr (stdout keeps only
    the answer, for pipes). On a terminal, the think block `thinking` finds is dimmed."""
    step = None
    dim = thinking if thinking is not None and sys.stdout.isatty() else ThinkingStream(False)

    def write(runs) -> None:
        for text, inside in runs:
            sys.stdout.write(f"\x1b[2m{text}\x1b[22m" if inside else text)
        sys.stdout.flush()

    with interrupt_flag() as interrupted:
        for step in steps:
            write(dim.feed(step.text))
            if interrupted.is_set():
                raise KeyboardInterrupt
    write(dim.flush())
    sys.stdout.write("\n")
    sys.stdout.flush()  # (the answer's end too, for a program reading it a line at a time)
    note = cut_note(step, window)
    if note:
        err_console.print(note)


def closed_streams() -> None:
    """A standard stream the caller closed (`<&-`, `2>&-`: Python's is then None) reads as
    empty (stdin) or swallows what is written (stderr); without standard output there is
    nowhere to answer: one error, on stderr."""
    if sys.stdin is None:
        sys.stdin = open(os.devnull)  # noqa: SIM115 (for the process's life)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    if sys.stdout is None:
        err_console.print("[bold red]error:[/] standard output is closed: offload writes "
                          "its answers there", highlight=False, soft_wrap=True)  # fmt: skip
        sys.exit(2)


class OneLineErrors(click.Group):
    """Usage errors as one line on stderr with exit code 2, as every other error is
    (click's own are four: usage, hint, blank line, error)."""

    def main(self, args=None, prog_name=None, **kwargs):
        kwargs["standalone_mode"] = False
        closed_streams()
        try:
            rv = super().main(args, prog_name or "offload", **kwargs)
        except click.UsageError as e:
            cmd = e.ctx.command_path if e.ctx else "offload"
            err_console.print(
                f"[bold red]error:[/] {escape(e.format_message())} (see {cmd} --help)",
                highlight=False, soft_wrap=True,
            )  # fmt: skip
            sys.exit(2)
        except click.Abort:
            err_console.print("interrupted")
            sys.exit(130)
        except click.ClickException as e:  # FileError and such
            err_console.print(f"[bold red]error:[/] {escape(e.format_message())}", highlight=False)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="offload", message="%(prog)s %(version)s")
def main():
    """offload: long-context LLM inference with a tiered KV cache."""
    # SIGTERM exits as Ctrl-C would: finalizers remove this process's spilled KV files
    # (a SIGKILL's leftovers are removed by the next process that spills to the folder).
    signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def sampling_options(fn):
    """The usual generation flags (llama.cpp's and ollama's names), each optional: an
    unset flag keeps the config's value."""
    for decl, kw in reversed([
        (("--max-tokens", "--max-new-tokens", "-n", "max_new_tokens"),
         dict(type=click.IntRange(1), help="Most tokens to generate.")),
        (("--temperature", "-t"), dict(type=click.FloatRange(0), help="0: greedy.")),
        (("--top-k",), dict(type=click.IntRange(0), help="Keep the k likeliest (0: all).")),
        (("--top-p",), dict(type=click.FloatRange(0, 1, min_open=True), help="Nucleus mass.")),
        (("--min-p",), dict(type=click.FloatRange(0, 1),
                            help="Keep tokens at least this times as likely as the likeliest.")),
        (("--seed",), dict(type=click.IntRange(0, 2**63 - 1), help="Sampling seed.")),
        (("--repeat-penalty",), dict(type=click.FloatRange(0, 100, min_open=True),
                                     help="> 1 discourages repeating the last 64 tokens.")),
        (("--stop",), dict(multiple=True, help="End the answer at this text (repeatable).")),
        (("--threads",), dict(type=click.IntRange(0), help="CPU threads (0: one per core other processes leave free, followed as they change).")),
    ]):  # fmt: skip
        fn = click.option(*decl, default=None, **kw)(fn)
    return fn


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "seed", "repeat_penalty")


def split_sampling(opts: dict, overrides: tuple[str, ...]):
    """(sampling kwargs for a request, --set overrides with --threads added)."""
    sampling = {k: opts[k] for k in SAMPLING_FLAGS if opts.get(k) is not None}
    if opts.get("stop"):
        sampling["stop"] = list(opts["stop"])
    if opts.get("threads") is not None:
        overrides = (*overrides, f"threads={opts['threads']}")
    return sampling, overrides


def json_answer(steps: list, rt) -> dict:
    """An answer of `rt` as `--json` prints it: its text, why it ended, and the request's
    figures that JSON takes as they are (numbers and strings). A reasoning model's think
    block is given apart, as `thinking`, and `text` is the answer after it."""
    text, thought, stats = "".join(st.text for st in steps), None, rt.stats()
    if thinks(rt.tokenizer):
        thought, text = split_thinking(text)
    return {"text": text, **({"thinking": thought} if thought is not None else {}),
            "finish_reason": steps[-1].finish_reason if steps else None,
            "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}}  # fmt: skip


@main.command()
@model_options
@sampling_options
@click.option("--system", "-s", default=None, help="System prompt.")
@click.option("--file", "-f", "files", multiple=True,
              help="Put this file's text before the prompt (repeatable).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text and stats.")
@click.argument("prompt", required=False)
@friendly_errors
def generate(model, config, overrides, system, files, as_json, prompt, max_new_tokens, **opts):
    """Stream the answer to PROMPT (one user turn) to stdout.

    PROMPT may be "-" or left out to read it from standard input."""
    text = read_prompt(prompt, files)
    sampling, overrides = split_sampling(opts, overrides)
    rt = load_runtime(model, config, overrides)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    if as_json:
        out = list(rt.stream(messages, max_new_tokens=max_new_tokens, **sampling))
        json.dump(json_answer(out, rt), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    bar = PrefillBar(err_console)
    try:
        steps = rt.stream(messages, max_new_tokens=max_new_tokens, progress=bar, **sampling)
        print_steps(steps, rt.args.max_seq_len, thinking_stream(rt))
    finally:
        bar.close()
    s = rt.stats()
    err_console.print(
        f"[dim]{s['prefill_tokens']} prompt tokens at {s['prefill_tokens_per_second']:.0f} tok/s, "
        f"{s['decode_tokens']} generated{decode_rate(s, ' at ')}[/]"
    )


@main.command()
@model_options
@sampling_options
@click.option("--system", "-s", default=None, help="System prompt.")
@click.option(
    "--session", "--resume", "session_dir", default=None,
    help="Resume a chat saved with /save DIR, or chat about a document saved by ingest.",
)  # fmt: skip
@friendly_errors
def chat(model, config, overrides, system, session_dir, max_new_tokens, **opts):
    """Multi-turn chat; earlier turns' KV is reused.

    Commands: /reset /stats /save DIR /file PATH [text] /exit; Ctrl-C stops an answer."""
    from cli.chat import run_chat

    sampling, overrides = split_sampling(opts, overrides)
    console = Console()
    if session_dir:
        rt = load_session_runtime(session_dir, model, config, overrides)
        if rt.session.get("kind") == "chat":
            conv = rt.resume_chat()
            console.print(
                f"[dim]resumed {len(conv.messages)} messages, {conv.context_tokens} tokens of KV[/]"
            )
        elif rt.document is not None:
            conv = rt.chat_about_document()
            console.print(
                f"[dim]chatting about the document of {escape(session_dir)} "
                f"({conv.context_tokens} tokens of KV): the first turn asks about it[/]"
            )
        else:
            raise OffloadError(f"{session_dir} is a {rt.session.get('kind')} session")
    else:
        rt = load_runtime(model, config, overrides)
        conv = rt.chat(system=system)
    run_chat(rt, conv, console, max_new_tokens, sampling)


@main.command()
@model_options
@click.argument("files", nargs=-1, required=True)
@click.option("--session", "session_dir", required=True, help="Directory to save the session in.")
@click.option("--system", default=None, help="System prompt saved with the document.")
@click.option("--replace", is_flag=True, help="Replace a session already in that directory.")
@friendly_errors
def ingest(model, config, overrides, files, session_dir, system, replace):
    """Prefill FILES once and save their KV, summaries and index as a session."""
    from storage.errors import SessionExistsError
    from storage.saving import check_space
    from storage.session import check_dir

    text = read_documents(files)
    try:  # fail before the long prefill, not after; create nothing yet
        check_dir(Path(session_dir), replace)
    except SessionExistsError as e:
        raise e.hinted(": pass --replace to replace it") from None
    rt = load_runtime(model, config, overrides)
    # (the document's ids are kept for its prefill: encoded once; one too long for the
    # model is refused as such by the prefill)
    tokens = len(rt.prompts.document_ids({"text": text, "system": system}))
    if tokens < rt.args.max_seq_len:
        check_space(Path(session_dir), rt.layout.session_bytes(tokens))
    bar = PrefillBar(err_console)
    t = time.perf_counter()
    try:
        info = rt.load_document(text, system=system, progress=bar)
    finally:
        bar.close()
    with err_console.status(f"saving the session to {session_dir}"):
        saved = rt.save_session(session_dir, replace=replace)
    err_console.print(
        f"ingested {info['tokens']:,} tokens in {time.perf_counter() - t:.1f}s "
        f"(prefill {info['prefill_seconds']:.1f}s, index {info['index_seconds']:.1f}s, "
        f"save {saved['seconds']:.1f}s); session {session_dir}: {human_bytes(saved['bytes'])}",
        highlight=False,
    )


@main.command()
@model_options
@sampling_options
@click.option("--session", "session_dir", required=True, help="A session made by `offload ingest`.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object a line for each question: question, text, stats.")  # fmt: skip
@click.argument("questions", nargs=-1)
@friendly_errors
def ask(model, session_dir, config, overrides, questions, as_json, max_new_tokens, **opts):
    """Answer each QUESTION from a saved document without prefilling the document again.

    Several questions are answered in turn, each from the document alone (the session
    is loaded once); none, or "-", reads them from standard input, one a line, each
    answered as soon as it is read (a program may write one and wait). The model
    (-m) must be the one the document was ingested with; the config is the session's
    unless -c is given."""
    questions = read_questions(questions)
    sampling, overrides = split_sampling(opts, overrides)
    rt = load_session_runtime(session_dir, model, config, overrides)
    if rt.document is None:
        kind = rt.session.get("kind")
        raise OffloadError(
            f"{session_dir} is a {kind} session, not a document: use `offload chat --session`"
        )
    headed = not isinstance(questions, list) or len(questions) > 1  # (stdin's: any number)
    for n, question in enumerate(questions, 1):
        steps = rt.stream_ask(question, max_new_tokens=max_new_tokens, **sampling)
        if as_json:
            json.dump({"question": question, **json_answer(list(steps), rt)}, sys.stdout)
            sys.stdout.write("\n")
            sys.stdout.flush()
            continue
        if headed:
            if n > 1:
                sys.stdout.write("\n")
            err_console.print(f"[bold]{escape(question)}[/]", highlight=False)
        print_steps(steps, rt.args.max_seq_len, thinking_stream(rt))
        s = rt.stats()
        err_console.print(
            f"[dim]{s['reused_tokens']} document tokens reused, {s['prefill_tokens']} prefilled, "
            f"first token after {s['prefill_seconds']:.2f}s{decode_rate(s)}[/]"
        )


@main.command()
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True)
@click.option(
    "--dtype", default="bfloat16", show_default=True, help="KV dtype for the byte counts."
)
@friendly_errors
def info(model, dtype):
    """Architecture, sizes, context length and KV bytes per token (reads metadata only)."""
    from offload.loading import read_model_info

    facts = read_model_info(model, dtype)
    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        if key.endswith("_bytes"):
            value = f"{human_bytes(value)} ({value:,} B)"
        table.add_row(f"[bold]{key}[/]", str(value))
    Console().print(table)


@main.command()
@model_options
@click.option(
    "--context", "-n", "context", type=int, required=True, help="Context length in tokens."
)
@click.option(
    "--gpu-mem", default=None, help="Device memory, e.g. 24GiB (default: this machine's)."
)
@click.option(
    "--host-mem", default=None, help="Host memory for KV, e.g. 64GiB (default: available)."
)
@click.option("--dtype", default=None, help="KV dtype (default: the config's, bfloat16).")
@click.option("--sink", type=int, default=None, help="Sink tokens (default: the config's, 16).")
@click.option(
    "--window", type=int, default=None, help="Window tokens (default: the config's, 256)."
)
@click.option("--bits", "summary_bits", type=int, default=None, help="Key summary bits (2 or 4).")
@friendly_errors
def plan(model, config, overrides, context, gpu_mem, host_mem, dtype, sink, window, summary_bits):
    """Where the KV of CONTEXT tokens goes, tier by tier, and whether it fits (with the
    settings of --config, as they run on CUDA)."""
    import torch

    from offload.budgets import machine_device_bytes, machine_host_bytes
    from offload.config import RuntimeConfig, parse_bytes
    from offload.plan import plan_for_config
    from offload.weight_forms import weight_bytes
    from storage.layout import DTYPE_BYTES

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = parse_bytes(gpu_mem, "--gpu-mem") if gpu_mem else machine_device_bytes(device)
    host = parse_bytes(host_mem, "--host-mem") if host_mem else machine_host_bytes()
    cfg = RuntimeConfig.from_toml(config) if config else RuntimeConfig()
    flags = {"dtype": dtype, "sink": sink, "window": window, "summary_bits": summary_bits}
    cfg = cfg.replace(
        **parse_overrides(overrides), **{k: v for k, v in flags.items() if v is not None}
    )
    p = plan_for_config(model, context, gpu, host, cfg)
    console = Console()
    a = p.args
    console.print(
        f"[bold]{model}[/]: {a.arch}, {a.num_layers} layers, {a.num_kv_heads} KV heads x {a.head_dim}, "
        f"{context:,} tokens; dense KV would be {human_bytes(p.dense_kv_bytes)}"
    )
    table = Table()
    for col in ("tier", "holds", "bytes", "per token"):
        table.add_column(col, justify="left" if col in ("tier", "holds") else "right")
    for r in p.rows:
        table.add_row(
            r.tier, r.what, human_bytes(r.nbytes), f"{r.per_token:,.0f} B" if r.per_token else ""
        )
    console.print(table)
    for tier, budget, fits in (("device", gpu, p.fits_device), ("host", host, p.fits_host)):
        verdict = "[green]fits[/]" if fits else "[red]does not fit[/]"
        console.print(
            f"{tier}: {human_bytes(p.tier_total(tier))} of {human_bytes(budget)}: {verdict}"
        )
    console.print(f"disk: {human_bytes(p.tier_total('disk'))}")
    console.print(
        f"saved as a session (`offload ingest`, /save): at least "
        f"{human_bytes(p.layout.session_bytes(context))} on disk"
    )
    if p.weights != "dense":
        console.print(
            f"weights: the block linears at {p.weights} (model.weights = "
            f"{cfg.model.weights}; dense they would be "
            f"{human_bytes(weight_bytes(a, DTYPE_BYTES[cfg.model.dtype], 'dense'))})"
        )
    console.print(
        f"prefill, layer by layer: peak device memory {human_bytes(p.prefill_peak_bytes)} "
        f"(the above less the hit caches and the index's device copy, plus the hidden "
        f"states and two layers' KV)"
    )
    too_long = context > a.max_seq_len
    if too_long:
        console.print(
            f"[red]the model's context window is {a.max_seq_len:,} tokens: "
            f"{context:,} do not fit it, whatever the memory[/]"
        )
    n = p.device_kv_tokens
    if n >= a.max_seq_len:
        console.print(
            f'on CUDA, mode "auto" keeps all KV on the device: the model\'s whole '
            f"{a.max_seq_len:,}-token window fits there"
        )
    else:
        console.print(
            f'on CUDA, mode "auto" keeps all KV on the device up to {n:,} tokens '
            f"(kv.device_bytes = {human_bytes(p.device_kv_bytes)}), then moves it to the "
            f"tiers above"
        )
    if context <= n and not too_long:
        console.print(
            f"at {context:,} tokens it does: up to {human_bytes(p.resident_device_bytes)} of "
            f"device memory (the weights, the activations reserve, the KV in buffers that "
            f"double as they fill), instead of the tiers above"
        )
    if too_long or not (p.fits_device and p.fits_host):
        sys.exit(1)


if __name__ == "__main__":
    main()
