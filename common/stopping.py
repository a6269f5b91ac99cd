"""Stop requests by SIGTERM/SIGINT, caught from the first instant of a long-running command.

Why: a worker spends seconds importing and connecting before it exists; a SIGTERM in that
time must still stop it cleanly (exit 0), not kill it by the signal's default action.
``catch_stop_signals`` (called first thing) remembers the request; ``on_stop`` runs a
callback now if one came already, and on every later one.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

requested = threading.Event()
"""Set by the first SIGTERM/SIGINT (once ``catch_stop_signals`` ran): waits that can last
(a catalog outage) end on it."""


class StopRequested(Exception):
    """The worker is stopping: the batch in hand is left uncommitted (redone on restart)."""


_callbacks: list[Callable[[int], None]] = []
_signal = [0]


def _handler(signum: int, frame: FrameType | None) -> None:
    requested.set()
    _signal[0] = signum
    for callback in list(_callbacks):
        callback(signum)


def catch_stop_signals() -> None:
    """Catch SIGTERM and SIGINT from now on (main thread only)."""
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def on_stop(callback: Callable[[int], None]) -> None:
    """Call ``callback(signum)`` on each stop signal, and now if one came already."""
    catch_stop_signals()
    _callbacks.append(callback)
    if requested.is_set():
        callback(_signal[0])


__all__ = ["catch_stop_signals", "on_stop", "requested"]
