"""The fixed-shape decode step over the tiered store (offload/tiered_step.py), what CUDA
captures when the KV lives in pinned host memory: against the eager sparse path, in its
default fraction mode, across index growth, where it hands back to the eager path, and
through the embedded model (the layer-by-layer prefill: tests/test_prefill_tiers.py).
On a CPU it runs eagerly (the kernels in Triton's interpreter or as torch references);
the graph-replay test is CUDA-only."""

import math
import warnings

import pytest
import torch

from offload import Runtime
from offload.backend import Backend
from offload.generate import prefill
from tests.conftest import DEVICE, cuda_only
from tests.test_decode_step import _decode_without_syncs, _greedy


def _tiered_pair(tiny_dirs, hit_factor=None, **overrides):
    """Two tiered caches of one tiny model: eager decode, and the fixed-shape step (with
    device hit caches of `hit_factor` x the retrieved tokens)."""
    cfg = dict(dtype="float32", mode="sparse", selector="cluster", sink=4, window=32,
               retrieved=16, dense_layers=1, candidate_factor=2, index_refresh=4096,
               prefetch="off", device=DEVICE.type)  # fmt: skip
    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], **{**cfg, **overrides})
    eager, stepped = rt.new_cache(), rt.new_cache()
    eager.step = None  # on CUDA the Runtime gives tiered caches the (captured) step
    if stepped.step is None:  # on a CPU the Runtime decodes tiered caches eagerly
        stepped.mirror_dense_layers(DEVICE)
        stepped.use_step(rt.model, Backend(DEVICE, kernels=True, graphs=False), hit_factor)
    elif hit_factor:
        stepped.use_step(rt.model, rt.backend, hit_factor)
    # The step reranks by the low-bit summaries; so must the eager path to be comparable
    # (on a CPU it would rerank by the exact keys in place).
    eager.store.key_rows = lambda layer: None
    return rt, eager, stepped


@pytest.mark.parametrize(
    "hit_factor, split, reuse",
    [(None, False, "off"), (2.0, True, "off"), (None, False, "on"), (2.0, False, "on")],
)
def test_fixed_shape_tiered_step_equals_eager_sparse_decode(
    tiny_dirs, hit_factor, split, reuse, monkeypatch
):
    """With and without the step's device hit caches (only their misses are read from
    the host tier: counted in the store's reads); with the tokens kept selected by
    the split kernels (`top_ids_split`, which only a larger context reaches: forced);
    and with every other step reusing the last selection and its successors (the
    step's second graph, `selection.reuse`)."""
    from offload.kernels import ranking
    from storage.tiered import TierReads

    if split:  # (4,352 candidates a head, the index's tail: 3 programs of 2,048)
        monkeypatch.setattr(ranking, "SPLIT_ABOVE", 0)
        monkeypatch.setattr(ranking, "INTERPRETED_SPLIT_ABOVE", 0)
        monkeypatch.setattr(ranking, "BLOCK_SPLIT", 2048)
    else:  # (one program a head, on a GPU too)
        monkeypatch.setattr(ranking, "SPLIT_ABOVE", 10**9)

    rt, eager, stepped = _tiered_pair(tiny_dirs, hit_factor, reuse=reuse)
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:150]
    logits = []
    for c in (eager, stepped):
        logits.append(prefill(rt.model, c, ids, 64))
        c.finish_prefill()
    stepped.store.reads = TierReads()
    out = [_greedy(c, rt.model, lg, 30) for c, lg in zip((eager, stepped), logits, strict=True)]
    assert out[0] == out[1]
    # layer 1 attended sparsely at every step, and in the stepped cache fixed-shape
    assert eager.policy.stats.sparse_steps == stepped.policy.stats.sparse_steps == 30
    assert stepped.step.plan.steps == 30
    reused = 15 if reuse == "on" else 0  # (every other step, one sparse layer)
    assert eager.policy.stats.reused_steps == stepped.policy.stats.reused_steps == reused
    stepped.flush()
    # steps x heads x retrieved (a reusing step reads twice as many rows without a hit cache)
    selected = (30 + reused) * rt.args.num_kv_heads * 16
    host_rows = stepped.store.reads.count["host"]
    assert host_rows == selected if hit_factor is None else 0 < host_rows < selected
    # The store lags by less than a chunk while steps run; flushing brings it level.
    assert stepped.store.num_tokens <= stepped.num_tokens < stepped.store.num_tokens + 16
    stepped.flush()
    assert stepped.store.num_tokens == stepped.num_tokens == eager.num_tokens
    for layer in range(2):
        k_e, v_e = eager.store.gather_all(layer)
        k_s, v_s = stepped.store.gather_all(layer)
        torch.testing.assert_close(k_e, k_s)
        torch.testing.assert_close(v_e, v_s)
    # A truncation (next request on a shared prefix) then eager and stepped agree again.
    for c in (eager, stepped):
        c.truncate(170)
    nxt = [c.decode(rt.model, 7) for c in (eager, stepped)]
    torch.testing.assert_close(nxt[0], nxt[1], atol=1e-4, rtol=1e-4)


def test_tiered_step_retrieves_the_fraction_of_the_context(tiny_dirs, monkeypatch):
    """The default config retrieves a fraction of the context (`retrieved` 0): the step
    computes its count on the device from the position (ceil of a float64 product), as
    the eager path does on the host, and gives the eager path's logits at every step;
    also across a boundary of the retrieval slots' buckets (more slots: a new capture)."""
    from offload import tiered_step

    monkeypatch.setattr(tiered_step, "K_BUCKET", 160)  # slots for T <= 160, then for 256
    rt, eager, stepped = _tiered_pair(tiny_dirs, retrieved=0, retrieve_fraction=0.1)
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:150]
    logits = []
    for c in (eager, stepped):
        logits.append(prefill(rt.model, c, ids, 64))
        c.finish_prefill()
    token = int(logits[0].argmax())
    counts, slots = [], []
    for _ in range(20):
        T = eager.num_tokens + 1
        out = [c.decode(rt.model, token) for c in (eager, stepped)]
        torch.testing.assert_close(out[1], out[0], atol=1e-4, rtol=1e-4)
        k_valid = int(stepped.step.plan.k_valid)
        assert k_valid == math.ceil(T * 0.1) == eager.policy.stats.last_retrieved
        counts.append(k_valid)
        slots.append(stepped.step.plan.k)
        token = int(out[0].argmax())
    # T 151, 160, 161, 170
    assert (counts[0], counts[9], counts[10], counts[-1]) == (16, 16, 17, 17)
    assert slots == [16] * 10 + [26] * 10  # ceil(0.1 x 160), then ceil(0.1 x 256)
    assert stepped.step.plan.steps == 20


def test_tiered_step_falls_back_to_eager_where_it_cannot_apply(tiny_dirs):
    """Below the sparse range the step hands over to the eager path, with the store
    brought level first (in the sparse range: the test below)."""
    rt, eager, stepped = _tiered_pair(tiny_dirs)
    ids = rt.tokenizer.encode("seven quiet stones over the river")[:30]  # < sink + window
    for c in (eager, stepped):
        prefill(rt.model, c, ids, 64)
        c.finish_prefill()
    assert stepped.step.plan.prepare(stepped.num_tokens) is None
    a = _greedy(eager, rt.model, eager.decode(rt.model, 5), 10)
    b = _greedy(stepped, rt.model, stepped.decode(rt.model, 5), 10)
    assert a == b and stepped.store.num_tokens == stepped.num_tokens


@pytest.mark.parametrize(
    "overrides",
    [{"selector": "summary"}, {"host_bytes": "16KiB", "spill_batch": 2}],
    ids=["not-the-cluster-selector", "chunks-on-disk"],
)
def test_tiered_step_falls_back_in_the_sparse_range_where_it_cannot_apply(tiny_dirs, overrides):
    """In the sparse range too: a selector other than the cluster index, or chunks of a
    sparse layer on disk, and the step is the eager path's (sparse there)."""
    rt, eager, stepped = _tiered_pair(tiny_dirs, **overrides)
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:150]
    for c in (eager, stepped):
        prefill(rt.model, c, ids, 64)
        c.finish_prefill()
        c.store.settle()  # (a spill still in flight keeps its chunks on the host)
    if "host_bytes" in overrides:  # some chunks of the sparse layer were spilled
        assert any(layer in stepped.step.plan.sparse for layer, _ in stepped.store.directory.disk)
    assert stepped.step.plan.prepare(stepped.num_tokens) is None
    a = _greedy(eager, rt.model, eager.decode(rt.model, 5), 10)
    b = _greedy(stepped, rt.model, stepped.decode(rt.model, 5), 10)
    assert a == b
    assert eager.policy.stats.sparse_steps == stepped.policy.stats.sparse_steps == 11
    # Every step is eager here on a CPU; on CUDA the first at least: once it has read the
    # spilled chunks back, the host holds the layer in order again, and the fixed-shape
    # step may take over.
    steps = stepped.step.plan.steps
    assert (steps == 0) if DEVICE.type == "cpu" else (steps < 11)


@pytest.mark.parametrize("retrieved", [8, 100_000])
def test_recall_probe_measures_the_attention_mass_a_sparse_step_keeps(tiny_dirs, retrieved):
    """`SelectionStats(recall=[])` (scripts/eval_fidelity.py): each sparse step records,
    per KV head, the share of the dense softmax mass on what it attended; every token
    attended (a budget past the context) keeps all of it."""
    from offload.attention import SelectionStats

    rt, eager, _ = _tiered_pair(tiny_dirs, retrieved=retrieved)
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:150]
    logits = prefill(rt.model, eager, ids, 64)
    eager.finish_prefill()
    eager.policy.stats = SelectionStats(recall=[])
    _greedy(eager, rt.model, logits, 6)
    recall = eager.policy.stats.recall
    assert [layer for layer, _ in recall] == [1] * 6  # layer 0 is dense
    masses = torch.stack([m for _, m in recall])  # [steps, H]
    assert masses.shape == (6, rt.args.num_kv_heads)
    if retrieved > 150:
        torch.testing.assert_close(masses, torch.ones_like(masses))
    else:
        assert ((masses > 0) & (masses < 0.99)).all()  # (0.26-0.87 here)


def test_runtime_over_the_tiered_step_at_full_budget_equals_dense(tiny_dirs):
    """The Runtime as it runs on CUDA (dense layers mirrored on the device, tiered
    decode through the fixed-shape step), here eagerly on the CPU: with a budget that
    covers the whole range, sparse decode equals dense decode token for token, over a
    chat whose second turn reuses the first turn's KV."""
    from offload.conversation import KVState

    path = tiny_dirs["llama-gqa-untied"][0]
    dense = Runtime.from_pretrained(path, dtype="float32", mode="full")
    rt = Runtime.from_pretrained(path, dtype="float32", mode="sparse", sink=4, window=32,
                                 retrieved=100000, dense_layers=1)  # fmt: skip
    rt.backend = Backend(DEVICE, kernels=True, fixed_shape=True, remote_host=True)
    rt._state = KVState(rt.new_cache())
    assert rt._state.cache.step is not None and rt._state.cache.layers[0].mirror is not None
    prompt = "seven quiet stones over the river " * 4
    assert rt.generate(prompt, max_new_tokens=24) == dense.generate(prompt, max_new_tokens=24)
    # every step ran fixed-shape, over the whole range
    assert rt._state.cache.step.plan.steps == 23 and rt._state.cache.step.plan.k > 40
    a, b = rt.chat(), dense.chat()
    for turn in ("green north market", "and after winter"):
        assert a.send(turn, max_new_tokens=16) == b.send(turn, max_new_tokens=16)
    assert a._state.cache.store.num_tokens == a.context_tokens  # flushed after each answer


def test_tiered_step_equals_dense_while_its_index_grows_and_syncs_in_part(tiny_dirs, monkeypatch):
    """Decode steps long enough for the index to absorb new tokens several times and to
    start new segments: the device index syncs only its end between them (and whole
    when its buffers grow), and at full budget the steps still give dense's tokens."""
    from offload.conversation import KVState
    from retrieval.cluster import ClusterIndex

    path = tiny_dirs["llama-gqa-untied"][0]
    dense = Runtime.from_pretrained(path, dtype="float32", mode="full")
    rt = Runtime.from_pretrained(path, dtype="float32", mode="sparse", sink=4, window=32,
                                 retrieved=100000, dense_layers=1, index_refresh=16,
                                 cluster_segment=64)  # fmt: skip
    rt.backend = Backend(DEVICE, kernels=DEVICE.type == "cuda", fixed_shape=True, remote_host=True)
    rt._state = KVState(rt.new_cache())
    firsts = []
    real = ClusterIndex.counts_from
    monkeypatch.setattr(
        ClusterIndex, "counts_from", lambda self, f, t: firsts.append(f) or real(self, f, t)
    )
    prompt = "seven quiet stones over the river " * 4
    n = 150  # (the tiny model's window is 256 tokens)
    assert rt.generate(prompt, max_new_tokens=n) == dense.generate(prompt, max_new_tokens=n)
    plan = rt._state.cache.step.plan
    assert plan.steps == n - 1
    index = rt._state.cache.policy.selectors[1]
    assert len(index.segments) >= 3  # new segments during the steps
    assert any(f > 0 for f in firsts) and 0 in firsts  # partial syncs, and full ones


def test_a_reusing_step_fetches_its_rows_on_a_side_stream(tiny_dirs):
    """On CUDA (emulated on a CPU, where the race check sees the streams' order) a step
    that reuses the last selection looks its rows up, and reads its misses, on a side
    stream from the step's start (variant 2, captured as a graph of its own beside the
    selecting steps'); each sparse layer's attention waits for its own rows. The tokens
    are the eager path's, and the same with the rows looked up in line (variant 1)."""
    from tests.conftest import on_cuda

    with on_cuda():
        rt, eager, stepped = _tiered_pair(tiny_dirs, 2.0, reuse="on", device="cuda")
        plan = stepped.step.plan
        assert plan.side_fetch and rt.backend.graphs
        ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:150]
        logits = [prefill(rt.model, c, ids, 64) for c in (eager, stepped)]
        for c in (eager, stepped):
            c.finish_prefill()
        want = _greedy(eager, rt.model, logits[0], 30)
        assert _greedy(stepped, rt.model, logits[1], 16) == want[:16]
        assert plan._side is not None and sorted(stepped.step._graphs) == [0, 2]
        plan.side_fetch = False  # the rows in line: variant 1, a graph of its own
        after = _greedy(stepped, rt.model, stepped.decode(rt.model, want[16]), 13)
        assert [want[16], *after] == want[16:]
        assert 1 in stepped.step._graphs
        assert eager.policy.stats.reused_steps == stepped.policy.stats.reused_steps == 15


@pytest.mark.parametrize("refuse", ["side stream", "reuse"])
def test_a_reusing_step_that_cannot_be_captured_falls_back(tiny_dirs, refuse, monkeypatch):
    """Where the reusing step's side stream fails to capture (a driver that refuses it),
    the step warns and reuses with its rows looked up in line (variant 1) from then on;
    where that fails too, every step selects (variant 0, reuse off). The tokens are those
    of the eager path that reuses, or of one that does not."""
    from offload.tiered_step import SparseStepLayer
    from tests.conftest import on_cuda

    def refused(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\n(details)")

    if refuse == "side stream":
        monkeypatch.setattr(SparseStepLayer, "fetch_reused", refused)
    else:  # (both reusing variants look their rows up with it)
        monkeypatch.setattr(SparseStepLayer, "_reused_rows", refused)
    with on_cuda():
        rt, eager, stepped = _tiered_pair(tiny_dirs, 2.0, reuse="on", device="cuda")
        eager.policy.reuse = refuse == "side stream"
        plan = stepped.step.plan
        ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:150]
        logits = [prefill(rt.model, c, ids, 64) for c in (eager, stepped)]
        for c in (eager, stepped):
            c.finish_prefill()
        want = _greedy(eager, rt.model, logits[0], 12)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _greedy(stepped, rt.model, logits[1], 12) == want
        said = [str(w.message) for w in caught if "could not be captured" in str(w.message)]
        assert len(said) == (1 if refuse == "side stream" else 2), said
        assert "variant 2" in said[0] and "(operation not permitted when" in said[0]
        assert not plan.side_fetch
        assert stepped.policy.stats.reused_steps == eager.policy.stats.reused_steps
        if refuse == "side stream":
            assert sorted(stepped.step._graphs) == [0, 1] and stepped.policy.reuse
            assert stepped.policy.stats.reused_steps > 0
        else:
            assert sorted(stepped.step._graphs) == [0] and not stepped.policy.reuse


@cuda_only
@pytest.mark.parametrize("hit_factor", [None, 2.0])
def test_tiered_step_replays_without_host_syncs_between_chunk_boundaries(tiny_dirs, hit_factor):
    rt, _, stepped = _tiered_pair(tiny_dirs, hit_factor)
    assert stepped.step.backend.graphs
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:150]
    token = int(prefill(rt.model, stepped, ids, 64).argmax())
    stepped.finish_prefill()
    # Step to just past a chunk boundary: the next 3 steps complete no chunk (a completed
    # chunk goes to the host between steps, a sync by design).
    while stepped.num_tokens % 16 != 1:
        token = int(stepped.decode(rt.model, token).argmax())
    captures = stepped.step.captures
    _decode_without_syncs(stepped, rt.model, (3, 4, 5))
    assert stepped.step.captures == captures and stepped.step.plan.steps >= 4


def test_embedded_model_through_the_tiered_step_at_full_budget_equals_dense(smol_bf16):
    """The real model as CUDA runs it when its KV is tiered (dense layers mirrored, the
    rest through the fixed-shape sparse step; on a CPU with the torch references, since
    Triton's interpreter is too slow for 30 layers): at full budget, dense's tokens."""
    from offload.conversation import KVState
    from tests.test_sparse_e2e import needle_messages

    prompt = needle_messages(40, 0.5)  # about 1k tokens
    dense = Runtime(smol_bf16.loaded, smol_bf16.config.replace(mode="full"), smol_bf16.device)
    want = [s.token_id for s in dense.stream(prompt, max_new_tokens=8)]
    # prefetch "cache": the step's device hit caches (what CUDA's "auto" gives)
    config = smol_bf16.config.replace(mode="sparse", retrieved=100_000, prefetch="cache")
    rt = Runtime(smol_bf16.loaded, config, smol_bf16.device)
    rt.backend = Backend(DEVICE, kernels=DEVICE.type == "cuda", fixed_shape=True,
                         remote_host=True)  # fmt: skip
    rt._state = KVState(rt.new_cache())
    got = [s.token_id for s in rt.stream(prompt, max_new_tokens=8)]
    assert got == want
    assert rt._state.cache.step.plan.steps == len(got) - 1
    s = rt.stats()
    assert s["selection"]["sparse_layer_steps"] == 28 * (len(got) - 1)
    # the first step missed everything; later ones the new tokens of the range only
    assert 0.5 < s["prefetch"]["hit_rate"] < 1
