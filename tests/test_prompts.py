"""Prompts encoded in part: a long prompt that begins as one encoded before (a loaded
document's questions, a chat's earlier turns) keeps its tokens up to a little before
where they differ, and must come out exactly as the tokenizer encodes it whole, for
every tokenizer kind that allows it (`Tokenizer.splits_locally`)."""

import dataclasses
import random

import pytest

from offload import Runtime, prompts
from offload.gguf import open_gguf
from offload.prompts import Prompts, document_messages
from offload.tokenizer import _SPLITS, Tokenizer
from tests.conftest import filler_text
from tests.gguf_files import write_gguf

PIECES = [" ", "  ", "\n", "\n\n", " \n", "\t", "\r\n", "12345", "7", "...", "!?", "'s", "'T",
          " don't", "é", "Ñandú", "東京", "😀", " 😀", "CamelCase", "HTTPServer", "x=1;",
          "<|im_start|>", "<|im_end|>", "a", "ab", "Question:", "\u2581"]  # fmt: skip


def random_text(rng: random.Random, n: int) -> str:
    words = filler_text(n, seed=rng.randrange(1000)).split(" ")
    out = []
    for word in words:
        out.append(rng.choice(PIECES) if rng.random() < 0.3 else " " + word)
    return "".join(out)


def split_as(base: Tokenizer, pattern: str | None) -> Tokenizer:
    """`base` with its text split as a GGUF's `tokenizer.ggml.pre` says (`pattern`: one of
    `_SPLITS`; None: GPT-2's own split), as `Tokenizer.from_gguf` builds it."""
    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_str(base.backend.to_str())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pattern is None)
    split = [] if pattern is None else [pre_tokenizers.Split(Regex(pattern), "isolated")]
    backend.pre_tokenizer = pre_tokenizers.Sequence([*split, byte_level])
    return dataclasses.replace(base, backend=backend)


def spy(monkeypatch, tok: Tokenizer, encoded: list[int]) -> None:
    """The lengths of the texts `tok` encodes go into `encoded`."""
    real = tok.encoding
    monkeypatch.setattr(tok, "encoding", lambda t, *a: encoded.append(len(t)) or real(t, *a))


@pytest.fixture(scope="module")
def tokenizers(tiny_dirs, smol_bf16):
    smol = smol_bf16.tokenizer
    kinds = {"hf byte-level": Tokenizer.from_hf_dir(tiny_dirs["llama-gqa-untied"][0]),
             "embedded": smol, "gpt-2": split_as(smol, None)}  # fmt: skip
    for pre in ("llama-bpe", "qwen2", "tekken", "gpt-4o"):
        kinds[pre] = split_as(smol, _SPLITS[pre])
    return kinds


def test_a_prompt_encoded_in_part_is_the_tokenizers_encoding(tokenizers, monkeypatch):
    monkeypatch.setattr(prompts, "SHARED_AT_LEAST", 200)
    rng = random.Random(0)
    for name, tok in tokenizers.items():
        assert tok.splits_locally, name
        p = Prompts(tok, dict)
        encoded = []  # the lengths of the texts the tokenizer was given
        spy(monkeypatch, tok, encoded)
        in_part = 0
        for case in range(40):
            if case % 8 == 0:  # (a new earlier text now and then)
                p.encode_text(random_text(rng, 150))
            earlier = p._prompts[0].text  # (the latest kept)
            cut = rng.randrange(len(earlier) // 2, len(earlier) + 1)
            text = earlier[:cut] + random_text(rng, rng.randrange(0, 12))
            encoded.clear()
            ids = p.encode_text(text)
            assert ids == tok.backend.encode(text).ids, (name, text[cut - 80 :])
            in_part += len(text) >= 200 and encoded[0] < len(text) // 2
        assert in_part >= 20, (name, in_part)  # (most of them were encoded in part)


def test_a_tokenizer_whose_tokens_depend_on_text_far_off_encodes_prompts_whole(tmp_path, smol_bf16):
    # SentencePiece's: a space before the text; the whole text one piece
    path = write_gguf(tmp_path / "spm.gguf", sentencepiece=True)
    assert not Tokenizer.from_gguf(open_gguf(path), path).splits_locally
    # a special token that takes the whitespace before it, however long
    from tokenizers import AddedToken

    stripping = split_as(smol_bf16.tokenizer, None)
    stripping.backend.add_special_tokens([AddedToken("<|mark|>", lstrip=True)])
    assert not stripping.splits_locally


def test_questions_and_chat_turns_about_a_long_document_encode_only_their_own_part(
    smol_bf16, monkeypatch
):
    """Before, every question about a 150k-token document encoded it again (0.25 s)."""
    rt = Runtime(smol_bf16.loaded, smol_bf16.config, smol_bf16.device)
    tok, encoded = rt.tokenizer, []
    spy(monkeypatch, tok, encoded)
    document = {"text": filler_text(3000, seed=3), "system": None}
    for question in ("Which word comes first?", "\n  And 12345 after it? 😀"):
        messages = document_messages(document, question)
        want = tok.backend.encode(tok.apply_chat_template(messages)).ids
        encoded.clear()
        assert rt.prompts.question(document, question)[0] == want
        first = question[0] == "W"  # (the document part is encoded once, whole)
        assert len(encoded) == 1 + first and encoded[-1] < 1000 < len(document["text"])
    conv = [*messages, {"role": "assistant", "content": "It is the river."}]
    for turn in ("Say it again.", "And once more?"):
        conv.append({"role": "user", "content": turn})
        encoded.clear()
        assert rt.encode_prompt(conv) == tok.backend.encode(tok.apply_chat_template(conv)).ids
        assert max(encoded) < 1000
        conv.append({"role": "assistant", "content": "The river."})


def test_prompts_about_other_documents_in_turn_are_each_encoded_in_part(smol_bf16, monkeypatch):
    """Conversations about different long texts, served in turn by one runtime (a
    server's): the last `PROMPTS_KEPT` prompts encoded whole are kept, not the last alone."""
    p, encoded = Prompts(smol_bf16.tokenizer, dict), []
    spy(monkeypatch, smol_bf16.tokenizer, encoded)
    texts = [filler_text(2500, seed=s) for s in range(prompts.PROMPTS_KEPT)]
    for text in texts:
        p.encode_text(text)
    encoded.clear()
    for turn in range(2):
        for text in texts:
            want = smol_bf16.tokenizer.backend.encode(text + f" turn {turn}").ids
            assert p.encode_text(text + f" turn {turn}") == want
    assert max(encoded) < 1000 and len(encoded) == 2 * len(texts)
