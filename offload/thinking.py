"""A reasoning model's thinking told apart from its answer: Qwen3 and the DeepSeek-R1
distills write a `<think>...</think>` block before answering (Qwen3 unless
`generation.thinking = "off"`). The command line shows the block dimmed and `--json`
gives it apart (`thinking`) from the answer (`text`); the Python API returns the text
as generated, and `split_thinking` splits it."""

from __future__ import annotations

from collections.abc import Callable

OPEN, CLOSE = "<think>", "</think>"


def thinks(tokenizer) -> bool:
    """Whether the model's vocabulary has the tags as tokens of their own (the models
    that think do; in another model's text the tags are only text)."""
    return tokenizer.token_to_id(OPEN) is not None and tokenizer.token_to_id(CLOSE) is not None


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thinking, answer) of a generated text: what comes between `<think>` and
    `</think>` (from the start where there is no opening tag: the R1 distills' templates
    put it in the prompt), and the rest, the blank lines after the block dropped; a block
    never closed (the answer was cut) runs to the end. (None, text) where there is none."""
    end, start = text.find(CLOSE), text.find(OPEN)
    if end < 0 and start < 0:
        return None, text
    if end < 0:
        end = len(text)
    elif start > end:
        start = -1
    before = text[:start] if start >= 0 else ""
    thinking = text[start + len(OPEN) if start >= 0 else 0 : end]
    return thinking.strip(), before.lstrip() + text[end + len(CLOSE) :].lstrip()


def opened_in(ids: list[int], tokenizer) -> bool:
    """Whether a prompt ends inside a think block, which the answer then continues (the
    R1 distills' templates end with `<think>` and a newline)."""
    tail = list(ids[-4:])
    open_id = tokenizer.token_to_id(OPEN)
    if open_id is None or open_id not in tail:
        return False
    return tokenizer.token_to_id(CLOSE) not in tail[len(tail) - tail[::-1].index(open_id) :]


class ThinkingStream:
    """Streamed text as runs of (text, inside the block or not), the tags inside it. A
    piece that ends with the start of a tag is held back until the next piece says
    whether it is one (`flush` gives back what is held at the end). `opened` says at the
    first piece whether the prompt left the block open (`Runtime.thinking_opened`). Not
    `active` (a model that does not think): every piece as it is, outside."""

    def __init__(self, active: bool = True, opened: Callable[[], bool] = lambda: False):
        self.active = active
        self.opened = opened  # asked at the first piece: did the prompt open the block?
        self.inside = None
        self.held = ""

    def feed(self, text: str) -> list[tuple[str, bool]]:
        if not self.active:
            return [(text, False)]
        if self.inside is None:
            self.inside = bool(self.opened())
        text, self.held, runs = self.held + text, "", []
        while text:
            tag = CLOSE if self.inside else OPEN
            at = text.find(tag)
            if at < 0:
                keep = _partial_tag(text, tag)
                runs.append((text[: len(text) - keep], self.inside))
                self.held = text[len(text) - keep :]
                break
            cut = at + len(tag) if self.inside else at  # (the tags go with the block)
            runs.append((text[:cut], self.inside))
            text, self.inside = text[cut:], not self.inside
        return [(t, inside) for t, inside in runs if t]

    def flush(self) -> list[tuple[str, bool]]:
        held, self.held = self.held, ""
        return [(held, self.inside)] if held else []


def _partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of `text` begin `tag` (0 if none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
