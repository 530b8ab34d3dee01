"""The command line as users of llama.cpp, ollama and HF expect it."""

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from storage.session import open_session
from tests.conftest import filler_text

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return ["-m", str(tiny_dirs["llama-gqa-untied"][0]), "--set", "dtype=float32"]


def test_help_and_version_import_no_torch():
    code = "import sys, cli.main; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    out = subprocess.run([sys.executable, "-m", "cli.main", "--help"], capture_output=True,
                         text=True, cwd=ROOT, check=True)  # fmt: skip
    assert "generate" in out.stdout and "chat" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--top-p", "3", "x"], "Invalid value for '--top-p'"),
        (["generate", "--min-p", "-1", "x"], "Invalid value for '--min-p'"),
        (["generate", "--no-such-flag", "x"], "No such option '--no-such-flag'"),
        (["nonsense"], "No such command 'nonsense'"),
        (["ask", "q"], "Missing option '--session'"),
        (["generate", "-n", "0", "x"], "0 is not in the range x>=1"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args, message):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    assert message in r.output and r.output.startswith("error:")
    assert r.output.strip().count("\n") == 0, r.output


def test_prompt_from_stdin_file_and_flags(tiny, tmp_path):
    runner = CliRunner()
    flags = ["-n", "6", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9",
             "--min-p", "0.05", "--seed", "5", "--repeat-penalty", "1.1", "--threads", "1"]  # fmt: skip
    want = runner.invoke(main, ["generate", *tiny, *flags, "seven stones"])
    assert want.exit_code == 0, want.output
    piped = runner.invoke(main, ["generate", *tiny, *flags], input="seven stones\n")
    dash = runner.invoke(main, ["generate", *tiny, *flags, "-"], input="seven stones")
    (tmp_path / "p.txt").write_text("seven stones\n")
    filed = runner.invoke(main, ["generate", *tiny, *flags, "-f", str(tmp_path / "p.txt")])
    first = lambda r: r.output.splitlines()[0]  # noqa: E731 (stdout's answer line)
    assert first(piped) == first(dash) == first(filed) == first(want)
    # -f repeated: every file, in order, each under its name, then the prompt
    (tmp_path / "q.txt").write_text("the river\n")
    two = runner.invoke(main, ["generate", *tiny, *flags, "--json", "-f", str(tmp_path / "p.txt"),
                               "-f", str(tmp_path / "q.txt"), "how many?"])  # fmt: skip
    joined = "# p.txt\n\nseven stones\n\n# q.txt\n\nthe river\n\nhow many?"
    same = runner.invoke(main, ["generate", *tiny, *flags, "--json"], input=joined)
    assert two.exit_code == 0, two.output
    two, same = (json.loads(r.output[r.output.index("{") :]) for r in (two, same))
    assert two["text"] == same["text"]
    assert two["stats"]["prompt_tokens"] == same["stats"]["prompt_tokens"] > 12
    r = runner.invoke(main, ["generate", *tiny, "-n", "3", "-s", "Be brief.", "--json", "x"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{") :])
    assert set(out) == {"text", "finish_reason", "stats"}
    assert out["stats"]["decode_tokens"] <= 3 and out["stats"]["prompt_tokens"] > 3
    r = runner.invoke(main, ["generate", *tiny], input="")
    assert r.exit_code == 2 and "the prompt is empty" in r.output
    r = runner.invoke(main, ["generate", *tiny], input=b"caf\xe9\n")
    assert r.exit_code == 2 and "standard input is not UTF-8 text (byte 3)" in r.output


def test_stop_strings_end_the_answer(tiny):
    from offload import Runtime

    rt = Runtime.from_pretrained(tiny[1], dtype="float32")
    full = rt.generate("seven stones", max_new_tokens=24)
    assert len(full) > 6
    stop = full[3:6]
    cut = rt.generate("seven stones", max_new_tokens=24, stop=[stop, "never there"])
    assert cut == full[: full.index(stop)]
    steps = list(rt.stream("seven stones", max_new_tokens=24, stop=stop))
    assert steps[-1].finish_reason == "stop" and "".join(s.text for s in steps) == cut
    assert rt.generate("seven stones", max_new_tokens=24, stop="never there") == full


def test_repeat_penalty_changes_only_repeated_tokens():
    import torch

    from offload.generate import make_sampler

    logits = torch.tensor([3.0, 2.9, -1.0, 0.5])
    assert make_sampler()(logits) == 0
    assert make_sampler(repeat_penalty=1.5, context=[0])(logits) == 1  # 3.0 / 1.5 < 2.9
    pen = make_sampler(repeat_penalty=1.5, repeat_last_n=1, context=[0, 3])
    assert pen(logits) == 0  # only the last token (3) is penalized


def test_chat_about_a_document_session(tiny, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("The lighthouse keeper counts seven stones every morning. " * 3)
    runner = CliRunner()
    r = runner.invoke(main, ["ingest", str(doc), "--session", str(tmp_path / "s"), *tiny])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["chat", "--session", str(tmp_path / "s"), *tiny, "-n", "3"],
                      input="how many stones?\nand then?\n/exit\n")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "chatting about the document" in r.output and r.output.count("tok/s") == 2


def read_until(fd, buf: bytearray, pattern: bytes, timeout: float = 120) -> bytes:
    """Bytes from the terminal up to and including `pattern` (the rest stay in buf)."""
    end = time.monotonic() + timeout
    while pattern not in buf:
        left = end - time.monotonic()
        assert left > 0, f"{pattern!r} not seen in {bytes(buf[-400:])!r}"
        if select.select([fd], [], [], left)[0]:
            buf += os.read(fd, 65536)
    i = buf.index(pattern) + len(pattern)
    seen = bytes(buf[:i])
    del buf[:i]
    return seen


def test_chat_in_a_terminal_pastes_one_turn_and_ctrl_c_stops_an_answer():
    """The embedded model in a pseudo-terminal: prompt_toolkit's line editor, a
    multi-line bracketed paste as one turn, Ctrl-C during an answer back to the prompt."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: offload chat on the terminal
        os.chdir(ROOT)
        # as a terminal's shell starts it (a suite run as a background job of a script
        # inherits SIGINT ignored, which the chat keeps: a parent's choice)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-m", "cli.main", "chat", "-n", "400"])
    buf = bytearray()
    try:
        read_until(fd, buf, b"you>")
        os.write(fd, b"Write a very long story about a dragon.\r")
        read_until(fd, buf, b"assistant>")
        read_until(fd, buf, b"dragon")  # it is answering
        os.write(fd, b"\x03")  # Ctrl-C
        seen = read_until(fd, buf, b"stopped")
        assert b"tok/s" not in seen  # cut short, not finished
        read_until(fd, buf, b"you>")
        os.write(fd, b"\x1b[200~Repeat these three lines:\nfirst line\nsecond line\x1b[201~\r")
        seen = read_until(fd, buf, b"tok/s")  # the one answer's figures
        assert seen.count(b"assistant>") == 1
        read_until(fd, buf, b"you>")
        os.write(fd, b"/exit\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_that_python_drops_still_stops_an_answer():
    """An interrupt whose handler runs inside a finalizer is dropped by Python (reported
    as "Exception ignored"); the answer stops at the next token all the same."""
    import io
    import signal
    from types import SimpleNamespace

    from rich.console import Console

    from cli.chat import answer

    def closed_by_the_collector():
        try:
            yield
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # handled here, in the finalizer
            sum(range(1000))

    class Conversation:
        def stream(self, text, max_new_tokens=None, progress=None, **sampling):
            for i in range(100):
                if i == 3:
                    g = closed_by_the_collector()
                    next(g)
                    del g  # closed now: its KeyboardInterrupt goes nowhere
                yield SimpleNamespace(text=f"t{i} ", finish_reason=None)

    figures = dict.fromkeys(["decode_tokens", "decode_tokens_per_second", "prefill_tokens",
                             "prefill_seconds", "context_tokens"], 0)  # fmt: skip
    runtime = SimpleNamespace(stats=lambda: figures,  # (read when an answer ends)
                              tokenizer=SimpleNamespace(token_to_id=lambda token: None))  # fmt: skip
    console = Console(file=io.StringIO(), width=200)
    answer(runtime, Conversation(), console, "hi", 100, {})
    out = console.file.getvalue()
    assert "t3 " in out and "t4 " not in out and "stopped" in out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_model_without_chat_template_says_which_is_used(tmp_path):
    from tests.gguf_files import write_gguf

    src = write_gguf(tmp_path / "m.gguf")
    r = CliRunner().invoke(main, ["generate", "-m", str(src), "-n", "2", "ab"])
    assert r.exit_code == 0, r.output
    assert "has no chat template; prompts are written in ChatML" in r.stderr


def test_chat_commands_save_and_send_a_file(tiny, tmp_path):
    """In `offload chat`: /save writes the conversation as a session that `offload chat
    --session` resumes; /file sends a file's text and the words after it as one turn;
    a path with spaces is quoted or escaped as a shell has it (as a terminal pastes a file
    dropped on it); a missing argument or file is one line (an unquoted path with spaces
    and words after it: with the usage), and the chat goes on."""
    notes = tmp_path / "my notes.txt"
    notes.write_text("The lighthouse keeper counts seven stones every morning.")
    missing, session = tmp_path / "missing.txt", tmp_path / "s"
    runner = CliRunner()
    escaped = str(notes).replace(" ", "\\ ")
    turns = ["hello there", "/help", "/save", "/file", f"/file {missing}", f'/file "{notes}" how many?',
             f"/file {notes} how many?", f"/file {escaped}", f"/save {session}", "/exit"]  # fmt: skip
    wide = {"COLUMNS": "1000"}  # (rich wraps lines at spaces, as in the path)
    r = runner.invoke(main, ["chat", *tiny, "-n", "2"], input="\n".join(turns) + "\n", env=wide)
    assert r.exit_code == 0, r.output
    out = r.output.replace("\n", "")
    assert "usage: /save [--replace] DIR" in out and "usage: /file PATH [text]" in out
    assert out.count("/exit quits (Ctrl-C stops an answer)") == 2  # (the hint, and /help)
    assert "missing.txt" in out and out.count(f"sending {notes}") == 2
    # (unquoted, with words after it: the path ends at the space, and the error says so)
    assert f"document not found: {tmp_path / 'my'} (usage: /file PATH [text] (a path" in out
    assert out.count("tok/s") == 3 and f"to {session}" in out
    saved = int(re.search(r"saved (\d+) tokens", out)[1])
    r = runner.invoke(
        main, ["chat", "--resume", str(session), *tiny, "-n", "2"], input="and then?\n/exit\n"
    )  # fmt: skip (--resume: --session's other name)
    assert r.exit_code == 0, r.output
    # the saved turns' KV is taken as it is: only the new turn is prefilled
    again = r.output.replace("\n", "")
    assert f"resumed 6 messages, {saved} tokens of KV" in again and again.count("tok/s") == 1
    prefilled = int(re.search(r"prefill (\d+) tokens", again)[1])
    context = int(re.search(r"context (\d+)", again)[1])  # (+ the first token, unless it stopped)
    assert prefilled < 50 and saved + prefilled <= context <= saved + prefilled + 1
    # --replace after the directory too (before: a new directory named "s --replace")
    other = tmp_path / "other"
    turns = f"hello\n/save {other}\n/save {session}\n/save {session} --replace\n/exit\n"
    r = runner.invoke(main, ["chat", *tiny, "-n", "2"], input=turns, env=wide)
    out = r.output.replace("\n", "")
    assert r.exit_code == 0 and f"{session} already holds a saved session" in out
    assert f"to {session} in" in out and not (tmp_path / "s --replace").exists()
    r = runner.invoke(main, ["chat", "--resume", str(session), *tiny], input="/exit\n")
    assert "resumed 2 messages" in r.output


def test_cli_ask_answers_several_questions_from_one_load(tiny, tmp_path):
    """`offload ask` with several questions (arguments, or standard input a line each)
    answers each from the document alone, as one `ask` a question would; `--json`
    prints an object a line."""
    doc = tmp_path / "doc.md"
    doc.write_text(filler_text(50, seed=9))
    runner = CliRunner()
    r = runner.invoke(main, ["ingest", str(doc), "--session", str(tmp_path / "s"), *tiny])
    assert r.exit_code == 0, r.output
    ask = ["ask", "--session", str(tmp_path / "s"), *tiny, "-n", "5"]
    questions = ["seven stones?", "the river", "green market north?"]
    alone = []
    for q in questions:
        r = runner.invoke(main, [*ask, q])
        assert r.exit_code == 0, r.output
        alone.append(r.stdout)
    r = runner.invoke(main, [*ask, *questions])
    assert r.exit_code == 0, r.output
    assert r.stdout == "\n".join(alone)  # (a blank line between answers)
    assert r.stderr.count("document tokens reused") == 3 and "the river" in r.stderr
    r = runner.invoke(main, [*ask, "--json"], input="\n".join(questions) + "\n\n")
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["question"] for o in lines] == questions
    assert [o["text"] + "\n" for o in lines] == alone
    assert all(o["stats"]["reused_tokens"] > 0 for o in lines)
    r = runner.invoke(main, [*ask, "q", " "])
    assert r.exit_code == 2 and "a question is empty" in r.output
    r = runner.invoke(main, [*ask, "-"], input="\n")
    assert r.exit_code == 2 and "no question on standard input" in r.output


def test_ask_answers_each_piped_question_before_reading_the_next(tiny, tmp_path):
    """A program that writes `offload ask` a question and waits for its answer gets it:
    before, `ask` read standard input to its end before loading the session, so such a
    program waited for ever (and a session replaced meanwhile answered instead)."""
    doc = tmp_path / "doc.md"
    doc.write_text(filler_text(50, seed=9))
    session = str(tmp_path / "s")
    r = CliRunner().invoke(main, ["ingest", str(doc), "--session", session, *tiny])
    assert r.exit_code == 0, r.output
    cmd = [sys.executable, "-m", "cli.main", "ask", "--session", session, *tiny, "-n", "4"]
    proc = subprocess.Popen([*cmd, "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)  # fmt: skip
    with proc:  # (its pipes closed at the end)
        try:
            answers = []
            for q in ("seven stones?", "the river"):
                proc.stdin.write(q.encode() + b"\n\n")  # (a blank line is skipped)
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], 120)
                assert ready, "no answer while standard input is open"
                answers.append(json.loads(proc.stdout.readline()))
            proc.stdin.write(b"caf\xe9?\n")
            proc.stdin.close()
            assert proc.wait(timeout=120) == 2
            err = proc.stderr.read().decode()
            assert err == "error: standard input's line 5 is not UTF-8 text (byte 3)\n"
        finally:
            proc.kill()
    assert [a["question"] for a in answers] == ["seven stones?", "the river"]
    r = CliRunner().invoke(main, [*cmd[3:], "--json", "seven stones?", "the river"])
    args = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(a["question"], a["text"]) for a in args] == [
        (a["question"], a["text"]) for a in answers
    ]


def test_quitting_a_chat_with_turns_its_session_lacks_says_so_once(tiny, tmp_path, monkeypatch):
    """In a terminal, /exit (or Ctrl-D) in a chat resumed from a session, or saved, with
    turns the session on disk lacks says so and quits at the next; after /save, or with
    nothing new, it quits at once. A chat never saved, or input from a pipe, quits."""
    import cli.chat

    s, runner = tmp_path / "s", CliRunner()
    r = runner.invoke(main, ["chat", *tiny, "-n", "2"], input=f"hello\n/save {s}\n/exit\n")
    assert r.exit_code == 0 and "saved" in r.output and "not in" not in r.output

    class Terminal(cli.chat.LineReader):  # (a terminal's prompt, reading the test's lines)
        def __init__(self, console):
            super().__init__(console)
            self.interactive = True

    monkeypatch.setattr(cli.chat, "LineReader", Terminal)
    resume = ["chat", "--session", str(s), *tiny, "-n", "2"]
    wide = {"COLUMNS": "1000"}
    r = runner.invoke(main, resume, input="/exit\n", env=wide)  # (nothing new)
    assert r.exit_code == 0 and "not in" not in r.output
    turns = ["the river", "/exit", f"/save {s}", "seven stones", "/exit", "/exit"]
    r = runner.invoke(main, resume, input="\n".join(turns) + "\n", env=wide)
    assert r.exit_code == 0, r.output
    assert r.output.count(f"the turns since the last save are not in {s.resolve()}") == 2
    assert r.output.count("tok/s") == 2  # (the first warning did not quit)
    messages = open_session(s).manifest["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hello", "the river"]
    r = runner.invoke(main, resume, input="the river\n", env=wide)  # (Ctrl-D: the end of input)
    assert r.exit_code == 0 and r.output.count("not in") == 1
    r = runner.invoke(main, resume, input="the river\n/reset\n/exit\n", env=wide)
    assert r.exit_code == 0 and "not in" not in r.output
    r = runner.invoke(main, ["chat", *tiny, "-n", "2"], input="hello\n/exit\n", env=wide)
    assert r.exit_code == 0 and "not in" not in r.output


def test_a_files_path_is_read_as_a_shell_reads_it(tmp_path):
    """`/file`'s path: quoted or escaped where it has spaces, whole where it names a file;
    the words after it as typed. On Windows backslashes belong to the path."""
    from cli.chat import file_args

    spaced = tmp_path / "my notes.md"
    spaced.write_text("notes")
    assert file_args(str(spaced)) == (str(spaced), "")
    assert file_args('"a b.md" what does "x" mean?') == ("a b.md", 'what does "x" mean?')
    assert file_args("a\\ b.md  why?") == ("a b.md", "why?")
    assert file_args("a.md") == ("a.md", "")
    with pytest.raises(ValueError):
        file_args('"a b.md why?')
    assert file_args("C:\\notes\\a.md why?", posix=False) == ("C:\\notes\\a.md", "why?")
    assert file_args('"C:\\my notes.md" why?', posix=False) == ("C:\\my notes.md", "why?")


def test_save_takes_replace_before_or_after_the_directory():
    """`/save`'s directory: one word as a shell reads it, or all the rest as typed (a path
    with spaces, unquoted); `--replace` before it or after it."""
    from cli.chat import save_args

    assert save_args("--replace s") == save_args("s --replace") == ("s", True)
    assert save_args("my chats") == save_args("my\\ chats") == ("my chats", False)
    assert save_args('"my chats" --replace') == ("my chats", True)
    assert save_args("--replace") == ("", True) and save_args("s--replace") == ("s--replace", False)
    with pytest.raises(ValueError):
        save_args('"my chats')
    assert save_args("C:\\my chats --replace", posix=False) == ("C:\\my chats", True)


def test_the_prefill_bar_counts_tokens_per_second_then_layers_of_the_index():
    """The bar a long prompt shows (`offload generate`, `ingest`, `ask`, the chat; a
    layer-by-layer prefill reports it layer by layer): tokens done and tok/s, then the
    index build's layers; none for a short prompt; gone when done (transient)."""
    from io import StringIO

    from rich.console import Console

    from cli.render import PROGRESS_MIN_TOKENS, PrefillBar

    out = StringIO()
    bar = PrefillBar(Console(file=out, force_terminal=True, width=120))
    bar(10, PROGRESS_MIN_TOKENS - 1)
    assert bar.bar is None and out.getvalue() == ""
    n = 4 * PROGRESS_MIN_TOKENS
    for layer in range(1, 4):
        time.sleep(0.02)
        bar(layer * n // 4, n)  # (as `prefill_by_layer` reports: a layer's share at a time)
    bar.bar.refresh()
    shown = out.getvalue()
    assert f"{3 * n // 4}/{n} tokens" in shown and " tok/s" in shown and "prefill" in shown
    bar(n, n)  # done: the bar closes itself
    assert bar.bar is None
    bar(1, 28, "index")
    time.sleep(0.02)
    bar(2, 28, "index")
    bar.bar.refresh()
    assert "index build" in out.getvalue() and "2/28 layers" in out.getvalue()
    assert " layer/s" in out.getvalue()
    bar.close()
    assert bar.bar is None


def test_a_closed_standard_stream_is_no_traceback(tiny):
    """Run with a stream closed (`<&-`, `>&-`; Python's is then None), as from some
    cron jobs and daemons: before, an AttributeError traceback."""

    def run(close: int, *args: str) -> subprocess.CompletedProcess:
        keep = {0: {}, 1: {"stdout": subprocess.PIPE}, 2: {"stderr": subprocess.PIPE}}
        pipes = {k: v for fd, pipe in keep.items() if fd != close for k, v in pipe.items()}
        return subprocess.run([sys.executable, "-m", "cli.main", "generate", *tiny, *args],
                              preexec_fn=lambda: os.close(close), cwd=ROOT, text=True,
                              timeout=120, **pipes)  # fmt: skip

    out = run(0, "-n", "3", "seven stones")  # (a prompt given: stdin is not needed)
    assert out.returncode == 0 and out.stdout.endswith("\n") and "Traceback" not in out.stderr
    out = run(0, "-n", "3")  # (none: stdin reads as empty)
    assert (out.returncode, out.stderr) == (2, "error: the prompt is empty\n")
    out = run(1, "-n", "3", "seven stones")
    assert out.returncode == 2
    assert out.stderr == "error: standard output is closed: offload writes its answers there\n"
    out = run(2, "-n", "3", "seven stones")
    assert out.returncode == 0 and out.stdout.endswith("\n")
