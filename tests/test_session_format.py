"""The session format: the abstracts in a file of their own that the load does not wait
for, tensor files hashed in blocks checked side by side, and format-1 sessions (before
2026-12-02: abstracts inside device.safetensors, files hashed whole) still loading."""

import json
import threading

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file, save_file

import storage.hashing
import storage.manifest
from offload import Runtime
from storage.disk import META_KEY, StorageError
from storage.session import OpenedSession, SessionError, open_session, sha256_file
from tests.conftest import filler_text, rewrite_manifest
from tests.test_sessions import doc_runtime, flip_byte, tiny  # helpers and a fixture


def _abstracts(rt):
    return [dev.abstracts() for dev in rt._state.cache.store.dev]


def _same_abstracts(a, b):
    for x, y in zip(a, b, strict=True):
        for key in ("kmin", "kmax", "kmean"):
            assert torch.equal(getattr(x, key), getattr(y, key))


def test_the_load_does_not_wait_for_the_abstracts(tiny, tmp_path, monkeypatch):
    """They are read when first asked for, which no question does; questions append and
    cut meanwhile, and once they are read, every chunk's abstracts are those of the
    runtime that saved the session."""
    rt = doc_runtime(tiny, filler_text(60, seed=1))
    rt.save_session(tmp_path / "s")
    release = threading.Event()
    real = OpenedSession.abstract_tensors

    def held(self):
        assert release.wait(60), "the load waited for the abstracts"
        return real(self)

    monkeypatch.setattr(OpenedSession, "abstract_tensors", held)
    loaded = Runtime.load_session(tmp_path / "s", model=tiny)
    store = loaded._state.cache.store
    for question in ("seven stones", "green market"):
        assert loaded.ask(question, max_new_tokens=6) == rt.ask(question, max_new_tokens=6)
    assert all(dev._pending is not None for dev in store.dev)  # not read yet
    assert store.num_tokens == rt._state.cache.num_tokens > store.layout.chunk_size
    release.set()
    _same_abstracts(_abstracts(loaded), _abstracts(rt))


def test_a_damaged_abstracts_file_is_named_where_they_are_read(tiny, tmp_path):
    """The load and the questions do not read the abstracts (only the chunk selector,
    spills and saves do): the first read names the file, and a save leaves nothing (not
    even the folder it created)."""
    rt = doc_runtime(tiny, filler_text(60, seed=2))
    want = rt.ask("seven stones", max_new_tokens=6)
    rt.save_session(tmp_path / "s")
    f = open_session(tmp_path / "s").version_dir / "abstracts.safetensors"
    flip_byte(f, f.stat().st_size - 10)
    loaded = Runtime.load_session(tmp_path / "s", model=tiny)
    assert loaded.ask("seven stones", max_new_tokens=6) == want
    with pytest.raises(SessionError, match="abstracts.safetensors: checksum mismatch"):
        loaded.save_session(tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_tensor_files_are_hashed_in_blocks(tiny, tmp_path, monkeypatch):
    for module in (storage.manifest, storage.hashing):
        monkeypatch.setattr(module, "HASH_BLOCK", 1024)
    rt = doc_runtime(tiny, filler_text(60, seed=3))
    want = rt.ask("seven stones", max_new_tokens=6)
    rt.save_session(tmp_path / "s")
    saved = open_session(tmp_path / "s")
    f = saved.version_dir / "device.safetensors"
    blocks = saved.manifest["files"]["device.safetensors"]["sha256_blocks"]
    assert len(blocks) == -(-f.stat().st_size // 1024) > 2
    assert (
        Runtime.load_session(tmp_path / "s", model=tiny).ask("seven stones", max_new_tokens=6)
        == want
    )
    flip_byte(f, 1024 + 100)  # the second block
    with pytest.raises(SessionError, match="device.safetensors: checksum mismatch"):
        Runtime.load_session(tmp_path / "s", model=tiny)


def _as_format_1(saved) -> None:
    """Rewrite a saved session as format 1 wrote it."""
    device = saved.version_dir / "device.safetensors"
    abstracts = saved.version_dir / "abstracts.safetensors"
    tensors = {**load_file(device), **load_file(abstracts)}
    save_file(tensors, device, metadata={"meta": "{}"})
    abstracts.unlink()

    def change(m):
        m["format_version"] = 1
        del m["files"]["abstracts.safetensors"]
        for name, f in m["files"].items():
            if name.startswith("kv/"):
                first, n = f.pop("first_chunk"), f.pop("num_chunks")
                f["chunks"] = list(range(first, first + n))
                f.pop("crc32_sha256")
                meta = pa.ipc.open_file(str(saved.version_dir / name)).schema.metadata
                f["crc32"] = json.loads(meta[META_KEY])["crc32"]
        for name in list(m["files"]):
            if name.endswith(".safetensors"):
                path = saved.version_dir / name
                m["files"][name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}

    rewrite_manifest(saved, change)


def test_format_1_sessions_still_load(tiny, tmp_path):
    rt = doc_runtime(tiny, filler_text(60, seed=4))
    rt.save_session(tmp_path / "s")
    want = rt.ask("seven stones", max_new_tokens=6)
    saved = open_session(tmp_path / "s")
    _as_format_1(saved)
    assert json.loads((saved.version_dir / "manifest.json").read_text())["format_version"] == 1
    loaded = Runtime.load_session(tmp_path / "s", model=tiny)
    assert loaded.ask("seven stones", max_new_tokens=6) == want
    _same_abstracts(_abstracts(loaded), _abstracts(rt))
    loaded.save_session(tmp_path / "s")  # saved again: format 2
    again = open_session(tmp_path / "s")
    assert again.manifest["format_version"] == 2
    assert (
        Runtime.load_session(tmp_path / "s", model=tiny).ask("seven stones", max_new_tokens=6)
        == want
    )


def test_chunk_files_must_hold_the_crc32s_the_manifest_names(tiny, tmp_path):
    rt = doc_runtime(tiny, filler_text(60, seed=5))
    rt.save_session(tmp_path / "s")
    saved = open_session(tmp_path / "s")
    entry = saved.chunk_files()[1]
    rewrite_manifest(saved, lambda m: m["files"][entry["name"]].update(crc32_sha256="0" * 64))
    with pytest.raises(StorageError, match="its chunk checksums differ from the manifest's"):
        Runtime.load_session(tmp_path / "s", model=tiny)


def test_cuts_and_appends_before_the_abstracts_are_read():
    """A cut below the saved chunks (a prompt that shares only part of a loaded session)
    and appends after it, before the saved abstracts are read (once, when first asked
    for): then every chunk's abstracts are those of a tier that had them all along."""
    from storage.abstracts import SavedAbstracts, chunk_abstracts
    from storage.device import DeviceTier
    from storage.layout import KVLayout

    L = KVLayout(num_layers=1, num_kv_heads=2, head_dim=8, dtype="float32", chunk_size=4)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 40, 8, generator=g)  # 10 chunks saved
    more = torch.randn(2, 12, 8, generator=g)  # 3 chunks after the cut
    want = DeviceTier(L, torch.float32, "cpu", 4, 8)
    want.add_chunks(keys)
    want.truncate_chunks(7)
    want.add_chunks(more)
    tier = DeviceTier(L, torch.float32, "cpu", 4, 8)
    tier.codes.append(want.codes.view()[:, :40])  # (the summaries come with the load)
    for g_, w in ((tier.scale, want.scale), (tier.zero, want.zero)):
        g_.append(w.view()[:, :10])
    saved = chunk_abstracts(keys, 4)
    reads = []

    def read():
        reads.append(1)
        return {f"L0.{k}": getattr(saved, k) for k in ("kmin", "kmax", "kmean")}

    tier.abstracts_later(SavedAbstracts(read).layer(0), 10, 12)
    tier.truncate_chunks(7)
    tier.add_chunks(more)
    assert tier.num_chunks == 10 and tier._pending is not None and not reads
    got, ref = tier.abstracts(), want.abstracts()
    assert reads == [1]
    for key in ("kmin", "kmax", "kmean"):
        assert torch.equal(getattr(got, key), getattr(ref, key))


def test_the_abstracts_read_late_are_the_loaded_versions_after_another_save(tiny, tmp_path):
    """A session is loaded, then saved over by another runtime (as another process would),
    which removes the loaded version's files; the loaded runtime's first read of its
    abstracts (here its own save) still reads the version it loaded, which the load
    held open (and its chunk files are mapped)."""
    rt = doc_runtime(tiny, filler_text(60, seed=1))
    rt.save_session(tmp_path / "s")
    loaded = Runtime.load_session(tmp_path / "s", model=tiny)
    first = open_session(tmp_path / "s").version_dir
    doc_runtime(tiny, filler_text(40, seed=5)).save_session(tmp_path / "s", replace=True)
    assert not first.exists()
    loaded.save_session(tmp_path / "t")
    again = Runtime.load_session(tmp_path / "t", model=tiny)
    _same_abstracts(_abstracts(again), _abstracts(rt))


@pytest.mark.parametrize("linkable", [True, False])
def test_a_session_saved_again_links_its_unchanged_chunk_files(
    tiny, tmp_path, monkeypatch, linkable
):
    """A chat resumed from a session, a turn, and a save over it: every chunk file of the
    old version whose chunks are unchanged is hard-linked into the new one, not written
    again; the files of the new chunks are written. Where a link fails (another file
    system) all are written. Either way the session resumes the chat as it was."""
    import storage.saving

    monkeypatch.setattr(storage.saving, "MAX_CHUNKS_PER_FILE", 4)
    if not linkable:
        monkeypatch.setattr(
            storage.session.os,
            "link",
            lambda *a: (_ for _ in ()).throw(OSError(18, "Invalid cross-device link")),
        )
    a = Runtime(tiny.loaded, tiny.config.replace(chunk_size=2), tiny.device).chat(system="sys")
    a.send(filler_text(40, seed=4), max_new_tokens=5)
    a.save(tmp_path / "c")
    old = open_session(tmp_path / "c")
    old_files = {(old.version_dir / f["name"]).stat().st_ino: f for f in old.chunk_files()}
    b = Runtime.load_session(tmp_path / "c", model=tiny).resume_chat()
    b.send("seven stones", max_new_tokens=5)
    b.save(tmp_path / "c")
    new = open_session(tmp_path / "c")
    assert new.version_dir != old.version_dir and not old.version_dir.exists()
    files = new.chunk_files()
    linked = [f for f in files if (new.version_dir / f["name"]).stat().st_ino in old_files]
    full = [f for f in old_files.values() if f["num_chunks"] == 4]  # (a partial one grew)
    if linkable:
        assert len(full) > 2 * tiny.args.num_layers and len(linked) == len(full)
        assert sorted(f["name"] for f in linked) == sorted(f["name"] for f in full)
    else:
        assert not linked
    assert len(files) > len(old_files)  # the turn's chunks in files of their own
    want = b.send("green market", max_new_tokens=5)
    c = Runtime.load_session(tmp_path / "c", model=tiny).resume_chat()
    assert c.messages == b.messages[:-2]
    assert c.send("green market", max_new_tokens=5) == want
