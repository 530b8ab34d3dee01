"""The runtime's documents and sessions: `load_document` and `ask`, `save_session` and
`load_session`, a loaded chat's `resume_chat` and `chat_about_document` (a mixin of
`Runtime`, offload/runtime.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from offload import caches
from offload.budgets import device_memory, out_of_memory
from offload.config import RuntimeConfig
from offload.conversation import Conversation, KVState, common_prefix
from offload.errors import OffloadError
from offload.generate import Progress, prefill
from offload.tokenizer import check_system
from storage import threads
from storage.errors import StorageError

if TYPE_CHECKING:
    from offload.runtime import Runtime
    from offload.session import SessionRef


def dropped(state: KVState, e: BaseException, what: str) -> None:
    """After `e` stopped a forward pass partway (an error, Ctrl-C), which may leave layers
    at different lengths: keep the tokens every layer had finished (the context before
    the request, and what of it was done), drop the rest; torch's out-of-memory error is
    raised as a `DeviceMemoryError` saying so (the caller re-raises anything else)."""
    state.keep_finished()
    state.cache.forget_index()  # (it may have stopped inside an update: rebuilt next time)
    if isinstance(e, torch.OutOfMemoryError):
        raise out_of_memory(f"{what} (the tokens it had not finished were dropped)", e) from e


class DocumentsAndSessions:
    """`Runtime`'s document and session methods (on the runtime's own `_state`,
    `document`, `session_ref`, `prompts` and `loaded`)."""

    def _document_ids(self) -> list[int]:
        """Token ids of the document part of every question's prompt (a shared prefix)."""
        return self.prompts.document_ids(self.document)

    def load_document(
        self, text: str, system: str | None = None, progress: Progress | None = None
    ) -> dict:
        """Prefill a document (and build its index) so that `ask` prefills only questions.

        Returns figures: tokens, prefill and index seconds."""
        requests = self.loaded.requests
        with requests.on(self._state):
            return requests.run(self._read_document, text, system, progress)

    def _read_document(self, text: str, system: str | None, progress: Progress | None) -> dict:
        if not isinstance(text, str):
            raise OffloadError(f"the document must be a string, not {type(text).__name__}")
        check_system(system)
        if not text.strip():
            raise OffloadError("the document is empty")
        self.document = {"text": text, "system": system}
        # (another document: a save must not replace a session unasked, nor read it back)
        self.session_ref = self.document_ref = None
        ids = self._document_ids()
        self._check_fits(ids, "the document")
        caches.check_room(self, self._state.cache, len(ids), "the document")
        new_ids, reused = self._state.prepare(ids, need_logits=False)
        self._state.computed(reused, len(ids), self.config.generation.prefill_chunk)
        self._state.ids = list(ids)  # (the cache holds a prefix of them: `dropped`)
        t = time.perf_counter()
        try:
            if new_ids:
                prefill(
                    self.model,
                    self._state.cache,
                    new_ids,
                    self.config.generation.prefill_chunk,
                    self._following(progress),
                )
            prefill_s = time.perf_counter() - t
            self._state.cache.finish_prefill(progress)
            self._state.cache.preload_index()
        except BaseException as e:
            self.document = None
            dropped(self._state, e, "reading the document")
            raise
        self._last_state = self._state
        index_s = time.perf_counter() - t - prefill_s
        return {"tokens": len(ids), "prefill_tokens": len(new_ids), "prefill_seconds": prefill_s,
                "index_seconds": index_s}  # fmt: skip

    def stream_ask(
        self, question: str, max_new_tokens: int | None = None, progress=None, **sampling
    ):
        """Answer a question about the loaded document; every question starts from the
        document's KV (earlier questions and answers are cut away, not attended)."""
        ids, shared = self.prompts.question(self.document, question)
        return self._run(self._state, ids, max_new_tokens, sampling, progress, shared)

    def ask(self, question: str, max_new_tokens: int | None = None, **sampling) -> str:
        return "".join(s.text for s in self.stream_ask(question, max_new_tokens, **sampling))

    def save_session(self, path: str | Path, replace: bool = False) -> dict:
        """Save the runtime's KV (a loaded document, or the last prompt) to a session
        directory: a new or empty one, the session this runtime was loaded from or last
        saved to, or another session when `replace` says so."""
        requests = self.loaded.requests
        with requests.on(self._state):
            info, self.session_ref = requests.run(self._save, path, replace)
        self.document_ref = self.session_ref
        return info

    def _save(self, path: str | Path, replace: bool) -> tuple[dict, SessionRef]:
        from offload.session import save_state

        own, kind, extra = self.session_ref, "prompt", {}
        if self.document is not None:
            # A document session holds the document only: cut any question and answer away
            # (and where its KV went to a conversation, `chat_about_document`, read it again).
            self._read_back(self._document_ids())
            if self._state.prepare(self._document_ids(), need_logits=False)[0]:
                self._read_document(self.document["text"], self.document.get("system"), None)
            kind, extra = "document", {"document": self.document}
        return save_state(self, self._state, path, kind, extra, replace, own)

    @classmethod
    def load_session(
        cls,
        path: str | Path,
        config: str | Path | RuntimeConfig | None = None,
        model=None,
        **overrides,
    ) -> Runtime:
        """A Runtime holding a saved session's KV. `model` (a name, path or Runtime; the
        default model if not given) must be the one the session was made with: a
        session never chooses which model file is opened. The config is the session's
        (less the keys that describe the machine it was made on) unless `config` is
        given."""
        from offload.session import load_state

        with device_memory("loading the session"):  # (on a thread that ends: `threads.apart`)
            rt = threads.apart(load_state, path, config, model, **overrides)
        if rt.session.get("kind") == "document":
            rt.document = rt.session["document"]
        return rt

    def resume_chat(self) -> Conversation:
        """The conversation of a loaded chat session, continuing on its KV."""
        from offload.session import check_session_kind

        info = check_session_kind(self, "chat")
        conv = Conversation(self, system=None, state=self._state, messages=info["messages"],
                            pinned=info.get("pinned_messages"))  # fmt: skip
        conv.session_ref = self.session_ref  # (`/save` to where it came from continues it)
        self._hand_over()
        return conv

    def chat_about_document(self) -> Conversation:
        """A conversation about the loaded document: its first turn is a question about
        the document (the prompt `ask` builds), so the document's KV is reused; later
        turns follow as in any chat. `/save` makes it a chat session."""
        doc = self.document
        if doc is None:
            raise OffloadError(
                "no document loaded: call load_document() or load a document session"
            )
        system = [{"role": "system", "content": doc["system"]}] if doc.get("system") else []
        conv = Conversation(self, system=doc.get("system"), state=self._state, messages=system)
        conv.document = doc["text"]
        self._hand_over()
        return conv

    def _read_back(self, ids: list[int]) -> None:
        """Where another request on the runtime's cache (a `generate`) cut away more than
        half of the document it was loaded with or saved as, or the KV went to a
        conversation (`chat_about_document`), and `ids` begin with that document, read the session back from its files (where it is still that version)
        instead of prefilling the document again (3,892 tokens on a 2-core CPU: the
        question after it 0.9 s in all, where it prefilled the document in 13.9 s)."""
        if self.document_ref is None or self.document is None:
            return
        doc = self._document_ids()
        if ids[: len(doc)] != doc:
            return
        if len(doc) - common_prefix(self._state.ids, doc) <= len(doc) // 2:
            return
        from offload.session import read_back

        try:
            read_back(self, self._state, self.document_ref)
        except (OffloadError, StorageError, OSError):
            pass  # (saved again or gone since: the request prefills the document)

    def _hand_over(self) -> None:
        """The runtime's KV is a conversation's now: the runtime starts empty, and its
        own save no longer continues the session it was loaded from."""
        self._state = KVState(self.new_cache())
        self.session_ref = None
