"""Ctrl-C while text streams: a flag beside the KeyboardInterrupt."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def interrupt_flag():
    """Ctrl-C raises KeyboardInterrupt as usual, and also sets the flag this yields,
    which an answer's loop checks after each token: Python drops an interrupt whose
    handler runs inside a finalizer (a generator closed by the garbage collector, say:
    "Exception ignored in ..."), and an answer must stop all the same."""
    flag = threading.Event()
    if (
        threading.current_thread() is not threading.main_thread()  # (handlers are its)
        or signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # a parent's choice: kept
    ):
        yield flag
        return

    def on_sigint(signum, frame):
        flag.set()
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)
