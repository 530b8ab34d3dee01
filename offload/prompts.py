"""A runtime's prompts as token ids (`Prompts`): rendered with the model's chat template,
and the leading parts that later prompts share, a loaded document's and a system
message's, whose ends are where a prefill's passes break (docs/design.md, "Where a
prompt's prefill passes break")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from offload.conversation import DOCUMENT_PROMPT, common_prefix
from offload.errors import OffloadError
from offload.tokenizer import Tokenizer, check_messages

Prompt = str | list[dict[str, str]]
# How a question about a loaded document is put to the model. The document comes
# first so its KV is a prefix shared by every question.
QUESTION_MARK = "\x00question\x00"


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

    def encode(self, prompt: Prompt) -> list[int]:
        """A string becomes one user turn of the chat template; messages are rendered as given."""
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            check_messages(prompt)
            messages = prompt
        return self.tokenizer.apply_chat_template(messages, True, True, self.variables())

    def document_prefix(self, document: dict | None, ids: list[int]) -> int:
        """How many of `ids` (a question's) are the document part of every question's
        prompt: prefilled as passes of their own where the cache lacks them (`Runtime.
        _computed`'s `shared`), so that the next question reuses all of it."""
        return common_prefix(ids, self.document_ids(document))

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
        kept, key = self._leading.get(kind), (key, self.variables())
        if kept is None or kept[0] != key:
            body = text()
            kept = self._leading[kind] = (key, self.tokenizer.encode(body) if body else [])
        return kept[1]
