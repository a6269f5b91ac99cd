"""Per-tenant, per-period usage as Prometheus text exposition (``export-metrics``).

Made with prometheus-client (a custom collector and ``generate_latest``), so escaping and the
HELP/TYPE layout are Prometheus' own. The families are the original tool's: counters
pf_usage_cpu_ms, pf_usage_network_bytes, pf_usage_api_calls, pf_usage_tool_executions,
pf_usage_data_retrievals, pf_usage_egress_scans, pf_usage_policy_checks, pf_usage_violations,
and the gauge pf_usage_risk_score (mean risk score of the period); added: the gauge
pf_usage_risk_score_max.

Naming, decided: prometheus-client follows the Prometheus/OpenMetrics rule that a counter's
samples end in ``_total``, and in the text format it names the HELP/TYPE lines that way too::

    # TYPE pf_usage_cpu_ms_total counter
    pf_usage_cpu_ms_total{period="2025-01",tenant="acme_corp"} 3.6e+06

Prometheus' own parser reads this back as family ``pf_usage_cpu_ms`` with samples
``pf_usage_cpu_ms_total``; in PromQL query ``pf_usage_cpu_ms_total``. We keep the library's
behaviour rather than declare the counters untyped to keep the bare names.
Labels: ``tenant`` (the whole tenant id, ``_`` and all, escaped) and ``period``.

``pf_usage_cpu_ms`` keeps its contract name, which Prometheus' linter (``promtool check
metrics``) flags for its abbreviated unit; ``pf_usage_cpu_seconds`` says the same in seconds
beside it, and ``base_units`` leaves the ``_ms`` family out (then the linter has nothing to
say). Whole values print as integers
(``1002860``, not prometheus-client's Go-style ``1.00286e+06``); every value is exact below
2**53, which float64 samples cannot go past anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.codec import COUNTERS

LABELS = ("tenant", "period")
HELP = {
    "cpu_ms": "CPU time used, in milliseconds",
    "network_bytes": "Network bytes transferred",
    "api_calls": "API calls made",
    "tool_executions": "Tool executions",
    "data_retrievals": "Data retrievals",
    "egress_scans": "Egress content scans",
    "policy_checks": "Policy checks",
    "violations": "Policy violations",
}
SECONDS = {"cpu_seconds": ("cpu_ms", 1000, "CPU time used, in seconds")}
GAUGES = {
    "risk_score": ("risk_score_avg", "Mean risk score of the period's events (0-1)"),
    "risk_score_max": ("risk_score_max", "Highest risk score of the period's events (0-1)"),
}


class UsageCollector(Collector):
    """Yields one family per metric with a sample per (tenant, period) usage row."""

    def __init__(self, rows: Iterable[Mapping[str, Any]], base_units: bool = False) -> None:
        self.base_units = base_units
        self.rows = sorted(rows, key=lambda r: (r["tenant_id"], r["period"]))

    def collect(self) -> Iterator[Metric]:
        for counter in COUNTERS:
            if self.base_units and counter == "cpu_ms":
                continue
            family = CounterMetricFamily(f"pf_usage_{counter}", HELP[counter], labels=LABELS)
            for row in self.rows:
                family.add_metric([row["tenant_id"], row["period"]], float(row[counter] or 0))
            yield family
        for name, (column, per_second, text) in SECONDS.items():
            family = CounterMetricFamily(f"pf_usage_{name}", text, labels=LABELS)
            for row in self.rows:
                value = (row[column] or 0) / per_second
                family.add_metric([row["tenant_id"], row["period"]], value)
            yield family
        for name, (column, text) in GAUGES.items():
            gauge = GaugeMetricFamily(f"pf_usage_{name}", text, labels=LABELS)
            for row in self.rows:
                if row[column] is not None:
                    gauge.add_metric([row["tenant_id"], row["period"]], float(row[column]))
            yield gauge


def exposition(rows: Iterable[Mapping[str, Any]], *, base_units: bool = False) -> str:
    """The text exposition of ``rows`` (dicts with tenant_id, period, the counters, risk)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(UsageCollector(rows, base_units))
    return "".join(map(_whole, generate_latest(registry).decode().splitlines(keepends=True)))


def _whole(line: str) -> str:
    """A sample line with a whole value written as an integer (comments unchanged)."""
    if line.startswith("#"):
        return line
    head, _, value = line.rstrip("\n").rpartition(" ")
    number = float(value)
    if number.is_integer() and abs(number) < 2**53:
        return f"{head} {int(number)}\n"
    return line
