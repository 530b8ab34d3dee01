"""What the command line shows: prefill bars, stats tables, byte counts (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from offload.config import human_bytes
from offload.thinking import ThinkingStream, thinks

PROGRESS_MIN_TOKENS = 512  # show a prefill bar only for inputs at least this long


def cut_note(step, window: int) -> str | None:
    """What to say of an answer that ended at the last step `step`: nothing where it
    ended on its own; where it was cut, whether by the token limit (-n) or by the
    model's context window (which a larger -n does not move)."""
    if step is None or step.finish_reason != "length":
        return None
    if step.window_full:
        return f"[dim](answer cut at the model's {window:,}-token context window)[/]"
    return "[dim](answer cut at the token limit: raise it with -n)[/]"


def thinking_stream(rt) -> ThinkingStream:
    """What tells a reasoning model's think block apart in `rt`'s answers."""
    return ThinkingStream(thinks(rt.tokenizer), opened=lambda: rt.thinking_opened)


def decode_rate(stats: dict, lead: str = ", ") -> str:
    """A request's decode rate as the figure lines show it ("{lead}61.2 tok/s"), or
    nothing where one token was generated (the rate is of the steps after the first)."""
    if stats["decode_tokens"] < 2:
        return ""
    return f"{lead}{stats['decode_tokens_per_second']:.1f} tok/s"


class RateColumn(ProgressColumn):
    """Units per second since the bar started ("2,315 tok/s")."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0
        if not elapsed or not task.completed:
            return Text("")
        return Text(f"{task.completed / elapsed:,.0f} {self.unit}/s", style="dim")


class PrefillBar:
    """Rich progress bars over prefill (long inputs only) and index build; a `Progress`."""

    LABELS = {"prefill": "prefill", "index": "index build"}
    UNITS = {"prefill": "tokens", "index": "layers"}
    RATES = {"prefill": "tok", "index": "layer"}

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
                RateColumn(self.RATES.get(stage, "")), TimeRemainingColumn(),
                console=self.console, transient=True,
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
