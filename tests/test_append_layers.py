"""`TieredStore.append_layers`, the one append for every layer that a decode loop over
the fixed-shape step makes every few chunks: the same store as an append per layer.
And how far the store's buffers grow (never past the model's window)."""

import pytest
import torch

from tests.test_storage import LAYOUT, fill, make_store, random_kv


def _equal_stores(a, b, residency: bool) -> None:
    assert a.lengths == b.lengths
    # (with spills, an append per layer spills per layer: other chunks may be on disk)
    assert not residency or a.directory.host_count == b.directory.host_count
    for layer in range(LAYOUT.num_layers):
        for x, y in zip(a.gather_all(layer), b.gather_all(layer), strict=True):
            assert torch.equal(x, y)
        s1, s2 = a.dev[layer].summaries(), b.dev[layer].summaries()
        for x, y in ((s1.codes, s2.codes), (s1.scale, s2.scale), (s1.zero, s2.zero)):
            assert torch.equal(x, y)
        a1, a2 = a.dev[layer].abstracts(), b.dev[layer].abstracts()
        for x, y in ((a1.kmin, a2.kmin), (a1.kmax, a2.kmax), (a1.kmean, a2.kmean)):
            assert torch.equal(x, y)
        T, d1, d2 = a.lengths[layer], a.dev[layer], b.dev[layer]  # (unwritten rows: anything)
        t0 = max(0, T - d1.window)
        assert torch.equal(d1.read_window(t0, T), d2.read_window(t0, T))
        assert torch.equal(d1.sink_kv[:, :, : min(T, d1.sink)], d2.sink_kv[:, :, : min(T, d1.sink)])
        n = a.lengths[layer] // LAYOUT.chunk_size
        assert torch.equal(a._recency[layer][:n], b._recency[layer][:n])


@pytest.mark.parametrize("host_chunks", [256, 24])
def test_one_append_for_all_layers_equals_an_append_per_layer(tmp_path, host_chunks):
    """Whole chunks at a chunk's start (the batched path), after a cut that freed slots
    (those layers chunk by chunk), at a token inside a chunk (an append per layer), and
    with the host budget spilling: the same KV, summaries, abstracts, windows, recency."""
    C = LAYOUT.chunk_size
    kv = torch.stack([random_kv(300, seed=5), random_kv(300, seed=6)])
    per = make_store(tmp_path / "per", host_chunks=host_chunks, window=64)
    batched = make_store(tmp_path / "batched", host_chunks=host_chunks, window=64)
    layers = list(range(LAYOUT.num_layers))
    with per, batched:
        t = 0
        for n, cut in ((4, None), (74, None), (2, None), (8 * C, None), (8 * C, 96), (3, None),
                       (5, None), (16 * C, None), (7 * C, None)):  # fmt: skip
            if cut is not None:
                per.truncate(cut)
                batched.truncate(cut)
                t = cut
            fill(per, kv[:, :, :, t:], pieces=(n,))
            batched.append_layers(layers, kv[:, :, :, t : t + n])
            t += n
            _equal_stores(per, batched, residency=host_chunks == 256)
        if host_chunks == 24:
            batched.settle()
            assert batched.spilled_chunks > 0


def test_layers_whose_window_holds_the_tokens_are_not_written_again(tmp_path):
    """`in_window`: what the fixed-shape step wrote to a layer's window ring already."""
    C = LAYOUT.chunk_size
    kv = torch.stack([random_kv(64, seed=7), random_kv(64, seed=8)])
    with make_store(tmp_path, host_chunks=64, window=16) as store:
        fill(store, kv[:, :, :, :32], pieces=(32,))
        before = store.dev[1].ring.clone()
        store.dev[0].write_recent(32, kv[0, 0, :, 32:48], kv[0, 1, :, 32:48])
        store.append_layers([0, 1], kv[:, :, :, 32:48], in_window=[1])
        assert torch.equal(store.dev[1].ring, before)  # (what a step would have written)
        assert torch.equal(store.dev[0].read_window(32, 48), kv[0, :, :, 32:48])
        for layer in range(2):
            assert torch.equal(store.read_range(layer, 0, 48)[0], kv[layer, 0, :, :48])
        assert store.lengths == [48, 48] and store.dev[1].num_chunks == 48 // C


def test_buffers_never_grow_past_the_models_window(tmp_path):
    """`max_tokens`: host slabs and summary buffers grow geometrically up to the window
    (at 128k tokens an eighth more would be 2 GiB of pinned memory and 0.25 GiB of GPU
    memory for the 8B shape), and a loaded session's room to grow stops there too."""
    from storage.tiered import TieredStore

    C, T = LAYOUT.chunk_size, 96
    kv = torch.stack([random_kv(T, seed=9), random_kv(T, seed=10)])
    store = TieredStore(LAYOUT, torch.bfloat16, torch.device("cpu"), host_bytes=1 << 24,
                        disk_dir=tmp_path, disk_bytes=1 << 30, max_tokens=T)  # fmt: skip
    with store:
        fill(store, kv, pieces=(5, 30, 1, 20, 40))
        for layer in range(LAYOUT.num_layers):
            d = store.dev[layer]
            assert store.host[layer].slab.shape[2] == T // C
            assert d.codes.data.shape[1] == T and d.scale.data.shape[1] == T // C
            assert d.kmin.data.shape[0] == T // C
            assert torch.equal(store.read_range(layer, 0, T), kv[layer])
