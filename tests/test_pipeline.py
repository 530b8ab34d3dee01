"""The prefetch pipeline and the device hit cache (offload/pipeline.py)."""

import threading

import pytest
import torch

from offload import Runtime
from offload.pipeline import HitCache, Pipeline, PrefetchError
from tests.test_sparse_e2e import needle_messages

H, D, T = 3, 8, 500


def source():
    return torch.randn(2, H, T, D, generator=torch.Generator().manual_seed(0))


def counting_fetch(src, calls):
    def fetch(ids):
        calls.append(ids.clone())
        return src[:, torch.arange(H)[:, None], ids]

    return fetch


def random_ids(gen, k):
    return torch.stack([torch.sort(torch.randperm(T, generator=gen)[:k]).values for _ in range(H)])


def test_repeated_selection_copies_nothing_the_second_time():
    src, calls = source(), []
    cache = HitCache(H, D, torch.float32, "cpu")
    cache.reserve(64, T)
    ids = random_ids(torch.Generator().manual_seed(1), 20)
    slots, copied = cache.ensure(ids, counting_fetch(src, calls))
    assert copied == ids.numel() and len(calls) == 1
    slots2, copied2 = cache.ensure(ids, counting_fetch(src, calls))
    assert copied2 == 0 and len(calls) == 1  # no fetch at all
    assert torch.equal(slots, slots2)
    assert torch.equal(cache.read(slots2), src[:, torch.arange(H)[:, None], ids])


def test_hit_cache_always_returns_the_selected_tokens_and_copies_only_misses():
    """Random selections with overlap and eviction: what is read back is always the
    source's K/V of the selected ids, and each call copies exactly the ids not resident."""
    src, calls = source(), []
    gen = torch.Generator().manual_seed(2)
    cache = HitCache(H, D, torch.float32, "cpu")
    k = 25
    cache.reserve(2 * k, T)
    resident = [set() for _ in range(H)]
    for _ in range(40):
        ids = random_ids(gen, k)
        before = [set(resident[h]) for h in range(H)]
        slots, copied = cache.ensure(ids, counting_fetch(src, calls))
        expected = sum(len(set(ids[h].tolist()) - before[h]) for h in range(H))
        assert copied == expected
        assert torch.equal(cache.read(slots), src[:, torch.arange(H)[:, None], ids])
        resident = [set(cache.token_of[h][cache.token_of[h] >= 0].tolist()) for h in range(H)]
        for h in range(H):
            assert set(ids[h].tolist()) <= resident[h]
            assert len(resident[h]) <= cache.capacity


def test_hit_cache_forgets_truncated_tokens():
    src, calls = source(), []
    cache = HitCache(H, D, torch.float32, "cpu")
    cache.reserve(64, T)
    ids = torch.arange(100, 120).expand(H, 20).contiguous()
    cache.ensure(ids, counting_fetch(src, calls))
    cache.truncate(110)  # tokens 110.. will be different tokens after the cut
    _, copied = cache.ensure(ids, counting_fetch(src, calls))
    assert copied == H * 10


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("offload-prefetch")]


def test_pipeline_runs_jobs_and_shuts_down_cleanly():
    done = []
    with Pipeline(torch.device("cpu")) as p:
        p.submit(3, lambda: done.append(3))
        assert p.wait(3) is not None
        assert p.wait(4) is None  # no job for that layer
        p.submit(5, lambda: done.append(5))  # left for stop() to finish
    assert done == [3, 5]
    assert prefetch_threads() == []


def test_worker_error_surfaces_in_the_caller_with_its_cause():
    def boom():
        raise OSError("disk gone")

    p = Pipeline(torch.device("cpu")).start()
    p.submit(7, boom)
    with pytest.raises(PrefetchError, match="layer 7.*disk gone") as info:
        p.wait(7)
    assert isinstance(info.value.__cause__, OSError)
    p.stop()
    assert prefetch_threads() == []


def test_a_failed_jobs_device_work_still_comes_before_the_callers():
    """On CUDA a job runs on the copy stream: what it queued before it failed must be
    ordered before the compute stream's next work (emulated, the race check sees it)."""
    from tests.conftest import on_cuda

    with on_cuda():
        x = torch.zeros(64, device="cuda")

        def half_done():
            x.add_(1)
            raise OSError("disk gone")

        p = Pipeline(x.device).start()
        p.submit(2, half_done)
        with pytest.raises(PrefetchError):
            p.wait(2)
        x.mul_(2)
        p.stop()
        assert x.tolist() == [2.0] * 64


def test_an_error_nobody_waited_for_is_raised_by_stop():
    p = Pipeline(torch.device("cpu")).start()
    p.submit(1, lambda: 1 / 0)
    with pytest.raises(PrefetchError) as info:
        p.stop()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert prefetch_threads() == []


@pytest.mark.parametrize("reuse", ["off", "on"])
def test_prefetch_on_and_off_give_identical_tokens(smol_bf16, reuse):
    """The same sparse decode with direct gathers, with the hit cache, and with the
    speculating worker: identical tokens; the worker's stats are filled and it is gone.
    (The eager sparse path: on CUDA, `cuda_graphs = false` keeps decode off the captured
    step, which fetches without the pipeline.) With `selection.reuse` the worker does
    not speculate for a layer whose step reuses its last selection: no job is dropped."""
    prompt = needle_messages(40, 0.5)  # about 1k tokens
    tokens, stats = {}, {}
    for prefetch in ("off", "cache", "on"):
        rt = Runtime(
            smol_bf16.loaded,
            smol_bf16.config.replace(
                mode="sparse", prefetch=prefetch, retrieve_fraction=0.1, cuda_graphs=False,
                reuse=reuse,
            ),
            smol_bf16.device,
        )  # fmt: skip
        tokens[prefetch] = [s.token_id for s in rt.stream(prompt, max_new_tokens=8)]
        stats[prefetch] = rt.stats()
        rt.close()
    assert tokens["off"] == tokens["cache"] == tokens["on"]
    assert "prefetch" not in stats["off"]
    cached, spec = stats["cache"]["prefetch"], stats["on"]["prefetch"]
    assert cached["jobs"] == 0 and cached["hit_rate"] > 0.3  # consecutive steps overlap
    assert spec["jobs"] > 0 and 0 < spec["speculation_recall"] <= 1
    assert spec["hit_rate"] >= cached["hit_rate"]
    assert spec["dropped_jobs"] == 0
    reused = stats["on"]["selection"]["reused_layer_steps"]
    assert (reused > 0) == (reuse == "on"), stats["on"]["selection"]
    assert prefetch_threads() == []


def test_pinned_staging_reuses_a_buffer_only_after_its_copy_is_done():
    """Host -> device copies through two pinned buffers in turn (storage/staging.py): the
    third copy refills the first buffer, which its asynchronous copy may still be reading
    unless the host waited for it (emulated, the race check sees a missed wait)."""
    from storage.staging import PinnedStaging
    from tests.conftest import on_cuda

    with on_cuda():
        staging, device = PinnedStaging(), torch.device("cuda")
        sent = [torch.full((3, 5), float(i)) for i in range(5)]
        got = [staging.to_device(t, device) for t in sent]
        assert all(g.is_cuda for g in got)
        assert [g.tolist() for g in got] == [t.tolist() for t in sent]
        # Rows gathered straight into the next buffer (`empty`: a selection's rows read
        # from the session files) go from it: it is the buffer sent, waited for as any.
        for i in range(5):
            rows = staging.empty((3, 5), torch.float32)
            assert rows.data_ptr() in [b.data_ptr() for b in staging._bufs]
            rows.fill_(10.0 + i)
            sent.append(rows.clone())
            got.append(staging.to_device(rows, device))
            got.append(staging.to_device(torch.full((2, 2), -1.0), device))
            sent.append(torch.full((2, 2), -1.0))
        assert [g.tolist() for g in got] == [t.tolist() for t in sent]
