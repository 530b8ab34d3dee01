"""What loading and saving a session check, and how a failure is named: damaged files,
another model, layout or config, a locked or bad path, a full disk; a session of an
older form still loads."""

from pathlib import Path

import pytest
import torch

from offload import OffloadError, Runtime
from storage.disk import StorageError
from storage.session import SessionError, SessionLock, SessionLockedError, open_session
from tests.conftest import filler_text, on_cuda, rewrite_manifest
from tests.gguf_files import write_gguf
from tests.test_sessions import doc_runtime, flip_byte, saved, tiny  # noqa: F401 (fixtures)


def test_corrupt_chunk_file_is_named(tiny, saved):
    f = saved.version_dir / saved.chunk_files()[0]["name"]
    flip_byte(f, f.stat().st_size // 2)
    # Opening does not read the KV; the first read of the damaged chunk names the file.
    # (The warm-up that reads the session in on a thread stops at it, quietly.)
    loaded = Runtime.load_session(saved.path, model=tiny)
    warmer = loaded._state.cache.store.warm()
    warmer.wait()
    assert isinstance(warmer.error, StorageError) and f.name in str(warmer.error)
    with pytest.raises(StorageError, match=f"{f.name}: checksum mismatch"):
        loaded.ask("seven", max_new_tokens=2)


@pytest.mark.parametrize("name", ["device.safetensors", "index.safetensors"])
@pytest.mark.parametrize("where", ["header", "data"])
def test_a_damaged_small_file_fails_the_load_by_name(tiny, saved, name, where):
    """The small files are hashed on threads while the load reads them: a damaged one
    fails the load with its name, whether its bytes still parse (data) or not (header)."""
    f = saved.version_dir / name
    flip_byte(f, 20 if where == "header" else f.stat().st_size - 10)
    with pytest.raises(SessionError, match=f"{name}: checksum mismatch"):
        Runtime.load_session(saved.path, model=tiny)


def test_corrupt_manifest_and_index_are_named(tiny, saved):
    index = saved.version_dir / "index.safetensors"
    flip_byte(index, index.stat().st_size - 10)
    with pytest.raises(SessionError, match="index.safetensors: checksum mismatch"):
        open_session(saved.path)
    manifest = saved.version_dir / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"num_tokens": ', '"num_tokens": 1'))
    with pytest.raises(SessionError, match="manifest.json: manifest checksum mismatch"):
        open_session(saved.path)


def test_another_model_or_layout_is_refused(tiny, tiny_dirs, saved):
    other = Runtime.from_pretrained(tiny_dirs["qwen2-bias"][0], dtype="float32", mode="sparse")
    with pytest.raises(SessionError, match="made with another model"):
        Runtime.load_session(saved.path, model=other)
    # the same model with its linears packed: its KV differs a little, and the error says so
    packed = Runtime.from_pretrained(tiny.loaded.source, dtype="float32", weights="int4")
    with pytest.raises(SessionError, match="linears dense; this runtime runs them int4: set "
                       "model.weights = dense"):  # fmt: skip
        Runtime.load_session(saved.path, model=packed)
    with pytest.raises(SessionError, match="chunk_size 16 \\(now 32\\)"):
        Runtime.load_session(saved.path, model=tiny, chunk_size=32, window=32)


def test_a_session_loads_with_the_linears_that_made_its_kv(tmp_path, tiny_dirs, monkeypatch):
    """`model.weights = "auto"` decides by the device (a Q4 GGUF's linears at int4 on a
    CPU, dense on CUDA where they fit), and a session's KV follows the form that made it:
    loading a session, `auto` runs the session's form (loading the model again in it),
    with a note where this device alone would run another, so that a session made on one
    device loads on the other. A form the config names is kept (and a session of another
    refused, as before), another model is refused without a second load; int8 runs on a
    CPU only, and a GPU refuses its session before the model loads."""
    src = write_gguf(tmp_path / "m.gguf", dim=256, ff=512, quant="Q4_1")
    text, question = filler_text(40, seed=2), "seven stones"
    kw = dict(dtype="float32", sink=4, window=16)
    made = Runtime.from_pretrained(src, device="cpu", weights="dense", **kw)  # (as CUDA)
    made.load_document(text)
    want = made.ask(question, max_new_tokens=6)
    made.save_session(tmp_path / "dense")
    with pytest.warns(UserWarning, match="made with the model's linears dense, so they run "
                      "dense here \\('auto' runs them int4 on cpu otherwise"):  # fmt: skip
        rt = Runtime.load_session(tmp_path / "dense", model=src, weights="auto", device="cpu")
    assert rt.loaded.model.weights == "dense" and rt.ask(question, max_new_tokens=6) == want
    with pytest.raises(SessionError, match="linears dense; this runtime runs them int4"):
        Runtime.load_session(tmp_path / "dense", model=src, weights="int4", device="cpu")

    cpu = Runtime.from_pretrained(src, device="cpu", **kw)  # (auto: int4)
    cpu.load_document(text)
    want = cpu.ask(question, max_new_tokens=6)
    cpu.save_session(tmp_path / "int4")
    with on_cuda():
        with pytest.warns(UserWarning, match="linears int4, so they run int4 here \\('auto' "
                          "runs them dense on cuda otherwise"):  # fmt: skip
            gpu = Runtime.load_session(tmp_path / "int4", model=src, device="cuda")
        assert gpu.device.type == "cuda" and gpu.loaded.model.weights == "int4"
        assert gpu.ask(question, max_new_tokens=6) == want
    loads, real = [], Runtime.from_pretrained.__func__
    monkeypatch.setattr(Runtime, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))  # fmt: skip
    with pytest.raises(SessionError, match="made with another model"):
        Runtime.load_session(tmp_path / "int4", model=tiny_dirs["llama-gqa-untied"][0])
    assert len(loads) == 1  # (dense there, not reloaded at int4 to be refused)

    q8 = write_gguf(tmp_path / "q8.gguf", dim=256, ff=512, quant="Q8_0")
    cpu = Runtime.from_pretrained(q8, device="cpu", **kw)  # (auto: int8)
    cpu.load_document(text)
    cpu.save_session(tmp_path / "int8")
    with on_cuda(), pytest.raises(SessionError, match="linears int8, which run on a CPU "
                                  "only .*: load it on a CPU \\(--set device=cpu\\)"):  # fmt: skip
        Runtime.load_session(tmp_path / "int8", model=q8, device="cuda")


def test_a_config_the_session_cannot_take_is_refused_before_the_model_loads(
    tiny, saved, monkeypatch
):
    """Another dtype (or chunk size) is named before the model is read: `offload ask
    --set dtype=float16` converted and cached the model for nothing first (7 s and 290 MB
    for the embedded one)."""
    import offload.runtime

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(offload.runtime, "load", load)
    source = tiny.loaded.source
    with pytest.raises(SessionError, match="dtype 'float32' \\(now 'float16'\\)"):
        Runtime.load_session(saved.path, model=source, dtype="float16")
    with pytest.raises(SessionError, match="chunk_size 16 \\(now 32\\)"):
        Runtime.load_session(saved.path, model=source, chunk_size=32, window=32)
    with pytest.raises(AssertionError, match="the model was loaded"):  # (the same config)
        Runtime.load_session(saved.path, model=source)


def test_concurrent_writer_is_locked(tiny, saved):
    rt = doc_runtime(tiny, filler_text(30, seed=6))
    with SessionLock(saved.path):
        with pytest.raises(SessionLockedError, match="is locked"):
            rt.save_session(saved.path, replace=True)


def test_bad_session_paths(tiny, tmp_path):
    rt = doc_runtime(tiny, filler_text(30, seed=7))
    (tmp_path / "f").write_text("x")
    with pytest.raises(SessionError, match="is a file, not a directory"):
        rt.save_session(tmp_path / "f")
    with pytest.raises(SessionError, match="cannot create session directory /proc/no-such"):
        rt.save_session("/proc/no-such/session")
    with pytest.raises(SessionError, match="no session at"):
        Runtime.load_session(tmp_path / "missing", model=tiny)


def test_sessions_with_float32_summary_parameters_still_load(tiny, saved):
    """Summaries' scale and zero point were float32 before they became float16: such a
    session loads and answers as the same session with float16 ones."""
    from safetensors.torch import load_file, save_file

    from storage.session import file_entry

    rt = Runtime.load_session(saved.path, model=tiny)
    want = rt.ask("green?", max_new_tokens=6)
    path = saved.version_dir / "device.safetensors"
    tensors = load_file(path)
    assert tensors["L1.scale"].dtype == torch.float16
    for name in [n for n in tensors if n.endswith((".scale", ".zero"))]:
        tensors[name] = tensors[name].float()
    save_file(tensors, path, metadata={"meta": "{}"})
    rewrite_manifest(saved, lambda m: m["files"].update({"device.safetensors": file_entry(path)}))
    old = Runtime.load_session(saved.path, model=tiny)
    assert old._state.cache.store.dev[1].scale.data.dtype == torch.float16
    assert old.ask("green?", max_new_tokens=6) == want


def test_disk_full_while_writing_tensors_leaves_the_old_session(tiny, saved, monkeypatch):
    from safetensors import SafetensorError

    import storage.saving as ss

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(ss, "save_file", full)
    rt = doc_runtime(tiny, filler_text(30, seed=10))
    with pytest.raises(SessionError, match="cannot save session to .*: No space left on device$"):
        rt.save_session(saved.path, replace=True)
    assert sorted(p.name for p in saved.path.iterdir() if p.name.startswith("v-")) == [
        saved.version_dir.name
    ]
    assert open_session(saved.path).token_ids == saved.token_ids


def test_disk_full_on_a_first_save_leaves_no_folder(tiny, tmp_path, monkeypatch):
    import errno

    import storage.disk

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.disk, "write_atomic", full)  # the KV files' writer
    rt = doc_runtime(tiny, filler_text(30, seed=10))
    target = tmp_path / "new" / "doc"
    with pytest.raises(
        SessionError, match="cannot save session to .*doc: No space left on device$"
    ):
        rt.save_session(target)
    assert not target.exists()


def test_a_session_takes_at_least_what_its_layout_says(tiny, saved):
    """`KVLayout.session_bytes`, what `offload ingest` wants free before its prefill: never
    more than a saved session takes (so nothing that would fit is refused), and more than
    its KV alone."""
    L, tokens = tiny.layout, len(saved.token_ids)
    taken = sum(p.stat().st_size for p in saved.version_dir.rglob("*") if p.is_file())
    kv = L.num_layers * (tokens // L.chunk_size) * L.chunk_bytes
    assert tokens >= 4 * L.chunk_size and kv < L.session_bytes(tokens) <= taken


def free_space(monkeypatch, nbytes: int) -> None:
    import shutil

    usage = shutil._ntuple_diskusage(1 << 40, (1 << 40) - nbytes, nbytes)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage)


def test_ingest_without_room_for_its_session_is_refused_before_the_prefill(
    tiny, tmp_path, monkeypatch
):
    from click.testing import CliRunner

    import offload.documents_api
    from cli.main import main

    def prefill(*a, **kw):
        raise AssertionError("the prefill ran")

    monkeypatch.setattr(offload.documents_api, "prefill", prefill)
    free_space(monkeypatch, 4096)
    doc, target = tmp_path / "doc.md", tmp_path / "new" / "s"
    doc.write_text(filler_text(50, seed=8))
    args = ["-m", str(tiny.loaded.source), "--set", "dtype=float32"]
    r = CliRunner().invoke(main, ["ingest", str(doc), "--session", str(target), *args])
    assert r.exit_code == 2, r.output
    assert f"error: cannot save session to {target}: the save writes at least " in r.output
    assert f"and {tmp_path} has 4.00 KiB free" in r.output.replace("\n", "")
    assert not (tmp_path / "new").exists()


def test_a_save_the_disk_has_no_room_for_is_refused_before_it_writes(tiny, saved, monkeypatch):
    """A save checks the least it writes is free first (it would fill the disk, then fail
    and remove what it wrote): a first save leaves no folder, a replacing one the session
    there; a loaded session saved again writes only what its files do not hold."""
    rt = doc_runtime(tiny, filler_text(30, seed=10))
    L, tokens = tiny.layout, len(rt._document_ids())
    free_space(monkeypatch, L.session_bytes(tokens) - 1)
    target = saved.path.parent / "new" / "doc"
    with pytest.raises(SessionError, match=f"cannot save session to {target}: the save writes "
                       "at least .*, and .* free$"):  # fmt: skip
        rt.save_session(target)
    assert not (saved.path.parent / "new").exists()
    with pytest.raises(SessionError, match="the save writes at least"):
        rt.save_session(saved.path, replace=True)
    assert open_session(saved.path).token_ids == saved.token_ids
    # Loaded, its chunk files are linked: the summaries and abstracts are what it writes.
    free_space(monkeypatch, L.session_bytes(len(saved.token_ids)) // 2)
    loaded = Runtime.load_session(saved.path, model=tiny)
    loaded.save_session(saved.path)
    assert open_session(saved.path).token_ids == saved.token_ids
