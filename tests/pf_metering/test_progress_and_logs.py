"""Progress and logs (issue 17, points 3 and 10): the drain bar counts records done out of
the backlog at the start, with a rate and time left; log lines go through the bar's console;
``-q`` silences INFO logs; stripe-python's per-request lines only at DEBUG; ``--version``."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from rich.console import Console

from common.logs import configure
from common.settings import load_settings
from pf_metering.progress import DrainProgress, progress_bar
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import SEED, event
from tests.fixtures.stripe import API_KEY
from tests.support.cli_runner import run_cli
from tests.support.stripe_server import FakeStripe


@pytest.fixture(autouse=True)
def logging_restored() -> Iterator[None]:
    """These tests call ``configure``: put the process's logging back as it was after."""
    root, stripe = logging.getLogger(), logging.getLogger("stripe")
    handlers, level, stripe_level = root.handlers[:], root.level, stripe.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    stripe.setLevel(stripe_level)


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=100, color_system=None)


def test_the_drain_bar_counts_done_out_of_the_backlog_at_start(
    monkeypatch: pytest.MonkeyPatch, data_env: dict[str, str]
) -> None:
    configure(load_settings())
    console = terminal()
    with progress_bar(False, console) as bar:
        show = DrainProgress(bar)
        show(0, 340_192)
        (task,) = bar.tasks
        assert (task.completed, task.total) == (0, 340_192)
        show(100_000, 240_192)
        assert (task.completed, task.total) == (100_000, 340_192)
        show(285_000, 55_192)  # the backlog shrinks: the total stays
        assert (task.completed, task.total) == (285_000, 340_192)
        show(300_000, 50_000)  # more arrived meanwhile: the total grows
        assert (task.completed, task.total) == (300_000, 350_000)
        logging.getLogger("consumer.worker").warning("a line while the bar runs")
        bar.refresh()
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "a line while the bar runs" in text  # printed by the bar's console
    assert "300000/350000" in text and "/s" in text


def test_logs_leave_the_console_when_the_bar_ends(
    capsys: pytest.CaptureFixture[str], data_env: dict[str, str]
) -> None:
    configure(load_settings())
    console = terminal()
    with progress_bar(False, console):
        pass
    logging.getLogger("consumer.worker").warning("after the bar")
    assert "after the bar" in capsys.readouterr().err
    assert "after the bar" not in console.file.getvalue()  # type: ignore[attr-defined]


def test_quiet_silences_info_logs(
    pfm: Cli, monkeypatch: pytest.MonkeyPatch, fake_stripe: FakeStripe
) -> None:
    pfm.publish(event("acme", "2025-01", **SEED))
    monkeypatch.setenv("STRIPE_SECRET_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", fake_stripe.url)
    loud = pfm("bill", "--as-of", "2025-02-01T02:00:00Z")
    assert loud.code == 0 and "billed through" in loud.err
    pfm.publish(event("beta", "2025-01", **SEED))
    quiet = pfm("bill", "--as-of", "2025-02-01T02:00:00Z", "--stripe", "-q")
    assert quiet.code == 0, quiet.err
    assert quiet.err == ""  # no "stripe push ... done" INFO line, no summary


def test_stripe_request_lines_only_at_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    for level, shown in (("INFO", False), ("DEBUG", True)):
        monkeypatch.setenv("LOG_LEVEL", level)
        configure(load_settings())
        assert logging.getLogger("stripe").isEnabledFor(logging.INFO) is shown


def test_version() -> None:
    run = run_cli("--version")
    assert run.returncode == 0 and run.stdout.startswith("pf-metering ")
    assert run.stdout.split()[1][0].isdigit()
