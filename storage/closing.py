"""Closing a store that became garbage, without hanging the thread that found it.

The garbage collector runs finalizers in whichever thread it starts in, at whatever
point that thread allocated: even inside `threading`'s own lock while a new thread
registers itself (CPython 3.11 holds `_shutdown_locks_lock` in `_set_tstate_lock`,
and a collection can start there). A store's close joins its threads, and joining a
thread takes that same lock, so the process hung: a session save's hashing pool
started a thread, a collection began inside its registration and found a dropped
cache (caches sit in reference cycles), the close joined a reader thread. Seen under
coverage's tracer, which moves when collections happen; any program could meet it.

So a close the collector asks for is put on a queue (`SimpleQueue.put` is reentrant:
made for finalizers) and run by a thread of this module's own; a close asked for
anywhere else (the last reference dropped in plain code, the interpreter's exit) runs
right there, as before.
"""

from __future__ import annotations

import gc
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable

from storage import threads

_queue: queue.SimpleQueue = queue.SimpleQueue()
_collecting = False  # is a collection running (one at a time: the collector does not nest)
_running = False  # the closer thread takes closes (set before it starts, cleared as it ends)
_start_lock = threading.Lock()
POLL_SECONDS = 0.1  # how often an idle closer looks whether the main thread has ended


def _on_gc(phase: str, info: dict) -> None:
    global _collecting
    _collecting = phase == "start"


def _after_fork() -> None:
    """A forked child has no closer thread: its closes run inline until one starts."""
    global _running, _start_lock
    _running, _start_lock = False, threading.Lock()


gc.callbacks.append(_on_gc)
os.register_at_fork(after_in_child=_after_fork)


def close_when_collected(owner: object, close: Callable[[], None]) -> None:
    """Call `close()` once `owner` is garbage (or at the interpreter's exit, if still
    alive then), as `weakref.finalize(owner, close)` would, but never inside a garbage
    collection: there it runs on the closer thread. `close` must not refer to `owner`."""
    _start()
    weakref.finalize(owner, _close, close)


def settled(timeout: float = 30.0) -> bool:
    """Wait until the closes queued so far have run (the closer thread takes them in
    order): after `gc.collect()`, what it found is then let go of (what a close drops
    may sit in cycles the next collection finds), for whoever measures memory. Returns
    whether they ran within `timeout`."""
    if not _running:
        return True
    done = threading.Event()
    _queue.put(done.set)
    return done.wait(timeout)


def _close(close: Callable[[], None]) -> None:
    if _collecting and _running:
        _queue.put(close)
    else:
        close()


def _start() -> None:
    """Start the closer thread if it is not running (in plain code, never in a
    finalizer: starting a thread is where the collection above began)."""
    global _running
    with _start_lock:
        if _running or not threading.main_thread().is_alive():  # (at exit: closes run inline)
            return
        _running = True  # first: a collection within `start` already queues for it
        threads.thread(_serve, "offload-closer").start()


def _serve() -> None:
    """Run queued closes until the main thread has ended; then the queue is drained and
    later closes run where they are asked. Not a daemon: the interpreter waits for it
    at exit (a poll period at most), so nothing queued is left undone."""
    global _running
    main = threading.main_thread()
    while True:
        try:
            close = _queue.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if main.is_alive():
                continue
            with _start_lock:
                _running = False
            break
        _run(close)
        # Let go of it before waiting for the next: a bound `store.close` kept here would
        # keep that store and its device buffers alive (on an H200, 3 GiB of a 128k
        # cache's, until another store was collected).
        close = None
    while True:  # what was queued between the last look and `_running` going down
        try:
            close = _queue.get_nowait()
        except queue.Empty:
            return
        _run(close)


def _run(close: Callable[[], None]) -> None:
    try:
        close()
    except Exception:  # reported as a finalizer's error would be; the thread goes on
        sys.excepthook(*sys.exc_info())
