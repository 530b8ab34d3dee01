"""Requests on one model from threads (a GUI's worker, a web server's handlers): one
step at a time, other threads' on one compute thread; one request at a time on a cache,
another waiting its turn; streams on different caches take turns step by step, in
threads or read in turn in one thread; in the main thread, a second request on the
cache a stream of its own is reading is refused."""

import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from offload import OffloadError, Runtime

MODEL = "llama-gqa-untied"
ASK = dict(max_new_tokens=10, temperature=0)


@pytest.fixture
def rt(tiny_dirs):
    return Runtime.from_pretrained(tiny_dirs[MODEL][0], dtype="float32")


def alone(tiny_dirs, *turns: str) -> list[str]:
    """Each turn's answer, one after the other, on a fresh runtime's chat."""
    conv = Runtime.from_pretrained(tiny_dirs[MODEL][0], dtype="float32").chat(system="sys")
    return [conv.send(turn, **ASK) for turn in turns]


def started(steps, n: int = 3) -> list[str]:
    return [next(steps).text for _ in range(n)]


def in_thread(work) -> tuple[threading.Thread, dict]:
    """`work()` on a thread; its result or error lands in the dict."""
    out: dict = {}

    def run():
        try:
            out["result"] = work()
        except Exception as e:  # (the test names it)
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_request_from_another_thread_waits_for_the_running_one(rt, tiny_dirs):
    """Before, both ran at once on one cache and both answers were garbage."""
    steps = rt.stream("ab cd ef", **ASK)
    first = started(steps)
    thread, out = in_thread(lambda: rt.generate("gh ij", **ASK))
    thread.join(0.3)
    assert thread.is_alive() and not out  # (waiting: the stream holds the cache)
    first += [s.text for s in steps]
    thread.join(30)
    assert not thread.is_alive() and "error" not in out
    want = [Runtime.from_pretrained(tiny_dirs[MODEL][0], dtype="float32").generate(p, **ASK)
            for p in ("ab cd ef", "gh ij")]  # fmt: skip
    assert ["".join(first), out["result"]] == want


def test_a_conversation_takes_turns_from_two_threads_in_order(rt, tiny_dirs):
    """The second thread's turn is made from the messages as they are when it starts: the
    first exchange is in its history, and both stay in the conversation."""
    conv = rt.chat(system="sys")
    steps = conv.stream("ab cd ef", **ASK)
    said = started(steps)
    thread, out = in_thread(lambda: conv.send("gh ij", **ASK))
    thread.join(0.3)
    assert thread.is_alive()
    said += [s.text for s in steps]
    thread.join(30)
    assert "error" not in out
    assert ["".join(said), out["result"]] == alone(tiny_dirs, "ab cd ef", "gh ij")
    assert [m["content"] for m in conv.messages[1::2]] == ["ab cd ef", "gh ij"]


def test_two_streams_read_in_turn_on_one_cache_are_refused(rt):
    """In one thread, a second request on the cache a stream is still reading would cut
    that stream's KV away: one error, and the stream goes on as if alone."""
    steps = rt.stream("ab cd ef", **ASK)
    first = started(steps)
    with pytest.raises(OffloadError, match="in the middle of another request.*close"):
        rt.generate("gh ij", **ASK)
    with pytest.raises(OffloadError, match="in the middle of another request"):
        rt.save_session("unused")
    first += [s.text for s in steps]
    alone_rt = Runtime.from_pretrained(rt.loaded.source, dtype="float32")
    assert "".join(first) == alone_rt.generate("ab cd ef", **ASK)
    steps = rt.stream("gh ij", **ASK)
    started(steps, 1)
    steps.close()  # (closed: the cache is free again)
    assert rt.generate("gh ij", **ASK) == alone_rt.generate("gh ij", **ASK)


def test_two_conversations_read_in_turn_in_one_thread(rt, tiny_dirs):
    """Each has its own cache: read a step at a time in turn, each answers as it does
    alone."""
    a, b = rt.chat(system="sys"), rt.chat(system="sys")
    streams = [a.stream("ab cd ef", **ASK), b.stream("gh ij", **ASK)]
    said: list[list[str]] = [[], []]
    while streams[0] or streams[1]:
        for i, steps in enumerate(streams):
            if steps is not None:
                step = next(steps, None)
                if step is None:
                    streams[i] = None
                else:
                    said[i].append(step.text)
    assert ["".join(s) for s in said] == alone(tiny_dirs, "ab cd ef") + alone(tiny_dirs, "gh ij")
    assert a.messages[2]["content"] == "".join(said[0])


def test_conversations_in_two_threads_take_turns_step_by_step(rt, tiny_dirs):
    """A stream on one cache left unread does not hold up another thread's conversation
    (a chat server's second user is answered meanwhile); each answers as it does alone."""
    a, b = rt.chat(system="sys"), rt.chat(system="sys")
    steps = a.stream("ab cd ef", **ASK)
    said = started(steps)
    thread, out = in_thread(lambda: b.send("gh ij", **ASK))
    thread.join(30)
    assert not thread.is_alive() and "error" not in out
    said += [s.text for s in steps]
    assert ["".join(said), out["result"]] == alone(tiny_dirs, "ab cd ef") + alone(
        tiny_dirs, "gh ij"
    )


def test_a_runtime_closed_by_another_thread_stops_its_stream_with_one_error(rt):
    steps = rt.stream("ab cd ef", **ASK)
    started(steps)
    thread, out = in_thread(rt.close)
    thread.join(30)
    assert not thread.is_alive() and "error" not in out
    with pytest.raises(OffloadError, match="this KV cache was closed"):
        next(steps)


def test_other_threads_compute_on_one_thread_and_the_main_thread_on_its_own(rt):
    """However many threads ask, one thread computes for them (each thread that computes
    keeps an OpenMP pool, and two pools slowed each step 1.8x on 2 cores: storage/
    threads.py); the main thread computes its own steps, where a Ctrl-C reaches them."""
    computed_on = []
    rt.model.register_forward_pre_hook(
        lambda *_: computed_on.append(threading.current_thread().name)
    )
    asked = [in_thread(lambda: rt.chat().send("ab cd ef", **ASK)) for _ in range(3)]
    for thread, out in asked:
        thread.join(30)
        assert "error" not in out
    assert computed_on and {name.rsplit("_", 1)[0] for name in computed_on} == {"offload-compute"}
    computed_on.clear()
    rt.generate("gh ij", **ASK)
    assert computed_on and set(computed_on) == {"MainThread"}


def test_a_pool_thread_waits_for_a_stream_it_began_that_others_read_on(rt, tiny_dirs):
    """A server's streamed answer: each step is read by whichever thread of a pool is
    free, so the thread that began it may be asked for the next request on the same
    cache while the answer is still being read. It waits (only the main thread, which
    alone could read its own stream on, is refused). A stream read on does not warn."""
    rt.loaded.requests.stall_seconds = 2.0
    steps = rt.stream("ab cd ef", **ASK)
    with warnings.catch_warnings(), ThreadPoolExecutor(1) as worker:
        warnings.simplefilter("error")  # (raised in the pool's thread: `second` fails)
        first = worker.submit(started, steps).result()  # (begun in the pool's thread)
        second = worker.submit(rt.generate, "gh ij", **ASK)
        assert not second.done()  # (waiting, not refused)
        first += [s.text for s in steps]  # (read on by another thread)
        answer = second.result(timeout=30)
    alone_rt = Runtime.from_pretrained(tiny_dirs[MODEL][0], dtype="float32")
    assert ["".join(first), answer] == [alone_rt.generate(p, **ASK) for p in ("ab cd ef", "gh ij")]


def test_a_thread_waiting_for_a_stream_nobody_reads_is_told(rt, tiny_dirs):
    """A thread (not the main one) that begins a second request on a cache before it
    closes its first stream waits for ever: before, silently; now a RuntimeWarning says
    why. Closing the first stream then lets the second run."""
    rt.loaded.requests.stall_seconds = 0.2
    steps = rt.stream("ab cd ef", **ASK)
    with warnings.catch_warnings(record=True) as seen, ThreadPoolExecutor(1) as worker:
        warnings.simplefilter("always")
        worker.submit(started, steps).result()
        second = worker.submit(rt.generate, "gh ij", **ASK)
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not second.done()
        steps.close()
        answer = second.result(timeout=30)
    [warning] = seen
    assert warning.category is RuntimeWarning
    assert re.search(r"this thread began: its stream has not been read for [0-9]+ s\.",
                     str(warning.message))  # fmt: skip
    assert "close() a stream before beginning another request" in str(warning.message)
    alone_rt = Runtime.from_pretrained(tiny_dirs[MODEL][0], dtype="float32")
    assert answer == alone_rt.generate("gh ij", **ASK)
