"""A store's reads checked against what was appended (seeded appends, spills, cuts and
selections), and the session-load benchmark that times a question's reads."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storage.layout import KVLayout
from storage.tiered import TieredStore


def test_the_session_load_benchmark_runs_and_times_a_questions_reads(tmp_path):
    """scripts/bench_session_load.py at a small size: its loads, its read-in and re-save,
    and a question's row reads from the files (`question_rows`, a layer's first read and
    again) are in its JSON."""
    out = tmp_path / "load.json"
    cmd = [sys.executable, "scripts/bench_session_load.py", "--layers", "2", "--tokens",
           "16384", "--runs", "1", "--selected", "64", "--dir", str(tmp_path / "work"),
           "--out", str(out)]  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res["runs"]) == 2 and "resave_seconds" in res["runs"][-1]
    rows = res["question_rows"]
    assert rows["selected"] == 64 and len(rows["first_ms"]) == len(rows["again_ms"]) == 2
    assert not (tmp_path / "work").exists()  # (the script removes what it wrote)


@pytest.mark.parametrize("host_chunks", [12, 40])
def test_selections_read_the_tokens_appended_through_spills_and_cuts(tmp_path, host_chunks):
    """Seeded random appends, cuts and selections on a CPU store at a small host budget
    (12 chunks: a selection's chunks never all fit; 40: at times they do), each selection (`gather_selected`: its rows from the host, from the files read and
    kept, or from the files where they lie) checked against the tokens appended; the
    disk records' arrays (`DiskIndex`) follow every spill and cut."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", chunk_size=4)
    store = TieredStore(
        layout, torch.float32, torch.device("cpu"), host_bytes=host_chunks * layout.chunk_bytes,
        disk_dir=tmp_path / "kv", disk_bytes=1 << 30, sink=4, window=8, spill_batch=2,
    ).start()  # fmt: skip
    rng, g = random.Random(5), torch.Generator().manual_seed(5)
    kv = [torch.empty(2, 2, 0, 8) for _ in range(2)]  # what each layer holds, as appended
    for step in range(120):
        T = store.num_tokens
        if T > 16 and rng.random() < 0.2:
            n = rng.randrange(8, T)
            store.truncate(n)
            kv = [t[:, :, :n] for t in kv]
        elif rng.random() < 0.6 or T < 16:
            S = rng.choice([1, 3, 4, 9, 16, 33])
            new = torch.randn(2, 2, 2, S, 8, generator=g)
            with store.lock:
                for layer in range(2):
                    store.append(layer, new[layer, 0], new[layer, 1])
            kv = [torch.cat([t, new[i]], dim=2) for i, t in enumerate(kv)]
        store.settle()
        T, layer = store.num_tokens, rng.randrange(2)
        k = min(T, rng.choice([1, 2, 5, T // 4 + 1, rng.randrange(1, T + 1)]))
        ids = torch.stack([torch.randperm(T, generator=g)[:k].sort().values for _ in range(2)])
        with store.lock:
            got = store.gather_selected(layer, ids)
        want = torch.stack([kv[layer][:, h, ids[h]] for h in range(2)], dim=1)
        assert torch.equal(got, want), f"step {step}"
        assert store.spilled_chunks > 0 or T < host_chunks * 4 // 2
        for lay in range(2):  # (the arrays say what the records say)
            chunks = torch.arange(layout.num_chunks(T)).numpy()
            files, _ = store.directory.index.records(lay, chunks)
            on_disk = [store.directory.on_disk((lay, c)) for c in chunks.tolist()]
            assert (files >= 0).tolist() == on_disk
    assert store.spilled_chunks > 0 and store.disk.used_bytes > 0
    store.close()
