"""The nightly ``bill`` job: finalize every closed period not yet invoiced (``invoicing.bill``),
then push the finalized, unsent invoices to Stripe (and finish voiding there what a void left
undone), then (cluster mode) maintain the lake; what the run did is written as job metrics
however it ends (``recorded``). A tenant that cannot be billed is left out (``failures``); the
run finalizes and pushes everything else, then fails (``raise_if_not_billed``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from aggregator import lake_maintenance
from aggregator.lake_maintenance import Maintenance
from billing import invoice_store, invoicing
from billing.db import Connect
from billing.invoicing import BillFailure, BillResult, Rules, UsageData
from billing.model import Invoice, add_up, money
from common.errors import OperationError
from common.settings import Settings
from schemas.periods import Period

if TYPE_CHECKING:  # stripe-python takes seconds to import: only a push loads it
    from billing.stripe.push import PushResult


@dataclass
class NightlyRun:
    """What one run has done so far."""

    finalized: int = 0
    pushes: list[PushResult] = field(default_factory=list)
    failures: list[BillFailure] = field(default_factory=list)

    @property
    def pushed_all(self) -> bool:
        return all(r.ok for r in self.pushes)


class NotBilled(OperationError):
    """Some tenants could not be billed (the others were; each failure was printed)."""


def raise_if_not_billed(failures: list[BillFailure]) -> None:
    """``NotBilled`` naming every tenant left out, if any was."""
    if failures:
        names = ", ".join(sorted({f.tenant_id for f in failures}))
        raise NotBilled(f"{len(failures)} tenant(s) could not be billed: {names}")


@contextmanager
def recorded(metrics_file: Path | None) -> Iterator[NightlyRun]:
    """A run whose counts go to ``metrics_file`` (a node-exporter textfile) on exit; it
    succeeded when no exception left the block and every push succeeded."""
    run = NightlyRun()
    succeeded = False
    try:
        yield run
        succeeded = run.pushed_all and not run.failures
    finally:
        if metrics_file is not None:
            from billing.job_metrics import BillRun, write_job_metrics

            write_job_metrics(metrics_file, BillRun.of(run.finalized, run.pushes, succeeded))


def finalize(
    connect: Connect,
    usage: UsageData,
    rules: Rules,
    *,
    as_of: datetime,
    now: datetime,
    on_plan: Callable[[Mapping[str, list[Period]]], None] | None = None,
) -> BillResult:
    """Finalize every closed period of every tenant as of ``as_of`` (one transaction);
    ``on_plan`` sees the periods about to be finalized first."""
    with connect() as con:
        return invoicing.bill(con, usage, rules, as_of=as_of, now=now, on_plan=on_plan)


FEW_PERIODS = 3  # more than this many periods of one tenant in one run are announced


def plan(targets: Mapping[str, list[Period]]) -> list[str]:
    """One line per tenant with more than ``FEW_PERIODS`` periods about to be finalized."""
    return [
        f"{tenant_id}: finalizing {len(periods)} invoices, {periods[0]} to {periods[-1]} "
        "(a base fee each, usage or not; those issued after their period's due date are due "
        "counted from their issue)"
        for tenant_id, periods in sorted(targets.items())
        if len(periods) > FEW_PERIODS
    ]


def unsent(connect: Connect) -> list[Invoice]:
    """Every finalized invoice not yet in Stripe (a rerun resumes an interrupted push)."""
    with connect() as con:
        return invoice_store.finalized_unsent(con)


def unvoided(connect: Connect) -> list[Invoice]:
    """Void invoices known in Stripe whose void there is not done (a rerun resumes it)."""
    from billing.stripe import state as stripe_state

    with connect() as con:
        return [
            invoice
            for invoice in invoice_store.void_invoices(con)
            if (push := stripe_state.get_push(con, invoice.invoice_id)) is not None
            and push.void_action is None
        ]


def summary(result: BillResult) -> str:
    """One line saying what ``finalize`` did."""
    total = add_up(inv.total for inv in result.invoices)
    return (
        f"billed through {result.last_closed}: {len(result.invoices)} invoice(s) finalized "
        f"for {result.tenants} tenant(s), {result.late_lines} late-usage or correction "
        "line(s), "
        f"total {money(total)} usd"
    )


def maintain_lake(settings: Settings, now: datetime) -> Maintenance:
    """Cluster mode's lake maintenance, the job's last step (``lake maintain`` alone)."""
    return lake_maintenance.maintain_lake(settings, now)
