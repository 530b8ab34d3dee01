"""A reasoning model's think block (Qwen3, the DeepSeek-R1 distills) told apart from its
answer: split for `--json`, dimmed on a terminal, streamed pieces cut anywhere."""

import io
import json
import random
import sys
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from rich.console import Console

from offload.generate import StepResult
from offload.thinking import ThinkingStream, split_thinking, thinks

ANSWER = "<think>\nTwo and two: four.\n</think>\n\nFour."


@pytest.mark.parametrize(
    "text, parts",
    [
        (ANSWER, ("Two and two: four.", "Four.")),
        ("No block here.", (None, "No block here.")),
        ("<think>\nstill going", ("still going", "")),  # cut before it closed
        ("opened in the prompt\n</think>\n\nFour.", ("opened in the prompt", "Four.")),  # R1
        ("<think>\n\n</think>\n\nAt once.", ("", "At once.")),  # Qwen3's empty block
        ("Well <think>hmm</think> four.", ("hmm", "Well four.")),
    ],
)
def test_split_thinking(text, parts):
    assert split_thinking(text) == parts


def test_a_stream_cut_anywhere_gives_the_same_runs():
    """However the text is cut into pieces (a tag split over two of them among them),
    the runs join to the text and the block's runs are the block, tags included."""
    text = "Hi <think>\nlet me see, <thin or not\n</think>\n\nFour. </thin"
    for seed in range(300):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
        stream, runs = ThinkingStream(), []
        for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
            runs += stream.feed(text[a:b])
        runs += stream.flush()
        assert "".join(t for t, _ in runs) == text
        assert "".join(t for t, inside in runs if inside) == (
            "<think>\nlet me see, <thin or not\n</think>"
        )
    assert ThinkingStream(active=False).feed("<think>x") == [("<think>x", False)]


def tokenizer(tags: bool):
    ids = {"<think>": 7, "</think>": 8} if tags else {}
    return SimpleNamespace(token_to_id=ids.get)


def steps(text: str, pieces: int = 5):
    """`text` as a stream's steps, cut into `pieces`."""
    n = -(-len(text) // pieces)
    for i in range(0, len(text), n):
        yield StepResult(token_id=0, text=text[i : i + n], index=i, finish_reason=None,
                         prefill_tokens=3, prefill_seconds=0.1, step_seconds=0.01,
                         context_tokens=3 + i)  # fmt: skip


class Scripted:
    """A runtime whose answer is scripted: what is under test is how the command line
    shows it, not the model (the model's vocabulary says whether it thinks)."""

    def __init__(self, tags: bool, answer: str = ANSWER, opened: bool = False):
        self.tokenizer = tokenizer(tags)
        self.args = SimpleNamespace(max_seq_len=4096)
        self.answer, self.opened, self.thinking_opened = answer, opened, False

    def stream(self, messages, max_new_tokens=None, progress=None, **sampling):
        self.thinking_opened = self.opened  # (set as the request starts, as Runtime does)
        return steps(self.answer)

    def stats(self):
        return {"prefill_tokens": 3, "prefill_seconds": 0.1, "prefill_tokens_per_second": 30.0,
                "decode_tokens": 5, "decode_tokens_per_second": 50.0, "context_tokens": 8}  # fmt: skip


@pytest.mark.parametrize("tags", [True, False])
def test_json_gives_the_thinking_apart(monkeypatch, tags):
    """`generate --json`: a model whose vocabulary has the tags gets `thinking` and the
    answer after it as `text`; another model's text is left whole."""
    from cli import main as cli

    assert thinks(tokenizer(tags)) is tags
    monkeypatch.setattr(cli, "load_runtime", lambda *a, **k: Scripted(tags))
    result = CliRunner().invoke(cli.main, ["generate", "--json", "two and two?"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    if tags:
        assert (out["thinking"], out["text"]) == ("Two and two: four.", "Four.")
    else:
        assert "thinking" not in out and out["text"] == ANSWER


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("opened", [False, True])
def test_a_terminal_shows_the_block_dimmed(monkeypatch, opened):
    """On a terminal the block is dimmed (SGR 2, then 22), the answer is not, also where
    the prompt opened the block (an R1 distill's answer has only the closing tag);
    piped, the text is as generated."""
    from cli.main import print_steps
    from cli.render import thinking_stream

    answer = ANSWER.removeprefix("<think>") if opened else ANSWER
    for out, dimmed in [(Terminal(), True), (io.StringIO(), False)]:
        rt = Scripted(True, answer, opened)
        monkeypatch.setattr(sys, "stdout", out)
        print_steps(rt.stream([]), 4096, thinking_stream(rt))
        shown = out.getvalue()
        assert shown.replace("\x1b[2m", "").replace("\x1b[22m", "") == answer + "\n"
        assert shown.startswith("\x1b[2m") is dimmed
        assert shown.endswith("\x1b[22m\n\nFour.\n" if dimmed else "</think>\n\nFour.\n")


def test_a_prompt_that_opens_the_block():
    """`opened_in`: the prompt's last tokens open a block (R1 distills' templates end
    with `<think>` and a newline) and do not close it (Qwen3's thinking off writes an
    empty closed block)."""
    from offload.thinking import opened_in

    tok = tokenizer(True)
    assert opened_in([3, 4, 5, 7, 9], tok) and opened_in([7], tok)
    assert not opened_in([3, 7, 9, 8, 9], tok) and not opened_in([7, 1, 2, 3, 4], tok)
    assert not opened_in([3, 7, 9], tokenizer(False))


def test_chat_dims_the_block():
    """`offload chat` dims the block (rich's dim style) and not the answer after it."""
    from cli.chat import answer

    console = Console(file=io.StringIO(), force_terminal=True, color_system="standard")
    conv = SimpleNamespace(stream=lambda text, **kw: steps(ANSWER), dropped=0)
    answer(Scripted(True), conv, console, "two and two?", None, {})
    shown = console.file.getvalue()
    assert "\x1b[2m<think>\x1b[0m" in shown and "\x1b[2m</think>\x1b[0m\n\nFour.\n" in shown


@pytest.mark.parametrize("opens", [True, False])
def test_a_runtime_says_whether_its_prompt_opened_the_block(tmp_path, opens):
    """`Runtime.thinking_opened`, set as a request starts: an R1 distill's template ends
    its prompt with `<think>`; another template (Qwen3's) leaves the model to open it."""
    from offload import Runtime
    from tests.gguf_files import write_gguf

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}" + "<think>" * opens
    src = write_gguf(tmp_path / "r.gguf", template=template, control=("<think>", "</think>"))
    rt = Runtime.from_pretrained(src, dtype="float32")
    assert thinks(rt.tokenizer) and not rt.thinking_opened
    steps = rt.stream("abc", max_new_tokens=2)
    next(steps)  # (the request has started)
    assert rt.thinking_opened is opens
