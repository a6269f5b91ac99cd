"""Progress bars for long commands, on stderr, silenced by ``--quiet``."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(quiet: bool) -> Progress:
    console = Console(file=sys.stderr)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=False,
    )


def status(message: str, quiet: bool) -> AbstractContextManager[Any]:
    """A spinner with ``message`` on a terminal while a step without a known length runs."""
    console = Console(file=sys.stderr)
    if quiet or not console.is_terminal:
        return nullcontext()
    return console.status(message)
