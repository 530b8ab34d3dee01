"""What the commands read: a prompt (its argument, --file texts, standard input) and
`ask`'s questions."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import click

from offload.documents import read_documents
from offload.errors import OffloadError


def read_stdin() -> str:
    """Standard input's text (UTF-8, or one clear error)."""
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    return utf8(raw, "standard input")


def utf8(raw: bytes | str, where: str) -> str:
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise OffloadError(f"{where} is not UTF-8 text (byte {e.start})") from None


def read_prompt(prompt: str | None, files: tuple[str, ...] = ()) -> str:
    """PROMPT, or standard input for "-" or when PROMPT is omitted and input is piped;
    the --file texts come first when both are given (several: each under its name, as
    `ingest` joins them)."""
    parts = []
    if files:
        parts.append(read_documents(files))
    if prompt == "-" or prompt is None and not files:
        if prompt is None and sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, - or --file, or pipe the prompt in")
        parts.append(read_stdin())
    elif prompt is not None:
        parts.append(prompt)
    text = "\n\n".join(p.strip() for p in parts if p.strip())
    if not text:
        raise OffloadError("the prompt is empty")
    return text


def read_questions(questions: tuple[str, ...]) -> list[str] | Iterator[str]:
    """`ask`'s questions: its arguments, or for none or "-" standard input's non-blank
    lines, each read when the one before is answered (the session is loaded first)."""
    if questions and questions != ("-",):
        out = [q for q in questions if q.strip()]
        if len(out) < len(questions):
            raise OffloadError("a question is empty")
        return out
    if not questions and sys.stdin.isatty():
        raise click.UsageError("give a QUESTION, or pipe questions in (one a line)")
    return piped_questions()


def piped_questions() -> Iterator[str]:
    """Standard input's non-blank lines, stripped, each as soon as it is there (a program
    that writes a question and waits for its answer gets it)."""
    asked = False
    for n, raw in enumerate(sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin, 1):
        line = utf8(raw, f"standard input's line {n}").strip()
        if line:
            asked = True
            yield line
    if not asked:
        raise OffloadError("no question on standard input")
