"""Selectors against the exact oracle on seeded data, GQA aggregation, the sparse path."""

import pytest
import torch

from offload.attention import SparsePolicy, gqa_attention
from offload.config import SelectionSection
from retrieval import ChunkBound, ClusterIndex, ExactTopK, SummaryScan, make_selector
from retrieval.base import coarse_max, fine_softmax_sum
from storage.layout import KVLayout
from storage.tiered import TieredStore
from tests.retrieval_data import mass_recall, recall, synthetic_layer, view_of

LO, HI, K = 16, 4096 - 256, 200


def fresh_index(view, **kw):
    index = ClusterIndex(3, 64, **kw)
    index.update(view)
    return index


SELECTORS = {
    "exact": lambda view: ExactTopK(),
    "summary": lambda view: SummaryScan(),
    "chunk": lambda view: ChunkBound(),
    "cluster": lambda view: fresh_index(view),
}


@pytest.mark.parametrize("name", sorted(SELECTORS))
@pytest.mark.parametrize("lo, hi, k", [(LO, HI, K), (LO, HI, 1), (100, 164, 64), (0, 4096, 300)])
def test_selection_contract(name, lo, hi, k):
    keys, q, view = synthetic_layer(seed=5)
    ids = SELECTORS[name](view).select(q, view, lo, hi, k)
    assert ids.shape == (3, k) and ids.dtype == torch.long
    for row in ids:
        assert row.tolist() == sorted(set(row.tolist())), "ids must be distinct and ascending"
        assert lo <= int(row.min()) and int(row.max()) < hi


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name, min_share", [("summary", 0.98), ("cluster", 0.97), ("chunk", 0.85)])
def test_attention_mass_against_exact(seed, name, min_share):
    keys, q, view = synthetic_layer(seed=seed)
    oracle = mass_recall(keys, q, ExactTopK().select(q, view, LO, HI, K), LO, HI)
    got = mass_recall(keys, q, SELECTORS[name](view).select(q, view, LO, HI, K), LO, HI)
    assert got <= oracle + 1e-6  # nothing beats the oracle at the same budget
    assert got >= min_share * oracle


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_candidates_recall_does_not_decrease_with_probes(seed):
    keys, q, view = synthetic_layer(seed=seed)
    exact = ExactTopK().select(q, view, LO, HI, K)
    recalls = [
        recall(fresh_index(view, candidate_factor=f).candidates(q, LO, HI, K), exact)
        for f in (1, 2, 4, 8, 16)
    ]
    assert recalls == sorted(recalls), recalls
    assert recalls[-1] >= 0.99 and recalls[0] < recalls[-1]


def test_cluster_index_absorbs_new_tokens_in_batches():
    keys, _, view = synthetic_layer(T=2048, seed=3)
    index = ClusterIndex(3, 64, refresh=256, segment=8192)
    index.update(view_of(keys, 1024))
    assert index.indexed_tokens == 1024 and len(index.segments) == 1
    index.update(view_of(keys, 1024 + 128))  # fewer than `refresh` new tokens: wait
    assert index.indexed_tokens == 1024
    index.update(view)  # 1024 new tokens: assigned to the existing segment's centroids
    assert index.indexed_tokens == 2048 and len(index.segments) == 1
    assert index.assign.shape == (3, 2048) and int(index.assign.max()) < index.centroids.shape[1]
    index.truncate(1500)
    assert index.indexed_tokens == 1500
    small = ClusterIndex(3, 64, segment=512)
    small.update(view)  # 2048 tokens in segments of 512: four k-means runs
    assert small.segments == [0, 512, 1024, 1536]


@pytest.mark.parametrize("kmeans", ["torch", "faiss"])
def test_segments_built_in_one_batch_equal_segments_built_one_by_one(monkeypatch, kmeans):
    """A bulk update k-means' whole segments together (torch: one batched run per group
    of segments; member sums where the keys are) and grows the index's tensors once:
    exactly the index that segments added one update at a time make."""
    import retrieval.cluster as cluster

    keys, _, view = synthetic_layer(T=2048, seed=4)
    bulk = ClusterIndex(3, 64, segment=384, refresh=64, kmeans=kmeans)
    bulk.update(view_of(keys, 96))  # a first segment of 96 tokens...
    bulk.update(view)  # ...filled to 384 by assignment, then 4 whole segments and a part
    assert bulk.segments == [0, 384, 768, 1152, 1536, 1920]
    monkeypatch.setattr(cluster, "KMEANS_GROUP_BYTES", 1)  # one segment per k-means run
    step = ClusterIndex(3, 64, segment=384, refresh=64, kmeans=kmeans)
    for upto in (96, 384, 768, 1152, 1536, 1920, 2048):
        step.update(view_of(keys, upto))
    assert bulk.state_meta() == step.state_meta()
    for name, t in bulk.state_tensors().items():
        assert torch.equal(t, step.state_tensors()[name]), name


def test_batches_join_the_token_map_in_place_and_a_truncation_rewinds_it():
    """Decode batches joining the last segment are written into the token map's buffer,
    which grows by a quarter, not copied whole each batch; a truncation rewinds it, and
    the batches after it overwrite what was cut."""
    keys, _, _ = synthetic_layer(T=1024, seed=6)
    index = ClusterIndex(3, 64, segment=1024, refresh=16, kmeans="torch")
    index.update(view_of(keys, 256))  # the segment's k-means; then batches join it

    def nearest(k):  # a batch's clusters: the segment's nearest k-means centroid
        return torch.einsum("hnd,hcd->hnc", k, index._unit).argmax(-1) + index._unit_offset

    want = index.assign.clone()
    buffers = set()
    for upto in range(272, 513, 16):
        index.update(view_of(keys, upto))
        want = torch.cat([want, nearest(keys[:, upto - 16 : upto])], dim=1)
        buffers.add(index._assign.data_ptr())
    assert torch.equal(index.assign, want) and index.indexed_tokens == 512
    assert len(buffers) < 8  # (16 batches)
    index.truncate(304)
    other = keys.flip(1)  # other tokens after the cut
    other[:, :304] = keys[:, :304]
    index.update(view_of(other, 400))
    want = torch.cat([want[:, :304], nearest(other[:, 304:400])], dim=1)
    assert torch.equal(index.assign, want) and index.state_tensors()["assign"].shape == (3, 400)


def test_gqa_aggregation():
    scores = torch.tensor([[[0.0, 5.0, 1.0], [4.0, 0.0, float("-inf")]]])  # [H=1, G=2, N=3]
    assert coarse_max(scores).tolist() == [[4.0, 5.0, 1.0]]
    w = fine_softmax_sum(scores)
    assert w.shape == (1, 3) and abs(float(w.sum()) - 2.0) < 1e-6
    assert float(w[0, 2]) == pytest.approx(
        torch.softmax(torch.tensor([0.0, 5.0, 1.0]), 0)[2].item()
    )


def test_sparse_attention_is_exact_attention_over_sink_window_and_selected(tmp_path):
    """The sparse path attends to exactly sink ∪ selected ∪ window, and dense layers stay dense."""
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=16, dtype="float32", chunk_size=4)
    sel = SelectionSection(
        mode="sparse", selector="exact", sink=4, window=8, retrieved=10, dense_layers=1
    )
    store = TieredStore(layout, torch.float32, torch.device("cpu"), host_bytes=1 << 20,
                        disk_dir=tmp_path, disk_bytes=1 << 30, sink=4, window=8)  # fmt: skip
    policy = SparsePolicy(sel, 3, 2, 16)
    from offload.attention import TieredLayer

    store.start()
    g = torch.Generator().manual_seed(0)
    T = 61
    kv = torch.randn(3, 2, 2, T, 16, generator=g)
    for layer in range(3):
        store.append(layer, kv[layer, 0, :, : T - 1], kv[layer, 1, :, : T - 1])
    q = torch.randn(4, 1, 16, generator=g)  # 4 query heads, 2 KV heads
    for layer in range(3):
        tl = TieredLayer(store, policy, layer)
        tl.append(kv[layer, 0, :, T - 1 :], kv[layer, 1, :, T - 1 :])
        out = tl.attend(q)
        k_all, v_all = kv[layer, 0], kv[layer, 1]
        if layer == 0:  # a dense layer
            torch.testing.assert_close(out, gqa_attention(q, k_all, v_all))
            continue
        ids = ExactTopK().select(q.reshape(2, 2, 16), policy.view(store, layer), 4, T - 8, 10)
        ref = []
        for h in range(2):
            keep = torch.cat([torch.arange(4), ids[h], torch.arange(T - 8, T)])
            ref.append(
                gqa_attention(q[2 * h : 2 * h + 2], k_all[h : h + 1, keep], v_all[h : h + 1, keep])
            )
        torch.testing.assert_close(out, torch.cat(ref))
    assert policy.stats.sparse_steps == 2 and policy.stats.dense_steps == 1
    store.close()


def test_auto_mode_on_cpu_is_dense_in_place_and_sparse_once_spilled(tmp_path):
    """Mode "auto" above the threshold: dense while the host tier holds the layer in place
    (cheaper on a CPU than selecting), sparse once chunks have gone to disk."""
    from offload.attention import TieredLayer

    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", chunk_size=4)
    sel = SelectionSection(mode="auto", selector="exact", sink=4, window=8, retrieved=6,
                           dense_layers=0, sparse_threshold=16)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 2, 2, 64, 16, generator=g)
    q = torch.randn(4, 1, 16, generator=g)
    steps = {}
    for host_chunks in (64, 6):  # room for every chunk; room for 6 of the 16 per layer
        store = TieredStore(layout, torch.float32, torch.device("cpu"),
                            host_bytes=host_chunks * layout.chunk_bytes, disk_dir=tmp_path / str(host_chunks),
                            disk_bytes=1 << 30, sink=4, window=8, spill_batch=2)  # fmt: skip
        store.start()
        policy = SparsePolicy(sel, 2, 2, 16)
        layers = [TieredLayer(store, policy, i) for i in range(2)]
        for i, tl in enumerate(layers):
            tl.append(kv[i, 0, :, :63], kv[i, 1, :, :63])
        policy.build_index(store, 63)
        for i, tl in enumerate(layers):
            tl.append(kv[i, 0, :, 63:], kv[i, 1, :, 63:])
            out = tl.attend(q)
            assert out.shape == (4, 1, 16) and torch.isfinite(out).all()
        steps[host_chunks] = (policy.stats.dense_steps, policy.stats.sparse_steps)
        store.close()
    assert steps == {64: (2, 0), 6: (0, 2)}


def test_make_selector_by_name():
    sel = SelectionSection()
    assert isinstance(make_selector("cluster", 3, 64, sel), ClusterIndex)
    assert isinstance(make_selector("chunk", 3, 64, sel), ChunkBound)


def test_a_reused_selection_adds_each_tokens_successor_once():
    """`with_successors`: the ids, then each one's successor unless it is the next id;
    rows past `valid` (padding, the head's first id) and the dropped successors unused.
    The same with `valid` a device tensor, as the captured step passes it."""
    from retrieval.base import with_successors

    ids = torch.tensor([[3, 4, 9, 12, 3], [0, 1, 2, 7, 0]])
    for valid in (4, torch.tensor([4])):
        both, use = with_successors(ids, valid)
        kept = [sorted(both[h][use[h]].tolist()) for h in range(2)]
        assert kept == [[3, 4, 5, 9, 10, 12, 13], [0, 1, 2, 3, 7, 8]]
        assert both.shape == use.shape == (2, 10)
        assert (both[~use] == ids[:, :1].expand(2, 10)[~use]).all()  # unused: the first id
