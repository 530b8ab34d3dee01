"""The runtime's threads and torch's OpenMP pools.

A thread that runs a parallel torch operation gets an OpenMP thread pool of its own,
which lives as long as the thread. With more pool threads than cores, libgomp makes
every pool, the main thread's too, stop spinning between operations (`GOMP_SPINCOUNT`'s
throttled value): each of a decode step's many small operators then waits for its pool
to wake. On 2 cores, while another thread that had once copied a large tensor lived, a
576x1536 bf16 matrix-vector product in the main thread took 175 us instead of 68
(docs/performance.md, "Threads and OpenMP pools"). So:

- our own threads (spill writer, readers, savers, warmers, the prefetch worker...) set
  their OpenMP thread count to 1 (`pool`, `thread`): the runtime's
  `omp_set_num_threads`, which is per thread, after torch's own start on that thread
  (which sets it from torch's setting). `torch.set_num_threads(1)` would do it too, but
  it also sets the count every thread started later begins with (the user's too);
- a model is loaded on a thread that then ends (`apart`), so that the thread that asked
  keeps no pool from it;
- steps asked from threads other than the main one run on one compute thread
  (`compute`, `offload.conversation.Requests`).

A pool does not survive a fork: in a child forked from a process whose main thread ran
a parallel operation (a server's workers forked after the model was loaded,
multiprocessing's "fork"), the main thread's first parallel operation waits for good
for the parent's pool threads, which the child does not have. A thread started in the
child makes a pool of its own, so there every step runs on the compute thread
(`forked`), the main thread's too; and what holds threads or locks renews them
(`renew_after_fork`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


@functools.cache
def _omp_set_num_threads() -> Callable[[int], int] | None:
    """The OpenMP runtime's `omp_set_num_threads`: among the process's symbols (torch's
    wheels load it so), else from the OpenMP library beside torch's; None where there is
    none (a torch without OpenMP: its threads make no such pool)."""
    places = [None, *sorted((Path(torch.__file__).parent / "lib").glob("lib*omp*.so*"))]
    for place in places:
        try:
            return ctypes.CDLL(place if place is None else str(place)).omp_set_num_threads
        except (AttributeError, OSError):
            continue
    return None


def single_threaded() -> None:
    """torch runs on this thread alone: no OpenMP pool of its own (the module docstring)."""
    torch.get_num_threads()  # (torch's start on this thread: it sets the thread's count)
    set_num_threads = _omp_set_num_threads()
    if set_num_threads is not None:
        set_num_threads(1)


def pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run torch single-threaded."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=single_threaded)


def thread(target: Callable[[], None], name: str, daemon: bool = False) -> threading.Thread:
    """A thread (not started) that runs torch single-threaded."""

    def run() -> None:
        single_threaded()
        target()

    return threading.Thread(target=run, name=name, daemon=daemon)


def apart(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` on a thread of its own, which ends with it (and its OpenMP
    pool with it); its result, or what it raised, here.

    Loading a model runs parallel torch operations. Run where the model is loaded, they
    leave that thread a pool for as long as it lives; a program that loads in its main
    thread and asks from another (a GUI's worker, a server's) then has two, and decoded
    1.8x slower on 2 cores. The thread is a daemon: an interrupt while waiting is raised
    here at once, and the process may exit before it ends."""
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as e:
            out["error"] = e

    worker = threading.Thread(target=run, name="offload-load", daemon=True)
    worker.start()
    worker.join()
    if "error" in out:
        raise out.pop("error")
    return out["result"]


_computer: ThreadPoolExecutor | None = None
_computer_made = threading.Lock()
COMPUTE_THREAD = "offload-compute"
_forked = False  # a child forked from the process that imported this module
_renewed: weakref.WeakSet = weakref.WeakSet()  # objects whose `after_fork` a fork calls


def forked() -> bool:
    """Is this a process forked from one that had loaded torch? Its main thread's OpenMP
    pool may be lost (the module docstring)."""
    return _forked


def renew_after_fork(obj: object) -> None:
    """Call `obj.after_fork()` in each child forked from this process (while `obj` lives),
    before the child runs anything else: locks that another thread held at the fork stay
    held in the child for good, and the child has none of the parent's threads."""
    _renewed.add(obj)


def _after_fork() -> None:
    global _computer, _computer_made, _forked
    _computer, _computer_made, _forked = None, threading.Lock(), True
    for obj in list(_renewed):
        obj.after_fork()


os.register_at_fork(after_in_child=_after_fork)


def compute(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` on the process's compute thread (made when first asked for; torch's
    own thread count), its result or what it raised here. Requests from threads other
    than the main thread compute there (`conversation.Requests.run`): however many
    threads ask, one OpenMP pool computes for them (the module docstring); in a forked
    child, the main thread's too (`forked`)."""
    global _computer
    with _computer_made:
        if _computer is None:
            _computer = ThreadPoolExecutor(1, thread_name_prefix=COMPUTE_THREAD)
    return _computer.submit(fn, *args).result()


def on_compute_thread() -> bool:
    return threading.current_thread().name.startswith(COMPUTE_THREAD)
