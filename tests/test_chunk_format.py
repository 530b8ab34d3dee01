"""The chunk file as written: one record batch per chunk whose buffers hold exactly that
chunk's bytes (the format storage/disk.py documents), whatever the row sizes."""

import pyarrow as pa
import torch

from storage.abstracts import chunk_abstracts
from storage.disk import DiskTier
from storage.layout import KVLayout


def test_each_record_batch_holds_exactly_its_chunk(tmp_path):
    # rows of 384 and 96 bytes: not multiples of Arrow's 64-byte padding
    L = KVLayout(num_layers=1, num_kv_heads=3, head_dim=8, dtype="bfloat16", chunk_size=4)
    n = 5
    data = (torch.arange(n * L.chunk_bytes // 2) % 251 / 7).to(torch.bfloat16).view(n, 2, 3, 4, 8)
    ab = chunk_abstracts(data[:, 0].permute(1, 0, 2, 3).reshape(3, n * 4, 8), 4)
    disk = DiskTier(tmp_path, L, torch.bfloat16, 1 << 30)
    disk.start()
    name = disk.write_chunks(0, list(range(n)), data, ab)
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
