"""Type stub of the native decoder (schemas/_native_decoder.c documents the call)."""

from collections.abc import Callable
from typing import Any

def decode(
    values: list[bytes | None],
    start: int,
    header: bytes,
    plan: bytes,
    max_bytes: int,
    max_total: int,
    allocate: Callable[[int], Any],
) -> tuple[Any, ...]: ...
