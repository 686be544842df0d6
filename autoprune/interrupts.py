"""Ctrl-C (and SIGTERM) held back while a record is being written.

Python delivers SIGINT as a ``KeyboardInterrupt`` between any two bytecodes. Inside the standard
library's file handling that can break more than the write: ``shutil.rmtree`` (which cleans up
every temporary folder MLflow logs an artifact through) can be interrupted between closing a
directory descriptor and noting that it did, and then closes the same number again — an
``OSError: [Errno 9] Bad file descriptor`` that replaces the interrupt, or worse, the close of
an unrelated file that reused the number. A search interrupted that way exits with an error
instead of its resume hint.

:func:`held` (a context manager and a decorator) defers SIGINT for the few milliseconds a
journal line, an MLflow batch or an artifact takes to write, then delivers it as the handler
that was installed would have. SIGTERM (a service stopping its process group, a scheduler ending
a job) is held the same way: its handler raises ``SystemExit`` just as abruptly. A search stays
interruptible everywhere else (inside a long evaluation or fine-tune), and what was being
recorded is recorded whole.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_state = threading.local()


HELD: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and a stop of the process (group)


@contextmanager
def held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block (or decorated call: a contextlib context manager
    is also a decorator, a fresh hold per call) ends, then deliver them."""
    if threading.current_thread() is not threading.main_thread() or getattr(
        _state, "active", False
    ):
        yield  # signals reach the main thread only; nested blocks share the outer hold
        return
    previous: dict[int, Any] = {}
    for signum in HELD:
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN and handler is not None:  # ignored, or not from Python
            previous[signum] = handler
    if not previous:
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if signum not in pending:
            pending.append(signum)

    for signum in previous:
        signal.signal(signum, hold)
    _state.active = True
    try:
        yield
    finally:
        _state.active = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _deliver_all(pending, previous)


def _deliver_all(pending: list[int], handlers: dict[int, Any]) -> None:
    """Deliver held signals in the order they came, each even when an earlier one's handler
    raised (the last exception raised is the one that propagates)."""
    if not pending:
        return
    try:
        _deliver(pending[0], handlers[pending[0]])
    finally:
        _deliver_all(pending[1:], handlers)


def _deliver(signum: int, handler: Any) -> None:
    """Act on a held signal as ``handler`` would have when it arrived."""
    if callable(handler):
        handler(signum, None)  # default_int_handler raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)
