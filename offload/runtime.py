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

from collections.abc import Iterator
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from offload import caches, request_stats
from offload.attention import SelectionStats
from offload.backend import Backend, pick_device
from offload.budgets import device_memory
from offload.config import DEFAULT_MODEL, RuntimeConfig
from offload.conversation import Conversation, KVState
from offload.cores import CoreWatch
from offload.documents_api import DocumentsAndSessions, dropped
from offload.errors import ConfigError, ContextLengthError, OffloadError
from offload.generate import (
    Progress,
    StepResult,
    apply_stops,
    generate_steps,
    make_sampler,
    stop_strings,
)
from offload.kvcache import KVCache
from offload.loading import LoadedModel, load
from offload.pipeline import PrefetchStats
from offload.prompts import Prompt, Prompts
from offload.thinking import opened_in
from storage.layout import KVLayout
from storage.tiered import TierReads

if TYPE_CHECKING:
    from offload.session import SessionRef

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "seed", "repeat_penalty",
                 "repeat_last_n")  # fmt: skip


class Runtime(DocumentsAndSessions):
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
        # The session holding the document's KV as loaded or saved (`_read_back`)
        self.document_ref: SessionRef | None = None
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
        if not ids:  # (a chat template may render nothing the tokenizer has a token for)
            raise OffloadError(f"{what} is empty: its text encodes to no tokens")
        limit = self.args.max_seq_len
        if len(ids) >= limit:
            raise ContextLengthError(
                f"{what} is {len(ids)} tokens; the model's context window is {limit} tokens "
                f"(at most {limit - 1} prompt tokens, leaving room for one generated token)"
            )

    def _generation(self, max_new_tokens: int | None, sampling: dict[str, Any]):
        """The request's [generation] settings, checked: the config's with its own."""
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown sampling option(s) {', '.join(unknown)}; known: {', '.join(SAMPLING_KEYS)}"
            )
        overrides = {f"generation.{k}": v for k, v in sampling.items()}
        if max_new_tokens is not None:
            overrides["generation.max_new_tokens"] = max_new_tokens
        return self.config.replace(**overrides).generation if overrides else self.config.generation

    def _sampling(self, max_new_tokens: int | None, sampling: dict[str, Any], context=()):
        g = self._generation(max_new_tokens, sampling)
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
                dropped(state, e, "during this request")
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
        if hasattr(token_ids, "__array__") and not isinstance(token_ids, torch.Tensor):
            try:  # (a numpy array)
                token_ids = torch.as_tensor(token_ids)
            except (TypeError, ValueError, RuntimeError):
                token_ids = None
        if isinstance(token_ids, torch.Tensor):
            whole = not (token_ids.is_floating_point() or token_ids.is_complex())
            ids = token_ids.flatten().tolist() if whole and token_ids.dtype != torch.bool else None
        else:
            ids = list(token_ids) if isinstance(token_ids, (list, tuple)) else None
        if ids is None or not all(isinstance(i, Integral) and not isinstance(i, bool) for i in ids):
            raise OffloadError("logits() takes token ids: a list of ints or an integer tensor")
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
