"""A runtime's prompts as token ids (`Prompts`): rendered with the model's chat template,
and the leading parts that later prompts share, a loaded document's and a system
message's, whose ends are where a prefill's passes break (docs/design.md, "Where a
prompt's prefill passes break")."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from offload.conversation import DOCUMENT_PROMPT, common_prefix
from offload.errors import OffloadError
from offload.tokenizer import Tokenizer, check_messages
from storage import threads

Prompt = str | list[dict[str, str]]
# How a question about a loaded document is put to the model. The document comes
# first so its KV is a prefix shared by every question.
QUESTION_MARK = "\x00question\x00"

# A long prompt that begins as one encoded before (a loaded document's questions, a
# chat's earlier turns) keeps that one's tokens up to a little before where the two
# differ, and only the rest is encoded (`Prompts.encode_text`): encoding 150k tokens
# again from the start took 0.25 s here, at each question. Only for a tokenizer whose
# tokens depend on the text near them alone (`Tokenizer.splits_locally`).
SHARED_AT_LEAST = 8192  # characters in common, below which a prompt is encoded whole
MARGIN = 64  # characters before the difference that a kept token must end by: more than
# any split's look-ahead or special token
CHECK = 16  # kept tokens encoded again with the rest, and compared: the rest's encoding
# begins where the kept tokens' did
PROMPTS_KEPT = 4  # long prompts encoded whole kept (conversations about other documents)


@dataclass(frozen=True, eq=False)
class Encoded:
    """A text encoded whole: its ids, and its `tokenizers.Encoding` (where each token is)."""

    text: str
    ids: list[int]
    encoding: Any


def document_messages(document: dict | None, question: str) -> list[dict[str, str]]:
    """The messages of a question about `document` (`Runtime.load_document`'s)."""
    if document is None:
        raise OffloadError("no document loaded: call load_document() or load a document session")
    user = DOCUMENT_PROMPT.format(document=document["text"], question=question)
    system = [{"role": "system", "content": document["system"]}] if document.get("system") else []
    return system + [{"role": "user", "content": user}]


class Prompts:
    """A runtime's prompts: encoded, and their shared leading parts kept (the module's)."""

    def __init__(self, tokenizer: Tokenizer, variables: Callable[[], dict[str, Any]]):
        self.tokenizer = tokenizer
        # the template's own inputs, as the runtime's config has them now
        # (`generation.template_variables`)
        self.variables = variables
        self._leading: dict[str, tuple] = {}  # kind -> (its content, its ids): `_leading_ids`
        # long texts encoded whole, kept (`encode_text`): the last of each leading part
        # ("document", "system"), and the last prompts, the latest used first
        self._leading_encoded: dict[str, Encoded] = {}
        self._prompts: tuple[Encoded, ...] = ()
        self.after_fork()
        threads.renew_after_fork(self)

    def after_fork(self) -> None:
        self._leading_lock = threading.Lock()  # (held while one is encoded: `_leading_ids`)

    def ahead(self, document: dict | None, messages: list[dict[str, str]] | None) -> None:
        """Encode now, on a thread, what a loaded session's first request begins with:
        the document's part of every question, or a chat's messages; kept, so that the
        request encodes its own part alone (`encode_text`; a session loading and its
        user typing meanwhile)."""

        def encode() -> None:
            try:
                if document is not None:
                    self.document_ids(document)
                elif messages:
                    self.encode_text(self.tokenizer.apply_chat_template(
                        messages, False, variables=self.variables()))  # fmt: skip
            except Exception:  # (the request itself will say what is wrong, if it is)
                pass

        if document is not None or messages:
            threads.thread(encode, "offload-encode", daemon=True).start()

    def encode(self, prompt: Prompt) -> list[int]:
        """A string becomes one user turn of the chat template; messages are rendered as given."""
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            check_messages(prompt)
            messages = prompt
        return self.encode_text(
            self.tokenizer.apply_chat_template(messages, True, False, self.variables())
        )

    def encode_text(self, text: str, kind: str = "prompt") -> list[int]:
        """`text`'s token ids, as the tokenizer gives them. A prompt that begins as a long
        text encoded before keeps its tokens but the last ones before where they differ,
        and encodes the rest (the module's comment); the kept tokens' last `CHECK` are
        encoded again with the rest and must come out the same, or the text is encoded
        whole. A text encoded whole is kept for the next (the last leading part of each
        `kind`, the last `PROMPTS_KEPT` prompts). (Threads share this: what is kept is
        replaced, never changed.)"""
        local = self.tokenizer.splits_locally and len(text) >= SHARED_AT_LEAST
        if local and kind == "prompt":
            leading = list(self._leading_encoded.values())
            kept = leading + list(self._prompts)
            shares = sorted(
                ((common_prefix(e.text, text), i) for i, e in enumerate(kept)), reverse=True
            )
            for shared, i in shares:
                if shared < SHARED_AT_LEAST:
                    break
                ids = _encoded_after(self.tokenizer, kept[i], text, shared)
                if ids is not None:
                    if i >= len(leading):  # (a prompt: the latest used first)
                        self._keep(kept[i])
                    return ids
        encoding = self.tokenizer.encoding(text)
        ids = encoding.ids
        if local and kind == "prompt":
            self._keep(Encoded(text, ids, encoding))
        elif local:
            self._leading_encoded = {**self._leading_encoded, kind: Encoded(text, ids, encoding)}
        return ids

    def _keep(self, encoded: Encoded) -> None:
        others = tuple(e for e in self._prompts if e is not encoded)
        self._prompts = (encoded, *others[: PROMPTS_KEPT - 1])

    def question(self, document: dict | None, question: str) -> tuple[list[int], int]:
        """A question about `document` (`Runtime.load_document`'s): its prompt's ids, and
        how many of them are the document part of every question's prompt, prefilled as
        passes of their own where the cache lacks them (`Runtime._computed`'s `shared`),
        so that the next question reuses all of it."""
        document_ids = self.document_ids(document)  # (first: the prompt is encoded from it)
        ids = self.encode(document_messages(document, question))
        return ids, common_prefix(ids, document_ids)

    def document_ids(self, document: dict | None) -> list[int]:
        """Token ids of the document part of every question's prompt (a shared prefix)."""

        def text() -> str:
            full = self.tokenizer.apply_chat_template(
                document_messages(document, QUESTION_MARK), variables=self.variables()
            )
            return full[: full.index(QUESTION_MARK)]

        doc = document or {}
        return self._leading_ids("document", (doc.get("text"), doc.get("system")), text)

    def system_prefix(self, prompt: Prompt, ids: list[int]) -> int:
        """How many of `ids` (the prompt's) are its leading system message, as the
        template writes it alone: prefilled as passes of their own (`Runtime._computed`'s
        `shared`), so that the next request with the same system prompt (a server's long
        instructions) reuses all of it; before, it was prefilled again whole each time
        (where it was within a prefill chunk)."""
        if isinstance(prompt, str) or len(prompt) < 2 or prompt[0]["role"] != "system":
            return 0

        def text() -> str:
            try:
                return self.tokenizer.apply_chat_template(
                    prompt[:1], False, variables=self.variables()
                )
            except OffloadError:  # (a template that takes no lone system message)
                return ""

        return common_prefix(ids, self._leading_ids("system", prompt[0]["content"], text))

    def _leading_ids(self, kind: str, key: Any, text: Callable[[], str]) -> list[int]:
        """The ids of `text()`, the leading part of prompts of `kind` whose content is
        `key`, kept for the next prompt with the same, rendered alike (128k tokens take
        a quarter of a second to encode)."""
        key = (key, self.variables())
        with self._leading_lock:  # (another thread encoding it: `ahead`)
            kept = self._leading.get(kind)
            if kept is None or kept[0] != key:
                body = text()
                kept = self._leading[kind] = (key, self.encode_text(body, kind) if body else [])
            return kept[1]


def _encoded_after(
    tokenizer: Tokenizer, earlier: Encoded, text: str, shared: int
) -> list[int] | None:
    """`text`'s ids from `earlier`'s, whose text's first `shared` characters it shares:
    `earlier`'s up to a token ending `MARGIN` characters before the difference, less
    `CHECK`, and the encoding of the rest of `text` from where they end, whose first
    tokens must be the `CHECK` ones. None where that fails, or the rest is the most of
    `text` (then it is encoded whole, to be kept)."""
    encoding = earlier.encoding
    last = encoding.char_to_token(shared - MARGIN) if shared >= MARGIN else None
    if last is None or last < CHECK:
        return None
    first = last - CHECK
    start = encoding.token_to_chars(first)[0]
    while first > 0 and encoding.token_to_chars(first - 1)[1] > start:
        first -= 1  # (a character in several tokens: from its first)
    if 2 * (len(text) - start) > len(text):
        return None
    rest = tokenizer.encode(text[start:])
    if rest[: last - first] != earlier.ids[first:last]:
        return None
    return earlier.ids[:first] + rest
