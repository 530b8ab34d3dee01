"""Tokenizer: HF `tokenizers` from `tokenizer.json`, or built from GGUF metadata.

Chat templates are rendered with jinja2 the way HF renders them (sandboxed,
`trim_blocks`, `lstrip_blocks`, `raise_exception`, `tojson`), within bounds of
time and size (offload/templates.py), and the rendered text is encoded without
adding special tokens: the template writes them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from offload.errors import ConfigError, ModelLoadError, OffloadError
from offload.model_args import whole_number
from storage.errors import first_line

# Used only when a model ships no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# End-of-turn tokens that stop generation when the vocabulary has them.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>")

# Pre-tokenizer split patterns of llama.cpp's `tokenizer.ggml.pre` names.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# Mistral's tekken (Mistral Nemo): words split before capitals, digits one by one;
# OpenAI's o200k (`gpt-4o`: Phi-4-mini): the same words with English contractions kept
# on, digits in threes
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"


def _cased_split(suffix: str, digits: str) -> str:
    return (
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{suffix}|"
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{suffix}|"
        rf"{digits}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )


_TEKKEN_SPLIT = _cased_split("", r"\p{N}")
_GPT4O_SPLIT = _cased_split("(?i:'s|'t|'re|'ve|'m|'ll|'d)?", r"\p{N}{1,3}")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "tekken": _TEKKEN_SPLIT,
           "gpt-4o": _GPT4O_SPLIT}  # fmt: skip
_GPT2_PRE = ("default", "gpt-2", "gpt2", "")  # GPT-2's own split (ByteLevel's regex)


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the chat template and stop ids of one model."""

    backend: Any  # tokenizers.Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    stop_ids: tuple[int, ...]
    note: str | None = None  # what a user should know about how text is split

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.encoding(text, add_special_tokens).ids

    def encoding(self, text: str, add_special_tokens: bool = False):
        """`text`'s `tokenizers.Encoding` (ids, and where each token is in the text).
        (A batch of one: its `encode_batch` lets other threads run meanwhile, its `encode`
        does not, 0.25 s for 150k tokens.)"""
        check_text(text)
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    @cached_property
    def splits_locally(self) -> bool:
        """Whether a token depends on the text near it only: the text is cut into pieces
        by a regular expression (byte-level BPE's, or a `Split`), each piece encoded on
        its own, with no normalizer but NFC. So where two texts share a long beginning,
        the tokens that end well before they differ are the same, and the rest is the
        encoding of the rest (`offload.prompts`). Not so for SentencePiece's (a space
        prefix at the start of the text; the whole text one piece)."""
        state = json.loads(self.backend.to_str())
        normalizer, pre = state.get("normalizer"), state.get("pre_tokenizer") or {}
        if normalizer is not None and normalizer.get("type") != "NFC":
            return False
        strips = ("lstrip", "rstrip", "single_word")  # (whitespace far off may join one)
        if any(t.get(k) for t in state.get("added_tokens") or [] for k in strips):
            return False
        parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        kinds = {part.get("type") for part in parts}
        byte_level = [part for part in parts if part.get("type") == "ByteLevel"]
        if any(part.get("add_prefix_space") for part in byte_level):
            return False  # (a space before the text's first piece)
        regex = "Split" in kinds or any(part.get("use_regex", True) for part in byte_level)
        return regex and kinds <= {"Split", "ByteLevel", "Digits"}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @cached_property
    def _template(self):
        from jinja2 import TemplateError

        from offload.templates import BoundedEnvironment

        env = BoundedEnvironment()
        try:
            return env, env.from_string(self.chat_template or CHATML_TEMPLATE)
        except TemplateError as e:
            raise ModelLoadError(f"the model's chat template does not parse: {e}") from None

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        variables: dict[str, Any] | None = None,
    ) -> str | list[int]:
        """The messages as the model's template writes them (`variables`: more of the
        template's inputs, such as Qwen3's `enable_thinking`)."""
        from jinja2 import TemplateError

        check_messages(messages)
        # A final assistant message is continued, not closed (HF's continue_final_message):
        # it primes the answer, e.g. "The secret passphrase is".
        prime = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        env, template = self._template
        try:
            text = env.render(
                template,
                sum(len(m["content"]) for m in messages),
                messages=messages,
                add_generation_prompt=add_generation_prompt and prime is None,
                **{
                    **(variables or {}),
                    "bos_token": self.bos_token or "",
                    "eos_token": self.eos_token or "",
                },
            )
        except TemplateError as e:
            raise OffloadError(f"chat template refused the messages: {e}") from None
        if prime is not None:
            cut = text.rfind(prime)
            if cut < 0 or not prime:
                raise OffloadError(
                    "cannot continue the final assistant message: the template changed it"
                )
            text = text[: cut + len(prime)]
        return self.encode(text) if tokenize else text

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the vocabulary, merges, specials and template: what decides token ids."""
        h = hashlib.sha256(self.backend.to_str().encode())
        h.update((self.chat_template or "").encode())
        return h.hexdigest()

    # -- construction ------------------------------------------------------

    def to_state(self) -> dict:
        """JSON-ready state (the weight cache keeps it beside the converted model)."""
        return {"backend": self.backend.to_str(), "chat_template": self.chat_template,
                "bos_token": self.bos_token, "eos_token": self.eos_token,
                "stop_ids": list(self.stop_ids), "note": self.note}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(state["backend"]), state["chat_template"],
                   state["bos_token"], state["eos_token"], tuple(state["stop_ids"]),
                   state.get("note"))  # fmt: skip

    @classmethod
    def from_hf_dir(cls, directory: Path, eos_ids: tuple[int, ...] = ()) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{directory}: no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot load tokenizer: {e}") from None
        cfg_path = directory / "tokenizer_config.json"
        cfg = _read_json(cfg_path)
        gen_path = directory / "generation_config.json"
        gen = _read_json(gen_path)
        template = _chat_template(cfg.get("chat_template"), cfg_path)
        if template is None and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        bos = _token_text(cfg.get("bos_token"), "bos_token", cfg_path)
        eos = _token_text(cfg.get("eos_token"), "eos_token", cfg_path)
        gen_eos = gen.get("eos_token_id")
        ids = _token_ids(gen_eos if isinstance(gen_eos, list) else [gen_eos], gen_path)
        if eos and backend.token_to_id(eos) is not None:
            ids.append(backend.token_to_id(eos))
        return cls(backend, template, bos, eos, _stop_ids(backend, list(eos_ids) + ids))

    @classmethod
    def from_gguf(cls, reader, path: Path) -> Tokenizer:
        """Byte-level BPE (`gpt2`: Llama 3, Qwen, Mistral Nemo, SmolLM) or SentencePiece
        BPE (`llama`: Llama 2, Mistral 7B) from a GGUF file's `tokenizer.ggml.*` keys."""
        from offload.gguf import field_value

        kind = field_value(reader, "tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise ModelLoadError(
                f"{path}: tokenizer type {kind!r} is not supported yet (byte-level BPE 'gpt2' "
                "and SentencePiece BPE 'llama' are); use the model's HF directory instead"
            )
        tokens = list(field_value(reader, "tokenizer.ggml.tokens"))
        types = list(field_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
        vocab = {tok: i for i, tok in enumerate(tokens)}
        merges = field_value(reader, "tokenizer.ggml.merges")  # (SentencePiece: usually none)
        if merges is not None and (
            not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges)
        ):
            raise ModelLoadError(
                f'{path}: tokenizer.ggml.merges must be a list of merges, two tokens each ("a b")'
            )
        try:
            merges = None if merges is None else [tuple(m.split(" ", 1)) for m in merges]
            if kind == "llama":
                backend, note = _sentencepiece(reader, tokens, vocab, merges), None
            else:
                backend, note = _byte_level(reader, vocab, merges, path)
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise ModelLoadError(
                f"{path}: the GGUF vocabulary or merges are invalid: {first_line(e)}"
            ) from None
        # Control (3) and user-defined (4) tokens are matched whole in input text.
        from tokenizers import AddedToken

        specials = [tokens[i] for i, t in enumerate(types) if t in (3, 4)]
        backend.add_special_tokens(
            [AddedToken(s, special=True, normalized=False) for s in specials]
        )

        def tok(key):
            i = field_value(reader, key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        eos_id = field_value(reader, "tokenizer.ggml.eos_token_id")
        return cls(
            backend,
            _chat_template(field_value(reader, "tokenizer.chat_template"), path),
            tok("tokenizer.ggml.bos_token_id"),
            tok("tokenizer.ggml.eos_token_id"),
            _stop_ids(backend, _token_ids([eos_id], path)),
            note,
        )


def check_messages(messages) -> None:
    if not isinstance(messages, list):  # (a prompt is a string, or messages)
        raise OffloadError(
            "a prompt is a string or a list of {'role', 'content'} dicts, "
            f"not {type(messages).__name__}"
        )
    if not messages:
        raise OffloadError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise OffloadError(f"messages[{i}] must be a dict with string 'role' and 'content'")
        check_text(m["content"], f"messages[{i}]")


def check_system(system) -> None:
    """A system prompt is a string, or None for none."""
    if system is not None and not isinstance(system, str):
        raise OffloadError(f"the system prompt must be a string, not {type(system).__name__}")


def check_text(text: str, what: str = "the text") -> None:
    """Text must be encodable as UTF-8: a command line or file read with surrogate
    escapes carries lone surrogates where its bytes were not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise OffloadError(
            f"{what} is not valid UTF-8 (bad byte at character {e.start}); "
            "convert it to UTF-8 first"
        ) from None


def _stop_ids(backend, ids: list[int]) -> tuple[int, ...]:
    out = list(ids)
    for token in END_OF_TURN:
        i = backend.token_to_id(token)
        if i is not None:
            out.append(i)
    return tuple(sorted(set(out)))


def _token_ids(values: list, source) -> list[int]:
    """`eos_token_id`'s ids (None: none), each a `whole_number`."""
    try:
        return [whole_number(v, "eos_token_id") for v in values if v is not None]
    except ConfigError as e:
        raise ModelLoadError(f"{source}: {e}") from None


def _token_text(value, key: str, path: Path) -> str | None:
    """A special token's text: a string, or a serialized AddedToken's content."""
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise ModelLoadError(f"{path}: {key} must be a token's text, got {value!r}")
    return text


def _chat_template(value, path: Path) -> str | None:
    """The template text of `chat_template`: a string, or of a list of named templates
    the one named "default" (None where none is)."""
    if isinstance(value, list):
        if not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and "template" in t
            for t in value
        ):
            raise ModelLoadError(
                f"{path}: chat_template: a list of templates must hold objects with a "
                "name and a template"
            )
        value = next((t["template"] for t in value if t["name"] == "default"), None)
    if value is not None and not isinstance(value, str):
        raise ModelLoadError(
            f"{path}: chat_template must be a template's text, got {type(value).__name__}"
        )
    return value


def _read_json(path: Path) -> dict:
    """A JSON object from `path` ({} where there is no such file)."""
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
        raise ModelLoadError(f"{path}: cannot read: {e}") from None
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _byte_level(reader, vocab: dict[str, int], merges, path: Path):
    """A byte-level BPE backend, split as the file's `tokenizer.ggml.pre` names, and a
    note where that name is not one this runtime knows."""
    from tokenizers import Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    from offload.gguf import field_value

    if merges is None:
        raise ValueError("no tokenizer.ggml.merges")
    backend = HFTokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    pre = field_value(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    note = None
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
        if pre not in _GPT2_PRE:
            note = (
                f"{path.name}: its tokenizer's pre-tokenizer {pre!r} is not one this "
                "runtime knows: text is split as GPT-2 splits it, so some tokens may "
                "differ from the model's own (use its HF directory for exact tokens)"
            )
    backend.decoder = decoders.ByteLevel()
    return backend, note


def _sentencepiece(reader, tokens: list[str], vocab: dict[str, int], merges):
    """A SentencePiece BPE backend: spaces as U+2581, one before each piece of text where
    the file says so (`add_space_prefix`, default on), characters outside the vocabulary
    as its <0xNN> byte tokens. The file's merges, or where it has none (as usual) the
    ones its scores imply: two pieces merge in the order of the merged piece's score,
    highest first, as llama.cpp's SentencePiece tokenizer merges them."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, normalizers
    from tokenizers.models import BPE

    from offload.gguf import field_value

    if merges is None:
        scores = list(field_value(reader, "tokenizer.ggml.scores", [0.0] * len(tokens)))
        merges = spm_merges(tokens, scores, vocab)
    unk = field_value(reader, "tokenizer.ggml.unknown_token_id")
    unk = tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None
    backend = HFTokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(field_value(reader, "tokenizer.ggml.add_space_prefix", True))
    # As SentencePiece encodes (and llama.cpp): the prefix before each piece of text
    # between special tokens, a text's leading spaces all kept ("  x": three U+2581)
    normal = [normalizers.Prepend("\u2581")] * prefix + [normalizers.Replace(" ", "\u2581")]
    backend.normalizer = normalizers.Sequence(normal)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * prefix)
    return backend


def spm_merges(tokens: list[str], scores: list[float], vocab) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces of the vocabulary (`vocab`, of `tokens`),
    ordered by the piece's score (highest first; ties: the earlier piece, then the
    longer left part)."""
    found = []
    for i, piece in enumerate(tokens):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((-scores[i], i, -cut, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


class StreamDecoder:
    """Incremental detokenization that never emits a broken UTF-8 sequence.

    Byte-level BPE can split one character over several tokens; decoding them one
    at a time would print U+FFFD. We decode a short window of recent tokens and
    release text only once it no longer ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = 0  # tokens before this were already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly '')."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """What is still held back at the end of generation, less a character cut
        short by the end (generation stopped inside a multi-token character)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :].rstrip("\ufffd")
