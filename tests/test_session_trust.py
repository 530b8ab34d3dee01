"""A session folder may come from someone else: nothing in it names a path outside it,
chooses the model or a folder to write, or is used before it is checked."""

from pathlib import Path

import pytest

from offload import Runtime
from storage.disk import StorageError
from storage.session import SessionError, open_session
from tests.conftest import filler_text, rewrite_manifest
from tests.test_sessions import doc_runtime, saved, tiny  # fixtures and a helper


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))}


@pytest.fixture
def outside(tmp_path):
    """A folder beside the session with a valid-looking version of its own."""
    d = tmp_path / "outside"
    (d / "v-000000000000").mkdir(parents=True)
    (d / "secret.arrow").write_bytes(b"x" * 64)
    return d


@pytest.mark.parametrize(
    "current",
    ["../outside/v-000000000000", "/etc", "v-../../outside", b"\xff\xfe", "v-ABC", "x" * 100],
)
def test_current_must_name_a_version_folder_inside(saved, outside, current):
    before = tree(outside)
    (saved.path / "CURRENT").write_bytes(
        current if isinstance(current, bytes) else current.encode()
    )
    with pytest.raises(SessionError, match="CURRENT|bytes, more than"):
        open_session(saved.path)
    assert tree(outside) == before


def test_symlinks_are_refused_everywhere(tiny, saved, outside, tmp_path):
    v = saved.version_dir
    # CURRENT as a link
    (saved.path / "CURRENT").rename(tmp_path / "C")
    (saved.path / "CURRENT").symlink_to(tmp_path / "C")
    with pytest.raises(SessionError, match="CURRENT: is a symbolic link"):
        open_session(saved.path)
    (saved.path / "CURRENT").unlink()
    (tmp_path / "C").rename(saved.path / "CURRENT")
    # a chunk file, device.safetensors, the kv folder, the version folder as links
    for rel in [saved.chunk_files()[0]["name"], "device.safetensors", "kv"]:
        target = outside / rel.replace("/", "_")
        (v / rel).rename(target)
        (v / rel).symlink_to(target)
        with pytest.raises(SessionError, match=f"{rel}: is a symbolic link"):
            open_session(saved.path)
        (v / rel).unlink()
        target.rename(v / rel)
    open_session(saved.path)  # restored: it loads
    v.rename(outside / v.name)
    v.symlink_to(outside / v.name)
    with pytest.raises(SessionError, match=f"{v.name}: is a symbolic link"):
        open_session(saved.path)
    v.unlink()
    (outside / v.name).rename(v)
    # a linked .lock must not make a save create its target outside
    (saved.path / ".lock").unlink(missing_ok=True)
    (saved.path / ".lock").symlink_to(outside / "created-by-save")
    rt = doc_runtime(tiny, filler_text(30, seed=9))
    with pytest.raises(SessionError, match="lock"):
        rt.save_session(saved.path, replace=True)
    assert not (outside / "created-by-save").exists()


@pytest.mark.parametrize(
    "name", ["../../outside/secret.arrow", "/etc/passwd", "kv/../../outside/secret.arrow",
             "kv/L000-0000000-deadbeef.arrow/../../x", "manifest.json"],
)  # fmt: skip
def test_manifest_file_names_cannot_leave_the_folder(saved, name):
    def change(m):
        first = next(k for k in m["files"] if k.startswith("kv/"))
        m["files"][name] = m["files"].pop(first)

    rewrite_manifest(saved, change)
    with pytest.raises(SessionError, match="is not a name a session uses"):
        open_session(saved.path)


def test_swapped_chunk_files_are_refused_by_the_layer_they_hold(tiny, saved):
    """Two chunk files of different layers swapped, their sizes in the manifest swapped
    too (as an attacker can): each file's own metadata names its layer."""
    fa, fb = saved.chunk_files()[:2]
    a, b = saved.version_dir / fa["name"], saved.version_dir / fb["name"]
    assert fa["layer"] != fb["layer"]
    tmp = a.with_suffix(".swap")
    a.rename(tmp), b.rename(a), tmp.rename(b)

    def change(m):
        files = m["files"]
        files[fa["name"]]["size"], files[fb["name"]]["size"] = fb["size"], fa["size"]

    rewrite_manifest(saved, change)
    with pytest.raises(StorageError, match="holds layer 1.*the manifest says layer 0"):
        Runtime.load_session(saved.path, model=tiny)


def test_the_session_does_not_choose_the_model_nor_a_folder_to_write(
    tiny, saved, outside, monkeypatch
):
    decoy = outside / "model.gguf"
    disk_dir = outside / "made-by-load"

    def change(m):
        m["model"]["source"] = str(decoy)
        m["config"]["kv"]["disk_dir"] = str(disk_dir)
        m["config"]["model"]["threads"] = 1

    rewrite_manifest(saved, change)
    opened = []
    real = Runtime.from_pretrained
    monkeypatch.setattr(
        Runtime, "from_pretrained", lambda src, **kw: opened.append(src) or real(src, **kw)
    )
    with pytest.raises(SessionError, match="made with another model"):
        Runtime.load_session(saved.path)  # no model named: the default one, not the decoy
    assert opened == ["smollm2"]
    loaded = Runtime.load_session(saved.path, model=str(tiny.loaded.source))
    loaded.ask("seven", max_new_tokens=2)
    assert loaded.config.kv.disk_dir is None and loaded.config.model.threads == 0
    assert not disk_dir.exists()


TAMPERINGS = {
    "no files": lambda m: m.pop("files"),
    "no model": lambda m: m.pop("model"),
    "no layout": lambda m: m.pop("layout"),
    "no config": lambda m: m.pop("config"),
    "no token_ids": lambda m: m.pop("token_ids"),
    "zero tokens": lambda m: m.update(num_tokens=0),
    "10^12 tokens": lambda m: m.update(num_tokens=10**12),
    "evil dtype": lambda m: m["layout"].update(dtype="evil"),
    "string size": lambda m: next(iter(m["files"].values())).update(size="12"),
    "ids and count disagree": lambda m: m["token_ids"].pop(),
    "a chunk missing": lambda m: next(f for f in m["files"].values() if "num_chunks" in f).update(num_chunks=1),
    "a huge chunk range": lambda m: next(f for f in m["files"].values() if "num_chunks" in f).update(num_chunks=1 << 24),
    "overlapping ranges": lambda m: m["files"].update({"kv/L000-0000000-deadbeef.arrow": dict(next(f for f in m["files"].values() if f.get("layer") == 0))}),
    "format 1 chunk list": lambda m: next(f for f in m["files"].values() if "num_chunks" in f).update(chunks=[0]),
    "a list": lambda m: m.update(layout=[1, 2]),
    "bad message": lambda m: m.update(kind="chat", messages=[{"role": "root", "content": 1}]),
    "more pinned than messages": lambda m: m.update(kind="chat", messages=[], pinned_messages=1),
    "no abstracts file": lambda m: m["files"].pop("abstracts.safetensors"),
    "a block hash missing": lambda m: m["files"]["device.safetensors"]["sha256_blocks"].pop(),
    "format 1 with blocks": lambda m: m.update(format_version=1),
}  # fmt: skip


@pytest.mark.parametrize("what", TAMPERINGS)
def test_tampered_manifests_get_one_clear_error(saved, what):
    rewrite_manifest(saved, TAMPERINGS[what])
    with pytest.raises(SessionError, match="manifest.json: manifest is invalid"):
        open_session(saved.path)


def test_device_tensors_are_checked(tiny, saved):
    from safetensors.torch import load_file, save_file

    from storage.session import file_entry

    path = saved.version_dir / "device.safetensors"
    tensors = load_file(path)
    tensors.pop("L1.scale")
    save_file(tensors, path, metadata={"meta": "{}"})

    def change(m):
        m["files"]["device.safetensors"] = file_entry(path)

    rewrite_manifest(saved, change)
    with pytest.raises(SessionError, match="tensor L1.scale is missing"):
        Runtime.load_session(saved.path, model=tiny)
