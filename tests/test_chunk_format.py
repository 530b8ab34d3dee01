"""The chunk file as written: one record batch per chunk whose buffers hold exactly that
chunk's bytes (the format storage/disk.py documents), whatever the row sizes."""

from pathlib import Path

import pyarrow as pa
import pytest
import torch

import storage.disk
from storage.abstracts import chunk_abstracts
from storage.disk import DiskTier, StorageError
from storage.layout import KVLayout


def _written(tmp_path, n=6, head_dim=8):
    """A file of n chunks and the tier, name, KV and abstracts. Head dim 8: rows of 384
    and 96 bytes, not multiples of Arrow's 64-byte alignment (written a batch at a time);
    16: rows of 768 and 192 bytes (one table)."""
    D = head_dim
    L = KVLayout(num_layers=1, num_kv_heads=3, head_dim=D, dtype="bfloat16", chunk_size=4)
    data = (torch.arange(n * L.chunk_bytes // 2) % 251 / 7).to(torch.bfloat16).view(n, 2, 3, 4, D)
    ab = chunk_abstracts(data[:, 0].permute(1, 0, 2, 3).reshape(3, n * 4, D), 4)
    disk = DiskTier(tmp_path, L, torch.bfloat16, 1 << 30)
    disk.start()
    return disk, disk.write_chunks(0, list(range(n)), data, ab), data, ab


@pytest.mark.parametrize("head_dim", [8, 16])
def test_each_record_batch_holds_exactly_its_chunk(tmp_path, head_dim):
    n = 5
    disk, name, data, ab = _written(tmp_path, n, head_dim)
    reader = pa.ipc.open_file(pa.memory_map(str(tmp_path / name)))
    assert reader.num_record_batches == n
    for i in range(n):
        rb = reader.get_batch(i)
        want = [data[i].contiguous(), ab.kmin[i], ab.kmax[i], ab.kmean[i]]
        for j, t in enumerate(want):
            offsets, values = rb.column(j).buffers()[1:]
            assert offsets.size == 8 and values.size == t.numel() * t.element_size()
            assert values.to_pybytes() == t.view(torch.uint8).numpy().tobytes()
        assert torch.equal(disk.read_chunk(name, i), data[i])


def test_a_file_written_as_one_table_is_the_file_written_a_chunk_at_a_time(tmp_path, monkeypatch):
    """Rows of multiples of 64 bytes go out as one table of a batch per row: the same
    bytes as a batch made per chunk."""
    files = []
    for one_by_one in (False, True):
        if one_by_one:  # (as rows of other sizes are written)
            monkeypatch.setattr(storage.disk, "ARROW_ALIGNMENT", 1 << 20)
        path = tmp_path / str(one_by_one)
        disk, name, _, _ = _written(path, 7, head_dim=16)
        files.append((path / name).read_bytes())
    assert files[0] == files[1]


def test_a_file_is_read_where_it_lies(tmp_path):
    """The chunks of a file as this tier writes it lie at one stride: `read_all` is a view
    of the mapped file (no copy), equal to the chunks."""
    disk, name, data, _ = _written(tmp_path)
    kv = disk.read_all(name)
    assert torch.equal(kv, data) and not kv.is_contiguous()  # (rows apart by their stride)
    mapped = disk._mapped[name]
    assert mapped.address <= kv.data_ptr() < mapped.address + mapped.size


def test_a_file_laid_out_otherwise_or_damaged_takes_the_general_read(tmp_path):
    """Batches at uneven places (per-batch metadata of several sizes: a valid file another
    writer could make) are read through the column; a damaged chunk is named either way."""
    for uneven in (False, True):
        disk, name, data, _ = _written(tmp_path / str(uneven))
        path = disk.directory / name
        if uneven:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            with pa.ipc.new_file(f"{path}.new", reader.schema) as w:
                for i, b in enumerate(batches):
                    w.write_batch(b, custom_metadata={"pad": "x" * (i * 24)})
            Path(f"{path}.new").rename(path)
        tier = DiskTier(disk.directory, disk.layout, torch.bfloat16, 1 << 30)
        r, crcs = tier._open(name)
        assert (tier.view(name, range(len(crcs))) is None) == uneven
        assert torch.equal(tier.read_all(name), data)
        raw = bytearray(path.read_bytes())  # a bit of chunk 3's KV flipped
        raw[raw.find(data[3].contiguous().view(torch.uint8).numpy().tobytes()) + 5] ^= 0x55
        path.write_bytes(bytes(raw))
        tier = DiskTier(disk.directory, disk.layout, torch.bfloat16, 1 << 30)
        with pytest.raises(StorageError, match=f"{name}: checksum mismatch in chunk 3"):
            tier.read_all(name)


@pytest.mark.parametrize("n, head_dim", [(6, 16), (6, 8), (1, 16)])
def test_a_files_chunks_are_read_in_place_and_each_checked_once(tmp_path, n, head_dim):
    """Some chunks of a file come as the view of the whole mapped file with only those
    chunks' checksums checked, each once in the process (a question past the host budget
    reads them at every step); a damaged chunk is still named when it is first read, and
    from then on the file is read through the general path."""
    disk, name, data, _ = _written(tmp_path, n, head_dim)  # (8: written a batch at a time)
    wanted = [n - 1, 0] if n > 1 else [0]
    kv, rows = disk.read_batches(name, wanted)
    assert torch.equal(kv[rows], data[wanted]) and kv.shape[0] == n
    mapped = disk._mapped[name]
    assert mapped.address <= kv.data_ptr() < mapped.address + mapped.size
    assert disk.unchecked(name, list(range(n))) == n - len(wanted)
    assert disk.unchecked(name, wanted) == 0
    if n == 1:
        return
    path = disk.directory / name
    raw = bytearray(path.read_bytes())  # chunk 3, not read yet, damaged in place (mapped)
    at = raw.find(data[3].contiguous().view(torch.uint8).numpy().tobytes())
    with open(path, "r+b") as f:
        f.seek(at + 5)
        f.write(bytes([raw[at + 5] ^ 0x55]))
    kv, rows = disk.read_batches(name, [0])  # (checked before: not again)
    assert torch.equal(kv[rows], data[[0]])
    with pytest.raises(StorageError, match=f"{name}: checksum mismatch in chunk 3"):
        disk.read_batches(name, [2, 3])
    assert torch.equal(disk.read_chunk(name, 2), data[2])  # (through the general path)
    with pytest.raises(StorageError, match=f"{name}: checksum mismatch in chunk 3"):
        disk.read_chunk(name, 3)


def test_the_checksum_is_zlibs_crc32():
    """The chunk files' crc32 (ISA-L's where its wheel is installed, as the project's
    dependencies have it) is zlib's, for every size and starting value: files written
    with either read with the other."""
    import importlib.util
    import zlib

    from storage.disk import crc32

    if importlib.util.find_spec("isal") is not None:
        from isal import isal_zlib

        assert crc32 is isal_zlib.crc32
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (1 << 18,), dtype=torch.uint8, generator=g).numpy()
    view = memoryview(raw)
    for a, b in [(0, 0), (0, 1), (3, 770), (64, 12352), (5, 65541), (0, 1 << 18)]:
        for start in (0, 1, 0xDEADBEEF):
            assert crc32(view[a:b], start) == zlib.crc32(view[a:b], start)
