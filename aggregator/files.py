"""The data folder's DuckDB files: a topic's folder name, and opening a file another process
may hold (DuckDB lets one process open a file read-write and nobody else open it at all)."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

import duckdb

from common.errors import StorageError

T = TypeVar("T")


def topic_folder(topic: str) -> str:
    """The folder name of a topic's files: every character but ``A-Za-z0-9._-`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", topic)


def is_lock_error(exc: duckdb.Error) -> bool:
    """Whether DuckDB refused because another process (or connection) holds the file."""
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text or "already open" in text


def retry_while_locked(
    open_once: Callable[[], T],
    timeout: float,
    what: str,
    error: type[StorageError] = StorageError,
) -> T:
    """``open_once()``, retried with jittered backoff while the file is locked, for up to
    ``timeout`` seconds; any other failure, or the lock outlasting it, raises ``error``
    ``cannot open <what>: ...`` from DuckDB's."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            return open_once()
        except duckdb.Error as exc:
            if not is_lock_error(exc) or time.monotonic() >= deadline:
                raise error(f"cannot open {what}: {exc}") from exc
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.5)
