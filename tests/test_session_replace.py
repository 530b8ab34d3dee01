"""A save never replaces what it was not asked to: another session in its directory (only
with `replace`, `--replace`, `/save --replace`), nor anything in a directory that is not
a session's. A save into the session an object was loaded from or last saved to
continues it and needs no asking, unless another saver saved there since."""

import os

import pytest
from click.testing import CliRunner

import cli.chat
from cli.main import main
from offload import OffloadError, Runtime
from storage.errors import SessionExistsError
from storage.session import SessionError, open_session
from tests.conftest import filler_text
from tests.test_sessions import doc_runtime, tiny  # noqa: F401 (a helper and a fixture)


def listing(path) -> dict:
    """Every entry under `path` with its size (directories: None)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, path)] = None if os.path.isdir(p) else os.path.getsize(p)
    return out


def test_a_save_replaces_another_session_only_when_asked(tiny, tmp_path):  # noqa: F811
    p = tmp_path / "s"
    first = doc_runtime(tiny, filler_text(40, seed=1))
    first.save_session(p)
    kept = open_session(p).token_ids
    other = doc_runtime(tiny, filler_text(50, seed=2))
    with pytest.raises(SessionExistsError, match=r"already holds a saved session.*replace=True"):
        other.save_session(p)
    assert open_session(p).token_ids == kept
    first.save_session(p)  # its own: saved again
    other.save_session(p, replace=True)
    assert open_session(p).token_ids == other._document_ids()
    other.save_session(p)  # now its own too
    # A loaded document session saves back where it came from; another document does not.
    loaded = Runtime.load_session(p, model=tiny)
    loaded.save_session(p)
    loaded.load_document(filler_text(30, seed=3))
    with pytest.raises(SessionExistsError):
        loaded.save_session(p)
    assert open_session(p).token_ids == other._document_ids()


def test_a_chat_saves_again_where_it_was_saved_or_resumed_from(tiny, tmp_path):  # noqa: F811
    doc = tmp_path / "doc"
    doc_runtime(tiny, filler_text(40, seed=4)).save_session(doc)
    chat = Runtime(tiny.loaded, tiny.config, tiny.device).chat(system="sys")
    chat.send("the river", max_new_tokens=3)
    chat.save(tmp_path / "c")
    chat.send("seven stones", max_new_tokens=3)
    chat.save(tmp_path / "c")
    rt = Runtime.load_session(tmp_path / "c", model=tiny)
    resumed = rt.resume_chat()
    with pytest.raises(OffloadError, match="holds no KV .* went to a conversation"):
        rt.save_session(tmp_path / "c")  # (its KV went to the conversation)
    rt.generate("a prompt", max_new_tokens=2)
    with pytest.raises(SessionExistsError):
        rt.save_session(tmp_path / "c")  # (nor does it continue that session)
    assert resumed.messages == chat.messages
    resumed.send("and then?", max_new_tokens=3)
    resumed.save(tmp_path / "c")
    with pytest.raises(SessionExistsError):
        resumed.save(doc)  # a document session is not this chat's
    assert open_session(doc).manifest["kind"] == "document"
    # A chat about a document session is not that session: its save goes elsewhere.
    about = Runtime.load_session(doc, model=tiny).chat_about_document()
    about.send("how many stones?", max_new_tokens=3)
    with pytest.raises(SessionExistsError):
        about.save(doc)
    about.save(doc, replace=True)
    assert open_session(doc).manifest["kind"] == "chat"
    # The runtime it came from still saves its document whole (read again: its KV went).
    about.runtime.save_session(tmp_path / "again")
    assert open_session(tmp_path / "again").token_ids == about.runtime._document_ids()


def test_a_directory_that_is_not_a_session_is_left_alone(tiny, tmp_path):  # noqa: F811
    """A user's folder (here with a file named like the session's pointer and a folder
    named like a version) is refused, `replace` or not, and nothing is written in it."""
    d = tmp_path / "mine"
    (d / "v-2024-photos").mkdir(parents=True)
    (d / "v-2024-photos" / "a.jpg").write_bytes(b"jpeg")
    (d / "CURRENT").write_text("my notes")
    before = listing(d)
    rt = doc_runtime(tiny, filler_text(30, seed=5))
    for replace in (False, True):
        with pytest.raises(
            SessionError, match=r"not a session directory \(it holds 'v-2024-photos'\)"
        ):
            rt.save_session(d, replace=replace)
    assert listing(d) == before
    # What a killed save leaves in a session folder is the session's own: a save goes on.
    s = tmp_path / "s"
    s.mkdir()
    (s / "v-0123456789ab.tmp").mkdir()
    for name in (".lock", ".CURRENT.0123abcd.tmp"):
        (s / name).write_text("")
    rt.save_session(s)
    assert not (s / "v-0123456789ab.tmp").exists()
    assert open_session(s).token_ids == rt._document_ids()
    # A session whose user keeps a file beside it is still a session: saved again there.
    (s / "notes.txt").write_text("mine")
    rt.save_session(s)
    with pytest.raises(SessionExistsError):
        doc_runtime(tiny, filler_text(20, seed=8)).save_session(s)
    assert (s / "notes.txt").read_text() == "mine"


def test_ingest_and_chat_save_say_how_to_replace_a_session(tiny, tmp_path):  # noqa: F811
    args = ["-m", str(tiny.loaded.source), "--set", "dtype=float32"]
    doc, s = tmp_path / "doc.md", tmp_path / "s"
    doc.write_text("The lighthouse keeper counts seven stones every morning. " * 3)
    runner = CliRunner()
    r = runner.invoke(main, ["ingest", str(doc), "--session", str(s), *args])
    assert r.exit_code == 0, r.output
    kept = listing(s)
    r = runner.invoke(main, ["ingest", str(doc), "--session", str(s), *args])
    assert r.exit_code == 2
    assert r.output.replace("\n", "") == (
        f"error: {s} already holds a saved session, which was kept: pass --replace to replace it"
    )
    assert listing(s) == kept
    r = runner.invoke(main, ["ingest", str(doc), "--session", str(s), "--replace", *args])
    assert r.exit_code == 0, r.output
    turns = ["hello", f"/save {s}", f"/save --replace {s}", "/save --replace", "/exit"]
    r = runner.invoke(main, ["chat", *args, "-n", "2"], input="\n".join(turns) + "\n")
    assert r.exit_code == 0, r.output
    out = r.output.replace("\n", "")  # (rich wraps at 80 columns)
    assert f"already holds a saved session, which was kept: /save --replace {s} replaces it" in out
    assert out.count(f"to {s} in") == 1 and "usage: /save [--replace] DIR" in out
    assert open_session(s).manifest["kind"] == "chat"


def test_a_session_saved_meanwhile_by_another_process_is_kept(tiny, tmp_path, monkeypatch):  # noqa: F811
    """The check is made again under the session's lock: a save into a new directory that
    another saver fills first (after this one looked, before it locked) is refused."""
    import storage.session as ss

    p = tmp_path / "s"
    theirs, ours = (
        doc_runtime(tiny, filler_text(40, seed=6)),
        doc_runtime(tiny, filler_text(30, seed=7)),
    )
    prepare = ss.prepare_dir

    def meanwhile(path, replace=False, continues=None, room=0):
        out = prepare(path, replace, continues, room)
        monkeypatch.setattr(ss, "prepare_dir", prepare)
        theirs.save_session(p, replace=True)  # (the other saver, between our look and lock)
        return out

    monkeypatch.setattr(ss, "prepare_dir", meanwhile)
    with pytest.raises(SessionExistsError, match="already holds"):
        ours.save_session(p)
    assert open_session(p).token_ids == theirs._document_ids()
    # The same for a save that continues its own session (loaded from there).
    ours = Runtime.load_session(p, model=tiny)
    theirs = doc_runtime(tiny, filler_text(30, seed=7))
    monkeypatch.setattr(ss, "prepare_dir", meanwhile)
    with pytest.raises(SessionExistsError, match="saved again since"):
        ours.save_session(p)
    assert open_session(p).token_ids == theirs._document_ids()


def test_a_save_continues_its_session_only_as_it_left_it(tiny, tmp_path, monkeypatch):  # noqa: F811
    """Two processes resume one chat session: the first `/save` there continues it; the
    second, which would replace that save with a conversation without its turns, is
    refused unless asked (and says why); an object that saved there last continues it."""
    p = tmp_path / "c"
    chat = Runtime(tiny.loaded, tiny.config, tiny.device).chat(system="sys")
    chat.send("the river", max_new_tokens=3)
    chat.save(p)
    a = Runtime.load_session(p, model=tiny).resume_chat()
    b = Runtime.load_session(p, model=tiny).resume_chat()
    a.send("seven stones", max_new_tokens=3)
    a.save(p)
    b.send("a lighthouse", max_new_tokens=3)
    with pytest.raises(SessionExistsError, match=r"saved again since this session was loaded "
                       r"from it or saved to it .*, and that save was kept: pass replace=True"):  # fmt: skip
        b.save(p)
    assert open_session(p).manifest["messages"] == a.messages
    a.send("and then?", max_new_tokens=3)
    a.save(p)  # (still its own, as it left it)
    b.save(p, replace=True)
    b.save(p)
    assert open_session(p).manifest["messages"] == b.messages
    with pytest.raises(SessionExistsError, match="saved again"):
        a.save(p)
    # `offload chat --session` resumed there, and `b` saving while it answers: its `/save`
    # says what happened and how to replace it.
    answer = cli.chat.answer

    def answer_while_b_saves(*args, **kwargs):
        answer(*args, **kwargs)
        b.send("the tower", max_new_tokens=3)
        b.save(p)

    monkeypatch.setattr(cli.chat, "answer", answer_while_b_saves)
    args = ["chat", "--session", str(p), "-m", str(tiny.loaded.source), "-n", "2"]
    turns = ["hello", f"/save {p}", "/exit"]
    r = CliRunner().invoke(main, args, input="\n".join(turns) + "\n", env={"COLUMNS": "1000"})
    assert r.exit_code == 0, r.output
    assert f"{p} was saved again since" in r.output and f"/save --replace {p} replaces" in r.output
    assert open_session(p).manifest["messages"] == b.messages
