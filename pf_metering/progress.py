"""Progress displays for long commands, on stderr, silenced by ``--quiet``; while one is
live, log lines print through its console (above the bar, never over it)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from common.logs import logs_through
from pf_metering.output import readable


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``12,345/s``."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-/s" if speed is None else f"{readable(round(speed))}/s")


def _console() -> Console:
    return Console(file=sys.stderr)


@contextmanager
def progress_bar(quiet: bool, console: Console | None = None) -> Iterator[Progress]:
    """A bar (done/total, rate, elapsed, time left) on a terminal unless ``quiet``."""
    console = console or _console()
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=False,
    )
    with bar:
        if bar.disable:
            yield bar
            return
        with logs_through(lambda line: console.print(line, markup=False, highlight=False)):
            yield bar


class DrainProgress:
    """``consume --drain``'s bar: records done out of the backlog seen at the start (the
    total grows when more arrive meanwhile)."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task = bar.add_task("draining", total=None)
        self.total = 0

    def __call__(self, consumed: int, remaining: int) -> None:
        """The worker's report: records done so far, records still to go."""
        self.total = max(self.total, consumed + remaining)
        self.bar.update(self.task, completed=consumed, total=self.total)


def status(message: str, quiet: bool) -> AbstractContextManager[Any]:
    """A spinner with ``message`` on a terminal while a step without a known length runs."""
    console = _console()
    if quiet or not console.is_terminal:
        return nullcontext()
    return console.status(message)
