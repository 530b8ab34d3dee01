"""Sessions on disk: round trips across processes and devices, crashes, kills (what a load
or save checks and refuses: tests/test_session_checks.py)."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import main
from offload import OffloadError, Runtime
from storage.session import SessionError, open_session
from tests.conftest import cuda_only, filler_text

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    directory, _ = tiny_dirs["llama-gqa-untied"]
    return Runtime.from_pretrained(
        directory, dtype="float32", mode="sparse", sink=4, window=16, retrieved=8, dense_layers=1
    )


def doc_runtime(tiny, text, **overrides):
    rt = Runtime(
        tiny.loaded, tiny.config.replace(**overrides) if overrides else tiny.config, tiny.device
    )
    rt.load_document(text)
    return rt


def test_session_given_by_a_relative_path_loads(tiny, tmp_path, monkeypatch):
    rt = doc_runtime(tiny, filler_text(60, seed=1))
    want = rt.ask("seven stones", max_new_tokens=6)
    monkeypatch.chdir(tmp_path)
    rt.save_session("s1")
    assert Runtime.load_session("s1", model=tiny).ask("seven stones", max_new_tokens=6) == want


def test_session_larger_than_the_host_budget_loads_and_answers(tiny, tmp_path):
    # chunks of 2 tokens: more than the 64 chunks per layer the recency table starts with
    rt = doc_runtime(tiny, filler_text(75, seed=3), mode="dense", chunk_size=2)
    want = rt.ask("seven stones", max_new_tokens=6)
    rt.save_session(tmp_path / "big")
    budget = 4 * tiny.args.num_layers * rt.layout.chunk_bytes  # four chunks per layer
    loaded = Runtime.load_session(
        tmp_path / "big", model=tiny, mode="dense", chunk_size=2, host_bytes=budget
    )
    assert loaded._state.cache.num_tokens > 64 * 2  # far more than fits
    assert loaded.ask("seven stones", max_new_tokens=6) == want
    assert loaded.stats()["tier_reads"]["disk"] > 0


def test_round_trip_in_process_with_index(tiny, tmp_path):
    rt = doc_runtime(tiny, filler_text(60, seed=1))
    want = rt.ask("seven stones", max_new_tokens=6)
    n_doc = rt.stats()["reused_tokens"]
    indexed = [s.indexed_tokens for s in rt._state.cache.policy.selectors if s is not None]
    info = rt.save_session(tmp_path / "s")
    assert info["tokens"] == n_doc and info["bytes"] > n_doc * rt.layout.token_bytes
    loaded = Runtime.load_session(tmp_path / "s", model=tiny)
    assert loaded.document == rt.document
    assert [
        s.indexed_tokens for s in loaded._state.cache.policy.selectors if s is not None
    ] == indexed
    assert loaded.ask("seven stones", max_new_tokens=6) == want
    s = loaded.stats()
    assert s["reused_tokens"] == n_doc and s["prefill_tokens"] == s["prompt_tokens"] - n_doc
    # questions do not leak into each other: the next one starts from the document again
    loaded.ask("green market", max_new_tokens=6)
    assert loaded.stats()["reused_tokens"] == n_doc


def test_loaded_session_in_auto_mode_reads_in_place_on_cpu(tiny_dirs, tmp_path):
    """Mode "auto" on the CPU (on any machine): the document's KV fits in host memory, so
    it is in the dense cache until the save moves it to the tiers; after a load it is in
    the tiered store, which the question and its decoding attend densely in place (no
    index is built), the chunks still on disk read back from the session's files first."""
    model = tiny_dirs["llama-gqa-untied"][0]
    cpu = dict(dtype="float32", mode="auto", sparse_threshold=32, sink=4, window=16,
               retrieved=8, dense_layers=1, device="cpu")  # fmt: skip
    rt = Runtime.from_pretrained(model, **cpu)
    rt.load_document(filler_text(60, seed=1))
    want = rt.ask("seven stones", max_new_tokens=6)
    assert rt._state.cache.store is None and rt._last_state.cache.store is None
    rt.save_session(tmp_path / "s")
    # (saved from the tiers, to which the KV moved rather than being held twice)
    assert rt._state.cache.store is not None
    assert rt.ask("seven stones", max_new_tokens=6) == want
    loaded = Runtime.load_session(tmp_path / "s", model=model, **cpu)
    assert loaded._state.cache.store is not None  # (a load reads no KV: it stays tiered)
    assert loaded.ask("seven stones", max_new_tokens=6) == want
    sel = loaded.stats()["selection"]
    # the question too: the chunks still on disk are read into host memory first
    assert sel["sparse_layer_steps"] == sel["sparse_layer_prefill_chunks"] == 0
    assert sel["index_seconds"] < 1e-3
    store = loaded._state.cache.store
    assert all(store.in_place(layer) for layer in range(store.layout.num_layers))


@pytest.mark.parametrize("mode", ["sparse", "auto"])
def test_a_document_another_request_cut_away_is_read_back_from_its_session(tiny, tmp_path, mode):
    """A `generate` on a runtime loaded from a document session cuts the document's KV
    away, and a chat about the document takes it; the next question (or a save) reads
    the session back, where it is still the version loaded, instead of prefilling the
    document again (before: all of it, 13.9 s for 3,892 tokens on the embedded model
    here), and answers alike. A session saved again since is not read: the document is
    prefilled."""
    doc_runtime(tiny, filler_text(60, seed=8), mode=mode).save_session(tmp_path / "s")
    rt = Runtime.load_session(tmp_path / "s", model=tiny, mode=mode)
    want = rt.ask("seven stones?", max_new_tokens=4)
    doc = rt.stats()["reused_tokens"]
    rt.generate("the river runs north", max_new_tokens=2)
    assert rt.ask("seven stones?", max_new_tokens=4) == want
    assert rt.stats()["reused_tokens"] == doc
    talk = rt.chat_about_document()  # (the KV goes to the conversation: read back too)
    talk.send("seven stones?", max_new_tokens=2)
    assert rt.ask("seven stones?", max_new_tokens=4) == want
    assert rt.stats()["reused_tokens"] == doc
    rt.generate("the river runs north", max_new_tokens=2)
    rt.save_session(tmp_path / "again")  # (read back too: what is saved is the document)
    assert (
        Runtime.load_session(tmp_path / "again", model=tiny, mode=mode).ask(
            "seven stones?", max_new_tokens=4
        )
        == want
    )
    other = doc_runtime(tiny, filler_text(60, seed=8), mode=mode)
    other.save_session(tmp_path / "s", replace=True)
    rt2 = Runtime.load_session(tmp_path / "s", model=tiny, mode=mode)
    rt2.generate("the river runs north", max_new_tokens=2)
    other.save_session(tmp_path / "s")  # (saved again since rt2 loaded it)
    assert rt2.ask("seven stones?", max_new_tokens=4) == want
    assert rt2.stats()["reused_tokens"] < doc


def test_chat_session_resumes(tiny, tmp_path):
    a = Runtime(tiny.loaded, tiny.config, tiny.device).chat(system="sys")
    a.send("the river", max_new_tokens=5)
    a.save(tmp_path / "c")
    want = a.send("seven stones", max_new_tokens=5)
    b = Runtime.load_session(tmp_path / "c", model=tiny).resume_chat()
    assert b.messages == a.messages[:-2]
    assert b.send("seven stones", max_new_tokens=5) == want


def test_nothing_to_save_is_one_error_and_writes_nothing(tiny, tmp_path):
    # a session of no tokens would be written, then refused at its load
    rt = Runtime(tiny.loaded, tiny.config, tiny.device)
    with pytest.raises(OffloadError, match="nothing to save to .*: this runtime holds no KV"):
        rt.save_session(tmp_path / "r")
    conv = rt.chat(system="sys")
    with pytest.raises(OffloadError, match="this conversation holds no KV yet"):
        conv.save(tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
    conv.send("the river", max_new_tokens=3)
    assert conv.save(tmp_path / "c")["tokens"] > 0


def test_embedded_model_save_load_in_fresh_process(smol_bf16, tmp_path):
    text = filler_text(700, seed=2)
    rt = Runtime(smol_bf16.loaded, smol_bf16.config, smol_bf16.device)
    rt.load_document(text)
    rt.save_session(tmp_path / "doc")
    want = [
        s.token_id for s in rt.stream_ask("Which colors appear in the text?", max_new_tokens=12)
    ]
    code = textwrap.dedent(f"""
        import json
        from offload import Runtime
        rt = Runtime.load_session({str(tmp_path / "doc")!r})
        ids = [s.token_id for s in rt.stream_ask("Which colors appear in the text?", max_new_tokens=12)]
        print(json.dumps({{"ids": ids, "stats": rt.stats()["prefill_tokens"]}}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ids"] == want
    assert got["stats"] < 30  # only the question was prefilled


SAVER = """
import sys
from offload import Runtime
rt = Runtime.from_pretrained(sys.argv[1], dtype="float32", mode="sparse", sink=4, window=16, retrieved=8, dense_layers=1, disk_dir=sys.argv[4])
rt.load_document(sys.argv[3])
print("ready", flush=True)
while True:
    rt.save_session(sys.argv[2], replace=True)
    print("saved", flush=True)
"""


def test_killed_saves_never_leave_a_wrong_session(tiny, tmp_path):
    """A saver killed at a random moment leaves the session it replaces or the new one,
    whole. Every other try waits for one save to complete before the kill, so replacement
    is exercised however slowly the saver starts (on a GPU, seconds), and from then on
    the new session must stay: a later save cut short never brings back the old one."""
    model_dir = str(tiny.loaded.source)
    path = tmp_path / "s"
    text_a, text_b = filler_text(60, seed=3), filler_text(70, seed=4)
    ids_a = doc_runtime(tiny, text_a)
    ids_a.save_session(path)
    old = tuple(open_session(path).token_ids)
    new = tuple(doc_runtime(tiny, text_b)._document_ids())
    rng = random.Random(0)
    replaced = False
    for attempt in range(6):
        # (its spill folder under the test's: a killed process leaves it to a later sweep)
        proc = subprocess.Popen([sys.executable, "-c", SAVER, model_dir, str(path), text_b,
                                 str(tmp_path / "kv")],
                                stdout=subprocess.PIPE, cwd=ROOT)  # fmt: skip
        assert proc.stdout.readline().strip() == b"ready"
        if attempt % 2:
            assert proc.stdout.readline().strip() == b"saved"
            replaced = True
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        loaded = Runtime.load_session(path, model=tiny)
        ids = tuple(loaded._state.ids)
        assert ids == new if replaced else ids in (old, new)
        loaded.ask("seven", max_new_tokens=2)  # and it is usable


def test_interrupted_first_save_is_reported_incomplete(tmp_path):
    (tmp_path / "s" / "v-abc.tmp").mkdir(parents=True)
    with pytest.raises(SessionError, match="a save was interrupted before it completed"):
        open_session(tmp_path / "s")


@pytest.fixture
def saved(tiny, tmp_path):
    rt = doc_runtime(tiny, filler_text(60, seed=5))
    rt.save_session(tmp_path / "s")
    return open_session(tmp_path / "s")


def flip_byte(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x55
    path.write_bytes(bytes(raw))


def test_cli_ingest_ask_and_errors(tiny, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(filler_text(50, seed=8))
    model = str(tiny.loaded.source)
    runner = CliRunner()
    sets = ["--set", "dtype=float32", "--set", "mode=sparse"]
    r = runner.invoke(
        main, ["ingest", str(doc), "--session", str(tmp_path / "s"), "-m", model, *sets]
    )
    assert r.exit_code == 0, r.output
    assert "ingested" in r.output and "tokens" in r.output
    r = runner.invoke(main, ["ask", "--session", str(tmp_path / "s"), "-n", "4", "seven?"])
    assert r.exit_code == 2 and "made with another model" in r.output  # the default model
    r = runner.invoke(
        main, ["ask", "--session", str(tmp_path / "s"), "-m", model, "-n", "4", "seven?"]
    )
    assert r.exit_code == 0, r.output
    assert "document tokens reused" in r.output
    r = runner.invoke(
        main,
        ["ingest", str(tmp_path / "missing.txt"), "--session", str(tmp_path / "t"), "-m", model],
    )
    assert r.exit_code == 2 and "document not found" in r.output
    r = runner.invoke(main, ["ask", "--session", str(tmp_path / "nothing"), "q"])
    assert r.exit_code == 2 and "no session at" in r.output


@cuda_only
def test_session_saved_on_cuda_loads_on_the_cpu_and_back(tiny_dirs, tmp_path):
    """One format on both devices (full budget, fp32: the same answer on each)."""
    path = tiny_dirs["llama-gqa-untied"][0]
    kw = dict(dtype="float32", mode="sparse", sink=4, window=16, retrieved=100_000, dense_layers=1)
    gpu = Runtime.from_pretrained(path, device="cuda", **kw)
    gpu.load_document(filler_text(60, seed=1))
    want = gpu.ask("seven stones", max_new_tokens=6)
    gpu.save_session(tmp_path / "g")
    cpu = Runtime.load_session(tmp_path / "g", model=path, device="cpu")
    assert cpu.device.type == "cpu" and cpu.ask("seven stones", max_new_tokens=6) == want
    cpu.save_session(tmp_path / "c")
    back = Runtime.load_session(tmp_path / "c", model=path, device="cuda")
    assert back.ask("seven stones", max_new_tokens=6) == want


def test_a_session_of_the_device_cache_takes_no_more_device_memory_to_save_or_load(
    tiny_dirs, tmp_path
):
    """On CUDA (emulated on a CPU), mode "auto": a device cache is saved, and a session
    within `kv.device_bytes` loaded into one, through host memory layer by layer, so
    neither holds more on the device than that cache's buffers and a layer's passing
    work (not the tiered store's summaries beside them: a session near the preset's
    bound would pass a 24 GB card); it answers as before (full budget, fp32)."""
    import gc

    from tests.conftest import on_cuda

    path = tiny_dirs["llama-gqa-untied"][0]
    full = Runtime.from_pretrained(path, dtype="float32", mode="full")
    full.load_document(filler_text(80, seed=1))
    want = full.ask("seven stones", max_new_tokens=6)
    n = len(full._state.ids)
    with on_cuda():
        rt = Runtime.from_pretrained(path, dtype="float32", mode="auto", device="cuda",
                                     sink=4, window=16, dense_layers=1)  # fmt: skip
        L = rt.layout
        cfg = rt.config.replace(device_bytes=(n + 20) * (L.token_bytes + L.token_bytes_per_layer))
        made = Runtime(rt.loaded, cfg, rt.device)
        made.load_document(filler_text(80, seed=1))
        n = made._state.cache.num_tokens  # (the document: a session keeps no question)
        assert made._state.cache.store is None
        gc.collect()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        made.save_session(tmp_path / "s")
        one_layer = n * L.token_bytes_per_layer
        assert torch.cuda.max_memory_allocated() - base <= one_layer
        del made
        gc.collect()
        base = torch.cuda.memory_allocated()
        fresh = Runtime(rt.loaded, cfg, rt.device)
        # what a runtime's own empty cache holds (the loaded runtime's: let go at the end)
        empty = torch.cuda.memory_allocated() - base
        del fresh
        gc.collect()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loaded = Runtime.load_session(tmp_path / "s", model=rt, config=cfg)
        held = torch.cuda.memory_allocated() - base
        assert loaded._state.cache.store is None and loaded._state.cache.num_tokens == n
        assert torch.cuda.max_memory_allocated() - base == held + empty
        assert held <= cfg.kv.device_bytes
        assert loaded.ask("seven stones", max_new_tokens=6) == want


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_spilled_file_survives_a_kill_and_the_next_start(tiny, tmp_path, sig):
    from storage.stale import sweep_stale

    disk = tmp_path / "spill"
    cmd = [sys.executable, "-m", "cli.main", "chat", "-m", str(tiny.loaded.source),
           "-n", "2", "--set", "dtype=float32", "--set", "mode=dense", "--set", "chunk_size=2",
           "--set", "host_bytes=4KiB", "--set", f"disk_dir={disk}"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)  # fmt: skip
    proc.stdin.write((filler_text(40, seed=11) + "\n").encode())
    proc.stdin.flush()
    deadline = time.monotonic() + 120
    while not list(disk.glob("cache-*/*.arrow")):  # the turn spilled KV: it waits for input
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    assert sweep_stale(disk) == 0  # the live process holds its folder's lock
    proc.send_signal(sig)
    proc.wait(timeout=60)
    left = list(disk.glob("cache-*/*"))
    if sig == signal.SIGTERM:
        assert left == [] and list(disk.iterdir()) == []
    else:
        assert left, "a SIGKILL leaves its files: the sweep below must find them"
        stale = len(list(disk.iterdir()))
        live = disk / "cache-1-0123abcd"  # a live process's folder (pid 1) stays
        live.mkdir()
        assert sweep_stale(disk) == stale and list(disk.iterdir()) == [live]


def test_a_session_loads_only_into_its_kv_layout_and_rebuilds_an_index_of_other_settings(
    tiny, tmp_path
):
    """Another chunk size or summary width is refused, naming the difference (the chunk
    files hold that layout); other cluster settings load, and the index is rebuilt from
    the KV on first use (the saved one was built with the old settings)."""
    rt = doc_runtime(tiny, filler_text(60, seed=2))
    rt.save_session(tmp_path / "s")
    with pytest.raises(
        SessionError, match=r"KV layout differs from this config: chunk_size 16 \(now 8\)"
    ):
        Runtime.load_session(tmp_path / "s", model=tiny, chunk_size=8)
    # (at full budget the answer is exact attention's whatever each index holds: a fresh
    # ingest indexed its document, the loaded one the document and the question's first
    # tokens, which on CUDA's sparse prefill chunks would select differently)
    other = dict(cluster_size=8, retrieved=100_000)
    loaded = Runtime.load_session(tmp_path / "s", model=tiny, **other)
    indexes = [s for s in loaded._state.cache.policy.selectors if s is not None]
    assert indexes and all(s.indexed_tokens == 0 for s in indexes)  # (not the saved one)
    fresh = doc_runtime(tiny, filler_text(60, seed=2), **other)
    question = "seven stones"
    assert loaded.ask(question, max_new_tokens=6) == fresh.ask(question, max_new_tokens=6)
    for s in indexes:  # rebuilt, with clusters of 8 tokens
        assert s.indexed_tokens > 0 and s.centroids.shape[1] == round(s.indexed_tokens / 8)
