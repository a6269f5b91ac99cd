"""128-bit usage as people and programs read it: ``usage``, ``sql`` and ``export-metrics``
show totals past 2**63 exactly (Prometheus, a float64, to 53 bits: the README says so)."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from bench.ledger_load import publish_usage
from common.settings import load_settings
from schemas.codec import COUNTERS
from tests.support.cli_runner import run_cli
from tests.support.events import make_event

JAN = 1_736_000_000_000_000  # 2025-01-04
INT64_MAX = 2**63 - 1


def test_usage_sql_and_export_metrics_show_totals_past_2_63(data_env: dict[str, str]) -> None:
    top = dict.fromkeys(COUNTERS, INT64_MAX)
    publish_usage(load_settings(), [make_event("big", occurred_at=JAN, **top) for _ in range(3)])
    exact = 3 * INT64_MAX  # 27670116110564327421

    usage = json.loads(run_cli("usage", "big", "2025-01", "-f", "json", check=True).stdout)
    assert all(usage[c] == exact for c in COUNTERS)
    table = run_cli("usage", "big", "2025-01", check=True).stdout
    assert f"{exact:,}" in table

    query = "SELECT cpu_ms, typeof(cpu_ms) AS kind FROM usage"
    rows = json.loads(run_cli("sql", query, "-f", "json", check=True).stdout)
    assert rows == [{"cpu_ms": exact, "kind": "HUGEINT"}]
    csv = run_cli("sql", "SELECT violations FROM usage", "-f", "csv", check=True).stdout
    assert csv.split() == ["violations", str(exact)]

    text = run_cli("export-metrics", check=True).stdout
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels == {"tenant": "big", "period": "2025-01"}
    }
    for counter in COUNTERS:  # float64: the nearest double, positive, never wrapped
        assert samples[f"pf_usage_{counter}_total"] == float(exact) > 2**64
