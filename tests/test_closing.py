"""Closing what the garbage collector finds (storage/closing.py): never inside the
collection, where the collecting thread may hold a lock the close needs."""

import gc
import threading
import time
import weakref

from storage.closing import close_when_collected, settled


class Cycle:
    """Held by a reference cycle, as a cache is: only the collector frees it."""

    def __init__(self):
        self.me = self


def wait_for(condition, seconds: float = 10) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "not within the time"
        time.sleep(0.01)


def test_a_close_the_collector_asks_for_waits_for_the_locks_of_the_collecting_thread():
    """A collection may begin while its thread holds a lock: a new thread registering
    itself holds `threading`'s own, and a store's close joins threads, which takes that
    lock (the process hung so). Here the close needs a lock held around the collection:
    run inline it would wait for itself; it runs on the closer thread once the lock is
    free."""
    lock = threading.Lock()
    ran = []

    def close():
        got = lock.acquire(timeout=5)  # (inline: the timeout, then False)
        ran.append((threading.current_thread().name, got))
        if got:
            lock.release()

    owner = Cycle()
    close_when_collected(owner, close)
    del owner
    with lock:
        gc.collect()
        assert ran == []
    wait_for(lambda: ran)
    assert ran == [("offload-closer", True)]


def test_what_the_closer_thread_closed_is_let_go():
    """The closer thread keeps no reference to a close it ran (a store's bound `close`
    would keep the store, and on CUDA its device buffers, alive)."""

    class Store:
        closed = False

        def close(self):
            self.closed = True

    store = Store()
    gone = weakref.ref(store)
    owner = Cycle()
    close_when_collected(owner, store.close)
    del owner, store
    gc.collect()
    wait_for(lambda: gone() is None or gone().closed)
    wait_for(lambda: gone() is None)


def test_settled_waits_for_the_closes_a_collection_queued():
    """`settled` returns once what a collection queued has run: a memory figure read
    after it no longer counts a collected cache (tests/test_plan.py)."""
    ran = []
    owner = Cycle()
    close_when_collected(owner, lambda: time.sleep(0.2) or ran.append(1))
    del owner
    gc.collect()
    assert settled() and ran == [1]


def test_a_close_asked_for_in_plain_code_runs_there():
    """The last reference dropped outside a collection: closed at once, by that thread."""
    ran = []
    owner = type("Owner", (), {})()
    close_when_collected(owner, lambda: ran.append(threading.current_thread().name))
    del owner
    assert ran == [threading.current_thread().name]


def test_a_collected_cache_leaves_no_spilled_file(tiny_dirs, tmp_path):
    """A tiered cache that spilled, dropped in a reference cycle: its files go when the
    collector finds it."""
    from offload import Runtime

    directory, _ = tiny_dirs["llama-gqa-untied"]
    rt = Runtime.from_pretrained(directory, dtype="float32")
    rt = Runtime(rt.loaded, rt.config.replace(mode="dense", host_bytes=4 * rt.layout.chunk_bytes,
                                              disk_dir=str(tmp_path), spill_batch=2), rt.device)  # fmt: skip
    rt.generate("seven quiet stones over the river " * 6, max_new_tokens=2)
    assert rt.stats()["spilled_chunks"] > 0 and list(tmp_path.glob("cache-*/*.arrow"))
    holder = Cycle()
    holder.cache = rt._state.cache
    del rt
    holder = None  # noqa: F841 (the cycle keeps the cache until a collection)
    gc.collect()
    wait_for(lambda: not list(tmp_path.iterdir()))
