"""A prefill chunk after a long context whose KV is not in place (CUDA, or spilled to
disk) attends exactly to sink + the window before it + itself, and to one selection for
the whole chunk in the far range, instead of reading every earlier token again."""

import pytest
import torch

from offload import Runtime
from offload.attention import SparsePolicy, TieredLayer, gqa_attention
from offload.backend import Backend
from offload.config import SelectionSection
from retrieval import SummaryScan
from retrieval.base import ROW_BLOCK, coarse_max, fine_softmax_sum, row_max, row_softmax_sum
from retrieval.device_index import DeviceClusterIndex
from storage.layout import KVLayout
from storage.tiered import TieredStore
from tests.conftest import DEVICE

H, G, D = 2, 2, 16  # KV heads, query heads per KV head, head dim
SINK, WINDOW, K = 4, 8, 10


def _store(tmp_path, sel, **kw):
    layout = KVLayout(num_layers=2, num_kv_heads=H, head_dim=D, dtype="float32", chunk_size=4)
    store = TieredStore(layout, torch.float32, torch.device("cpu"),
                        host_bytes=kw.pop("host_bytes", 1 << 20), disk_dir=tmp_path,
                        disk_bytes=1 << 30, sink=SINK, window=WINDOW, **kw)  # fmt: skip
    return store.start(), SparsePolicy(sel, 2, H, D)


def _reference(q, k_all, v_all, T, ids=None):
    """The chunk's S queries over sink + the far tokens `ids` [H, k] (by default the exact
    top-k, k = 4 x K, by the summed softmax mass of the G x S queries of a group) + the
    near range (causally)."""
    S = q.shape[1]
    lo, hi = SINK, T - WINDOW - (S - 1)
    out = []
    for h in range(H):
        if ids is None:
            # a long chunk is scored with 64 evenly spaced positions, first and last included
            pos = torch.linspace(0, S - 1, min(S, 64)).round().long()
            rows = q[G * h : G * h + G, pos].reshape(-1, D)
            mass = torch.softmax(rows @ k_all[h, lo:hi].T / D**0.5, dim=-1).sum(0)
            far = torch.topk(mass, min(4 * K, hi - lo)).indices.sort().values + lo
        else:
            far = ids[h]
        keep = torch.cat([torch.arange(lo), far, torch.arange(hi, T)])
        qh = q[G * h : G * h + G]
        out.append(gqa_attention(qh, k_all[h : h + 1, keep], v_all[h : h + 1, keep]))
    return torch.cat(out)


@pytest.mark.parametrize("in_place,S", [(False, 40), (False, 100), (True, 40)])
def test_a_chunk_attends_to_sink_window_itself_and_one_selection(
    tmp_path, monkeypatch, in_place, S
):
    """Not in place: exactly the reference above (the chunk's query rows are scored in
    blocks); in place (the CPU's host memory): every token, as before."""
    if not in_place:
        monkeypatch.setattr(TieredStore, "in_place", lambda self, layer: False)
    sel = SelectionSection(mode="sparse", selector="exact", sink=SINK, window=WINDOW,
                           retrieved=K, dense_layers=1)  # fmt: skip
    store, policy = _store(tmp_path, sel)
    g = torch.Generator().manual_seed(0)
    T0 = 100
    T = T0 + S
    assert G * S > ROW_BLOCK
    kv = torch.randn(2, H, T, D, generator=g)
    q = torch.randn(H * G, S, D, generator=g)
    store.append(1, kv[0, :, :T0], kv[1, :, :T0])
    layer = TieredLayer(store, policy, 1)
    layer.append(kv[0, :, T0:], kv[1, :, T0:])
    out = layer.attend(q)
    if in_place:
        torch.testing.assert_close(out, gqa_attention(q, kv[0], kv[1]))
        assert policy.stats.sparse_chunks == 0
    else:
        torch.testing.assert_close(out, _reference(q, kv[0], kv[1], T))
        assert policy.stats.sparse_chunks == 1 and policy.stats.sparse_steps == 0
    store.close()


def test_row_blocks_equal_one_pass():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2 * ROW_BLOCK + 5, 8, generator=g)
    keys = torch.randn(3, 50, 8, generator=g)

    def logits(rows):
        return rows @ keys.transpose(1, 2)

    torch.testing.assert_close(row_softmax_sum(q, logits), fine_softmax_sum(logits(q)))
    torch.testing.assert_close(row_max(q, logits), coarse_max(logits(q)))


def test_a_chunk_reads_only_the_selected_chunks_from_disk(tmp_path, monkeypatch):
    """A chunk whose far KV is on disk brings back the chunks its selection (by the
    summaries, which are on the device) touches, not every chunk; the budget holds."""
    monkeypatch.setattr(TieredStore, "in_place", lambda self, layer: False)
    sel = SelectionSection(mode="sparse", selector="summary", sink=SINK, window=WINDOW,
                           retrieved=K, dense_layers=1)  # fmt: skip
    capacity = 24  # host chunks
    store, policy = _store(tmp_path, sel, host_bytes=capacity * 2 * H * 4 * D * 4, spill_batch=4)
    g = torch.Generator().manual_seed(2)
    T0, S = 400, 6
    T = T0 + S
    kv = torch.randn(2, H, T, D, generator=g)
    store.append(1, kv[0, :, :T0], kv[1, :, :T0])
    store.settle()
    on_disk = store.spilled_chunks
    assert on_disk > 60
    layer = TieredLayer(store, policy, 1)
    layer.append(kv[0, :, T0:], kv[1, :, T0:])
    store.reads.count["disk"] = 0
    q = torch.randn(H * G, S, D, generator=g)
    lo, hi, k = policy.bounds(T, S)
    assert (lo, hi, k) == (SINK, T - WINDOW - S + 1, 4 * K)
    ids = SummaryScan().select(q.reshape(H, G * S, D), policy.view(store, 1), lo, hi, k)
    out = layer.attend(q)
    torch.testing.assert_close(out, _reference(q, kv[0], kv[1], T, ids))
    touched = len(set((ids // 4).flatten().tolist()))
    assert 0 < store.reads.count["disk"] <= touched + (WINDOW + S) // 4 + 1 < on_disk
    store.settle()  # the spill the fetch started is written in the background
    assert store.directory.host_count <= capacity
    store.close()


def _as_on_cuda(monkeypatch):
    backend = Backend(DEVICE, kernels=DEVICE.type == "cuda", fixed_shape=True,
                      graphs=DEVICE.type == "cuda", remote_host=True)  # fmt: skip
    monkeypatch.setattr(Backend, "for_device", classmethod(lambda cls, *a, **k: backend))
    monkeypatch.setattr(TieredStore, "in_place", lambda self, layer: False)
    monkeypatch.setattr(TieredStore, "key_rows", lambda self, layer: None)  # (none on CUDA)


DOC = "seven quiet stones over the river and a lamp by the door " * 4
QUESTION = "Where is the lamp?"


def _turns(path, **overrides) -> tuple:
    """Tokens of a first turn (the document) and of a second (the question), on a tiered
    cache; that cache, and the runtime's stats."""
    cfg = dict(dtype="float32", mode="sparse", sink=4, window=16, dense_layers=1,
               sparse_threshold=32, candidate_factor=2, prefetch="off")  # fmt: skip
    chat = Runtime.from_pretrained(path, **{**cfg, **overrides}).chat()
    first = [s.token_id for s in chat.stream(DOC, max_new_tokens=4)]
    cache = chat._state.cache
    assert cache.store is not None
    cache.store.reads.nbytes["host"] = 0
    second = [s.token_id for s in chat.stream(QUESTION, max_new_tokens=4)]
    return first, second, cache, chat.runtime.stats()


def test_second_turn_is_dense_at_full_budget_and_reads_less_below_it(tiny_dirs, monkeypatch):
    """On the CUDA path (run here on the CPU): a question after a document goes through
    the sparse chunk path, its far tokens selected by the decode steps' device index; at
    full budget it gives dense attention's tokens, at a small budget it reads a fraction
    of the earlier KV from the host."""
    _as_on_cuda(monkeypatch)
    rows = []  # query rows of each device-index selection (a step's: G; a chunk's: more)
    real = DeviceClusterIndex.select
    monkeypatch.setattr(DeviceClusterIndex, "select",
                        lambda self, q, *a, **k: rows.append(q.shape[1]) or real(self, q, *a, **k))  # fmt: skip
    path = tiny_dirs["llama-gqa-untied"][0]
    want = _turns(path, mode="dense")
    full = _turns(path, retrieved=100_000)
    small = _turns(path, retrieved=8)
    assert max(rows) > min(rows)  # the chunks selected with the steps' device index
    assert full[:2] == want[:2]
    assert want[2].policy.stats.sparse_chunks == 0
    assert full[2].policy.stats.sparse_chunks > 0 and small[2].policy.stats.sparse_chunks > 0
    assert small[3]["selection"]["sparse_layer_prefill_chunks"] > 0
    assert small[2].store.reads.nbytes["host"] < full[2].store.reads.nbytes["host"]
    # (the answers at a small budget may be shorter: a stop token sooner, as on an H200)
    assert min(small[2].num_tokens, full[2].num_tokens) > 100
