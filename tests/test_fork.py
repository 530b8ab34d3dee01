"""A runtime loaded before a fork (a server's workers forked after the model was
loaded, multiprocessing's "fork"), used in the child: it answers there as in the
parent, and the parent's spilled KV is left alone. A runtime sent to another process
(pickled, as "spawn" does) is one clear error at once.

Before, the child's first request waited for good: torch's OpenMP pool (the main
thread's, which had computed) does not survive a fork, so the first parallel
operation in the child's main thread waited for the parent's pool threads; and a
tiered cache closed in the child deleted the parent's spill files."""

import copy
import json
import os
import pickle
import select
import signal
import threading
import time

import pytest
import torch

from offload import ConfigError, OffloadError, Runtime
from offload.backend import pick_device
from offload.conversation import KVState, Requests
from storage import threads

ASK = dict(max_new_tokens=8, temperature=0)
PROMPT = "Name three colors."
CHILD_SECONDS = 120  # a child that has not answered by then waits for good (the bug)


def in_child(work) -> dict:
    """`work()` in a child forked from this process: what it returned (JSON), or the
    error it raised; a child that does not answer in time is killed, and that fails."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # (the child never returns into pytest)
        try:
            os.close(read)
            try:
                out = {"result": work()}
            except BaseException as e:
                out = {"error": f"{type(e).__name__}: {e}"}
            os.write(write, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], CHILD_SECONDS)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the forked child did not answer in {CHILD_SECONDS} s")
        data = b""
        while chunk := os.read(read, 1 << 16):
            data += chunk
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def rt(smol_cpu):
    """The embedded model on two threads (not following the cores other processes leave
    free, as `smol_cpu` does: with one, torch makes no pool, and a fork loses none)."""
    was = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.ones(1 << 22).sum()  # (this thread has computed in parallel: it has a pool)
    yield Runtime(smol_cpu.loaded, smol_cpu.config, smol_cpu.device)
    torch.set_num_threads(was)


def test_a_runtime_loaded_before_a_fork_answers_in_the_child(rt):
    want = rt.generate(PROMPT, **ASK)

    def child():
        mine = rt.generate(PROMPT, **ASK)  # (the main thread)
        answers = []
        worker = threading.Thread(target=lambda: answers.append(rt.generate(PROMPT, **ASK)))
        worker.start()
        worker.join(CHILD_SECONDS)
        return [mine, *answers]

    assert in_child(child) == {"result": [want, want]}
    assert rt.generate(PROMPT, **ASK) == want  # (the parent goes on as before)


def test_a_tiered_cache_is_renewed_in_the_child_and_the_parents_files_stay(rt, tmp_path):
    """The parent's cache spilled to disk; the child renews it (its own directory), and
    closing it there deletes none of the parent's files."""
    cfg = rt.config.replace(
        mode="dense", host_bytes=4 * rt.layout.chunk_bytes * rt.args.num_layers,
        disk_dir=str(tmp_path), spill_batch=2,
    )  # fmt: skip
    rt = Runtime(rt.loaded, cfg, rt.device)
    prompt = "Seven quiet stones lie by the river. " * 12 + PROMPT
    want = rt.generate(prompt, **ASK)
    assert rt.stats()["spilled_chunks"] > 0
    parents = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def child():
        answer = rt.generate(prompt, **ASK)
        renewed = rt._state.cache.store.disk.directory != tmp_path / parents[0]
        rt.close()
        return [answer, renewed]

    assert in_child(child) == {"result": [want, True]}
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == parents
    assert rt.generate(prompt, **ASK) == want  # (reading its spilled chunks again)
    rt.close()


def test_a_cache_held_in_memory_is_kept_in_the_child(rt):
    """(Copy-on-write: the child's next turn reuses the parent's KV of the first.)"""
    conv = rt.chat(system="Be brief.")
    conv.send(PROMPT, **ASK)

    def child():
        answer = conv.send("And three fruits?", **ASK)
        return [answer, rt.stats()["reused_tokens"] > 0]

    got = in_child(child)
    assert got == {"result": [conv.send("And three fruits?", **ASK), True]}


def test_a_session_loaded_before_the_fork_is_asked_about_in_the_child(rt, tmp_path):
    """A document session (its cache tiered: renewed in the child) is read again from its
    files in the child, so its first question prefills the question alone, as in the
    parent (before, the document again: 4.8 s for 4k tokens against 0.6). Saved again
    since, the session is not what the parent held: the document is prefilled again."""
    rt.load_document("Seven quiet stones lie by the river. " * 20)
    rt.save_session(tmp_path / "doc")
    loaded = Runtime.load_session(tmp_path / "doc", model=rt)
    document = loaded.stats()["context_tokens"]
    assert loaded._state.cache.store is not None  # (tiered: the child renews it)
    questions = ("How many stones?", "Where are they?")

    def child():
        answers, reused = [], []
        for q in questions:
            answers.append(loaded.ask(q, **ASK))
            reused.append(loaded.stats()["reused_tokens"] == document)
        return [answers, reused]

    want = [[loaded.ask(q, **ASK) for q in questions], [True, True]]
    assert in_child(child) == {"result": want}
    loaded.save_session(tmp_path / "doc")  # (a new version of the session)
    again = Runtime.load_session(tmp_path / "doc", model=rt)
    rt.save_session(tmp_path / "doc", replace=True)  # (not the version `again` read)
    assert in_child(lambda: [again.ask(questions[0], **ASK), again.stats()["reused_tokens"]]) == {
        "result": [want[0][0], 0]
    }


def test_a_cuda_model_in_a_forked_child_is_one_clear_error(monkeypatch):
    """(CUDA does not survive a fork; torch's own error would come from deep inside.)"""
    requests = Requests(cuda=True)
    monkeypatch.setattr(threads, "_forked", True)
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(OffloadError, match="CUDA does not survive a fork.*spawn"):
        requests.run(time.time)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="model.device 'auto': CUDA was in use"):
        pick_device("auto")  # (a model loaded in the child)


def test_a_state_a_request_was_running_on_at_the_fork_is_renewed():
    """(The thread running it is not in the child: its cache may be half written.)"""

    class Cache:
        store, num_tokens = None, 3

        def __init__(self):
            self.fresh = Cache

    state = KVState(Cache())
    state.ids, state.busy, state.pid = [1, 2, 3], 12345, -1  # (as a fork leaves it)
    old = state.cache
    state.adopt()
    assert state.cache is not old and state.ids == [] and state.busy is None
    assert state.pid == os.getpid()


def test_a_runtime_or_conversation_sent_to_another_process_is_one_clear_error(smol_cpu):
    """Before: seconds spent pickling the weights, then "cannot pickle '_thread.RLock'"."""
    with pytest.raises(TypeError, match="a Runtime cannot be pickled.*from_pretrained"):
        pickle.dumps(smol_cpu.generate)  # (what `pool.map(rt.generate, ...)` sends)
    with pytest.raises(TypeError, match="a Conversation cannot be pickled.*conv.save"):
        copy.deepcopy(smol_cpu.chat())
