"""Chunked prefill and the decode loop: the one generation loop everything consumes.

`generate_steps` is a generator of `StepResult`s; the CLI, `Runtime`, scripts and
benchmarks all drive it. Sampling is a policy passed in as a callable made by
`make_sampler`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise

import torch

from offload.config import GenerationSection
from offload.errors import ConfigError
from offload.kvcache import DenseLayer, KVCache
from offload.model import Transformer
from offload.quantize import chunk_dtype, dequantized_once
from offload.tokenizer import StreamDecoder, Tokenizer
from storage import threads

Sampler = Callable[[torch.Tensor], int]
# (done, total, stage): stage "prefill" counts tokens, "index" counts layers indexed
Progress = Callable[[int, int, str], None]


@dataclass
class StepResult:
    """One generated token.

    token_id:        the sampled token
    text:            the text this token completes ('' while a UTF-8 sequence is open,
                     and for the stop token, which is never shown)
    index:           0 for the first generated token
    finish_reason:   None while generating; "stop" (end-of-turn token), "length"
                     (max_new_tokens or the context window) on the last step
    prefill_tokens:  tokens prefilled before the first step (same on every step)
    prefill_seconds: time of that prefill, first-token sampling included
    step_seconds:    time of this step's forward + sampling (0 for the first)
    context_tokens:  tokens in the KV cache after this step
    kv_bytes:        bytes of KV per tier after this step
    window_full:     on the last step of an answer cut by the model's context window
                     (finish "length" with no room left), which a larger
                     max_new_tokens does not move
    """

    token_id: int
    text: str
    index: int
    finish_reason: str | None
    prefill_tokens: int
    prefill_seconds: float
    step_seconds: float
    context_tokens: int
    kv_bytes: dict[str, int] = field(default_factory=dict)
    window_full: bool = False


def make_sampler(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    repeat_penalty: float = 1.0,
    repeat_last_n: int = 64,
    context: list[int] = (),
    min_p: float = 0.0,
) -> Sampler:
    """Greedy when temperature == 0, else temperature / top-k / top-p / min-p sampling,
    in HF's order (the filters see the logits divided by the temperature; min-p keeps
    the tokens at least `min_p` times as likely as the likeliest).

    `repeat_penalty` (llama.cpp's and HF's repetition penalty) divides the positive
    logits and multiplies the negative ones of the tokens among the last
    `repeat_last_n` of `context` and of what this sampler has returned."""
    recent = list(context)[-repeat_last_n:] if repeat_last_n else []
    pick = _pick(temperature, top_k, top_p, seed, min_p)
    if repeat_penalty == 1.0 or not repeat_last_n:
        return pick

    def penalized(logits: torch.Tensor) -> int:
        if recent:
            ids = torch.tensor(sorted(set(recent)), device=logits.device)
            seen = logits[ids]
            logits = logits.clone()
            logits[ids] = torch.where(seen > 0, seen / repeat_penalty, seen * repeat_penalty)
        token = pick(logits)
        recent.append(token)
        del recent[:-repeat_last_n]
        return token

    return penalized


def _pick(temperature: float, top_k: int, top_p: float, seed: int | None, min_p: float) -> Sampler:
    if temperature == 0:
        return lambda logits: int(torch.argmax(logits))
    gens: dict[torch.device, torch.Generator] = {}

    def generator(device: torch.device) -> torch.Generator:
        """One per device the logits come from, each seeded with `seed` (a GPU's draws
        differ from a CPU's for the same seed)."""
        if device not in gens:
            gen = gens[device] = torch.Generator(device=device)
            if seed is not None:
                gen.manual_seed(seed)
            else:
                gen.seed()
        return gens[device]

    def sample(logits: torch.Tensor) -> int:
        # Where the logits are: on a GPU the vocabulary's sort for top-p (128k entries
        # for Llama 3) would take milliseconds on the host, and one token comes back.
        logits = logits.float() / temperature  # [V]
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            logits = nucleus(logits, top_p)
        if min_p > 0.0:  # p >= min_p * p_max, as log-probabilities: l >= l_max + log(min_p)
            logits = logits.masked_fill(logits < logits.max() + math.log(min_p), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator(probs.device)))

    return sample


NUCLEUS_FIRST = 256  # most likely tokens a host's top-p looks at first (then 16x, then all)


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits [V] with -inf for every token past the nucleus: the most likely tokens
    until their mass reaches `top_p` (a token is dropped once the mass before it does;
    the first always stays).

    On a GPU the whole vocabulary is sorted there. On a CPU that sort was most of a
    sampled token (16 ms for Llama 3's 128k entries here), and the nucleus is usually
    far smaller: the best NUCLEUS_FIRST by `topk`, then 16 times more, then all, while
    their mass falls short (the same tokens: past the first k, the mass before any
    token is at least theirs; but where tokens of equal probability straddle the edge,
    as bf16 logits often make them, `topk` may keep another of them than a sort does).
    The embedded model at temperature 0.7, top-p 0.9, 64 tokens on this CPU: nuclei of
    3 tokens (median; at most 26), 0.57 ms a token against 3.3 for the sort."""
    probs = torch.softmax(logits, dim=-1)
    V = probs.numel()
    if logits.device.type == "cpu":
        k = min(NUCLEUS_FIRST, V)
        top, order = torch.topk(probs, k)
        while k < V and float(top.sum()) < top_p:
            k = 16 * k if 16 * k < V // 4 else V  # (then the whole vocabulary)
            top, order = torch.topk(probs, k)
    else:
        top, order = torch.sort(probs, descending=True)
    kept = logits[order].masked_fill(top.cumsum(-1) - top >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(0, order, kept)  # (no sync)


def stop_strings(stop) -> list[str]:
    """`stop` (None, a string or strings) as a list of strings; anything else an error."""
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, (list, tuple)) or not all(isinstance(x, str) for x in stops):
        raise ConfigError(f"stop: expected strings, got {stop!r}")
    return list(stops)


def apply_stops(steps: Iterator[StepResult], stops: list[str]) -> Iterator[StepResult]:
    """End generation where the text first contains one of `stops` (not shown).

    Text that may be the start of a stop string is held back until it is known not
    to be; the step that completes a stop string is the last, with finish_reason
    "stop" and the text before the stop string."""
    stops = [s for s in stops if s]
    if not stops:
        yield from steps
        return
    pending = ""
    try:
        for step in steps:
            pending += step.text
            cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                yield dataclasses.replace(
                    step, text=pending[:cut], finish_reason="stop", window_full=False
                )
                return
            if step.finish_reason is not None:
                yield dataclasses.replace(step, text=pending)
                return
            keep = max((_held(pending, s) for s in stops), default=0)
            out, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
            yield dataclasses.replace(step, text=out)
    finally:
        steps.close()


def _held(text: str, stop: str) -> int:
    """Length of the longest end of `text` that begins `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


def prefill(
    model: Transformer,
    cache: KVCache,
    ids: list[int],
    chunk_size: int,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Run `ids` through the model in chunks; return the last position's logits [V].

    Chunks bound activation memory (attention scores are [H, chunk, T], not [H, T, T]).
    """
    assert ids, "prefill needs at least one token"
    cache.make_room(len(ids))  # a device cache that would pass its budget moves to the tiers
    if cache.layered_prefill and cache.num_tokens == 0:
        return prefill_by_layer(model, cache, ids, chunk_size, progress)
    total = len(ids)
    logits = None
    # A prompt of many chunks into the tiers (a long paste after a conversation): each
    # layer's host slab is sized for all of it on a thread, once, instead of growing
    # 1.25x at a time chunk after chunk (on CUDA, pinning several times its final size).
    with _reserving(cache, cache.num_tokens + total if total > chunk_size else 0):
        for start in range(0, total, chunk_size):
            piece = torch.tensor(
                ids[start : start + chunk_size], dtype=torch.long, device=model.device
            )
            logits = model(piece, cache, last_only=True)
            if progress is not None:
                progress(min(start + chunk_size, total), total, "prefill")
    return logits[-1]


@contextlib.contextmanager
def _reserving(cache: KVCache, num_tokens: int):
    """Reserve each layer's host slab for `num_tokens` tokens on a thread, in layer order
    (`TieredStore.reserve_host`: within the host budget only); yields a future per layer
    (a caller that must not grow a slab waits for its layer's). Nothing for a cache
    without tiers, or num_tokens 0."""
    if cache.store is None or not num_tokens:
        yield None
        return
    pool = threads.pool(1, "offload-reserve")
    try:
        yield [
            pool.submit(cache.store.reserve_host, i, num_tokens) for i in range(len(cache.layers))
        ]
    except BaseException:  # (a stopped prefill does not wait for the slabs not yet begun)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    # Every layer's, also where the prefill was quicker than the thread: a layer it
    # already grew is only checked.
    pool.shutdown(wait=True)


@torch.no_grad()
def prefill_by_layer(
    model: Transformer,
    cache: KVCache,
    ids: list[int],
    chunk_size: int,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Prefill an empty tiered cache one layer at a time; return the last logits [V].

    The prompt's hidden states `[S, dim]` stay on the compute device; each layer runs
    over all of them in chunks of `chunk_size` against that layer's KV, held on the
    device for the duration (exact causal attention), and only then hands the layer's
    KV to the cache (host tier, and the device mirror of a dense layer), after building
    the layer's selection index from the keys still on the device. So no chunk reads
    earlier KV back over PCIe, as chunk-by-chunk prefill through the tiers does when
    the host is not the device's memory, and neither does the index build.

    A layer is handed over while the next one computes (`_HandOver`): on CUDA its copies,
    summaries and k-means run on a side stream, and the host's share (the index's
    bookkeeping, the store's) waits on that stream only, so the GPU is not left idle
    between layers. Peak device memory is the weights, the hidden states, two layers'
    KV (the one computing, the one handed over) and one chunk's activations.
    """
    S = len(ids)
    args = model.args
    cos, sin = model.rope(0, S)
    x = model.tok_embeddings(torch.tensor(ids, dtype=torch.long, device=model.device))
    # Each layer's host slab is allocated (on CUDA: pinned, about 1.5 GB/s on the H100
    # machine, so 11 s for 128k tokens of an 8B model) on a thread, in layer order,
    # while the layers before it compute; a layer's append waits for its own slab only.
    with _reserving(cache, S) as reserved, _HandOver(cache, reserved, S) as hand:
        for i, block in enumerate(model.layers):
            local = hand.buffer(model)
            with dequantized_once(block, chunk_dtype(x)):  # (int4 linears: once a layer)
                for s in range(0, S, chunk_size):
                    e = min(S, s + chunk_size)
                    # In place: a chunk's output is computed from its own rows of x (earlier
                    # rows reach it only through the layer's KV): one [S, dim] buffer serves.
                    x[s:e] = block(x[s:e], cos[s:e], sin[s:e], local)
            hand.computed(i, local)  # hands over the layer before it meanwhile
            if progress is not None and i:
                progress(i * S // args.num_layers, S, "prefill")
    if progress is not None:
        progress(S, S, "prefill")
    cache.advance(S)
    return model.output(model.norm(x[-1:])).float()[-1]


class _HandOver:
    """A layer-by-layer prefill's hand-overs, one layer behind its compute.

    `computed(i, local)` queues layer i's KV (in `local`, a `DenseLayer`) and hands over
    layer i - 1: its KV to the store (and a dense layer's device mirror), its index built
    from its keys. On CUDA that runs on a side stream that waits for layer i - 1's
    compute only, so its synchronous copies and host reads wait for that stream, while
    layer i computes on the main one. Two layer buffers take turns (`buffer`): the main
    stream waits for a buffer's hand-over before the next layer writes it. The buffers
    the store keeps on the device (summaries, a dense layer's mirror) are sized on the
    main stream first, so no tensor that outlives the prefill belongs to the side stream.
    """

    def __init__(self, cache: KVCache, reserved, num_tokens: int):
        self.cache, self.reserved, self.S = cache, reserved, num_tokens
        self.free: list[DenseLayer] = []
        self.queued: tuple[int, DenseLayer, object] | None = None  # (layer, KV, its event)
        self.main = self.side = self.started = None

    def __enter__(self) -> _HandOver:
        store = self.cache.store
        self.cache.prefill_timeline = []
        if store.device.type == "cuda":
            self.main = torch.cuda.current_stream(store.device)
            self.side = torch.cuda.Stream(store.device)
        # Sized here, on the main stream, before any layer: the appends then grow nothing.
        for i, layer in enumerate(self.cache.layers):
            store.dev[i].reserve_chunks(self.S // store.layout.chunk_size)
            if layer.mirror is not None:
                layer.mirror.reserve(self.S, self.S)
        return self

    def buffer(self, model: Transformer) -> DenseLayer:
        """An empty buffer for the next layer's KV (each made once, then reused); on CUDA,
        the layer's compute starts on the main stream here (an event marks it)."""
        if self.free:
            local = self.free.pop()
            local.truncate(0)
        else:
            a = model.args
            local = DenseLayer(a.num_kv_heads, a.head_dim, model.dtype, model.device)
            local.reserve(self.S, self.S)
        if self.side is not None:
            self.started = self.main.record_event(torch.cuda.Event(enable_timing=True))
        return local

    def computed(self, layer: int, local: DenseLayer) -> None:
        done = None
        if self.side is not None:
            done = self.main.record_event(torch.cuda.Event(enable_timing=True))
            self.cache.prefill_timeline.append((self.started, done))
        if self.queued is not None:
            self._hand_over(*self.queued)
        self.queued = (layer, local, done)

    def _hand_over(self, i: int, local: DenseLayer, done) -> None:
        cache, store = self.cache, self.cache.store
        layer = cache.layers[i]
        with _on(self.side):
            if done is not None:
                self.side.wait_event(done)
            self.reserved[i].result()
            layer.append(local.k.view(), local.v.view())
            if cache.policy is not None:  # index the layer before its keys leave the device
                cache.policy.update_from_keys(store, i, local.k.view())
        if self.side is not None:  # the next layer to write this buffer waits for it
            self.main.wait_stream(self.side)
        self.free.append(local)

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None and self.queued is not None:
                self._hand_over(*self.queued)
        finally:
            self.queued = None
            if self.side is not None:  # nothing of the side stream's is pending after this
                self.main.wait_stream(self.side)


def layer_times(cache: KVCache) -> dict[str, float] | None:
    """Of the last layer-by-layer prefill of `cache` on CUDA (None elsewhere), from its
    events (waiting for them): the main stream's compute of the layers and its idle time
    between them (waiting for a hand-over, or for the host to queue the next layer), ms."""
    marks = cache.prefill_timeline
    if not marks:
        return None
    marks[-1][1].synchronize()
    return {
        "layers_ms": sum(a.elapsed_time(b) for a, b in marks),
        "between_layers_ms": sum(b.elapsed_time(c) for (_, b), (c, _) in pairwise(marks)),
    }


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def generate_steps(
    model: Transformer,
    cache: KVCache,
    tokenizer: Tokenizer,
    new_ids: list[int],
    max_new_tokens: int,
    sampler: Sampler,
    prefill_chunk: int = GenerationSection.prefill_chunk,
    progress: Progress | None = None,
    head: int = 0,
) -> Iterator[StepResult]:
    """Prefill `new_ids` after what `cache` already holds, then decode token by token.
    The first `head` of them are prefilled on their own first (chunks of them alone: a
    document before its question, whose KV later questions reuse to its end).

    The last sampled token (the stop token, or the one that hit the limit) is not
    fed back, so on return the cache holds the prompt and every token but the last.
    """
    stop_ids = set(tokenizer.stop_ids)
    max_len = model.args.max_seq_len
    decoder = StreamDecoder(tokenizer)
    t0 = time.perf_counter()
    total = len(new_ids)
    if head:  # (and its index, as `Runtime.load_document` has it before a question)
        prefill(model, cache, new_ids[:head], prefill_chunk,
                progress and (lambda done, _, what: progress(done, total, what)))  # fmt: skip
        cache.finish_prefill(progress)
    logits = prefill(model, cache, new_ids[head:], prefill_chunk,
                     progress and (lambda done, _, what: progress(head + done, total, what)))  # fmt: skip
    cache.finish_prefill(progress)  # the selection index is part of prefill
    token = sampler(logits)
    prefill_seconds = time.perf_counter() - t0
    step_seconds = 0.0
    with cache.decoding():  # the prefetch worker, if any, lives for the decode loop
        for index in range(max_new_tokens):
            full = cache.num_tokens + 1 >= max_len  # (no room for another token)
            finish = None
            if token in stop_ids:
                finish = "stop"
            elif index + 1 == max_new_tokens or full:
                finish = "length"
            text = "" if finish == "stop" else decoder.push(token)
            if finish is not None:
                text += decoder.flush()
            yield StepResult(
                token_id=token,
                text=text,
                index=index,
                finish_reason=finish,
                prefill_tokens=len(new_ids),
                prefill_seconds=prefill_seconds,
                step_seconds=step_seconds,
                context_tokens=cache.num_tokens,
                kv_bytes=cache.tier_bytes(),
                window_full=finish == "length" and full,
            )
            if finish is not None:
                return
            t = time.perf_counter()
            token = sampler(cache.decode(model, token))
            step_seconds = time.perf_counter() - t
