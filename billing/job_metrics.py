"""Prometheus metrics of the nightly ``bill`` job, written to a node-exporter textfile.

The job is a batch process that exits, so nobody could scrape it: each run rewrites a ``.prom``
file (atomically, with prometheus_client's ``write_to_textfile``) that node-exporter's textfile
collector serves. The ``_total`` series are real counters across runs: a run adds its counts to
the values already in the file, so ``increase()`` works in Prometheus; deleting the file is
just a counter reset. ``pf_bill_last_success_timestamp_seconds`` only moves when a run
succeeded, so ``time() - pf_bill_last_success_timestamp_seconds`` is the alert to set.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from billing.stripe.push import PushOutcome, PushResult

COUNTERS: dict[str, str] = {
    "pf_invoices_finalized": "Invoices finalized by the nightly bill job",
    "pf_invoices_pushed": "Invoices created in Stripe by the nightly bill job",
    "pf_stripe_errors": "Invoices whose Stripe push failed in the nightly bill job",
}
LAST_SUCCESS = "pf_bill_last_success_timestamp_seconds"
LAST_RUN = "pf_bill_last_run_timestamp_seconds"


@dataclass(frozen=True)
class BillRun:
    """What one run of the nightly job did."""

    finalized: int = 0
    pushed: int = 0
    stripe_errors: int = 0
    succeeded: bool = True

    @classmethod
    def of(cls, finalized: int, pushes: Sequence[PushResult], succeeded: bool) -> BillRun:
        """From the invoices finalized and the Stripe push results (an already-sent invoice
        found again on a resumed push is not counted twice)."""
        return cls(
            finalized=finalized,
            pushed=sum(r.outcome is PushOutcome.sent for r in pushes),
            stripe_errors=sum(r.outcome is PushOutcome.failed for r in pushes),
            succeeded=succeeded,
        )

    def counts(self) -> dict[str, int]:
        return {
            "pf_invoices_finalized": self.finalized,
            "pf_invoices_pushed": self.pushed,
            "pf_stripe_errors": self.stripe_errors,
        }


def _previous(path: Path) -> dict[str, float]:
    """Sample values already in the file (none if it is missing or unreadable)."""
    try:
        text = path.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return {}
    try:
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    except ValueError:  # a damaged file: start the counters again (Prometheus sees a reset)
        return {}


class _Snapshot(Collector):
    """A collector yielding fixed metric families (no ``_created`` series for a batch job)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def job_families(run: BillRun, previous: dict[str, float], now: float) -> list[Metric]:
    """The metric families after ``run``, continuing the counters in ``previous``."""
    counts = run.counts()
    families: list[Metric] = [
        CounterMetricFamily(name, doc, value=previous.get(f"{name}_total", 0.0) + counts[name])
        for name, doc in COUNTERS.items()
    ]
    last_success = now if run.succeeded else previous.get(LAST_SUCCESS, 0.0)
    families.append(
        GaugeMetricFamily(LAST_SUCCESS, "Unix time the bill job last succeeded", last_success)
    )
    families.append(GaugeMetricFamily(LAST_RUN, "Unix time the bill job last ran", now))
    return families


def write_job_metrics(path: Path, run: BillRun, now: float | None = None) -> None:
    """Add ``run`` to the textfile at ``path`` (name it ``*.prom`` for node-exporter)."""
    moment = time.time() if now is None else now
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Snapshot(job_families(run, _previous(path), moment)))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
