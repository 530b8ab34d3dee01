"""The fixed-shape decode step, captured once and replayed.

A decode step has fixed shapes when its position is a device tensor (here over a
dense device cache; offload/tiered_step.py does the same over the tiered store): RoPE rows are read from a table by index, the new K/V are written
at that position (`Backend.rope_store`, in RoPE's launch), and attention reads the layer's whole buffer
up to a device-side length (`offload/kernels/decode_attention.py`). Nothing in it
waits on the host, so on CUDA it is captured as one CUDA graph and each token
costs one replay instead of several hundred kernel launches from Python
(about 28 us each on an H100 from eager torch).

    token, pos (device)  --fill_ per step-->  [captured: embed, 30 x block, norm, head]  -> logits
                                                    writes K/V at pos, attends rows <= pos

The graph holds the addresses of the cache buffers and the RoPE table: it is
captured again only when those are reallocated (the buffers grow geometrically,
so a few times in a long generation). On a CPU the same step runs eagerly; there
it exists so that tests check its numerics against the ordinary decode path.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch

from offload.backend import Backend
from storage.errors import first_line

WARMUP_RUNS = 2  # eager runs on a side stream before capture (Triton compiles, allocator warms)


class StepPlan(Protocol):
    """What a fixed-shape step runs over: one per kind of cache (`DensePlan` here, the
    tiered store's in offload/tiered_step.py)."""

    layers: list  # the cache layers the model calls inside the step
    token: torch.Tensor  # [1] int64 on the device: the graph's static inputs
    pos: torch.Tensor
    variant: int  # which of the plan's steps `prepare` chose (each its own graph): 0, or
    # the tiered plan's 1 or 2, a step that reuses the last one's selection

    def prepare(self, num_tokens: int) -> tuple | None:
        """Before a step at position `num_tokens`: make room, sync device state; return
        what a captured graph depends on (buffer addresses, sizes), or None when this
        step cannot run fixed-shape (the caller decodes eagerly)."""
        ...

    def derive(self, pos: torch.Tensor) -> None:
        """Inside the step: per-step device values computed from the position."""
        ...

    def finish(self, num_tokens: int) -> None:
        """After the step: host-side bookkeeping; `num_tokens` are in the cache now."""
        ...

    def flush(self) -> None:
        """Bring state the steps keep only on the device level with the cache's tiers."""
        ...

    def truncate(self, num_tokens: int) -> None:
        """The cache drops every token from `num_tokens` on: forget what the plan keeps of them."""
        ...

    def fallback(self, variant: int) -> int | None:
        """Where `variant` could not be captured: the variant to run instead from now on
        (chosen by `prepare` too), or None (the error stands)."""
        ...


class DecodeStep:
    """One token through `model` with fixed shapes over `plan`, replayed as a CUDA graph
    when `backend.graphs`, run eagerly otherwise."""

    def __init__(self, model, plan: StepPlan, backend: Backend):
        self.model, self.plan, self.backend = model, plan, backend
        self.captures = 0  # how often the step was captured (for tests and stats)
        # With `backend.compile`, each block runs (and is captured) compiled by
        # torch.compile (`compiled_block`).
        self._block = compiled_block() if backend.compile else None
        self._graphs: dict[int, tuple] = {}  # variant -> (graph, logits), for the key
        self._old: dict[int, tuple] = {}  # the last key's, until a capture (see _capture)
        self._key = None
        self._pool = None

    def __call__(self, token: int, num_tokens: int) -> torch.Tensor | None:
        """Feed `token` at position `num_tokens`; return float32 logits [V] (valid until
        the next call: with graphs they are the graph's output buffer), or None when the
        plan cannot take this step."""
        key = self.plan.prepare(num_tokens)
        if key is None:
            return None
        rope = self.model.rope_table(self.model.args.max_seq_len)  # built once, never moved
        self.plan.token.fill_(token)
        self.plan.pos.fill_(num_tokens)
        if self.backend.graphs:
            key = (*key, rope[0].data_ptr())
            if key != self._key:
                self._old, self._graphs, self._key = self._graphs or self._old, {}, key
            variant = self.plan.variant
            if variant not in self._graphs:
                variant = self._capture_or_fall_back(variant)
            graph, logits = self._graphs[variant]
            graph.replay()
        else:
            logits = self._compute()
        self.plan.finish(num_tokens + 1)
        return logits[-1]

    def _compute(self) -> torch.Tensor:
        """The step: compiled where asked, and where compiling fails, as written (with a
        warning) rather than not at all."""
        try:
            return self._forward()
        except torch._dynamo.exc.TorchDynamoException as e:
            if self._block is None:
                raise
            first = first_line(e, type(e).__name__)
            warnings.warn(
                f"torch.compile of the decode step failed, decoding without it: {first}",
                stacklevel=2,
            )
            self._block = None
            return self._forward()

    def _forward(self) -> torch.Tensor:
        self.plan.derive(self.plan.pos)
        return self.model.forward_at(self.plan.token, self.plan.pos, self.plan.layers, self._block)

    def _capture_or_fall_back(self, variant: int) -> int:
        """Capture `variant`, or where that fails and the plan has another for it (the
        tiered plan's: a reusing step's rows fetched in line where the side stream's
        failed, then no reuse), that one, with a warning: a step that runs slower rather
        than not at all."""
        while variant not in self._graphs:
            try:
                self._capture(variant)
            except RuntimeError as e:
                instead = self.plan.fallback(variant)
                if instead is None:
                    raise
                first = first_line(e, type(e).__name__)
                warnings.warn(
                    f"the decode step's variant {variant} could not be captured as a CUDA"
                    f" graph ({first}); running variant {instead} instead",
                    stacklevel=3,
                )
                self._pool = None  # (the failed capture's pool: a fresh one for the rest)
                variant = instead
        return variant

    def _capture(self, variant: int) -> None:
        # The graphs captured before stay alive until this one is captured, into the same
        # pool: what they freed during their captures is the new capture's to reuse, and a
        # pool whose graphs were all freed while its memory was held (the logits) cannot
        # be captured into again (torch 2.11 fails an internal assert, seen on an H200).
        # A plan's variants share the pool: they never run at once, and each one's logits
        # are read before the next replay.
        device = self.model.device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # Warm-up on a side stream, as capture requires. Each run writes this step's K/V
        # at `pos`, which the replay writes again with the same values.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):  # (and, the first time, compiles)
                    self._compute()
        finally:  # (also when a run is stopped: its K/V writes must come before what follows)
            torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # "thread_local": only this thread's unsafe calls break the capture. The default,
        # "global", also fails it (and the other thread's call) when a background thread
        # of this runtime calls CUDA meanwhile: the session warmer pinning a slab, the
        # abstracts reader copying to the device, a spill.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._forward()
        self._graphs[variant], self._old = (graph, logits), {}
        self.captures += 1

    def close(self) -> None:
        self._graphs, self._old = {}, {}
        self._key = self._pool = None


def run_block(block, x, cos, sin, cache_layer) -> torch.Tensor:
    return block(x, cos, sin, cache_layer)


def compiled_block():
    """`run_block` through torch.compile: what `model.compile_step` compiles. One block,
    not the whole step: the blocks' weights and the cache layers' buffers are inputs, so
    one compile serves every block of a kind and its cost does not grow with the depth
    (the embedded model's 30 blocks, on this CPU: 10 s, against 92 s for the whole step).
    Sizes are symbolic, and not unified with equal ones (duck shaping would tie a
    buffer's capacity to a weight dimension that happens to equal it, and each growth
    would then compile again)."""
    from torch.fx.experimental import _config as fx_config

    compiled = torch.compile(run_block, dynamic=True)

    def call(block, x, cos, sin, cache_layer):
        with fx_config.patch(use_duck_shape=False):
            return compiled(block, x, cos, sin, cache_layer)

    return call


class DensePlan:
    """The step over a dense device cache (`DenseLayer`s): K/V written at `pos`,
    attention over each layer's whole buffer up to `pos + 1`."""

    def __init__(self, cache, backend: Backend, max_tokens: int):
        dev = backend.device
        self.cache, self.max_tokens = cache, max_tokens
        self.token = torch.zeros(1, dtype=torch.long, device=dev)  # static inputs of the graph
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.length = torch.zeros(1, dtype=torch.long, device=dev)
        self.layers = [layer.step_layer(self.pos, self.length, backend) for layer in cache.layers]
        self.variant = 0  # (one step)

    def prepare(self, num_tokens: int) -> tuple:
        layers = self.cache.layers
        first = layers[0]
        # The layers fill and grow together: one with room is all with room (no loop
        # over every layer's buffers at every token, host time between two replays).
        if min(first.capacity, layers[-1].capacity) <= num_tokens:
            for layer in layers:
                layer.reserve(num_tokens + 1, self.max_tokens)
        return first.capacity, first.k.data.data_ptr()

    def derive(self, pos: torch.Tensor) -> None:
        torch.add(pos, 1, out=self.length)

    def finish(self, num_tokens: int) -> None:
        for layer in self.cache.layers:
            layer.commit(1)

    def flush(self) -> None:
        pass  # the buffers are the cache

    def truncate(self, num_tokens: int) -> None:
        pass  # the cache's own truncation is all

    def fallback(self, variant: int) -> int | None:
        return None  # (one step)
