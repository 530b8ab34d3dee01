"""The Python face of the runtime: `Runtime` (its `Conversation`s and the KV reuse
state are in offload/conversation.py).

    rt = Runtime.from_pretrained("smollm2")            # or an HF dir / .gguf path
    rt.generate("Summarise ...", max_new_tokens=64)    # -> str
    for step in rt.stream(messages): print(step.text, end="")
    conv = rt.chat(system="Be brief."); conv.send("hi"); conv.send("and then?")

A prompt's KV is kept after each call: the next call that starts with the same
tokens (a follow-up turn, another question on the same document) prefills only
what differs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from offload import caches, request_stats
from offload.attention import SelectionStats
from offload.backend import Backend, pick_device
from offload.budgets import device_memory, out_of_memory
from offload.config import DEFAULT_MODEL, RuntimeConfig
from offload.conversation import Conversation, KVState, common_prefix
from offload.cores import CoreWatch
from offload.errors import ConfigError, ContextLengthError, OffloadError
from offload.generate import (
    Progress,
    StepResult,
    apply_stops,
    generate_steps,
    make_sampler,
    prefill,
    stop_strings,
)
from offload.kvcache import KVCache
from offload.loading import LoadedModel, load
from offload.pipeline import PrefetchStats
from offload.prompts import Prompt, Prompts
from offload.thinking import opened_in
from storage import threads
from storage.errors import StorageError
from storage.layout import KVLayout
from storage.tiered import TierReads

if TYPE_CHECKING:
    from offload.session import SessionRef

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "seed", "repeat_penalty",
                 "repeat_last_n")  # fmt: skip


def _dropped(state: KVState, e: BaseException, what: str) -> None:
    """After `e` stopped a forward pass partway (an error, Ctrl-C), which may leave layers
    at different lengths: keep the tokens every layer had finished (the context before
    the request, and what of it was done), drop the rest; torch's out-of-memory error is
    raised as a `DeviceMemoryError` saying so (the caller re-raises anything else)."""
    state.keep_finished()
    state.cache.forget_index()  # (it may have stopped inside an update: rebuilt next time)
    if isinstance(e, torch.OutOfMemoryError):
        raise out_of_memory(f"{what} (the tokens it had not finished were dropped)", e) from e


class Runtime:
    """A loaded model, its tokenizer, a runtime config and the KV caches built from them."""

    def __init__(self, loaded: LoadedModel, config: RuntimeConfig, device: torch.device):
        if config.model.rope_scaling != loaded.rope:  # (it is in the weights' fingerprint)
            raise ConfigError(f"model.rope_scaling: the model was loaded with "
                              f"{loaded.rope or 'its own'!r}, not {config.model.rope_scaling!r}")  # fmt: skip
        self.loaded = loaded
        self.model = loaded.model
        sel, n = config.selection, loaded.args.max_seq_len
        if sel.sink > n or sel.window > n:  # more than the context window is the window
            config = config.replace(
                sink=min(sel.sink, n), window=max(config.kv.chunk_size, min(sel.window, n))
            )
        self.config = config
        self.device = device
        self.backend = Backend.for_device(
            device,
            graphs=config.model.cuda_graphs,
            compile=config.model.compile_step,
            head_dim=loaded.args.head_dim,
        )
        self.model.use_ops(self.backend.layer_ops)
        self._state = KVState(self.new_cache())
        self._stats: dict[str, Any] = {}
        self._last_state = self._state  # whose cache stats() reports
        self.thinking_opened = False  # the last prompt left a think block open (R1 distills)
        self.document: dict | None = None  # set by load_document / a document session
        self.prompts = Prompts(loaded.tokenizer, lambda: self.config.generation.template_variables)
        self.session: dict = {}  # what a loaded session said about itself
        # The session loaded from or last saved to: a save there needs no `replace` while
        # no other saver has saved there since (offload/session.py, `SessionRef`).
        self.session_ref: SessionRef | None = None
        # `model.threads = 0`: the threads follow the cores other processes leave free
        # (set by `from_pretrained`, which takes the first sample before the load)
        self.cores: CoreWatch | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_MODEL,
        config: str | Path | RuntimeConfig | None = None,
        **overrides: Any,
    ) -> Runtime:
        """Load a model (`smollm2`, an HF directory or a .gguf file) with a config.

        `config` is a TOML path or preset name from `offload/configs/`, a
        `RuntimeConfig`, or None for the defaults; `overrides` are `key=value` (e.g.
        `dtype="float32"`, `**{"generation.top_k": 40}`).
        """
        if config is None:
            cfg = RuntimeConfig()
        elif isinstance(config, RuntimeConfig):
            cfg = config
        else:
            cfg = RuntimeConfig.from_toml(config)
        if overrides:
            cfg = cfg.replace(**overrides)
        device = pick_device(cfg.model.device)
        cores = None if cfg.model.threads else CoreWatch().start()
        if cores is None:
            torch.set_num_threads(cfg.model.threads)
        dtype = getattr(torch, cfg.model.dtype)
        with device_memory("loading the model"):
            loaded = load(name_or_path, dtype, device, cfg.model.weights, cfg.model.rope_scaling)
            rt = cls(loaded, cfg, device)
        rt.cores = cores
        return rt

    # -- pieces --------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def args(self):
        return self.loaded.args

    @property
    def layout(self) -> KVLayout:
        a, kv = self.args, self.config.kv
        return KVLayout(a.num_layers, a.num_kv_heads, a.head_dim, self.config.model.dtype,
                        kv.chunk_size, kv.summary_bits)  # fmt: skip

    def new_cache(self, tiered: bool = False) -> KVCache:
        """A fresh cache: all KV in one device tensor per layer, or the tiered store
        (offload/caches.py says which, and moves one to the other)."""
        return caches.new_cache(self, tiered)

    def device_kv_tokens(self) -> int:
        """Mode "auto": tokens of KV the device cache holds before it moves to the tiers
        (`kv.device_bytes` on CUDA, `kv.host_bytes` on a CPU)."""
        return caches.device_kv_tokens(self)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """A string becomes one user turn of the chat template; messages are rendered as given."""
        return self.prompts.encode(prompt)

    def _check_fits(self, ids: list[int], what: str) -> None:
        limit = self.args.max_seq_len
        if len(ids) >= limit:
            raise ContextLengthError(
                f"{what} is {len(ids)} tokens; the model's context window is {limit} tokens "
                f"(at most {limit - 1} prompt tokens, leaving room for one generated token)"
            )

    def _sampling(self, max_new_tokens: int | None, sampling: dict[str, Any], context=()):
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown sampling option(s) {', '.join(unknown)}; known: {', '.join(SAMPLING_KEYS)}"
            )
        overrides = {f"generation.{k}": v for k, v in sampling.items()}
        if max_new_tokens is not None:
            overrides["generation.max_new_tokens"] = max_new_tokens
        g = self.config.replace(**overrides).generation if overrides else self.config.generation
        return g, make_sampler(g.temperature, g.top_k, g.top_p, g.seed, g.repeat_penalty,
                               g.repeat_last_n, context, g.min_p)  # fmt: skip

    def _run(
        self,
        state: KVState,
        ids: list[int],
        max_new_tokens: int | None,
        sampling: dict[str, Any],
        progress: Progress | None,
        shared: int = 0,
    ) -> Iterator[StepResult]:
        """The request's steps, once another thread's request on `state` is done, each
        computed with the model to itself (`Requests`)."""
        with self.loaded.requests.on(state):
            yield from self._steps(state, ids, max_new_tokens, sampling, progress, shared)

    def _steps(
        self, state, ids, max_new_tokens, sampling, progress, shared: int = 0
    ) -> Iterator[StepResult]:
        """The request's steps, each computed with the model to itself (the caller has
        `state` to itself)."""
        steps = self._computed(state, ids, max_new_tokens, sampling, progress, shared)
        return self.loaded.requests.stepped(state, steps)

    def _computed(
        self, state, ids, max_new_tokens, sampling, progress, shared: int = 0
    ) -> Iterator[StepResult]:
        """(`shared`: the first tokens of `ids` that later requests may share, a loaded
        document's or a leading system message's: where they are not all in the cache,
        they are prefilled as passes of their own, so that the next such request reuses
        all of them (`KVState` reuses KV up to where a pass began only). Where the passes
        break is a function of the prompt alone, so a request answers as on a fresh
        runtime. Before, a question whose document another request had cut away (a
        `generate`, a forked child's renewed cache) prefilled the document's last 2,000
        tokens or so again at each later question, and a long system prompt was
        prefilled again whole at each request.)"""
        self._check_fits(ids, "the prompt")
        if shared and state is self._state:
            self._read_back(ids)
        stops = stop_strings(sampling.pop("stop", None))
        g, sampler = self._sampling(max_new_tokens, sampling, ids)
        reach = min(len(ids) + g.max_new_tokens, self.args.max_seq_len)
        caches.check_room(self, state.cache, reach, "this request")
        new_ids, reused = state.prepare(ids)
        head = max(0, min(shared, len(ids) - 1) - reused)
        state.computed(reused, reused + head, g.prefill_chunk)
        state.computed(reused + head, len(ids), g.prefill_chunk)
        state.ids = list(ids)
        self._last_state = state
        if state.cache.store is not None:  # reads and selection are counted per request
            state.cache.store.reads = TierReads()
            recall = state.cache.policy.stats.recall
            state.cache.policy.stats = SelectionStats(recall=recall)
            if state.cache.prefetcher is not None:
                state.cache.prefetcher.stats = PrefetchStats()
        self._stats = request_stats.new_request(len(ids), reused, len(new_ids))
        self.thinking_opened = opened_in(ids, self.tokenizer)  # (the answer starts in a block)
        steps = apply_stops(generate_steps(
            self.model, state.cache, self.tokenizer, new_ids, g.max_new_tokens, sampler,
            prefill_chunk=g.prefill_chunk, progress=self._following(progress), head=head,
        ), stops)  # fmt: skip
        last_token = None
        try:
            for step in steps:
                if self.cores is not None:
                    self.cores.check()
                if last_token is not None:  # the previous token is now in the cache
                    state.ids.append(last_token)
                last_token = step.token_id
                self._stats["prefill_seconds"] = step.prefill_seconds
                self._stats["decode_tokens"] = step.index + 1
                self._stats["decode_seconds"] += step.step_seconds
                self._stats["finish_reason"] = step.finish_reason
                yield step
        except BaseException as e:
            # A consumer that stops between steps (GeneratorExit at the yield) leaves the
            # cache whole.
            if not isinstance(e, GeneratorExit):
                _dropped(state, e, "during this request")
            raise
        finally:
            steps.close()
            # A consumer that stopped early may leave the cache a step ahead of ids.
            if state.cache.num_tokens != len(state.ids):
                state.keep_finished()
            state.computed(len(ids), len(state.ids), 1)  # decode: one token a pass

    def _following(self, progress: Progress | None) -> Progress | None:
        """`progress`, and the threads following the machine (`CoreWatch`) at each of its
        calls: a long prefill reports after every chunk."""
        if self.cores is None:
            return progress
        cores = self.cores

        def following(done: int, total: int, what: str) -> None:
            cores.check()
            if progress is not None:
                progress(done, total, what)

        return following

    # -- public API ----------------------------------------------------------

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int | None = None,
        progress: Progress | None = None,
        **sampling: Any,
    ) -> Iterator[StepResult]:
        """Yield one `StepResult` per generated token.

        `sampling`: temperature, top_k, top_p, min_p, seed, repeat_penalty, repeat_last_n
        (defaults from the config's [generation]), and `stop`: a string or strings
        that end the answer where it first contains one (not included)."""
        ids = self.encode_prompt(prompt)
        shared = self.prompts.system_prefix(prompt, ids)
        return self._run(self._state, ids, max_new_tokens, sampling, progress, shared)

    def generate(self, prompt: Prompt, max_new_tokens: int | None = None, **sampling: Any) -> str:
        """The whole answer as a string (the stop token is not included)."""
        return "".join(step.text for step in self.stream(prompt, max_new_tokens, **sampling))

    def logits(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """float32 logits `[len, vocab]` of one full forward over `token_ids` (fresh cache)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().tolist()
        if not ids:
            raise OffloadError("logits() needs at least one token id")
        bad = [i for i in ids if not 0 <= i < self.args.vocab_size]
        if bad:
            raise OffloadError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.args.vocab_size})"
            )
        if len(ids) > self.args.max_seq_len:
            raise ContextLengthError(
                f"{len(ids)} tokens exceed the model's context window of {self.args.max_seq_len}"
            )
        cache = self.new_cache()
        cache.make_room(len(ids))
        chunk = self.config.generation.prefill_chunk
        x = torch.tensor(ids, dtype=torch.long, device=self.device)
        with device_memory("computing logits"):
            pieces = [x[s : s + chunk] for s in range(0, len(ids), chunk)]
            return torch.cat([self.loaded.requests.run(self.model, p, cache) for p in pieces])

    def chat(self, system: str | None = None, trim: bool = True) -> Conversation:
        """A new conversation. A turn that would leave its answer too little of the
        context window drops the oldest exchanges first (`trim`; else it is refused:
        `Conversation`)."""
        return Conversation(self, system, trim=trim)

    # -- documents and sessions ------------------------------------------------

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
        if not text.strip():
            raise OffloadError("the document is empty")
        self.document = {"text": text, "system": system}
        self.session_ref = None  # (another document: a save must not replace a session unasked)
        ids = self._document_ids()
        self._check_fits(ids, "the document")
        caches.check_room(self, self._state.cache, len(ids), "the document")
        new_ids, reused = self._state.prepare(ids, need_logits=False)
        self._state.computed(reused, len(ids), self.config.generation.prefill_chunk)
        self._state.ids = list(ids)  # (the cache holds a prefix of them: `_dropped`)
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
            _dropped(self._state, e, "reading the document")
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
        half of the document it was loaded with or saved as, and `ids` begin with that
        document, read the session back from its files (where it is still that version)
        instead of prefilling the document again (3,892 tokens on a 2-core CPU: the
        question after it 0.9 s in all, where it prefilled the document in 13.9 s)."""
        if self.session_ref is None or self.document is None:
            return
        doc = self._document_ids()
        if ids[: len(doc)] != doc:
            return
        if len(doc) - common_prefix(self._state.ids, doc) <= len(doc) // 2:
            return
        from offload.session import read_back

        try:
            read_back(self, self._state, self.session_ref)
        except (OffloadError, StorageError, OSError):
            pass  # (saved again or gone since: the request prefills the document)

    def _hand_over(self) -> None:
        """The runtime's KV is a conversation's now: the runtime starts empty, and its
        own save no longer continues the session it was loaded from."""
        self._state = KVState(self.new_cache())
        self.session_ref = None

    def close(self) -> None:
        """Release the runtime's own cache: its device and host memory, and its spilled
        chunk files (the runtime is not used after; its model may be, by another), once
        another thread's step on the model is done."""
        self.loaded.requests.run(self._state.cache.close)

    def __reduce_ex__(self, protocol):
        """Not sent to another process: it would copy the model (seconds, gigabytes) and
        then fail on a lock; one clear error at once instead."""
        raise TypeError(
            "a Runtime cannot be pickled (sent to another process, as multiprocessing's "
            "'spawn' and 'forkserver' do, or deep-copied): load the model in each process "
            "(Runtime.from_pretrained; Runtime.load_session for a saved document), or "
            "fork after loading it"
        )

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """Figures of the last request and the current cache."""
        request = self._stats or request_stats.new_request(0, 0, 0)
        return request_stats.figures(request, self._last_state.cache, self.config.selection)
