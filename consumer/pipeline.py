"""A background stage that runs one kind of work, item by item, in submission order.

The work it runs (decoding, a ledger commit) releases the GIL, so the caller's thread goes on
meanwhile (docs/performance.md, "The pipeline").

Contract: items are processed one at a time in the order submitted; ``flush`` returns
once every submitted item is done; the first failure stops the stage (later items are
dropped, never processed out of order) and is raised, the same exception object, by the
next ``submit``, ``flush`` or ``close`` on the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
_STOP = object()


class Stage(Generic[T]):
    """Run ``work(item)`` on one daemon thread; at most ``depth`` items wait for it."""

    def __init__(self, name: str, work: Callable[[T], None], depth: int = 2) -> None:
        self._work = work
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> None:
        """Queue ``item`` (blocks while ``depth`` items already wait)."""
        self._raise_failure()
        if self._closed:
            raise RuntimeError("stage is closed")
        self._queue.put(item)

    def flush(self) -> None:
        """Wait until every submitted item is processed; raise the stage's failure."""
        self._queue.join()
        self._raise_failure()

    def close(self) -> None:
        """Finish what was submitted, stop the thread; raise the stage's failure."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:
                    self._work(item)  # type: ignore[arg-type]
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()
