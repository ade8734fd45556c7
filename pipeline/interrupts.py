"""Ctrl-C and SIGTERM during training: ask the loop to stop at the next step boundary, where it saves a
checkpoint and tells the user how to continue (a cluster's SIGTERM before a kill loses nothing)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class StopRequest:
    """Set by the signal handler; the loop reads it after each optimizer step."""

    signal: str | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals(signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[StopRequest]:
    """Within the block, `signals` set the request instead of killing the process; the previous handlers
    come back on exit, however the block ends."""
    request = StopRequest()
    previous = {sig: signal.signal(sig, request) for sig in signals}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
