"""A decode step never reads a value back to the host: checked on the CPU.

What CUDA captures as a graph (`DecodeStep._forward`) is run under `HostReads`
(tests/host_sync.py), for the dense device cache's step and the tiered step with and
without its hit caches, over enough tokens to cross a hand-over to the store and an
index update between steps. The CUDA-only tests in tests/test_decode_step.py and
tests/test_tiered_step.py check the same with CUDA's sync debug mode on a GPU. After the
step, on CUDA (emulated on a CPU), the index updates of the steps after a hand-over wait
for nothing on the device.
"""

import pytest
import torch

from offload import Runtime
from offload.backend import Backend
from offload.generate import prefill
from tests.conftest import DEVICE, on_cuda
from tests.host_sync import HostReads
from tests.test_decode_step import _greedy
from tests.test_tiered_step import _tiered_pair


def _watch(step) -> list:
    """Run each of `step`'s forwards under HostReads; returns what they recorded."""
    found, forward = [], step._forward

    def watched():
        with HostReads() as reads:
            out = forward()
        found.extend(reads.found)
        return out

    step._forward = watched
    return found


@pytest.mark.parametrize("hit_factor", [None, 2.0])
def test_the_tiered_step_reads_nothing_back(tiny_dirs, hit_factor):
    rt, _, stepped = _tiered_pair(tiny_dirs, hit_factor, index_refresh=16)
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:150]
    first = prefill(rt.model, stepped, ids, 64)
    stepped.finish_prefill()
    found = _watch(stepped.step)
    _greedy(stepped, rt.model, first, 40)
    assert stepped.step.plan.steps == 40  # every step fixed-shape
    assert stepped.store.num_tokens >= 160  # steps ran after a hand-over to the store
    assert not found, found


def test_the_index_takes_in_a_hand_over_in_the_next_steps_without_waiting(tiny_dirs, monkeypatch):
    """A hand-over's tokens join the sparse layers' indexes in the steps after it, a few
    layers a step (here one), once the step is launched. On CUDA (emulated on a CPU)
    that work waits for nothing on the device (sync debug mode "error" around it), so
    it runs while the step computes. At full budget the tokens are the eager path's (at
    a smaller one they may part: its index takes the tokens in at the hand-over)."""
    import offload.tiered_step as tiered_step

    monkeypatch.setattr(tiered_step, "INDEX_LAYERS_PER_STEP", 1)
    with on_cuda():
        rt, eager, stepped = _tiered_pair(
            tiny_dirs, 2.0, index_refresh=16, dense_layers=0, retrieved=100000, device="cuda"
        )
        plan = stepped.step.plan
        assert len(plan.sparse) >= 2
        ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:150]
        logits = [prefill(rt.model, c, ids, 64) for c in (eager, stepped)]
        for c in (eager, stepped):
            c.finish_prefill()
        indexed = [stepped.policy.selectors[i].indexed_tokens for i in plan.sparse]
        updated, update = [], plan._update_indexes

        def watched(most):
            due = len(plan._index_due)
            torch.cuda.set_sync_debug_mode("error")
            try:
                update(most)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            updated.append(due - len(plan._index_due))

        plan._update_indexes = watched
        # (20 steps: the hand-over at 160 tokens, step 10, then a sparse layer a step;
        # 40 before, as many assertions)
        assert _greedy(stepped, rt.model, logits[1], 20) == _greedy(eager, rt.model, logits[0], 20)
        assert plan.steps == 20
    assert 1 in updated and max(updated) == 1  # a layer a step
    after = [stepped.policy.selectors[i].indexed_tokens for i in plan.sparse]
    assert all(b > a for a, b in zip(indexed, after, strict=True)), (indexed, after)


def test_a_hand_over_waits_for_no_step(tiny_dirs):
    """A hand-over of whole chunks between steps queues its copies into the pinned host
    slabs after the step and reads the hit caches' counts a hand-over later: on CUDA
    (emulated on a CPU) it waits for nothing on the device (sync debug mode "error"),
    and the host reads a slab only once its copies have landed (the emulator's race
    checks: the index updates after it read the keys there). The store then holds the
    eager path's KV, and once flushed it has counted every lookup."""
    from storage.tiered import TierReads

    with on_cuda():
        rt, eager, stepped = _tiered_pair(tiny_dirs, 2.0, index_refresh=16, device="cuda")
        plan = stepped.step.plan
        ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:144]
        assert len(ids) % stepped.store.layout.chunk_size == 0  # (whole chunks from here)
        logits = [prefill(rt.model, c, ids, 64) for c in (eager, stepped)]
        for c in (eager, stepped):
            c.finish_prefill()
        stepped.store.reads = TierReads()
        handed, hand_over = [], plan._hand_over

        def watched(T):
            torch.cuda.set_sync_debug_mode("error")
            try:
                hand_over(T)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            handed.append(T)

        plan._hand_over = watched
        out = [_greedy(c, rt.model, lg, 48) for c, lg in zip((eager, stepped), logits, strict=True)]
        plan._hand_over = hand_over  # (a flush hands over part of a chunk: that one waits)
        assert out[0] == out[1]
        assert handed == [160, 192] and plan.steps == 48
        before = stepped.store.reads.count["host"]
        stepped.flush()
        assert stepped.store.reads.count["host"] > before  # (the last hand-over's, counted)
        assert stepped.store.num_tokens == stepped.num_tokens == eager.num_tokens
        for layer in range(rt.args.num_layers):
            pairs = zip(eager.store.gather_all(layer), stepped.store.gather_all(layer), strict=True)
            for a, b in pairs:
                torch.testing.assert_close(a, b)


def test_the_dense_step_reads_nothing_back(tiny_dirs):
    rt = Runtime.from_pretrained(
        tiny_dirs["llama-gqa-untied"][0], dtype="float32", mode="full", device=DEVICE.type
    )
    cache = rt.new_cache()
    cache.use_step(rt.model, Backend(DEVICE, kernels=False, graphs=False))
    first = prefill(rt.model, cache, rt.tokenizer.encode("seven quiet stones " * 3), 8)
    found = _watch(cache.step)
    _greedy(cache, rt.model, first, 20)
    assert not found, found


def test_host_reads_catches_each_kind():
    """The watcher itself: each forbidden kind is recorded, a scalar fill is not."""
    x = torch.arange(6)
    cases = {
        "_local_scalar_dense": lambda: int(x[2]),
        "Tensor.tolist": lambda: x.tolist(),
        "nonzero": lambda: torch.nonzero(x),
        "index": lambda: x[x > 2],
        "lift_fresh": lambda: torch.tensor([1, 2]),
        "repeat_interleave": lambda: torch.repeat_interleave(x, x),
    }
    for name, op in cases.items():
        with HostReads() as reads:
            op()
        assert name in [what for what, _ in reads.found], name
    with HostReads() as reads:
        x[1] = 7
        torch.repeat_interleave(x, x, output_size=21)  # (x is 0, 7, 2, 3, 4, 5)
    assert reads.found == []
