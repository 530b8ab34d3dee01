"""Reusing KV across requests (`KVState`) and multi-turn chat on top of it (`Conversation`).

`KVState` is a cache plus the token ids it holds; a request reuses the longest
prefix it can reuse exactly. `Conversation` renders each turn with the chat
template and runs it through its runtime's generation loop on its own state.
`Requests` says who computes on a model when threads share it.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from offload.errors import CUDA_FORKED, ContextLengthError, OffloadError
from offload.generate import Progress, StepResult
from offload.tokenizer import check_system
from storage import threads
from storage.errors import StorageError

if TYPE_CHECKING:
    from offload.kvcache import KVCache
    from offload.runtime import Runtime
    from offload.session import SessionRef

T = TypeVar("T")

STALLED = (
    "waiting for a request on this cache that this thread began: its stream has not been "
    "read for {seconds:.0f} s. Unless another thread reads it to its end or closes it, "
    "this thread waits for ever: close() a stream before beginning another request on "
    "the same runtime or conversation"
)

DOCUMENT_PROMPT = (
    "{document}\n\nAnswer the question about the document above.\nQuestion:\n{question}"
)


def leading_messages(messages: list[dict[str, str]]) -> int:
    """The leading messages a trim keeps, where a session does not say (saved before
    `pinned_messages`, 2026-12-05): the system prompt, and a document chat's first
    exchange (its question in DOCUMENT_PROMPT's form), which holds the document."""
    n = int(bool(messages) and messages[0]["role"] == "system")
    marker = DOCUMENT_PROMPT.split("{document}")[1].split("{question}")[0]
    first = messages[n : n + 2]
    if [m["role"] for m in first] == ["user", "assistant"] and marker in first[0]["content"]:
        return n + 2
    return n


def common_prefix(a: Sequence, b: Sequence, most: int | None = None) -> int:
    """How many first items (ids, characters) `a` and `b` share (`most` at most),
    compared a slice at a time (150k ids in about 1 ms)."""
    n = min(len(a), len(b))
    if most is not None:
        n = max(0, min(n, most))
    if a[:n] == b[:n]:
        return n
    same, differs = 0, n  # a[:same] == b[:same]; a[:differs] != b[:differs]
    while differs - same > 1:
        mid = (same + differs) // 2
        if a[same:mid] == b[same:mid]:
            same = mid
        else:
            differs = mid
    return same


def _next_step(cache: KVCache, steps: Iterator[StepResult]) -> StepResult | None:
    cache.check_open()
    return next(steps, None)


class Requests:
    """Who runs on a loaded model, for every runtime and conversation that shares it
    (threads: a GUI's worker, a web server's handlers).

    - One step at a time (`run`): a request has the model to itself while it computes a
      step (a prefill and the first token, then each token) and lets go between steps,
      so that streams on different caches, read in different threads, take turns step
      by step; in one thread they may be read in turn. The main thread computes its own
      steps (a Ctrl-C there stops one inside a forward pass); other threads' run on one
      compute thread (`storage.threads.compute`), so that however many threads ask, one
      OpenMP pool computes (docs/performance.md, "Threads and OpenMP pools").
    - One request at a time on a cache (`on`): another request waits until the one
      running is read to its end or closed. In the main thread, where the running one
      was begun there too, it is an error: only that thread can go on reading it (a
      script, a notebook, an event loop). A thread of a pool may find the cache busy
      with a stream it began itself, which the pool's other threads go on reading (a
      server's streamed answers): it waits. Where that stream has not moved for
      `stall_seconds` (nothing read it: a thread that began a second request before it
      closed its first waits for ever), a RuntimeWarning says so.
    - In a process forked from the one that loaded the model (a server's workers forked
      after loading it, multiprocessing's "fork"): the main thread's steps run on the
      compute thread too (its OpenMP pool did not survive the fork: `storage.threads`),
      and a cache is first adopted (`KVState.adopt`). A model on CUDA cannot be used
      there (CUDA does not survive a fork): one clear error.
    """

    stall_seconds = 10.0  # (`on`)

    def __init__(self, cuda: bool = False):
        self.cuda = cuda  # the model is on CUDA
        self.after_fork()
        threads.renew_after_fork(self)

    def after_fork(self) -> None:
        """(Also in a forked child: the parent's other threads may have held these.)"""
        self._compute = threading.RLock()
        self._free = threading.Condition()

    def run(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` with the model to itself (the class docstring)."""
        if threads.on_compute_thread():  # (inside a run already: a callback that asks)
            return fn(*args)
        if self.cuda and threads.forked() and torch.cuda._is_in_bad_fork():
            raise OffloadError(CUDA_FORKED)
        with self._compute:
            if threading.current_thread() is threading.main_thread() and not threads.forked():
                return fn(*args)
            return threads.compute(fn, *args)

    def stepped(self, state: KVState, steps: Iterator[StepResult]) -> Iterator[StepResult]:
        """`steps` of a request on `state`, each computed with the model to itself; a
        cache closed between them (by another thread) stops them with one error."""
        try:
            while True:
                state.stepping = True
                try:
                    step = self.run(_next_step, state.cache, steps)
                finally:
                    state.stepping, state.moved = False, time.monotonic()
                if step is None:
                    return
                yield step
        finally:
            self.run(steps.close)

    @contextmanager
    def on(self, state: KVState) -> Iterator[None]:
        me = threading.get_ident()
        with self._free:
            state.adopt()
            warned = False
            while state.busy is not None:
                if state.busy == me == threading.main_thread().ident:
                    raise OffloadError(
                        "this cache is in the middle of another request: a stream begun on "
                        "it was neither read to its end nor closed (close() it first)"
                    )
                self._free.wait(self.stall_seconds)
                idle = 0.0 if state.stepping else time.monotonic() - state.moved
                if state.busy == me and idle >= self.stall_seconds and not warned:
                    warned = True
                    warnings.warn(STALLED.format(seconds=idle), RuntimeWarning, stacklevel=3)
            state.busy, state.moved = me, time.monotonic()
        try:
            yield
        finally:  # (a stream dropped in another thread ends there)
            with self._free:
                state.busy = None
                self._free.notify_all()


class KVState:
    """A KV cache plus the token ids it holds, reused across calls by common prefix.

    Reuse is exact: greedy decoding gives the same tokens for the same request whether
    its KV is reused or computed fresh. A forward pass over S tokens does not round
    exactly as S passes of one token do, so a request reuses KV only up to a position
    where an earlier forward pass began (`passes`); what follows is then computed in
    the same passes, with the same shapes, as the first time. Reusing all of the cache
    is always exact (what follows is new either way).
    """

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.ids: list[int] = []
        # (start, end, step): forward passes began at start, start + step, ... < end
        self.passes: list[tuple[int, int, int]] = []
        self.busy: int | None = None  # the thread that began the request on it (`Requests`)
        self.stepping = False  # a step of that request is being computed
        self.moved = 0.0  # when that request began or last took a step (monotonic)
        self.pid = os.getpid()  # the process it is used in (`adopt`)

    def adopt(self) -> None:
        """Make the state this process's own, where it was made in a process this one was
        forked from (`Requests`). A cache in one tensor per layer is used as it is (its
        memory shared with the parent until either writes it); a tiered cache, whose
        threads did not come along and whose spill files are the parent's, or one a
        request was running on at the fork, is replaced by an empty one (the parent's
        files left alone), into which a loaded session's KV is read again from its
        files (where it was not saved again since): the next request prefills the rest
        of its prompt, as in the parent; other KV is prefilled again."""
        if self.pid == os.getpid():
            return
        if self.cache.store is not None or self.busy is not None:
            if self.cache.fresh is None:
                raise OffloadError("this KV cache was made in the process this one was "
                                   "forked from, and cannot be renewed here")  # fmt: skip
            reread = self.cache.reread if self.busy is None else None
            self.cache = self.cache.fresh()
            self.ids, self.passes = [], []
            if reread is not None:  # a loaded session's, read again from its files
                try:  # (on the compute thread: this one's OpenMP pool may be lost)
                    threads.compute(reread, self)
                except (OffloadError, StorageError, OSError):
                    pass  # (saved again or gone since: the next request prefills it)
        self.pid, self.busy = os.getpid(), None

    def prepare(self, ids: list[int], need_logits: bool = True) -> tuple[list[int], int]:
        """Truncate to the longest reusable prefix shared with `ids`; return (ids to
        prefill, reused).

        With `need_logits` at least one token is left to prefill (its logits start decoding)."""
        self.cache.check_open()
        n = common_prefix(self.ids, ids, len(ids) - need_logits)
        if n < len(self.ids):
            n = self._pass_start_at_most(n)
        self.cache.truncate(n)
        self._cut(n)
        return ids[n:], n

    def _cut(self, n: int) -> None:
        self.ids = self.ids[:n]
        self.passes = [(s, min(e, n), step) for s, e, step in self.passes if s < n]

    def _pass_start_at_most(self, n: int) -> int:
        best = 0
        for s, e, step in self.passes:
            if s <= n:
                best = max(best, s + (min(n, e - 1) - s) // step * step)
        return best

    def computed(self, start: int, end: int, step: int) -> None:
        """Tokens start..end-1 were computed in passes of `step` tokens."""
        if end > start:
            self.passes.append((start, end, step))

    def reset(self) -> None:
        self.keep(0)

    def keep(self, n: int) -> None:
        """Keep the first n tokens (n <= what every layer holds), whatever a forward pass
        that stopped partway (an error, Ctrl-C) left in the layers past them."""
        self.cache.restore(n)
        self._cut(n)

    def keep_finished(self) -> None:
        """Keep the tokens both the cache counts and `ids` names (what every layer had
        finished, of the ids the state was given)."""
        self.keep(min(self.cache.num_tokens, len(self.ids)))


class Conversation:
    """A multi-turn chat whose earlier turns' KV is reused: each `send` prefills only
    the new turn (and the previous answer's end-of-turn token).

    A turn that would leave its answer too little of the model's context window (its
    `max_new_tokens`, at most a quarter of the window) drops the oldest exchanges first,
    with `trim` (the default): whole user-and-assistant pairs, never the system prompt
    nor a document chat's first exchange (the one holding the document), until the
    prompt and that room take at most three quarters of the window, so that the next
    turns find room too. What follows the first dropped exchange is prefilled again
    (its positions changed); `dropped` says how many exchanges the last turn dropped.
    Without `trim`, or where dropping all of them is not enough, a prompt past the
    window is a ContextLengthError."""

    def __init__(
        self,
        runtime: Runtime,
        system: str | None = None,
        state: KVState | None = None,
        messages: list[dict[str, str]] | None = None,
        trim: bool = True,
        pinned: int | None = None,
    ):
        """A new conversation, or (with `state`, `messages` and what of them is `pinned`)
        one resumed from a session or begun on a loaded document."""
        check_system(system)
        self.runtime = runtime
        self.system = system
        self.trim = trim
        self.dropped = 0  # exchanges the last turn dropped to fit the window
        self.document: str | None = None  # chat_about_document: the first turn asks about it
        # Leading messages a trim never drops: the system prompt, a document chat's first
        # exchange once it has one (saved with a chat session: `pinned_messages`).
        self.pinned = 0
        # The session this conversation was resumed from or last saved to: a save there
        # continues it (needs no `replace`) while no other saver has saved there since.
        self.session_ref: SessionRef | None = None
        if state is not None:
            self._state, self.messages = state, list(messages or [])
            self.pinned = leading_messages(self.messages) if pinned is None else pinned
            return
        self._state = KVState(runtime.new_cache())
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        if self.document is None:
            requests = self.runtime.loaded.requests
            with requests.on(self._state):
                requests.run(self._state.reset)
        # (about a document: the next turn's prompt starts with the document again, and
        # its KV is kept for that)
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.pinned = len(self.messages)

    @property
    def context_tokens(self) -> int:
        return self._state.cache.num_tokens

    def stream(
        self,
        text: str,
        max_new_tokens: int | None = None,
        progress: Progress | None = None,
        **sampling: Any,
    ) -> Iterator[StepResult]:
        with self.runtime.loaded.requests.on(self._state):
            # (the turn is made from the messages as they are when it starts)
            yield from self._turn(text, max_new_tokens, progress, sampling)

    def _turn(self, text, max_new_tokens, progress, sampling) -> Iterator[StepResult]:
        rt = self.runtime
        first = self.document is not None and not any(m["role"] == "user" for m in self.messages)
        if first:
            text = DOCUMENT_PROMPT.format(document=self.document, question=text)
        messages = self.messages + [{"role": "user", "content": text}]
        messages, ids = self._fitted(messages, max_new_tokens)
        try:
            rt._check_fits(ids, "the conversation")
        except ContextLengthError as e:
            self.dropped = 0  # (nothing was: the conversation stays as it was)
            hint = (
                "this turn does not fit even with the earlier exchanges dropped"
                if self.trim
                else "start a new conversation (reset)"
            )
            raise ContextLengthError(f"{e}; {hint}") from None
        pieces: list[str] = []
        try:
            for step in rt._steps(self._state, ids, max_new_tokens, sampling, progress):
                pieces.append(step.text)
                yield step
        except (GeneratorExit, KeyboardInterrupt):
            # Stopped (Ctrl-C, or a consumer that closes the stream): the answer stays in
            # the conversation as far as it got, as it stays on the screen, and the next
            # turn can refer to it (its KV is in the cache already). Stopped before its
            # first token, the turn is not part of the conversation.
            if pieces:
                self._answered(messages, "".join(pieces), first)
            raise
        self._answered(messages, "".join(pieces), first)

    def _answered(self, messages: list[dict[str, str]], answer: str, first: bool) -> None:
        self.messages = messages + [{"role": "assistant", "content": answer}]
        if first:  # (the exchange holding the document stays)
            self.pinned = len(self.messages)

    def _fitted(self, messages: list[dict[str, str]], max_new_tokens: int | None):
        """`messages` (the new turn last) and their ids, less the oldest exchanges where
        the turn would not leave its answer room in the window (the class docstring)."""
        rt, self.dropped = self.runtime, 0
        ids = rt.encode_prompt(messages)
        window = rt.args.max_seq_len
        room = min(rt._generation(max_new_tokens, {}).max_new_tokens, window // 4)  # (checked)
        if not self.trim or len(ids) + room <= window:
            return messages, ids
        first = self.pinned
        pairs = 0  # exchanges that may go: user-then-assistant pairs before the new turn
        while first + 2 * pairs + 2 < len(messages) and [
            m["role"] for m in messages[first + 2 * pairs : first + 2 * pairs + 2]
        ] == ["user", "assistant"]:
            pairs += 1

        def without(n: int) -> list[dict[str, str]]:
            return messages[:first] + messages[first + 2 * n :]

        # The fewest exchanges dropped that bring it within three quarters of the window
        # (all of them where none does), by bisection: a prompt is encoded whole each time.
        target = window - window // 4 - room
        lo, hi, best = 1, pairs, None
        while lo <= hi:
            mid = (lo + hi) // 2
            mid_ids = rt.encode_prompt(without(mid))
            if len(mid_ids) <= target:
                best, hi = (mid, mid_ids), mid - 1
            else:
                lo = mid + 1
        if best is None:
            if not pairs:
                return messages, ids
            best = (pairs, rt.encode_prompt(without(pairs)))
        self.dropped = best[0]
        return without(best[0]), best[1]

    def send(self, text: str, max_new_tokens: int | None = None, **sampling: Any) -> str:
        return "".join(step.text for step in self.stream(text, max_new_tokens, **sampling))

    def save(self, path: str | Path, replace: bool = False) -> dict:
        """Save this conversation (its KV and messages) as a chat session: into a new or
        empty directory, the session it was resumed from or last saved to, or another
        session when `replace` says so."""
        from offload.session import save_state

        extra = {"messages": self.messages, "pinned_messages": self.pinned}
        requests = self.runtime.loaded.requests
        with requests.on(self._state):
            info, self.session_ref = requests.run(
                save_state, self.runtime, self._state, path, "chat", extra, replace,
                self.session_ref,
            )  # fmt: skip
        return info

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a Conversation cannot be pickled (sent to another process, or deep-copied): "
            "save it (conv.save) and resume it there "
            "(Runtime.load_session(path, model=...).resume_chat())"
        )

    def close(self) -> None:
        self.runtime.loaded.requests.run(self._state.cache.close)  # (between others' steps)
