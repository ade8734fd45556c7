"""Ctrl-C and SIGTERM during training: ask the loop to stop at the next step boundary, where it saves a
checkpoint and tells the user how to continue (a cluster's SIGTERM before a kill loses nothing). The
user hears at once that the stop is coming; a second signal asks for the same stop, it does not kill."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class StopRequest:
    """Set by the signal handler; the loop reads it after each optimizer step."""

    signal: str | None = None
    notice_fd: int = 2  # where the handler says the stop is coming: stderr

    def __call__(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        notice = f"{name}: already stopping after this step..." if self.signal else f"{name}: stopping after this step..."
        self.signal = name
        # os.write, not print: the signal may land inside a write to sys.stderr (tqdm's bar), and a
        # buffered stream raises on a reentrant write. The leading newline ends the bar's line.
        os.write(self.notice_fd, f"\n{notice}\n".encode())


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
