"""The interactive chat loop of `offload chat`.

On a terminal, input is read with prompt_toolkit: line editing, history (up and
down arrows), and bracketed paste, so a pasted block of many lines, however long,
arrives as one turn. Ctrl-C stops an answer being generated and returns to the
prompt, the answer so far kept in the conversation (at the prompt it clears the
line); Ctrl-D or /exit quits (in a terminal, a chat with turns its session on disk
lacks says so once first). When standard input is not a terminal (a pipe, a script),
each line is one turn.

Commands: /reset, /stats, /save [--replace] DIR, /file PATH [text] (a PATH with spaces
in quotes), /exit.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from cli.interrupts import interrupt_flag
from cli.render import PrefillBar, cut_note, decode_rate, render_stats, thinking_stream
from offload.config import human_bytes
from offload.documents import read_documents
from offload.errors import OffloadError
from storage.errors import SessionExistsError, StorageError

HINT = "/reset clears the conversation, /stats shows figures, /save DIR saves it, /file PATH [text] sends a file, /exit quits (Ctrl-C stops an answer)"
COMMANDS = "/reset /stats /save DIR /file PATH /exit"
REPLACE = "--replace"
SAVE_USAGE = f"/save [{REPLACE}] DIR"
FILE_USAGE = "usage: /file PATH [text] (a path with spaces in quotes)"


class LineReader:
    """One turn of input at a time; EOFError when the user is done."""

    def __init__(self, console: Console):
        self.console = console
        self.session = None
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty()
        if self.interactive:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.formatted_text import HTML
            from prompt_toolkit.history import InMemoryHistory

            self.session = PromptSession(history=InMemoryHistory())
            self.prompt = HTML("<ansigreen><b>you&gt;</b></ansigreen> ")

    def read(self) -> str:
        if self.session is None:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\n")
        while True:
            try:
                return self.session.prompt(self.prompt)
            except KeyboardInterrupt:  # at the prompt: a fresh line, as in a shell
                continue


def run_chat(rt, conv, console: Console, max_new_tokens, sampling) -> None:
    """The loop: read a turn or a command, stream the answer, repeat until EOF or /exit."""
    reader = LineReader(console)
    console.print(f"[dim]{escape(HINT)}[/]")
    saved, warned = list(conv.messages), False  # (what the session on disk holds)
    while True:
        try:
            text = reader.read()
        except EOFError:
            console.print()
            text = "/exit"
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            if warned or not reader.interactive or not unsaved_turns(conv, saved):
                return
            path = escape(str(conv.session_ref.path))
            console.print(f"[yellow]the turns since the last save are not in {path}: /save "
                          f"{path} saves them; /exit (or Ctrl-D) again quits[/]")  # fmt: skip
            warned = True
            continue
        if cmd == "/reset":
            conv.reset()
            console.print("[dim]conversation cleared[/]")
            continue
        if cmd == "/stats":
            render_stats(console, rt.stats())
            continue
        if cmd in ("/help", "/?"):
            console.print(f"[dim]{escape(HINT)}[/]")
            continue
        if cmd == "/save" or cmd.startswith("/save "):
            if save(conv, console, cmd[len("/save") :].strip()):
                saved, warned = list(conv.messages), False
            continue
        if cmd == "/file" or cmd.startswith("/file "):
            try:
                name, rest = file_args(cmd[len("/file") :].strip())
            except ValueError:
                name = ""
            if not name:
                console.print(f"[yellow]{escape(FILE_USAGE)}[/]")
                continue
            try:
                text = read_documents([Path(name).expanduser()])
            except OffloadError as e:
                hint = f" ({FILE_USAGE})" if rest and not Path(name).expanduser().exists() else ""
                console.print(f"[bold red]error:[/] {escape(str(e) + hint)}", highlight=False)
                continue
            text = f"{text}\n\n{rest.strip()}" if rest.strip() else text
            console.print(f"[dim]sending {name} ({len(text):,} characters)[/]")
        elif cmd.startswith("/"):
            console.print(f"[yellow]unknown command {escape(cmd.split()[0])}[/] ({COMMANDS})")
            continue
        answer(rt, conv, console, text, max_new_tokens, sampling)


def unsaved_turns(conv, saved: list[dict]) -> bool:
    """Has a chat that has a session (resumed from one, or saved) turns the session on
    disk does not (`saved`: its messages as loaded or last saved)?"""
    asked = any(m["role"] == "user" for m in conv.messages)
    return conv.session_ref is not None and asked and conv.messages != saved


def file_args(args: str, posix: bool = os.name != "nt") -> tuple[str, str]:
    """`/file`'s path and the words after it. The path is the first word as a shell reads
    it ('My notes.md', My\\ notes.md: what a terminal pastes for a file dropped on it), or
    all of `args` where that names a file (a path with spaces, unquoted, and no text).
    The words after it are kept as typed (their quotes too). ValueError: an unclosed quote.
    Not `posix` (Windows): backslashes are a path's own; quotes still group."""
    try:
        whole = Path(args).expanduser().is_file()
    except OSError:  # (a name too long to be a file's: the words are read as below)
        whole = False
    if whole:
        return args, ""
    lexer = shlex.shlex(args, posix=posix)
    lexer.whitespace_split = True
    name = lexer.get_token() or ""
    if not posix and len(name) > 1 and name[0] == name[-1] and name[0] in "\"'":
        name = name[1:-1]
    return name, lexer.instream.read().strip()


def save_args(args: str, posix: bool = os.name != "nt") -> tuple[str, bool]:
    """`/save`'s directory, and whether `--replace` was given, before it or after it. The
    directory is one word as a shell reads it ("my chats", my\\ chats) or, where the rest
    is several, all of it as typed (a path with spaces, unquoted). ValueError: an
    unclosed quote."""
    words = args.split()
    replace = REPLACE in words[:1] + words[-1:]
    if replace:
        args = args.strip()
        args = args[len(REPLACE) :] if words[0] == REPLACE else args[: -len(REPLACE)]
    name, more = file_args(args.strip(), posix)
    return (args.strip() if more else name), replace


def save(conv, console: Console, args: str) -> bool:
    """`/save [--replace] DIR`: the conversation as a chat session (a session already in
    DIR, other than the one this chat was resumed from or saved to, only with --replace).
    Whether it was saved."""
    try:
        target, replace = save_args(args)
    except ValueError:
        target = ""
    if not target:
        console.print(f"[yellow]usage: {escape(SAVE_USAGE)}[/]")
        return False
    try:
        with console.status(f"saving to {escape(target)}"):
            info = conv.save(target, replace=replace)
    except SessionExistsError as e:
        hint = f": /save {REPLACE} {target} replaces it"
        console.print(f"[bold red]error:[/] {escape(str(e.hinted(hint)))}", highlight=False)
        return False
    except (OffloadError, StorageError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        return False
    console.print(
        f"[dim]saved {info['tokens']} tokens ({human_bytes(info['bytes'])}) "
        f"to {escape(target)} in {info['seconds']:.1f}s[/]"
    )
    return True


def answer(rt, conv, console: Console, text: str, max_new_tokens, sampling) -> None:
    """Stream one answer; Ctrl-C stops it (what it said stays in the conversation)."""
    bar = PrefillBar(console)
    console.print("[bold blue]assistant>[/] ", end="")
    step = None
    steps = conv.stream(text, max_new_tokens=max_new_tokens, progress=bar, **sampling)
    dim = thinking_stream(rt)  # a reasoning model's think block, dimmed

    def show(runs) -> None:
        for piece, inside in runs:
            console.out(piece, style="dim" if inside else None, end="", highlight=False)

    try:
        with interrupt_flag() as interrupted:
            for step in steps:
                show(dim.feed(step.text))
                if interrupted.is_set():
                    raise KeyboardInterrupt
            show(dim.flush())
    except KeyboardInterrupt:
        steps.close()
        bar.close()
        console.print("\n[dim]stopped[/]", highlight=False)
        return
    except (OffloadError, StorageError) as e:
        bar.close()
        console.print(f"\n[bold red]error:[/] {escape(str(e))}", highlight=False)
        return
    bar.close()
    note = cut_note(step, rt.args.max_seq_len)
    if note:
        console.print(f" {note}", end="")
    s = rt.stats()
    console.print(
        f"\n[dim]{s['decode_tokens']} token{'s' * (s['decode_tokens'] != 1)}{decode_rate(s)}, "
        f"prefill {s['prefill_tokens']} tokens in {s['prefill_seconds']:.2f}s, "
        f"context {s['context_tokens']}[/]"
    )
    if conv.dropped:
        n = conv.dropped
        console.print(
            f"[dim]the {'oldest exchange was' if n == 1 else f'{n} oldest exchanges were'} "
            f"dropped to fit the model's {rt.args.max_seq_len:,}-token context window[/]"
        )
