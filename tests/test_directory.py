"""The tiered store's bookkeeping (storage/directory.py): which chunk lives where, in
which LRU order, checked against exact expected orders; plain Python, no tensors (the
disk records are also arrays: `DiskIndex`)."""

import pytest

from storage.directory import ChunkDirectory, DiskRecord, paused_gc


def test_directory_lru_spill_order_and_reload():
    d = ChunkDirectory(host_capacity=3)
    for c in range(4):
        d.add((0, c))
        if c < 3:
            d.filled((0, c))
    assert d.lru_order() == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert d.over_budget() == 1
    d.touch([(0, 0)])  # a selection hit makes chunk 0 the most recent
    assert d.lru_order() == [(0, 1), (0, 2), (0, 3), (0, 0)]
    # chunk 3 is still being filled: never a candidate
    assert d.spill_candidates(10) == [(0, 1), (0, 2), (0, 0)]
    d.spilled((0, 1), DiskRecord("f1", 0))
    assert d.over_budget() == 0 and d.on_disk((0, 1)) and not d.on_host((0, 1))
    d.loaded((0, 1))
    assert d.lru_order() == [(0, 2), (0, 3), (0, 0), (0, 1)]
    d.spilled((0, 1))  # its disk record is still valid: no new record needed
    assert d.disk[(0, 1)] == DiskRecord("f1", 0)
    assert d.drop((0, 1)) == DiskRecord("f1", 0) and d.files_in_use() == set()


def test_a_sessions_file_is_recorded_on_disk_at_once():
    """A saved session's file adds a record per chunk (chunk chunks[i] at record i), on
    disk only; a chunk already known is refused. The collector, paused while a session's
    files are added (`paused_gc`), is after as it was before (on, or off)."""
    import gc

    d = ChunkDirectory(host_capacity=3)
    d.add((1, 0))
    d.add_file_on_disk(1, "f", [5, 6, 7])
    d.add_file_on_disk(2, "g", [5])
    assert d.disk == {(1, 5): DiskRecord("f", 0), (1, 6): DiskRecord("f", 1),
                      (1, 7): DiskRecord("f", 2), (2, 5): DiskRecord("g", 0)}  # fmt: skip
    assert not d.on_host((1, 5))
    for again in ([7], [0]):  # on disk, on the host
        with pytest.raises(AssertionError, match="exist already"):
            d.add_file_on_disk(1, "h", again)
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_disk_index_follows_the_records():
    """`DiskIndex` (each layer's disk records as arrays, for a selection's thousands of
    chunks at once) says what the records say after every change: a session's files
    added, spills with new records (one chunk, or a file's at once), chunks dropped, all
    forgotten."""
    import random

    import numpy as np

    def agrees(d: ChunkDirectory) -> None:
        for layer in range(3):
            chunks = np.arange(300)
            files, batches = d.index.records(layer, chunks)
            for c, f, b in zip(chunks.tolist(), files.tolist(), batches.tolist(), strict=True):
                rec = d.disk.get((layer, c))
                assert (f < 0) == (rec is None), (layer, c)
                if rec is not None:
                    assert (d.index.names[f], b) == (rec.file, rec.batch), (layer, c)

    rng = random.Random(0)
    d = ChunkDirectory(host_capacity=1000)
    d.add_file_on_disk(1, "session", list(range(100, 200)))
    agrees(d)
    for step in range(400):
        layer, c = rng.randrange(3), rng.randrange(250)
        key = (layer, c)
        if d.on_disk(key) and rng.random() < 0.3:
            d.drop(key)
        elif not d.on_host(key) and not d.on_disk(key):
            d.add(key, filling=False)
            d.spilled(key, DiskRecord(f"f{step % 7}", rng.randrange(64)))
        elif step % 5 == 0:  # a spill's file of several chunks at once (`spilled_to`)
            run = [c for c in range(250, 260 + step % 9) if not d.on_disk((layer, c))]
            for c in run:
                if not d.on_host((layer, c)):
                    d.add((layer, c), filling=False)
            d.spilled_to(layer, run, f"s{step}")
            assert [d.disk[(layer, c)] for c in run] == [
                DiskRecord(f"s{step}", i) for i in range(len(run))
            ]
        if step % 50 == 0:
            agrees(d)
    agrees(d)
    assert d.index.records(2, np.array([10**6]))[0].tolist() == [-1]  # (past every chunk)
    d.forget_disk()
    assert d.disk == {}
    agrees(d)


def test_chunks_are_grouped_by_the_file_holding_them():
    """`DiskIndex.by_file`: the files in the order of their first chunk asked for, each
    file's chunks (and record batches) in the order asked, the chunks without a record
    apart."""
    d = ChunkDirectory(host_capacity=10)
    d.add_file_on_disk(0, "a", [0, 1, 2, 3])
    d.add_file_on_disk(0, "b", [4, 5, 6])
    d.add_file_on_disk(1, "c", [0, 1])
    groups, absent = d.index.by_file(0, [5, 1, 9, 0, 4, 7])
    assert list(groups.items()) == [("b", ([5, 4], [1, 0])), ("a", ([1, 0], [1, 0]))]
    assert absent == [9, 7]
    assert d.index.by_file(1, []) == ({}, [])
    assert d.index.by_file(2, [3]) == ({}, [3])  # (a layer with no record at all)
