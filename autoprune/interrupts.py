"""Ctrl-C held back while a record is being written.

Python delivers SIGINT as a ``KeyboardInterrupt`` between any two bytecodes. Inside the standard
library's file handling that can break more than the write: ``shutil.rmtree`` (which cleans up
every temporary folder MLflow logs an artifact through) can be interrupted between closing a
directory descriptor and noting that it did, and then closes the same number again — an
``OSError: [Errno 9] Bad file descriptor`` that replaces the interrupt, or worse, the close of
an unrelated file that reused the number. A search interrupted that way exits with an error
instead of its resume hint.

:func:`held` (a context manager and a decorator) defers SIGINT for the few milliseconds a
journal line, an MLflow batch or an artifact takes to write, then delivers it as the handler
that was installed would have. A search stays interruptible everywhere else (inside a long
evaluation or fine-tune), and what was being recorded is recorded whole.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_state = threading.local()


@contextmanager
def held() -> Iterator[None]:
    """Hold SIGINT until the block (or decorated call: a contextlib context manager is also a
    decorator, a fresh hold per call) ends, then deliver it."""
    if threading.current_thread() is not threading.main_thread() or getattr(
        _state, "active", False
    ):
        yield  # signals reach the main thread only; nested blocks share the outer hold
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN or previous is None:  # ignored, or not set from Python
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        pending.append(signum)

    signal.signal(signal.SIGINT, hold)
    _state.active = True
    try:
        yield
    finally:
        _state.active = False
        signal.signal(signal.SIGINT, previous)
        if pending:
            _deliver(previous)


def _deliver(handler: Any) -> None:
    """Act on a held SIGINT as ``handler`` would have when it arrived."""
    if callable(handler):
        handler(signal.SIGINT, None)  # default_int_handler raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)
