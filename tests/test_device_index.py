"""Device-resident cluster selection: fixed shapes, and the same ids as `ClusterIndex`."""

import pytest
import torch

from offload.backend import Backend
from offload.kernels import candidates as candidate_kernels
from offload.kernels import ranking
from offload.kernels.candidates import cluster_candidates_ref
from offload.kernels.candidates import score_candidates as score_kernel
from offload.kernels.ranking import take_clusters_ref, top_ids_ref
from retrieval import ClusterIndex
from retrieval.base import ROW_BLOCK
from retrieval.device_index import DeviceClusterIndex
from storage.quant import quantize_keys, score_candidates
from tests.conftest import DEVICE
from tests.retrieval_data import synthetic_layer, view_of


def _pair(view, T_cap, factor=8, tail=0, **kw):
    index = ClusterIndex(3, 64, candidate_factor=factor, **kw)
    index.update(view)
    dev = DeviceClusterIndex(3, 64, factor, DEVICE)
    dev.sync(index, T_cap, tail)
    return index, dev


def _on(view, device):
    s = view.summaries
    return type(s)(s.bits, s.group, s.codes.to(device), s.scale.to(device), s.zero.to(device))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("factor", [2, 8])
def test_device_selection_equals_cluster_index_selection(seed, factor):
    keys, q, view = synthetic_layer(T=4096, seed=seed)
    index, dev = _pair(view, 8192, factor)
    lo, hi, k = 16, 4096 - 256, 205
    ref = index.select(q, view, lo, hi, k)  # summary rerank: no keys in place in this view
    n = dev.candidate_count(k)
    hi_d = torch.tensor([hi], device=DEVICE)
    got = dev.select(q.to(DEVICE), _on(view, DEVICE), lo, hi_d, k, n)
    assert got.shape == (3, k)
    assert torch.equal(torch.sort(got).values.cpu(), ref)
    # Fixed slots, fewer used: the best k_valid of 2k slots are the selection of k_valid.
    k_valid = torch.tensor([k], device=DEVICE)
    got = dev.select(q.to(DEVICE), _on(view, DEVICE), lo, hi_d, 2 * k, n * 2, k_valid)
    assert torch.equal(torch.sort(got[:, :k]).values.cpu(), ref)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("D, rows", [(64, 3), (128, 70)])
@pytest.mark.parametrize("dot", [True, False])
def test_candidate_scoring_kernel_matches_its_reference(bits, D, rows, dot, monkeypatch):
    """The Triton rerank (in the interpreter on a CPU) against the torch reference: low-bit
    keys dequantized in registers, padding past each head's count at -inf. With the GPU's
    block of candidates (the interpreter elsewhere takes larger ones); a row at a time, as
    on a GPU, or the rows in one product, as the interpreter runs it elsewhere."""
    monkeypatch.setattr(candidate_kernels, "INTERPRETED_BLOCK_N", candidate_kernels.BLOCK_N)
    monkeypatch.setattr(candidate_kernels, "INTERPRETED_SCORE_DOT", dot)
    g = torch.Generator().manual_seed(bits + D)
    H, T, N = 3, 1024, 77  # N: not a multiple of the kernel's block
    keys = torch.randn(H, T, D, generator=g) * torch.linspace(0.2, 3, D)  # outlier channels
    qk = quantize_keys(keys, bits, 16)
    qk = type(qk)(qk.bits, qk.group, *(t.to(DEVICE) for t in (qk.codes, qk.scale, qk.zero)))
    q = torch.randn(H, rows, D, generator=g).to(DEVICE, torch.bfloat16)
    ids = torch.randint(0, T, (H, N), generator=g).to(DEVICE)
    count = torch.tensor([N, 50, 0], device=DEVICE)
    want = score_candidates(q, qk, ids, count, D**-0.5)
    got = score_kernel(q, qk, ids, count, D**-0.5)[0]  # (the logits)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert int(torch.isinf(want).sum()) == rows * (N - 50 + N)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, block", [(3, 128), (70, 32), (5, 2)])
def test_rerank_weights_kernels_match_their_reference(rows, block, monkeypatch):
    """The rerank's softmax summed over the rows, from the scoring kernel's statistics of
    each program (1 block of candidates; 3; 39 blocks of 2: more programs than the
    statistics' block of 16, so several of its iterations) against the torch code:
    padding at zero weight, a head with no candidates all zero, rows of a prefill block."""
    N = 77
    monkeypatch.setattr(candidate_kernels, "INTERPRETED_BLOCK_N", block)
    monkeypatch.setattr(candidate_kernels, "BLOCK_W", 32)  # several programs of the sum
    monkeypatch.setattr(candidate_kernels, "BLOCK_STATS", 16)
    g = torch.Generator().manual_seed(rows)
    H, T, D = 3, 1024, 64
    qk = quantize_keys(torch.randn(H, T, D, generator=g) * 2, 2, 16)
    qk = type(qk)(qk.bits, qk.group, *(t.to(DEVICE) for t in (qk.codes, qk.scale, qk.zero)))
    q = torch.randn(H, rows, D, generator=g).to(DEVICE, torch.bfloat16)
    ids = torch.randint(0, T, (H, N), generator=g).to(DEVICE)
    count = torch.tensor([N, 50, 0], device=DEVICE)
    want = candidate_kernels.rerank_weights_ref(q, qk, ids, count, D**-0.5)
    got = candidate_kernels.rerank_weights(q, qk, ids, count, D**-0.5)
    assert got.shape == (H, N) and got.dtype == torch.float32
    assert torch.equal(got[1, 50:], torch.zeros(N - 50, device=DEVICE))
    assert torch.equal(got[2], torch.zeros(N, device=DEVICE))
    assert torch.allclose(got.sum(1).cpu(), torch.tensor([rows, rows, 0.0]), atol=1e-4)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("D, rows", [(64, 3), (128, 70), (80, 5)])
def test_cluster_scoring_kernel_matches_its_reference(D, rows, monkeypatch):
    """The clusters' scores (each centroid's largest logit over the rows, plus the bias
    that masks the slots past the real clusters) against the torch code; with the GPU's
    block of clusters, a head dim that is not a power of two, and centroids with a row
    stride (the index's buffers past the real count)."""
    monkeypatch.setattr(candidate_kernels, "INTERPRETED_BLOCK_N", candidate_kernels.BLOCK_CS)
    g = torch.Generator().manual_seed(D + rows)
    H, NC = 3, 100  # NC: not a multiple of the block
    centroids = torch.randn(H, NC + 20, D, generator=g).to(DEVICE)[:, :NC]
    bias = torch.zeros(H, NC + 1, device=DEVICE)[:, :NC]
    bias[:, 90:] = float("-inf")
    q = torch.randn(H, rows, D, generator=g).to(DEVICE, torch.bfloat16)
    want = candidate_kernels.score_clusters_ref(q, centroids, bias)
    got = candidate_kernels.score_clusters(q, centroids, bias)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and bool(
        torch.isinf(want[:, 90:]).all()
    )
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_prefill_chunks_many_rows_score_the_clusters_with_torch(monkeypatch):
    """The kernel loops over its rows: a decode step's few take it, a prefill chunk's many
    (more than a block of `ROW_BLOCK`) torch's matmul."""
    calls = []
    kernel = candidate_kernels.score_clusters
    monkeypatch.setattr(
        candidate_kernels, "score_clusters", lambda *a: calls.append(1) or kernel(*a)
    )
    g = torch.Generator().manual_seed(0)
    centroids, bias = (
        torch.randn(3, 40, 64, generator=g).to(DEVICE),
        torch.zeros(3, 40, device=DEVICE),
    )
    backend = Backend(DEVICE, kernels=True)
    for rows, kernel_calls in [(4, 1), (ROW_BLOCK, 2), (ROW_BLOCK + 1, 2)]:
        q = torch.randn(3, rows, 64, generator=g).to(DEVICE)
        got = backend.score_clusters(q, centroids, bias)
        want = candidate_kernels.score_clusters_ref(q, centroids, bias)
        assert len(calls) == kernel_calls and torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N, block", [(64, 64), (1024, 64), (1024, 16)])
def test_candidate_list_kernels_match_their_reference(N, block, monkeypatch):
    """The two kernels of the candidate list (blocks of 64 or 16 tokens here, so many
    blocks; with 16, more blocks than a block's lanes, and each program's share of the
    padding past a block) against the torch code: the same ids in the same order, the
    same counts, padding with lo, and past N (N = 64: more candidates than that) the
    rest dropped."""
    monkeypatch.setattr(candidate_kernels, "BLOCK_T", block)
    g = torch.Generator().manual_seed(N)
    H, NC, T_cap = 3, 40, 1000  # T_cap: not a multiple of the block
    take = (torch.rand(H, NC + 1, generator=g) < 0.3).to(DEVICE)
    take[:, -1] = True
    take[2] = False  # a head with no candidates
    assign = torch.randint(0, NC + 1, (H, T_cap), generator=g, dtype=torch.int32).to(DEVICE)
    for lo, hi in [(0, T_cap), (16, 700), (5, 5)]:
        hi_t = torch.tensor([hi], device=DEVICE)
        want = cluster_candidates_ref(take, assign, lo, hi_t, N)
        got = candidate_kernels.cluster_candidates(take, assign, lo, hi_t, N)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (lo, hi)
    full = cluster_candidates_ref(take, assign, 0, torch.tensor([T_cap], device=DEVICE), N)[1]
    assert int(full.max()) > 64 and int(full[2]) == 0  # some dropped at N = 64; an empty head


@pytest.mark.parametrize("block, trials", [(16, 1), (16384, 1), (16, 4), (16384, 8)])
def test_cluster_taking_kernel_matches_its_reference(block, trials, monkeypatch):
    """The clusters taken, by the kernel's search over the scores (a bisection, or
    `TAKE_TRIALS` thresholds a pass; all of a head's in registers, or blocks of 16 clusters,
    read in each pass) against the ranking of the
    torch code: scores of both signs, zero and -inf (the buffer's slots past the real
    clusters, with no tokens), counts with a row stride (the index's), a head whose best
    cluster alone is enough, a head that takes every cluster, want = 0 (the best cluster
    still taken), want from a device tensor."""
    monkeypatch.setattr(ranking, "BLOCK_C", block)
    monkeypatch.setattr(ranking, "TAKE_TRIALS", trials)
    g = torch.Generator().manual_seed(3)
    H, NC = 4, 100  # NC: not a multiple of the block
    scores = torch.randn(H, NC, generator=g) * 10
    scores[:, 5] = 0.0
    scores[:, 90:] = float("-inf")
    counts = torch.randint(0, 40, (H, NC + 1), generator=g).float()
    counts[:, 90:] = 0
    counts[1, int(scores[1].argmax())] = 500  # its best cluster alone holds more than want
    scores, counts = scores.to(DEVICE), counts.to(DEVICE)[:, :-1]  # (the index's layout)
    for factor, k, k_valid in [(8, 40, None), (8, 1000, None), (8, 0, None), (2, 99, [50])]:
        k_valid = None if k_valid is None else torch.tensor(k_valid, device=DEVICE)
        want = take_clusters_ref(scores, counts, factor, k, k_valid)
        got = ranking.take_clusters(scores, counts, factor, k, k_valid)
        assert got.dtype == torch.bool and torch.equal(got, want), (factor, k)
        if (factor, k) == (8, 40):
            assert int(want[1].sum()) == 2 and 2 < int(want[0].sum()) < NC
        if k == 1000:
            assert bool(want.all())
        if k == 0:
            assert torch.equal(want.sum(1).cpu(), torch.full((H,), 2))


@pytest.mark.parametrize("trials", [1, 8])
def test_clusters_tied_at_the_threshold_are_all_taken(trials, monkeypatch):
    """Where scores tie at the cut, the kernel takes every tied cluster (those the clusters
    above leave room for), the ranking only the ones it put first."""
    monkeypatch.setattr(ranking, "TAKE_TRIALS", trials)
    scores = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]], device=DEVICE)
    counts = torch.tensor([[10.0, 10.0, 10.0, 10.0, 10.0]], device=DEVICE)
    got = ranking.take_clusters(scores, counts, 1, 15)  # want 15: 3.0, then a 2.0
    assert got.cpu().tolist() == [[True, True, True, True, False, True]]
    want = take_clusters_ref(scores, counts, 1, 15)
    assert int(want[0, 1:4].sum()) == 1 and bool((want <= got).all())


@pytest.mark.parametrize(
    "block, split, per_thread", [(16, None, 8), (32768, None, 8), (32768, None, 1), (32768, 16, 8)]
)
def test_top_ids_kernel_matches_its_reference(block, split, per_thread, monkeypatch):
    """The ids of the largest weights, by the kernel's radix select (a head's weights in
    registers, listed in one read or, `per_thread` 1, in reads of one weight a thread; or
    blocks of 16, read in each pass; or spread over programs of `split`
    weights, their histograms summed two at a time) against torch's stable sort: weights tied at the cut (the earlier ones
    kept, ties in several programs), zeros (a head's padding, or a head with no
    candidate), k_valid below k (the rows after the chosen ones: the first candidate),
    k = N, k_valid = 0."""
    monkeypatch.setattr(ranking, "BLOCK_TOP", block)
    monkeypatch.setattr(ranking, "LIST_PER_THREAD", per_thread)
    monkeypatch.setattr(ranking, "BLOCK_READ", min(block, ranking.BLOCK_READ))
    if split:
        monkeypatch.setattr(ranking, "SPLIT_ABOVE", 0)
        monkeypatch.setattr(ranking, "INTERPRETED_SPLIT_ABOVE", 0)
        monkeypatch.setattr(ranking, "BLOCK_SPLIT", split)
        monkeypatch.setattr(ranking, "SPLIT_ROWS", 2)  # (7 programs a head: 4 reads of them)
    else:
        monkeypatch.setattr(ranking, "SPLIT_ABOVE", 10**9)
        monkeypatch.setattr(ranking, "INTERPRETED_SPLIT_ABOVE", 10**9)
    g = torch.Generator().manual_seed(4)
    H, N = 4, 100
    weights = torch.rand(H, N, generator=g)
    weights[0, ::3] = 0.7  # 34 ties, around the cut
    weights[1, 60:] = 0.0  # padding
    weights[2] = 0.0  # no candidate
    weights[3] = torch.randn(N, generator=g) * 10  # both signs (the top digit's sign bit)
    weights = weights.to(DEVICE)
    ids = torch.randint(0, 10**6, (H, N + 7), generator=g).to(DEVICE)[:, :N]  # a row stride
    for k, k_valid in [(40, None), (100, None), (50, [20]), (50, [0]), (1, None)]:
        k_valid = None if k_valid is None else torch.tensor(k_valid, device=DEVICE)
        want = top_ids_ref(weights, ids, k, k_valid)
        got = ranking.top_ids(weights, ids, k, k_valid)
        assert torch.equal(got, want), (k, k_valid)
    want = top_ids_ref(weights, ids, 40, None)
    n_above = int((weights[0] > 0.7).sum())
    assert n_above < 40 < n_above + 34  # the cut falls among the ties...
    kept = set(want[0].tolist())
    ties = [int(ids[0, j]) for j in range(0, N, 3)]
    assert [t in kept for t in ties] == [i < 40 - n_above for i in range(34)]  # ...the first
    assert set(want[1].tolist()) <= set(ids[1, :60].tolist())  # no padding
    assert want[2].tolist() == ids[2, :40].tolist()  # all zero: the first 40, in order
    few = top_ids_ref(weights, ids, 50, torch.tensor([20], device=DEVICE))
    assert (few[:, 20:] == ids[:, :1]).all()
    many = torch.rand(2, 5000, generator=g).to(DEVICE) ** 8  # (keys sharing their high bits)
    monkeypatch.setattr(ranking, "BLOCK_SPLIT", 1024)  # (5 programs a head, when split)
    at = torch.arange(5000, device=DEVICE).expand(2, 5000)
    assert torch.equal(ranking.top_ids(many, at, 700), top_ids_ref(many, at, 700))


@pytest.mark.parametrize("seed", [0, 1])
def test_device_selection_with_the_kernels_equals_the_host_selection(seed):
    keys, q, view = synthetic_layer(T=4096, seed=seed)
    index, dev = _pair(view, 8192, 8)
    lo, hi, k = 16, 4096 - 256, 205
    ref = index.select(q, view, lo, hi, k)
    backend = Backend(DEVICE, kernels=True)
    got = dev.select(q.to(DEVICE), _on(view, DEVICE), lo, torch.tensor([hi], device=DEVICE), k,
                     dev.candidate_count(k), backend=backend)  # fmt: skip
    assert torch.equal(torch.sort(got).values.cpu(), ref)


def test_a_prefill_chunks_rows_select_as_on_the_host():
    """A prefill chunk's many query rows (more than one block of `ROW_BLOCK`): the device
    index returns the tokens `ClusterIndex.select` returns for the same rows."""
    keys, q, view = synthetic_layer(T=4096, seed=6)
    index, dev = _pair(view, 8192, 8)
    g = torch.Generator().manual_seed(6)
    rows = q.repeat(1, 50, 1) + 0.3 * torch.randn(3, 50 * q.shape[1], 64, generator=g)
    assert rows.shape[1] > ROW_BLOCK
    lo, hi, k = 16, 4096 - 300, 4 * 205
    ref = index.select(rows, view, lo, hi, k)
    got = dev.select(rows.to(DEVICE), _on(view, DEVICE), lo, torch.tensor([hi], device=DEVICE),
                     k, dev.candidate_count(k))  # fmt: skip
    assert torch.equal(torch.sort(got).values.cpu(), ref)


def test_device_selection_takes_tokens_not_yet_indexed_and_follows_hi():
    """Tokens past the index are always candidates (as in `ClusterIndex`), and one
    replay serves growing contexts: `hi` is read from the device."""
    keys, q, view = synthetic_layer(T=4096, seed=4)
    index, dev = _pair(view_of(keys, 3072), 4096, tail=1024)
    qd, sd = q.to(DEVICE), _on(view, DEVICE)
    n = dev.candidate_count(100)
    for hi in (3200, 3500, 4096):
        ref = index.select(q, view, 16, hi, 100)
        got = dev.select(qd, sd, 16, torch.tensor([hi], device=DEVICE), 100, n)
        assert torch.equal(torch.sort(got).values.cpu(), ref), hi
        assert int(got.max()) < hi and int(got.min()) >= 16


def test_sync_reports_reallocation_only_when_buffers_grow():
    keys, _, view = synthetic_layer(T=4096, seed=5)
    index = ClusterIndex(3, 64, refresh=256)
    index.update(view_of(keys, 2048))
    dev = DeviceClusterIndex(3, 64, 8, DEVICE)
    assert dev.sync(index, 8192, 0)
    index.update(view_of(keys, 2560))  # assigned to existing clusters
    assert not dev.sync(index, 8192, 0)
    assert dev.token_capacity == 8192 and int(dev.assign[:, 2560:].min()) == dev.cluster_capacity


def test_torch_kmeans_clusters_as_well_as_faiss():
    """The k-means the index runs where keys are on a GPU (here on the CPU): unit
    centroids, and candidate recall against exact top-k on par with faiss'."""
    from retrieval import ExactTopK
    from retrieval.cluster import spherical_kmeans
    from tests.retrieval_data import recall

    keys, q, view = synthetic_layer(T=4096, seed=6)
    unit, assign = spherical_kmeans(keys, 256, 10, seed=0)
    assert unit.shape == (3, 256, 64) and assign.shape == (3, 4096)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3, 256))
    assert torch.equal(assign, torch.einsum("hnd,hcd->hnc", keys, unit).argmax(-1))
    exact = ExactTopK().select(q, view, 16, 3840, 205)
    got = {}
    for kmeans in ("faiss", "torch"):
        index = ClusterIndex(3, 64, candidate_factor=4, kmeans=kmeans)
        index.update(view)
        got[kmeans] = recall(index.candidates(q, 16, 3840, 205), exact)
    assert got["torch"] >= 0.9 and got["torch"] >= got["faiss"] - 0.02, got


def test_syncs_between_changes_copy_only_the_end_and_equal_a_full_sync():
    """Within an epoch of the index, a sync copies only the new tokens (or those from a
    cut on, where it cut only members of the last k-means segment's clusters) and the
    clusters of the last segment on, also when a buffer grows (it keeps its contents); a
    deeper cut (and a loaded state) starts a new epoch and a full copy. After each
    change, the mirror holds what a fresh full sync gives."""
    keys, q, view = synthetic_layer(T=4096, seed=7)
    index = ClusterIndex(3, 64, refresh=64, segment=1024)
    dev = DeviceClusterIndex(3, 64, 8, DEVICE)
    copied = []
    real_to = torch.Tensor.to
    other = synthetic_layer(T=4096, seed=8)[0]
    growths, incremental = 0, []
    for upto, cut in ((1536, None), (1600, None), (2048, None), (2304, 1800), (2560, None),
                      (2496, 2200), (1008, 700), (1008, 650), (3072, None), (4096, None)):  # fmt: skip
        if cut is not None:  # (new keys after the cut: new assignments for old positions)
            index.truncate(cut)
            keys = torch.cat([keys[:, :cut], other[:, cut:]], dim=1)
        index.update(view_of(keys, upto))
        T, NC = index.indexed_tokens, index.centroids.shape[1]
        synced = dev._synced  # (epoch, tokens, first cluster of the last segment, _, cuts)
        copied.clear()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(
                torch.Tensor,
                "to",
                lambda t, *a, **k: copied.append(t.numel()) or real_to(t, *a, **k),
            )
            grown = dev.sync(index, upto + 64, 0)
        growths += grown
        fresh = DeviceClusterIndex(3, 64, 8, DEVICE)
        fresh.sync(index, upto + 64, 0)
        if synced is not None and synced[0] == index.epoch:  # the end only: centroids and
            _, t0, c0, _, seen = synced  # counts from the last segment's first cluster,
            t0 = min([t0, *index.cuts[seen:]])  # tokens from the last sync's end or a cut
            assert sum(copied) == 3 * ((NC - c0) * (64 + 1) + T - t0), upto
            incremental.append(cut)
        assert torch.equal(dev.centroids[:, :NC], fresh.centroids[:, :NC])
        assert torch.equal(dev.counts[:, :NC], fresh.counts[:, :NC])
        assert torch.equal(dev.assign[:, :T], fresh.assign[:, :T])
        assert bool((dev.assign[:, T:] == dev.cluster_capacity).all())
        assert bool((dev.bias[:, :NC] == 0).all()) and bool(dev.bias[:, NC:].isneginf().all())
        assert dev.max_count == fresh.max_count
        k, lo, hi = 100, 16, torch.tensor([index.indexed_tokens], device=DEVICE)
        s = _on(view_of(keys, upto), DEVICE)
        got = dev.select(q.to(DEVICE), s, lo, hi, k, dev.candidate_count(k))
        want = fresh.select(q.to(DEVICE), s, lo, hi, k, fresh.candidate_count(k))
        assert torch.equal(torch.sort(got).values, torch.sort(want).values), upto
    assert growths >= 4  # (the token map grew at most steps, the centroids at some)
    assert incremental.count(None) == 5 and {1800, 2200} <= set(incremental)  # (not 700)


@pytest.fixture(params=["as on a GPU", "as interpreted"])
def kmeans_blocks(request, monkeypatch):
    """The assignment kernel's blocks: the GPU's (many programs of a few points, a few
    centroids a time), and the interpreter's (larger)."""
    from offload.kernels import kmeans

    if request.param == "as on a GPU":
        monkeypatch.setattr(kmeans, "INTERPRETED_BLOCK_M", kmeans.BLOCK_M)
        monkeypatch.setattr(kmeans, "INTERPRETED_BLOCK_N", kmeans.BLOCK_N)
    return kmeans.blocks()


@pytest.mark.parametrize(
    "B,m,nc,D", [(2, 300, 100, 64), (3, 64, 64, 128), (1, 70, 5, 16), (1, 1200, 300, 16)]
)
def test_nearest_centroid_kernel_picks_the_best_centroid(B, m, nc, D, kmeans_blocks):
    """The k-means' assignment without its scores in memory (offload/kernels/kmeans.py):
    each point's centroid of largest dot product, as the torch one picks it. In float32
    (Triton's interpreter) the same but where two centroids score within rounding; on a
    GPU the dot products are TF32, so there within about 1e-3."""
    import torch.nn.functional as F

    from offload.kernels.kmeans import nearest
    from retrieval.cluster import nearest_centroids

    g = torch.Generator().manual_seed(B * m + nc)
    x = F.normalize(torch.randn(B, m, D, generator=g), dim=-1).to(DEVICE)
    c = F.normalize(torch.randn(B, nc, D, generator=g), dim=-1).to(DEVICE)
    got, want = nearest(x, c), nearest_centroids(x, c)
    scores = torch.einsum("bmd,bnd->bmn", x, c)
    tol = 5e-3 if DEVICE.type == "cuda" else 1e-5
    best2 = scores.topk(min(2, nc), dim=-1).values
    chosen = scores.gather(-1, got[..., None])[..., 0]
    assert bool((chosen >= best2[..., 0] - tol).all())
    clear = best2[..., 0] - best2[..., -1] > tol if nc > 1 else torch.ones_like(chosen).bool()
    assert torch.equal(got[clear], want[clear])


def test_nearest_centroid_kernel_takes_the_first_of_equal_centroids(kmeans_blocks):
    """Small integer vectors: every dot product exact (TF32 too), many ties, always
    broken toward the lower centroid, within a block of centroids and across blocks."""
    from offload.kernels.kmeans import nearest
    from retrieval.cluster import nearest_centroids

    BLOCK_N = kmeans_blocks[1]
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-1, 2, (2, 200, 16), generator=g).float().to(DEVICE)
    c = torch.randint(-1, 2, (2, BLOCK_N + 6, 16), generator=g).float()
    c[:, BLOCK_N + 2] = c[:, 1]  # a copy in the next block
    c = c.to(DEVICE)
    got = nearest(x, c)
    assert torch.equal(got, nearest_centroids(x, c))
    assert not bool((got == BLOCK_N + 2).any())


def test_torch_kmeans_with_the_nearest_centroid_kernel():
    """The k-means of a layer-by-layer prefill on CUDA (`Backend.nearest_centroids`): its
    assignment step through the kernel gives the index the torch one gives (float32)."""
    from offload.kernels.kmeans import nearest
    from retrieval.cluster import spherical_kmeans

    keys, _, _ = synthetic_layer(T=512, seed=5)
    want = spherical_kmeans(keys, 32, 4, seed=0, segments=2)
    got = spherical_kmeans(keys.to(DEVICE), 32, 4, seed=0, segments=2, nearest=nearest)
    if DEVICE.type == "cpu":  # (on a GPU: TF32, a near-tie may move a point)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert got[1].shape == (3, 512) and int(got[1].max()) < 64


def test_the_index_runs_its_torch_kmeans_with_the_assignment_the_runtime_gives(tiny_dirs):
    """A tiered cache's cluster indexes take the backend's assignment (the kernel on
    CUDA), and a torch k-means calls it; with torch's own, the same index."""
    from offload import Runtime
    from retrieval.cluster import nearest_centroids

    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32", dense_layers=0)
    index = rt.new_cache(tiered=True).policy.selectors[-1]
    assert index.nearest == rt.backend.nearest_centroids
    calls = []

    def spy(x, c):
        calls.append(tuple(x.shape))
        return nearest_centroids(x, c)

    _, _, view = synthetic_layer(T=1024, seed=2)
    a = ClusterIndex(3, 64, segment=512, kmeans="torch", nearest=spy)
    a.update(view)
    b = ClusterIndex(3, 64, segment=512, kmeans="torch")
    b.update(view)
    assert calls and calls[0] == (6, 512, 64)  # heads x segments, in one batch
    for name, t in a.state_tensors().items():
        assert torch.equal(t, b.state_tensors()[name]), name
