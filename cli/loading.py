"""Loading a command's runtime: `--set` overrides, a spinner, and the runtime's
warnings (a tokenizer's split, the GPU kernels' head_dim) as notes."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape

import offload
from offload.errors import OffloadError

err_console = Console(stderr=True)


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OffloadError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


@contextlib.contextmanager
def loading(what: str):
    """A spinner while `what` loads; the runtime's warnings then as notes (a tokenizer's
    split, the GPU kernels' head_dim), others as Python shows them."""
    ours = Path(offload.__file__).parent
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with err_console.status(f"loading {what} ..."):
            yield
    for w in seen:
        if Path(w.filename).is_relative_to(ours):
            err_console.print(f"[dim]note: {escape(str(w.message))}[/]", highlight=False)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def load_session_runtime(
    session_dir: str, model: str, config: str | None, overrides: tuple[str, ...]
):
    from offload.runtime import Runtime

    with loading(f"session {session_dir}"):
        return Runtime.load_session(
            session_dir, config=config, model=model, **parse_overrides(overrides)
        )


def load_runtime(model: str, config: str | None, overrides: tuple[str, ...]):
    from offload.runtime import Runtime

    with loading(model):
        rt = Runtime.from_pretrained(model, config=config, **parse_overrides(overrides))
    if rt.tokenizer.chat_template is None:
        err_console.print(
            f"[dim]note: {escape(str(model))} has no chat template; prompts are written in "
            "ChatML (<|im_start|>role ... <|im_end|>)[/]", highlight=False, soft_wrap=True,
        )  # fmt: skip
    return rt
