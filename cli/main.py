"""`offload` command line: parse, call the library, render with rich. Nothing else."""

from __future__ import annotations

import functools
import signal
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from offload.config import DEFAULT_MODEL
from offload.documents import read_documents
from offload.errors import OffloadError
from storage.errors import StorageError

err_console = Console(stderr=True)
PROGRESS_MIN_TOKENS = 512  # show a prefill bar only for inputs at least this long


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
    fn = click.option("--config", "-c", default=None, help="TOML file or preset name in configs/.")(
        fn
    )
    fn = click.option(
        "--model", "-m", default=DEFAULT_MODEL, show_default=True,
        help="HF model directory, .gguf file, or embedded model name.",
    )(fn)  # fmt: skip
    return fn


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OffloadError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def load_session_runtime(
    session_dir: str, model: str, config: str | None, overrides: tuple[str, ...]
):
    from offload.runtime import Runtime

    with err_console.status(f"loading session {session_dir} ..."):
        return Runtime.load_session(
            session_dir, config=config, model=model, **parse_overrides(overrides)
        )


def load_runtime(model: str, config: str | None, overrides: tuple[str, ...]):
    from offload.runtime import Runtime

    with err_console.status(f"loading {model} ..."):
        return Runtime.from_pretrained(model, config=config, **parse_overrides(overrides))


CUT_NOTE = "[dim](answer cut at the token limit: raise it with -n)[/]"


def print_steps(steps) -> None:
    """Stream generated text to stdout as it comes, then end the line. An answer cut at
    the token limit says so on stderr (stdout keeps only the answer, for pipes)."""
    step = None
    for step in steps:
        sys.stdout.write(step.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if step is not None and step.finish_reason == "length":
        sys.stdout.flush()
        err_console.print(CUT_NOTE)


class PrefillBar:
    """Rich progress bars over prefill (long inputs only) and index build; a `Progress`."""

    LABELS = {"prefill": "prefill", "index": "index build"}
    UNITS = {"prefill": "tokens", "index": "layers"}

    def __init__(self, console: Console):
        self.console = console
        self.bar = None
        self.stage = None

    def __call__(self, done: int, total: int, stage: str = "prefill") -> None:
        if stage == "prefill" and total < PROGRESS_MIN_TOKENS:
            return
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = Progress(
                TextColumn(f"[dim]{self.LABELS.get(stage, stage)}"), BarColumn(),
                TextColumn(f"{{task.completed}}/{{task.total}} {self.UNITS.get(stage, '')}"),
                TimeRemainingColumn(), console=self.console, transient=True,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task(stage, total=total)
        self.bar.update(self.task, completed=done)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        self.stage = None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="offload", prog_name="offload", message="%(prog)s %(version)s")
def main():
    """offload: long-context LLM inference with a tiered KV cache."""
    # SIGTERM exits as Ctrl-C would: finalizers remove this process's spilled KV files
    # (a SIGKILL's leftovers are removed by the next process that spills to the folder).
    signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


@main.command()
@model_options
@click.option("--max-new-tokens", "-n", type=int, default=None, help="Tokens to generate.")
@click.option("--temperature", "-t", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.argument("prompt")
@friendly_errors
def generate(model, config, overrides, max_new_tokens, temperature, seed, prompt):
    """Stream the answer to PROMPT (one user turn) to stdout."""
    rt = load_runtime(model, config, overrides)
    sampling = {k: v for k, v in (("temperature", temperature), ("seed", seed)) if v is not None}
    bar = PrefillBar(err_console)
    try:
        print_steps(rt.stream(prompt, max_new_tokens=max_new_tokens, progress=bar, **sampling))
    finally:
        bar.close()
    s = rt.stats()
    err_console.print(
        f"[dim]{s['prefill_tokens']} prompt tokens at {s['prefill_tokens_per_second']:.0f} tok/s, "
        f"{s['decode_tokens']} generated at {s['decode_tokens_per_second']:.1f} tok/s[/]"
    )


@main.command()
@model_options
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-new-tokens", "-n", type=int, default=None)
@click.option(
    "--session", "session_dir", default=None, help="Resume a saved session (chat or document)."
)
@friendly_errors
def chat(model, config, overrides, system, max_new_tokens, session_dir):
    """Multi-turn chat; earlier turns' KV is reused. Commands: /reset /stats /save DIR /exit."""
    console = Console()
    if session_dir:
        rt = load_session_runtime(session_dir, model, config, overrides)
        if rt.session.get("kind") == "chat":
            conv = rt.resume_chat()
            console.print(
                f"[dim]resumed {len(conv.messages)} messages, {conv.context_tokens} tokens of KV[/]"
            )
        else:
            raise OffloadError(
                f"{session_dir} is a {rt.session.get('kind')} session: use `offload ask`"
            )
    else:
        rt = load_runtime(model, config, overrides)
        conv = rt.chat(system=system)
    console.print(
        "[dim]/reset clears the conversation, /stats shows figures, /save DIR saves it, /exit quits[/]"
    )
    while True:
        try:
            text = console.input("[bold green]you>[/] ")
        except EOFError:
            console.print()
            return
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            conv.reset()
            console.print("[dim]conversation cleared[/]")
            continue
        if cmd == "/stats":
            render_stats(console, rt.stats())
            continue
        if cmd == "/save" or cmd.startswith("/save "):
            target = cmd[len("/save") :].strip()
            if not target:
                console.print("[yellow]usage: /save DIR[/]")
                continue
            try:
                info = conv.save(target)
            except (OffloadError, StorageError) as e:
                console.print(f"[bold red]error:[/] {e}", highlight=False)
                continue
            console.print(
                f"[dim]saved {info['tokens']} tokens ({human_bytes(info['bytes'])}) to {target}[/]"
            )
            continue
        if cmd.startswith("/"):
            console.print(
                f"[yellow]unknown command {cmd.split()[0]}[/] (/reset /stats /save DIR /exit)"
            )
            continue
        bar = PrefillBar(console)
        console.print("[bold blue]assistant>[/] ", end="")
        step = None
        try:
            for step in conv.stream(text, max_new_tokens=max_new_tokens, progress=bar):
                console.out(step.text, end="", highlight=False)
        except (OffloadError, StorageError) as e:
            bar.close()
            console.print(f"\n[bold red]error:[/] {e}", highlight=False)
            continue
        bar.close()
        if step is not None and step.finish_reason == "length":
            console.print(f" {CUT_NOTE}", end="")
        s = rt.stats()
        console.print(
            f"\n[dim]{s['decode_tokens']} tokens, {s['decode_tokens_per_second']:.1f} tok/s, "
            f"prefill {s['prefill_tokens']} tokens in {s['prefill_seconds']:.2f}s, "
            f"context {s['context_tokens']}[/]"
        )


def render_stats(console: Console, stats: dict) -> None:
    table = Table(show_header=False, box=None)
    for key, value in stats.items():
        if isinstance(value, dict):
            fmt = human_bytes if "bytes" in key else _plain
            value = ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.3f}"
        table.add_row(f"[dim]{key}[/]", str(value))
    console.print(table)


def _plain(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@main.command()
@model_options
@click.argument("files", nargs=-1, required=True)
@click.option("--session", "session_dir", required=True, help="Directory to save the session in.")
@click.option("--system", default=None, help="System prompt saved with the document.")
@friendly_errors
def ingest(model, config, overrides, files, session_dir, system):
    """Prefill FILES once and save their KV, summaries and index as a session."""
    from storage.session import check_dir

    text = read_documents(files)
    check_dir(Path(session_dir))  # fail before the long prefill, not after; create nothing yet
    rt = load_runtime(model, config, overrides)
    bar = PrefillBar(err_console)
    t = time.perf_counter()
    try:
        info = rt.load_document(text, system=system, progress=bar)
    finally:
        bar.close()
    saved = rt.save_session(session_dir)
    err_console.print(
        f"ingested {info['tokens']:,} tokens in {time.perf_counter() - t:.1f}s "
        f"(prefill {info['prefill_seconds']:.1f}s, index {info['index_seconds']:.1f}s); "
        f"session {session_dir}: {human_bytes(saved['bytes'])}",
        highlight=False,
    )


@main.command()
@model_options
@click.option("--session", "session_dir", required=True, help="A session made by `offload ingest`.")
@click.option("--max-new-tokens", "-n", type=int, default=None)
@click.argument("question")
@friendly_errors
def ask(model, session_dir, config, overrides, max_new_tokens, question):
    """Answer QUESTION from a saved document without prefilling the document again.

    The model (-m) must be the one the document was ingested with; the config is the
    session's unless -c is given."""
    rt = load_session_runtime(session_dir, model, config, overrides)
    if rt.document is None:
        kind = rt.session.get("kind")
        raise OffloadError(
            f"{session_dir} is a {kind} session, not a document: use `offload chat --session`"
        )
    print_steps(rt.stream_ask(question, max_new_tokens=max_new_tokens))
    s = rt.stats()
    err_console.print(
        f"[dim]{s['reused_tokens']} document tokens reused, {s['prefill_tokens']} prefilled, "
        f"first token after {s['prefill_seconds']:.2f}s, {s['decode_tokens_per_second']:.1f} tok/s[/]"
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
@click.option(
    "--model",
    "-m",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Model dir, config.json, .gguf or name.",
)
@click.option(
    "--context", "-n", "context", type=int, required=True, help="Context length in tokens."
)
@click.option(
    "--gpu-mem", default=None, help="Device memory, e.g. 24GiB (default: this machine's)."
)
@click.option(
    "--host-mem", default=None, help="Host memory for KV, e.g. 64GiB (default: available)."
)
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--sink", default=16, show_default=True)
@click.option("--window", default=256, show_default=True)
@click.option(
    "--bits", "summary_bits", default=2, show_default=True, help="Key summary bits (2 or 4)."
)
@friendly_errors
def plan(model, context, gpu_mem, host_mem, dtype, sink, window, summary_bits):
    """Where the KV of CONTEXT tokens goes, tier by tier, and whether it fits."""
    import torch

    from offload.budgets import machine_device_bytes, machine_host_bytes
    from offload.config import parse_bytes
    from offload.plan import make_plan

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = parse_bytes(gpu_mem, "--gpu-mem") if gpu_mem else machine_device_bytes(device)
    host = parse_bytes(host_mem, "--host-mem") if host_mem else machine_host_bytes()
    p = make_plan(
        model, context, gpu, host, dtype=dtype, summary_bits=summary_bits, sink=sink, window=window
    )
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
    too_long = context > a.max_seq_len
    if too_long:
        console.print(
            f"[red]the model's context window is {a.max_seq_len:,} tokens: "
            f"{context:,} do not fit it, whatever the memory[/]"
        )
    window = f"the model's whole {a.max_seq_len:,}-token window"
    if p.kv_on_device:
        console.print(f'on CUDA, mode "auto" keeps all KV on the device: {window} fits there')
    else:
        console.print(
            f'on CUDA, mode "auto" uses the tiers above: {window} does not fit the device'
        )
    if too_long or not (p.fits_device and p.fits_host):
        sys.exit(1)


if __name__ == "__main__":
    main()
