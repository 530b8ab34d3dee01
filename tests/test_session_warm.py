"""A loaded session's KV is read into host memory on a thread (storage/warm.py), so the
questions after it read memory; within the host budget, and never over a truncation."""

import threading
from collections import Counter

import pytest
import torch

from offload import Runtime
from offload.backend import Backend
from storage.disk import StorageError
from storage.tiered import TieredStore
from storage.warm import Warmer
from tests.conftest import DEVICE, count_reallocations, count_slab_growths, filler_text
from tests.test_sessions import doc_runtime, tiny  # a helper and a fixture


def _chunks(store):
    return sum(store.layout.num_chunks(n) for n in store.lengths)


def _loaded_unwarmed(tiny, tmp_path, monkeypatch, rt):
    """`rt`'s document saved and loaded with the warm-up held back (a test drives it by
    hand); the loaded runtime and its store."""
    rt.save_session(tmp_path / "s")
    monkeypatch.setattr(TieredStore, "warm", lambda self: None)
    loaded = Runtime.load_session(tmp_path / "s", model=tiny)
    return loaded, loaded._state.cache.store


QUESTIONS = (("seven stones", 6), ("green river", 6))


def _loaded_as_on_cuda(
    tiny, tmp_path, monkeypatch, questions=QUESTIONS[:1], session=True, **overrides
):
    """A document at full retrieval budget, saved, and loaded (or with `session` False,
    read again) by a runtime that drives the tiered store as CUDA does (host memory is
    not the device's; steps run fixed-shape; on the CPU, eagerly): that runtime, and the
    saver's answers to `questions` ((text, max_new_tokens) each, asked in turn after
    the save)."""
    config = dict(retrieved=100_000, prefetch="cache", **overrides)
    rt = doc_runtime(tiny, filler_text(60, seed=1), **config)
    rt.save_session(tmp_path / "s")
    want = [rt.ask(q, max_new_tokens=n) for q, n in questions]
    if DEVICE.type == "cpu":  # (CUDA's backend is so already)
        remote = Backend(DEVICE, fixed_shape=True, remote_host=True)
        monkeypatch.setattr(Backend, "for_device", classmethod(lambda cls, *a, **kw: remote))
        monkeypatch.setattr(TieredStore, "in_place", lambda self, layer: False)
    if not session:
        return doc_runtime(tiny, filler_text(60, seed=1), **config), want
    return Runtime.load_session(tmp_path / "s", model=tiny, **overrides), want


def test_a_loaded_session_is_read_in_while_the_user_asks(tiny, tmp_path):
    rt = doc_runtime(tiny, filler_text(60, seed=1))
    want = rt.ask("seven stones", max_new_tokens=6)
    rt.save_session(tmp_path / "s")
    loaded = Runtime.load_session(tmp_path / "s", model=tiny)
    store = loaded._state.cache.store
    store.warm().wait()
    assert store.directory.host_count == _chunks(store)
    # each layer in slot order: what the captured CUDA step reads
    assert all(store.host[i].in_order(n) for i, n in enumerate(store.lengths))
    C = store.layout.chunk_size  # (the partial last chunk was read at the load)
    assert store.reads.nbytes["disk"] >= store.layout.kv_bytes(store.num_tokens // C * C)
    assert loaded.ask("seven stones", max_new_tokens=6) == want
    assert loaded.stats()["tier_reads"]["disk"] == 0  # the question read memory only
    loaded.close()


def test_warming_keeps_the_host_budget(tiny, tmp_path):
    rt = doc_runtime(tiny, filler_text(75, seed=3), mode="dense", chunk_size=2)
    want = rt.ask("seven stones", max_new_tokens=6)
    rt.save_session(tmp_path / "big")
    budget = 6 * tiny.args.num_layers * rt.layout.chunk_bytes
    loaded = Runtime.load_session(
        tmp_path / "big", model=tiny, mode="dense", chunk_size=2, host_bytes=budget
    )
    store = loaded._state.cache.store
    store.warm().wait()
    assert 0 < store.directory.host_count <= store.directory.host_capacity < _chunks(store)
    assert loaded.ask("seven stones", max_new_tokens=6) == want


def test_chunks_cut_away_while_warming_are_not_brought_back(tiny, tmp_path, monkeypatch):
    """A truncation between the warmer's read and its put: the chunks past the cut stay
    gone, the KV kept is the saved one, and a question after it answers as it would
    on a session never warmed."""
    rt = doc_runtime(tiny, filler_text(60, seed=1))
    ref = rt._state.cache.store
    loaded, store = _loaded_unwarmed(tiny, tmp_path, monkeypatch, rt)
    warmer = Warmer(store)
    files = warmer.files()
    layers = [layer for layer, _ in files]
    assert sum(map(len, files.values())) == _chunks(store) - store.directory.host_count
    assert layers == sorted(layers, reverse=True) and len(set(layers)) > 1
    real = store.disk.read_all
    cut = store.num_tokens // 2

    def read_then_cut(name):
        data = real(name)
        if store.num_tokens > cut:
            loaded._state.cache.truncate(cut)
        return data

    monkeypatch.setattr(store.disk, "read_all", read_then_cut)
    warmer.run()
    C = store.layout.chunk_size
    for layer in range(store.layout.num_layers):
        assert all(c < -(-cut // C) for (lay, c) in store.directory.lru_order() if lay == layer)
        k, v = store.gather_all(layer)
        k_ref, v_ref = ref.gather_all(layer)
        assert k.shape[1] == cut
        assert k.equal(k_ref[:, :cut]) and v.equal(v_ref[:, :cut])


def test_a_warmed_session_decodes_through_the_fixed_shape_step(tiny, tmp_path, monkeypatch):
    """As on CUDA (host memory is not the device's; steps run fixed-shape; here on the
    CPU, eagerly): once the warmer has read every layer in, in slot order, the decode
    steps of a loaded session take the fixed-shape path, and at full budget answer as
    the runtime that saved it."""
    loaded, want = _loaded_as_on_cuda(tiny, tmp_path, monkeypatch)
    loaded._state.cache.store.warm().wait()
    assert [loaded.ask("seven stones", max_new_tokens=6)] == want
    assert loaded._state.cache.step.plan.steps > 0


def test_a_question_asked_while_warming_takes_its_rows_from_the_files(tiny, tmp_path, monkeypatch):
    """As on CUDA: a question asked while the warm-up still reads (here held back) keeps
    none of the chunks its selections touch (the warm-up puts them in their slots; on
    CUDA, into the slabs the grower thread pins meanwhile): their rows come from the
    files, each counted once, and the answer is the saver's. Then the warm-up reads the
    whole session in, and the next question reads memory only."""
    go = threading.Event()
    real = Warmer._reader
    monkeypatch.setattr(Warmer, "_reader", lambda self: go.wait() and real(self))
    try:
        loaded, want = _loaded_as_on_cuda(tiny, tmp_path, monkeypatch, questions=QUESTIONS)
        store = loaded._state.cache.store
        assert store.warming
        L, T = store.layout, store.num_tokens
        sparse = range(loaded.config.selection.dense_layers, L.num_layers)  # (a dense layer
        # is read whole, and keeps what it read)
        held = [store.host[i].num_chunks for i in sparse]
        assert [loaded.ask(QUESTIONS[0][0], max_new_tokens=6)] == want[:1]
        new = L.num_chunks(store.num_tokens) - L.num_chunks(T)  # the question's, the answer's
        assert store.warming and [store.host[i].num_chunks - new for i in sparse] == held
        assert loaded.stats()["tier_read_bytes"]["disk"] > 0
    finally:
        go.set()
    store.warm().wait()
    assert not store.warming and store.directory.host_count == _chunks(store)
    assert [loaded.ask(QUESTIONS[1][0], max_new_tokens=6)] == want[1:]
    assert loaded.stats()["tier_reads"]["disk"] == 0
    loaded.close()


@pytest.mark.parametrize("session", [True, False], ids=["session", "document"])
def test_a_documents_index_is_on_the_device_before_the_first_question(
    tiny, tmp_path, monkeypatch, session
):
    """Where the fixed-shape steps run (CUDA; here on the CPU, eagerly), a session's load
    and a document's read copy each sparse layer's index to the steps' device copy, so
    the questions' syncs copy only what they add (none starts over): also the second
    question's, though it cuts the first's indexed question and answer away. They
    answer as before."""
    from retrieval.device_index import DeviceClusterIndex

    C = tiny.layout.chunk_size  # (the first answer joins the index)
    questions = (("seven stones", 3 * C), QUESTIONS[1])
    loaded, want = _loaded_as_on_cuda(
        tiny, tmp_path, monkeypatch, questions, session, index_refresh=C
    )
    plan = loaded._state.cache.step.plan
    selectors = loaded._state.cache.policy.selectors
    assert plan.sparse and all(
        plan._synced[i] == selectors[i].indexed_tokens > 0 for i in plan.sparse
    )
    for i in plan.sparse:
        NC = selectors[i].centroids.shape[1]
        assert plan.indexes[i].centroids[:, :NC].cpu().equal(selectors[i].centroids)
    syncs = []
    real = DeviceClusterIndex.sync

    def sync(self, index, *a):
        syncs.append(self._synced is not None and self._synced[0] == index.epoch)
        return real(self, index, *a)

    monkeypatch.setattr(DeviceClusterIndex, "sync", sync)
    assert [loaded.ask(q, max_new_tokens=n) for q, n in questions] == want
    assert syncs and all(syncs)  # each one within the loaded index's epoch: its end only
    assert all(selectors[i].cuts for i in plan.sparse)  # (the second question cut the index)
    loaded.close()


def test_chunks_a_question_read_meanwhile_do_not_stop_the_warm_up(tiny, tmp_path, monkeypatch):
    """A question reads some chunks of a file between the warmer's read of that file and
    its put: they are skipped, and every layer is still read in whole, in slot order."""
    rt = doc_runtime(tiny, filler_text(60, seed=1))
    loaded, store = _loaded_unwarmed(tiny, tmp_path, monkeypatch, rt)
    real = store.disk.read_all
    C = store.layout.chunk_size

    def read_then_a_question_reads(name):
        data = real(name)
        for layer in range(store.layout.num_layers):
            with store.lock:
                store.read_range(layer, 0, 2 * C)  # (kept on the host: there is room)
        return data

    monkeypatch.setattr(store.disk, "read_all", read_then_a_question_reads)
    warmer = Warmer(store)
    warmer.run()
    assert warmer.error is None
    assert store.directory.host_count == _chunks(store)
    assert all(store.host[i].in_order(n) for i, n in enumerate(store.lengths))


def test_a_file_is_put_a_piece_at_a_time_and_a_cut_between_pieces_holds(
    tiny, tmp_path, monkeypatch
):
    """The warm-up puts a file's chunks on the host a piece at a time (`PIECE`), taking
    the store's lock for each, so a question waits one piece at most; what happens
    between two pieces (here a truncation) is seen by the next: the chunks past the cut
    stay gone and the KV kept is the saved one."""
    import storage.warm

    monkeypatch.setattr(storage.warm, "PIECE", 5)
    rt = doc_runtime(tiny, filler_text(75, seed=3), chunk_size=2)  # ~100 chunks per layer
    ref = rt._state.cache.store
    loaded, store = _loaded_unwarmed(tiny, tmp_path, monkeypatch, rt)
    cut = store.num_tokens // 2
    puts, real = [], store.keep_on_host

    def put(layer, chunks, kv, room=None):
        n = real(layer, chunks, kv, room)
        puts.append(len(chunks))
        if len(puts) == 3:  # (between the third piece and the fourth: a cut, which
            loaded._state.cache.truncate(cut)  # reads its new window back: not counted)
            del puts[3:]
        return n

    monkeypatch.setattr(store, "keep_on_host", put)
    Warmer(store).run()
    assert max(puts) <= 5 and len(puts) > 3 * store.layout.num_layers
    C = store.layout.chunk_size
    assert store.directory.host_count == _chunks(store)
    for layer in range(store.layout.num_layers):
        assert store.host[layer].in_order(cut)
        assert all(c < -(-cut // C) for (lay, c) in store.directory.lru_order() if lay == layer)
        k, v = store.gather_all(layer)
        k_ref, v_ref = ref.gather_all(layer)
        assert k.equal(k_ref[:, :cut]) and v.equal(v_ref[:, :cut])


def test_each_layers_slab_is_allocated_once_however_many_files(tiny, tmp_path, monkeypatch):
    """A layer's chunks come in many files: its host slab grows (on CUDA: is pinned) once,
    for the whole layer, not file after file; putting it in slot order grows nothing."""
    import storage.saving

    monkeypatch.setattr(storage.saving, "MAX_CHUNKS_PER_FILE", 4)
    rt = doc_runtime(tiny, filler_text(75, seed=3), chunk_size=2)  # ~100 chunks per layer
    loaded, store = _loaded_unwarmed(tiny, tmp_path, monkeypatch, rt)
    warmer = Warmer(store)
    assert len(warmer.files()) > 3 * store.layout.num_layers
    allocs = count_slab_growths(monkeypatch)
    warmer.run()
    assert len(allocs) == store.layout.num_layers
    assert store.directory.host_count == _chunks(store)
    assert all(store.host[i].in_order(n) for i, n in enumerate(store.lengths))


def test_a_bulk_read_back_sizes_the_layers_slab_once(tiny, tmp_path, monkeypatch):
    """A question on a loaded session reads many chunks of a layer back, file by file:
    the first bulk put sizes the layer's slab for all its chunks (one growth, one pinning
    on CUDA); the few chunks a load reads (the recent window) grew it as before."""
    import storage.saving

    monkeypatch.setattr(storage.saving, "MAX_CHUNKS_PER_FILE", 70)
    rt = doc_runtime(tiny, filler_text(75, seed=3), chunk_size=2)  # ~100 chunks per layer
    loaded, store = _loaded_unwarmed(tiny, tmp_path, monkeypatch, rt)
    allocs = count_slab_growths(monkeypatch)
    with store.lock:
        kv = store.read_range(0, 0, store.lengths[0])
    assert len(allocs) == 1 and torch.equal(kv, rt._state.cache.store.read_range(0, 0, kv.shape[2]))


def test_a_question_reads_a_layers_files_on_threads(tiny, tmp_path, monkeypatch):
    """A layer saved as several files (a long session: 1024 chunks a file) is read by a
    question asked at once on threads, files ahead of their use: the same answer as
    before the save, each chunk's checksum checked once however many steps read it; a
    corrupt file is still named."""
    import storage.reading as reading
    import storage.saving as saving

    monkeypatch.setattr(saving, "MAX_CHUNKS_PER_FILE", reading.BULK_READ_MIN)
    monkeypatch.setattr(reading, "READ_THREADS", 3)
    rt = doc_runtime(tiny, filler_text(60, seed=1), chunk_size=2)
    want = rt.ask("seven stones", max_new_tokens=6)
    loaded, store = _loaded_unwarmed(tiny, tmp_path, monkeypatch, rt)
    per_layer = Counter(layer for layer, _ in Warmer(store).files())
    assert min(per_layer.values()) > 3  # more files than threads
    threads, checks = set(), Counter()
    real = store.disk.read_batches

    def read_batches(name, batches):
        threads.add(threading.current_thread().name)
        checks[name] += store.disk.unchecked(name, batches)
        return real(name, batches)

    monkeypatch.setattr(store.disk, "read_batches", read_batches)
    assert loaded.ask("seven stones", max_new_tokens=6) == want
    assert len(checks) > 2 * 3  # layers of 3+ files
    assert all(0 < n <= store.disk.num_chunks(name) for name, n in checks.items())
    assert any(t.startswith("offload-read") for t in threads)


def test_files_read_ahead_come_in_order_and_a_failed_read_is_raised_at_its_turn():
    import storage.reading as reading

    class Disk:
        def read_batches(self, name, batches):
            if name == "bad":
                raise StorageError("bad: checksum mismatch in chunk 0: the file is corrupt")
            return name

    names = ["a", "b", "c", "bad", "d"]
    got = reading.read_files(Disk(), [(n, [0]) for n in names], threads=3)
    assert [next(got) for _ in range(3)] == [(n, n) for n in "abc"]
    with pytest.raises(StorageError, match="bad: checksum mismatch"):
        next(got)


def test_a_load_reads_its_few_chunks_alone_and_leaves_room_to_grow(tiny, tmp_path, monkeypatch):
    """Opening a session reads the recent window's chunks alone, not the whole files they
    sit in (a 128k-token session's files hold 1024 chunks each, the window 17): only
    their checksums are checked; and sizes the summaries with room, so the first tokens
    after it copy nothing."""
    rt = doc_runtime(tiny, filler_text(75, seed=3), chunk_size=2)
    want = rt.ask("seven stones", max_new_tokens=6)
    loaded, store = _loaded_unwarmed(tiny, tmp_path, monkeypatch, rt)
    C, on_disk = store.layout.chunk_size, _chunks(store) - store.directory.host_count

    def checked() -> int:
        return sum(int(d.sum()) for d in store.disk._checked.values())

    window = -(-(store.window + C) // C) + 1  # (the window's chunks, their ends unaligned)
    assert 0 < checked() <= store.layout.num_layers * window < on_disk
    grown = count_reallocations(monkeypatch)
    assert loaded.ask("seven stones", max_new_tokens=6) == want
    assert checked() > store.layout.num_layers * window  # the question needs most chunks
    assert not grown


def test_a_question_asked_at_once_finds_its_layers_slabs_pinned(tiny_dirs, tmp_path, monkeypatch):
    """On CUDA (emulated on a CPU), a loaded session's warm-up also pins each layer's
    whole slab on the store's grower thread, from the first layer: a question asked at
    once then grows no slab on its own thread (here the warmer's readers are held back
    and the question waits for the grower), and answers as before."""
    from tests.conftest import on_cuda

    path = tiny_dirs["llama-gqa-untied"][0]
    with on_cuda():
        rt = Runtime.from_pretrained(path, dtype="float32", mode="sparse", device="cuda",
                                     sink=4, window=16, dense_layers=1, retrieved=100_000,
                                     chunk_size=2)  # fmt: skip
        rt.load_document(filler_text(75, seed=3))
        want = rt.ask("seven stones", max_new_tokens=6)
        rt.save_session(tmp_path / "s")
        monkeypatch.setattr(Warmer, "_reader", lambda self: None)
        loaded = Runtime.load_session(tmp_path / "s", model=rt)
        store = loaded._state.cache.store
        store._grower.submit(lambda: None).result()  # (what the load queued there: done)
        L = store.layout
        assert all(store.host[i].capacity >= L.num_chunks(n) for i, n in enumerate(store.lengths))
        assert store.directory.host_count < sum(L.num_chunks(n) for n in store.lengths) // 2
        grown = count_slab_growths(monkeypatch)
        assert loaded.ask("seven stones", max_new_tokens=6) == want
        assert "MainThread" not in grown, grown
        loaded.close()
