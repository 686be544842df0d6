"""Ctrl-C while a record is written: held until the write ends, then delivered as usual."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from autoprune.agents.base import Record, SearchResult

from autoprune.interrupts import held
from autoprune.tracking.writer import SearchLogger


@pytest.fixture(autouse=True)
def python_sigint() -> Iterator[None]:
    """Python's own Ctrl-C handler, as in a terminal: a process started in the background
    without job control (some CI runners) inherits SIGINT ignored, and Python keeps that."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_interrupt_inside_a_held_block_arrives_after_it() -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt), held():
        ctrl_c()
        steps.append("after the signal")  # still runs: the interrupt waits
        with held():  # nested: one hold
            steps.append("nested")
        steps.append("end of block")
    assert steps == ["after the signal", "nested", "end of block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_held_as_a_decorator_and_without_a_signal() -> None:
    @held()
    def write(out: list[str]) -> str:
        ctrl_c()
        out.append("written")
        return "done"

    out: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        write(out)
    assert out == ["written"]
    assert write.__wrapped__ is not None  # type: ignore[attr-defined]
    with held():
        pass  # no signal: nothing raised
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_custom_handler_gets_the_held_signal_and_ignored_stays_ignored() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with held():
            ctrl_c()
            assert seen == []
        assert seen == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with held():
            ctrl_c()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_off_the_main_thread_it_is_a_plain_block() -> None:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with held():  # signal.signal would raise ValueError here
                pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert errors == []


class _Client:
    """Stands in for MlflowClient; Ctrl-C arrives while the history chunk is written."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def log_text(self, run_id: str, text: str, name: str) -> None:
        ctrl_c()
        self.calls.append(f"text {name}")

    def log_batch(self, run_id: str, metrics: Any) -> None:
        self.calls.append(f"batch {len(metrics)}")


def test_ctrl_c_during_a_flush_lets_the_flush_finish() -> None:
    client = _Client()
    log = SearchLogger(client, "run", flush_every=2)  # type: ignore[arg-type]
    result = SearchResult("random", {"flops": 0.5}, 0)

    def record(index: int) -> Record:
        row = {"index": index, "ratios": {"conv1": 0.5}, "accuracy": 0.9, "loss": 0.1}
        return Record.from_dict(
            {**row, "flops_ratio": 0.5, "params_ratio": 0.6, "meets_budget": True, "elapsed": 1.0}
        )

    log(record(1), result)
    assert client.calls == []
    with pytest.raises(KeyboardInterrupt):
        log(record(2), result)
    assert client.calls == ["text history/000001-000002.jsonl", "batch 10"]  # 5 metrics x 2
    assert log._rows == []  # flushed once: a later close does not log them again


def test_sigterm_is_held_too_and_both_arrive_in_order() -> None:
    """A stop of the process group (SIGTERM, whose handler raises SystemExit) waits for the
    write like Ctrl-C; with both pending, each handler runs in the order they came."""
    seen: list[int] = []

    def terminate(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, terminate)
    steps = []
    try:
        with pytest.raises(SystemExit), held():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("written")
        assert steps == ["written"] and seen == [signal.SIGTERM]
        signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
        with pytest.raises(SystemExit), held():
            ctrl_c()
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("written again")
        assert seen == [signal.SIGTERM, signal.SIGINT, signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is terminate  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_every_held_signal_is_delivered_in_arrival_order_even_after_one_raises() -> None:
    """SIGTERM then SIGINT: delivered in that order (not a fixed one); when both handlers raise,
    the second still runs and its exception is the one that propagates."""
    seen: list[int] = []
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with held():
            os.kill(os.getpid(), signal.SIGTERM)
            ctrl_c()
        assert seen == [signal.SIGTERM, signal.SIGINT]

        def raising(exc: BaseException) -> Any:
            def handler(signum: int, frame: Any) -> None:
                seen.append(signum)
                raise exc

            return handler

        seen.clear()
        signal.signal(signal.SIGTERM, raising(SystemExit(143)))
        signal.signal(signal.SIGINT, raising(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt), held():
            os.kill(os.getpid(), signal.SIGTERM)
            ctrl_c()
        assert seen == [signal.SIGTERM, signal.SIGINT]
    finally:
        signal.signal(signal.SIGTERM, previous_term)
