"""A chat longer than the model's context window drops its oldest exchanges (tiny model)."""

import re

import pytest
from click.testing import CliRunner

from cli.main import main
from offload import ContextLengthError, Runtime
from storage.session import open_session
from tests.conftest import make_tiny_hf_model, rewrite_manifest

WINDOW = 256


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A tiny model with a 256-token context window."""
    path = tmp_path_factory.mktemp("short") / "model"
    make_tiny_hf_model(path, "llama-gqa-untied", max_positions=WINDOW)
    rt = Runtime.from_pretrained(path, dtype="float32")
    rt.path = path  # (for the command line)
    return rt


TURNS = ["the river runs", "seven stones", "a grey heron", "under the bridge", "in the reeds"]


def chat_until_dropped(conv, new: int = 8) -> tuple[list[dict], str]:
    """Send turns until one drops exchanges; (the messages before it, its answer)."""
    for i in range(40):
        before = list(conv.messages)
        answer = conv.send(TURNS[i % len(TURNS)] + f" {i}", max_new_tokens=new)
        if conv.dropped:
            return before, answer
        assert len(conv.messages) == len(before) + 2
    raise AssertionError("no turn dropped an exchange")


def test_a_chat_past_the_window_drops_its_oldest_exchanges(short):
    conv = short.chat(system="sys")
    before, answer = chat_until_dropped(conv)
    n = conv.dropped
    # The system prompt stays; the n oldest user-assistant pairs went, the rest follow.
    assert conv.messages[0] == before[0] == {"role": "system", "content": "sys"}
    assert conv.messages[1:-2] == before[1 + 2 * n :]
    assert [m["role"] for m in before[1 : 1 + 2 * n]] == ["user", "assistant"] * n
    # The prompt with the answer's room (8 tokens) within three quarters of the window,
    # and one fewer exchange dropped would not have been.
    prompt = short.encode_prompt(conv.messages[:-1])
    assert len(prompt) + 8 <= WINDOW * 3 // 4
    one_fewer = before[:1] + before[1 + 2 * (n - 1) :] + conv.messages[-2:-1]
    assert len(short.encode_prompt(one_fewer)) + 8 > WINDOW * 3 // 4
    # The answer is the one a fresh request with those messages gets (greedy).
    assert answer == short.generate(conv.messages[:-1], max_new_tokens=8)
    assert conv.context_tokens == len(prompt) + 8 - 1  # (the last token is not yet in the KV)
    # The next turn reuses the KV again (at least all of the last prompt's: a random
    # model's answer may encode to other tokens than it was generated as).
    conv.send("and then", max_new_tokens=8)
    assert conv.dropped == 0
    assert short.stats()["reused_tokens"] >= len(prompt)


def test_without_trim_a_chat_past_the_window_is_refused(short):
    conv = short.chat(system="sys", trim=False)
    with pytest.raises(ContextLengthError, match="start a new conversation"):
        for i in range(40):
            conv.send(TURNS[i % len(TURNS)], max_new_tokens=8)
    assert len(short.encode_prompt(conv.messages)) < WINDOW


def test_a_turn_longer_than_the_window_is_refused_after_dropping(short):
    conv = short.chat()
    conv.send("the river", max_new_tokens=4)
    with pytest.raises(ContextLengthError, match="does not fit even with"):
        conv.send("the river " * 200)
    assert len(conv.messages) == 2 and conv.dropped == 0  # (the conversation is as it was)
    assert conv.send("seven", max_new_tokens=4)


def test_a_document_chat_keeps_its_first_exchange_also_when_resumed(short, tmp_path):
    short.load_document("a heron by the bridge.")
    conv = short.chat_about_document()
    conv.send("what is by the bridge?", max_new_tokens=6)
    first = list(conv.messages[:2])
    assert "heron by the bridge" in first[0]["content"]
    assert conv.pinned == 2
    conv.save(tmp_path / "chat")
    resumed = Runtime.load_session(tmp_path / "chat", model=short).resume_chat()
    assert resumed.pinned == 2 and resumed.messages == conv.messages
    for c in (conv, resumed):
        before, answer = chat_until_dropped(c, new=6)
        assert c.messages[:2] == first  # the document's exchange stays
        assert c.messages[2:-2] == before[2 + 2 * c.dropped :]
    assert conv.messages == resumed.messages
    # saved before `pinned_messages` existed: the document's exchange is found all the same
    old = tmp_path / "chat"
    rewrite_manifest(open_session(old), lambda m: m.pop("pinned_messages"))
    assert "pinned_messages" not in open_session(old).manifest
    assert Runtime.load_session(old, model=short).resume_chat().pinned == 2


def test_the_chat_command_says_when_it_dropped_exchanges(short):
    turns = [f"{TURNS[i % len(TURNS)]} {i}" for i in range(30)] + ["/exit"]
    r = CliRunner().invoke(
        main, ["chat", "-m", str(short.path), "--set", "dtype=float32", "-n", "8"],
        input="\n".join(turns) + "\n",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = r.output.replace("\n", " ")  # (rich wraps at 80 columns)
    assert out.count("tok/s") == 30 and "error" not in out
    notes = re.findall(r"the (\d+ )?oldest exchanges? (?:was|were) dropped to fit the model's "
                       r"256-token context window", out)  # fmt: skip
    assert notes
