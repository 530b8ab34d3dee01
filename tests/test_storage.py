"""The tiered store: one contract suite over every tier, bookkeeping, corruption, full disk."""

import errno
import os

import pytest
import torch

from storage.abstracts import chunk_abstracts
from storage.device import DeviceTier
from storage.disk import DiskFullError, DiskTier, StorageError
from storage.host import HostTier
from storage.layout import KVLayout
from storage.tiered import TieredStore
from tests.conftest import count_reallocations, count_slab_growths, cuda_only

LAYOUT = KVLayout(num_layers=2, num_kv_heads=3, head_dim=8, dtype="bfloat16", chunk_size=4)
DT = torch.bfloat16


def random_kv(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = LAYOUT
    return torch.randn(2, L.num_kv_heads, T, L.head_dim, generator=g).to(DT)


# -- one contract over every tier: write tokens, read them back by ids, bit-exact, bytes ----


class HostContract:
    def __init__(self, tmp_path):
        self.tier = HostTier(LAYOUT, DT)

    def write(self, kv):
        C = LAYOUT.chunk_size
        for c in range(kv.shape[2] // C):
            self.tier.put(c, kv[:, :, c * C : (c + 1) * C])

    def read(self, ids):
        out = torch.empty(2, LAYOUT.num_kv_heads, len(ids), LAYOUT.head_dim, dtype=DT)
        return self.tier.gather_tokens(ids, out)

    def nbytes(self):
        return self.tier.nbytes()


class DiskContract:
    def __init__(self, tmp_path):
        self.tier = DiskTier(tmp_path / "disk", LAYOUT, DT, budget_bytes=1 << 30)
        self.tier.start()

    def write(self, kv):
        C = LAYOUT.chunk_size
        n = kv.shape[2] // C
        data = kv.reshape(2, LAYOUT.num_kv_heads, n, C, LAYOUT.head_dim).permute(2, 0, 1, 3, 4)
        self.name = self.tier.write_chunks(0, list(range(n)), data, chunk_abstracts(kv[0], C))
        self.n = n

    def read(self, ids):
        C = LAYOUT.chunk_size
        chunks = [self.tier.read_chunk(self.name, int(i) // C) for i in ids]
        return torch.stack([ch[:, :, int(i) % C] for ch, i in zip(chunks, ids, strict=True)], dim=2)

    def nbytes(self):
        # The file holds every chunk's KV and abstract, plus Arrow framing.
        assert self.tier.used_bytes >= self.n * LAYOUT.disk_bytes_per_chunk()
        return self.n * LAYOUT.chunk_bytes


class DeviceContract:
    def __init__(self, tmp_path):
        self.tier = DeviceTier(LAYOUT, DT, "cpu", sink=0, window=64)

    def write(self, kv):
        self.T = kv.shape[2]
        self.tier.write_recent(0, kv[0], kv[1])

    def read(self, ids):
        window = self.tier.read_window(0, self.T)
        return window[:, :, ids]

    def nbytes(self):
        return self.T * LAYOUT.token_bytes_per_layer


@pytest.mark.parametrize("tier_cls", [HostContract, DiskContract, DeviceContract])
def test_tier_contract(tier_cls, tmp_path):
    tier = tier_cls(tmp_path)
    kv = random_kv(32)
    tier.write(kv)
    ids = torch.tensor([0, 5, 6, 31, 17, 3, 3])
    assert torch.equal(tier.read(ids), kv[:, :, ids])
    assert tier.nbytes() == 32 * LAYOUT.token_bytes_per_layer


def test_layout_arithmetic():
    L = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128)  # Llama-3.1-8B
    assert L.token_bytes == 131072  # 128 KiB per token in bf16
    assert L.kv_bytes(131072) == 16 * 2**30  # 16 GiB at 128k
    assert L.chunk_bytes == 16 * 4096
    assert L.num_chunks(33) == 3
    # 2-bit codes (32 B per head) + per-16-token float16 scale and zero (2*128*2/16 = 32 B)
    assert L.summary_bytes_per_token == 32 * 8 * (32 + 32)


# -- the composed store --------------------------------------------------------------------


def make_store(tmp_path, host_chunks=4, disk_bytes=1 << 30, window=8, sink=4):
    return TieredStore(
        LAYOUT, DT, torch.device("cpu"), host_bytes=host_chunks * LAYOUT.chunk_bytes,
        disk_dir=tmp_path / "kv", disk_bytes=disk_bytes, sink=sink, window=window, spill_batch=2,
    )  # fmt: skip


def fill(store, kv, pieces=(5, 1, 1, 9, 3, 11)):
    t = 0
    for n in pieces:
        for layer in range(LAYOUT.num_layers):
            store.append(layer, kv[layer, 0, :, t : t + n], kv[layer, 1, :, t : t + n])
        t += n
    return t


def test_read_chunks_gives_each_chunk_wherever_it_lives(tmp_path):
    """What a save reads: chunks in any order, from host slots (runs or not) and disk."""
    kv = torch.stack([random_kv(40, seed=5), random_kv(40, seed=6)])
    with make_store(tmp_path, host_chunks=12) as store:
        fill(store, kv, pieces=(7, 9, 13, 11))
        store.truncate(30)  # (frees slots: chunks refilled after it land out of order)
        for layer in range(2):
            store.append(layer, kv[layer, 0, :, 30:40], kv[layer, 1, :, 30:40])
        for layer in range(2):
            on_host = [c for c in range(10) if store.directory.on_host((layer, c))]
            assert on_host and len(on_host) < 10  # (the rest on disk)
            for order in (list(range(10)), [9, 2, 3, 4, 0, 8, 1, 5, 6, 7]):
                want = torch.stack([store._chunk_kv(layer, c)[1] for c in order])
                assert torch.equal(store.read_chunks(layer, order), want)
            full = kv[layer, :, :, :40].reshape(2, 3, 10, 4, 8).permute(2, 0, 1, 3, 4)
            assert torch.equal(store.read_chunks(layer, list(range(10))), full)


def test_store_spills_and_gathers_bit_exact(tmp_path):
    kv = torch.stack([random_kv(30, seed=1), random_kv(30, seed=2)])  # [layers, 2, H, T, D]
    with make_store(tmp_path) as store:
        T = fill(store, kv)
        assert T == 30 and store.spilled_chunks > 0
        assert len(list((tmp_path / "kv").glob("*.arrow"))) >= 1
        for layer in range(2):
            k, v = store.gather_all(layer)
            assert torch.equal(k, kv[layer, 0]) and torch.equal(v, kv[layer, 1])
        assert store.reads.count["disk"] > 0
        b = store.tier_bytes()
        assert b["host"] == store.directory.host_count * LAYOUT.chunk_bytes
        assert b["host"] <= 4 * LAYOUT.chunk_bytes
        # summaries and abstracts exist for every completed chunk
        assert store.dev[0].num_chunks == 30 // LAYOUT.chunk_size
        # truncation into a spilled chunk, then different tokens: equal to writing them fresh
        store.truncate(13)
        other = torch.stack([random_kv(30, seed=3), random_kv(30, seed=4)])
        for layer in range(2):
            store.append(layer, other[layer, 0, :, 13:25], other[layer, 1, :, 13:25])
        want = torch.cat([kv[:, :, :, :13], other[:, :, :, 13:25]], dim=3)
        for layer in range(2):
            k, v = store.gather_all(layer)
            assert torch.equal(k, want[layer, 0]) and torch.equal(v, want[layer, 1])
    assert not (tmp_path / "kv").exists()  # close removed its files and directory


def test_host_budget_too_small_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="at least 4"):
        make_store(tmp_path, host_chunks=3)


def test_disk_budget_exceeded_before_anything_is_lost(tmp_path):
    kv = torch.stack([random_kv(30, seed=1), random_kv(30, seed=2)])
    store = make_store(tmp_path, disk_bytes=100).start()
    with pytest.raises(DiskFullError, match="disk tier budget exceeded"):
        fill(store, kv)
    assert [p.name for p in (tmp_path / "kv").iterdir()] == [".owner"]


def test_a_failed_background_write_loses_nothing_and_the_next_spill_succeeds(tmp_path):
    """Spills are written by a background thread; the chunks stay on the host until
    their file is complete, so a write that fails leaves every token readable."""
    kv = torch.stack([random_kv(30, seed=1), random_kv(30, seed=2)])
    store = make_store(tmp_path, disk_bytes=100).start()
    with pytest.raises(DiskFullError, match="disk tier budget exceeded"):
        fill(store, kv)
    for layer in range(LAYOUT.num_layers):
        T = store.lengths[layer]
        assert T > 0 and torch.equal(store.read_range(layer, 0, T), kv[layer, :, :, :T])
    store.disk.budget_bytes = 1 << 30  # room again: the next spill writes what must leave
    store.spill()
    store.settle()
    assert store.spilled_chunks > 0 and not store.directory.over_budget()
    for layer in range(LAYOUT.num_layers):
        T = store.lengths[layer]
        assert torch.equal(store.read_range(layer, 0, T), kv[layer, :, :, :T])
    store.close()


def test_enospc_midway_leaves_no_readable_half_file(tmp_path, monkeypatch):
    kv = torch.stack([random_kv(30, seed=1), random_kv(30, seed=2)])
    store = make_store(tmp_path).start()
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(DiskFullError, match="No space left on device"):
        fill(store, kv)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert [p.name for p in (tmp_path / "kv").iterdir()] == [
        ".owner"
    ]  # neither a final nor a temporary file
    # nothing was lost: every token written so far still reads back from the host
    T = store.lengths[1]
    k, _ = store.gather_all(0)
    assert torch.equal(k[:, :T], kv[0, 0, :, :T])


@pytest.fixture
def chunk_file(tmp_path):
    tier = DiskTier(tmp_path / "d", LAYOUT, DT, budget_bytes=1 << 30)
    tier.start()
    kv = random_kv(16)
    data = kv.reshape(2, 3, 4, 4, 8).permute(2, 0, 1, 3, 4)
    name = tier.write_chunks(1, [0, 1, 2, 3], data, chunk_abstracts(kv[0], 4))
    return tier, name, tmp_path / "d" / name, data


def fresh(tier):
    return DiskTier(tier.directory, LAYOUT, DT, budget_bytes=1 << 30)


def test_chunk_file_round_trip(chunk_file):
    tier, name, _, data = chunk_file
    for i in range(4):
        assert torch.equal(fresh(tier).read_chunk(name, i), data[i])


def test_flipped_byte_is_named(chunk_file):
    tier, name, path, data = chunk_file
    raw = bytearray(path.read_bytes())
    pos = raw.find(data[2].contiguous().view(torch.uint8).numpy().tobytes()[:16])
    assert pos > 0
    raw[pos + 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match=f"{name}: checksum mismatch in chunk 2"):
        fresh(tier).read_chunk(name, 2)


def test_truncated_and_missing_files_are_named(chunk_file):
    tier, name, path, _ = chunk_file
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(StorageError, match=f"{name}: not a valid chunk file"):
        fresh(tier).read_chunk(name, 0)
    path.unlink()
    with pytest.raises(StorageError, match=f"{name}: chunk file is missing"):
        fresh(tier).read_chunk(name, 0)


@pytest.mark.parametrize("host_chunks", [256, 24])
def test_long_appends_equal_token_by_token_appends(tmp_path, monkeypatch, host_chunks):
    """Whole chunks of a long append go to a run of host slots at once (summaries from
    the keys as given, block by block, into buffers sized once for the whole run): the
    same KV, summaries, abstracts and residency as appending one token at a time, also
    when the host budget makes it spill, and after a cut."""
    import storage.tiered as tiered

    monkeypatch.setattr(tiered, "SUMMARY_BLOCK", 2 * LAYOUT.chunk_size)  # several blocks
    kv = torch.stack([random_kv(300, seed=5), random_kv(300, seed=6)])
    one = make_store(tmp_path / "one", host_chunks=host_chunks)
    bulk = make_store(tmp_path / "bulk", host_chunks=host_chunks)
    with one, bulk:
        fill(one, kv, pieces=[1] * 230)
        fill(bulk, kv, pieces=(3, 70, 1))
        with monkeypatch.context() as m:
            grown = count_reallocations(m)
            fill(bulk, kv[:, :, :, 74:], pieces=(130,))  # 8 whole chunks, in 4 blocks
        assert len(grown) == 2 * 6  # each layer's codes, scale, zero, kmin, kmax, kmean: once
        fill(bulk, kv[:, :, :, 204:], pieces=(26,))
        one.truncate(150)
        bulk.truncate(150)
        fill(one, kv[:, :, :, 150:], pieces=[1] * 150)
        fill(bulk, kv[:, :, :, 150:], pieces=(150,))
        for layer in range(2):
            for a, b in zip(one.gather_all(layer), bulk.gather_all(layer), strict=True):
                assert torch.equal(a, b)
            assert torch.equal(bulk.gather_all(layer)[0], kv[layer, 0])
            s1, s2 = one.dev[layer].summaries(), bulk.dev[layer].summaries()
            for a, b in ((s1.codes, s2.codes), (s1.scale, s2.scale), (s1.zero, s2.zero)):
                assert torch.equal(a, b)
            a1, a2 = one.dev[layer].abstracts(), bulk.dev[layer].abstracts()
            assert torch.equal(a1.kmax, a2.kmax) and torch.equal(a1.kmean, a2.kmean)
        if host_chunks == 256:  # nothing spilled: the chunks sit in order, read in place
            assert one.directory.host_count == bulk.directory.host_count == 2 * 75
            assert bulk.host[0].in_order(300) and bulk.key_rows(0) is not None
        else:  # (a spill is applied when its background write is done)
            bulk.settle()
            assert bulk.spilled_chunks > 0 and bulk.directory.host_count <= host_chunks


def test_host_slabs_reserved_ahead_take_the_appends_without_allocating(tmp_path, monkeypatch):
    """A layer's slab reserved for T tokens (a thread does it during a layer-by-layer
    prefill, pinning on CUDA) takes the appends of those tokens with no allocation; the
    KV is as without the reservation. Where the budget cannot hold T tokens of every
    layer, nothing is reserved (the appends spill as before)."""
    kv = torch.stack([random_kv(130, seed=7), random_kv(130, seed=8)])
    allocs = count_slab_growths(monkeypatch)
    with make_store(tmp_path / "a", host_chunks=2 * 33) as store:
        assert store.reserve_host(0, 130) and store.reserve_host(1, 130)
        assert not store.reserve_host(1, 130)  # already there
        reserved = len(allocs)
        fill(store, kv, pieces=(130,))
        assert len(allocs) == reserved
        for layer in range(2):
            assert torch.equal(store.gather_all(layer)[0], kv[layer, 0])
            assert torch.equal(store.gather_all(layer)[1], kv[layer, 1])
    with make_store(tmp_path / "b", host_chunks=2 * 33 - 1) as store:
        assert not store.reserve_host(0, 130)


def test_keys_stay_in_place_after_a_truncation(tmp_path):
    """A cut frees the tail's host slots; re-filling must put the chunks back in order,
    or the CPU fast paths (keys and K/V read in place, no copy) are lost for good."""
    C = LAYOUT.chunk_size
    kv = random_kv(5 * C, seed=3)
    with make_store(tmp_path, host_chunks=64) as store:
        for layer in range(LAYOUT.num_layers):
            store.append(layer, kv[0, :, : 4 * C + 3], kv[1, :, : 4 * C + 3])
        store.truncate(2 * C)
        for layer in range(LAYOUT.num_layers):
            store.append(layer, kv[0, :, 2 * C :], kv[1, :, 2 * C :])
        for layer in range(LAYOUT.num_layers):
            rows = store.key_rows(layer)
            assert rows is not None
            assert torch.equal(rows.view(), kv[0])
            ids = torch.tensor([[1, 2 * C + 5, 5 * C - 1]] * LAYOUT.num_kv_heads)
            assert torch.equal(rows.gather(ids), kv[0][:, ids[0]])


def test_chunks_brought_in_out_of_order_are_put_in_order():
    """A loaded session brings chunks to the host as they are needed, in any order; once
    all are there, one copy puts each in its own slot and every token reads in place."""
    g = torch.Generator().manual_seed(3)
    n = 7
    data = torch.randn(n, 2, 3, 4, 8, generator=g).to(DT)  # [chunk, 2, H, C, D]
    host = HostTier(LAYOUT, DT)
    for c in (6, 0, 5, 2):
        host.put(c, data[c])
    T = n * 4 - 2  # the last chunk partly filled
    assert not host.put_in_order(T) and host.tokens_view(T) is None  # not all here yet
    for c in (3, 1, 4):
        host.put(c, data[c])
    assert not host.in_order(T)
    assert host.put_in_order(T) and host.in_order(T)
    want = data.permute(1, 2, 0, 3, 4).reshape(2, 3, n * 4, 8)[:, :, :T]
    assert torch.equal(host.tokens_view(T), want)
    host.free(6)  # later puts reuse the freed slot as before
    host.put(6, data[6])
    assert host.in_order(T) and torch.equal(host.tokens_view(T), want)


def test_chunks_read_back_in_bulk_take_their_own_slots(monkeypatch):
    """A loaded session's files, read back in any order into a slab sized for the layer,
    put each chunk in its own slot where it is free, so that putting the layer in order
    moves only the chunks that could not be (the recent window read at the load sat in
    their slots), not the whole layer."""
    g = torch.Generator().manual_seed(4)
    n, C = 40, LAYOUT.chunk_size
    data = torch.randn(n, 2, 3, C, 8, generator=g).to(DT)
    host = HostTier(LAYOUT, DT)
    host.put_many([0, 38, 39], data[[0, 38, 39]])  # at a load: the sink and recent chunks
    assert host.slot_of == {0: 0, 38: 1, 39: 2}
    host._reserve(n)  # the warm-up sizes the slab for the layer
    host.put_many(list(range(20, 38)), data[20:38])  # the files in any order
    host.put_many(list(range(1, 20)), data[1:20])
    moved = {c for c, slot in host.slot_of.items() if slot != c}
    assert moved == {1, 2, 38, 39}  # slots 1 and 2 were taken: chunks 1 and 2 went elsewhere
    copied, real = {}, torch.Tensor.index_copy_  # (by index: a torch function mode, as
    # under emulated CUDA, calls the method again)
    monkeypatch.setattr(torch.Tensor, "index_copy_",
                        lambda t, d, i, s: (copied.setdefault(id(i), len(i)), real(t, d, i, s))[1])  # fmt: skip
    assert host.put_in_order(n * C) and list(copied.values()) == [4]
    want = data.permute(1, 2, 0, 3, 4).reshape(2, 3, n * C, 8)
    assert torch.equal(host.tokens_view(n * C), want)
    host.free(39)
    host.put_many([39], data[39:])  # (its own slot again)
    assert host.in_order(n * C)


def test_lru_sync_takes_chunks_never_marked_as_oldest(tmp_path):
    """A loaded session's chunks enter the host without a selection hit, and their index
    may lie past a layer's recency table: they sort as least recently used."""
    with make_store(tmp_path, host_chunks=64) as store:
        fill(store, torch.stack([random_kv(30, seed=1), random_kv(30, seed=2)]))
        store.directory.add((1, 100))
        store.host[1].put(100)
        store.directory.filled((1, 100))
        store._sync_lru()  # was an IndexError: chunk 100 of a 64-entry table
        assert store.directory.lru_order()[0] == (1, 100)


@cuda_only
def test_abstracts_can_wait_in_host_memory(tmp_path):
    """Only the chunk selector reads abstracts: a CUDA store may keep them on the host,
    and its accounting moves them there; spills and reads are unchanged."""
    kv = torch.stack([random_kv(30, seed=1), random_kv(30, seed=2)]).cuda()
    store = TieredStore(
        LAYOUT, DT, torch.device("cuda"), host_bytes=4 * LAYOUT.chunk_bytes,
        disk_dir=tmp_path / "kv", disk_bytes=1 << 30, sink=4, window=8, spill_batch=2,
        abstracts_on_device=False,
    ).start()  # fmt: skip
    T = fill(store, kv)
    store.settle()
    assert store.dev[0].kmin.data.device.type == "cpu" and store.spilled_chunks > 0
    b = store.tier_bytes()
    assert b["device"] == LAYOUT.device_bytes(T, 4, 8, abstracts=False)
    assert b["host"] >= LAYOUT.abstracts_bytes(T)
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(store.read_range(layer, 0, T), kv[layer, :, :, :T])
    store.close()


@cuda_only
def test_cuda_store_reads_its_pinned_slab_in_place_and_after_a_spill(tmp_path):
    """On CUDA a layer whose chunks are all in the pinned slab, in order, is copied by the
    device straight from there (long appends write it straight from the device), and
    selected rows are gathered by the device from there; after a spill both are
    gathered as before. All give every token exactly."""
    kv = torch.stack([random_kv(300, seed=7), random_kv(300, seed=8)]).cuda()
    for host_chunks, spilled in ((256, False), (24, True)):
        store = TieredStore(
            LAYOUT, DT, torch.device("cuda"), host_bytes=host_chunks * LAYOUT.chunk_bytes,
            disk_dir=tmp_path / f"kv{host_chunks}", disk_bytes=1 << 30, sink=4, window=8,
        ).start()  # fmt: skip
        T = fill(store, kv, pieces=(3, 70, 1, 130, 96))
        store.settle()
        assert store.host[0].slab.is_pinned() and (store.spilled_chunks > 0) == spilled
        g = torch.Generator(device="cuda").manual_seed(host_chunks)
        ids = torch.randint(0, T, (LAYOUT.num_kv_heads, 50), device="cuda", generator=g)
        heads = torch.arange(LAYOUT.num_kv_heads, device="cuda")[:, None]
        for layer in range(LAYOUT.num_layers):
            k, v = store.gather_all(layer)
            assert k.device.type == "cuda"
            assert torch.equal(k, kv[layer, 0, :, :T]) and torch.equal(v, kv[layer, 1, :, :T])
            # a selection: in the slab, in order, the device gathers the rows itself
            assert torch.equal(store.gather_selected(layer, ids), kv[layer][:, heads, ids])
        store.close()


@cuda_only
def test_pinned_slabs_are_readable_by_the_device_while_any_view_lives():
    """Host slabs on CUDA are exactly sized pinned memory (registered with CUDA, not
    rounded up to a power of two); the device reads them in place."""
    import gc

    from storage.host import device_view, pinned_empty

    t = pinned_empty((2, 3, 1000, 16, 64), torch.bfloat16)
    assert t.is_pinned() and t.is_contiguous()
    t.normal_()
    want = t.clone()
    assert torch.equal(device_view(t, torch.device("cuda")).cpu(), want)
    part = t[:, :, 5:7]
    del t
    gc.collect()
    assert part.is_pinned() and torch.equal(part, want[:, :, 5:7])
    assert torch.equal(part.to("cuda", non_blocking=True).cpu(), want[:, :, 5:7])
