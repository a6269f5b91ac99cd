"""``export-metrics``: valid Prometheus text (parsed by prometheus-client's own parser), the
original metric names, labels tenant and period escaped, ids with ``_`` whole, values equal to
what ``usage`` reports."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from billing.render.prometheus_export import exposition
from schemas.codec import COUNTERS
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import SEED, event

TENANTS = ("acme_corp", "a.b:c-d_e", "plain")


def test_export_metrics_parses_and_matches_usage(pfm: Cli, tmp_path: Path) -> None:
    pfm.publish(
        event("acme_corp", "2025-01", **SEED),
        event("acme_corp", "2025-02", api_calls=5, violations=1),
        event("a.b:c-d_e", "2025-01", cpu_ms=123_456_789, network_bytes=2**40),
        event("plain", "2025-01", policy_checks=9),
    )
    out = tmp_path / "metrics.prom"
    run = pfm("export-metrics", "-o", str(out))
    assert run.code == 0 and "usage data as of" in run.err
    text = out.read_text()

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {f"pf_usage_{c}" for c in COUNTERS} | {
        "pf_usage_cpu_seconds",
        "pf_usage_risk_score",
        "pf_usage_risk_score_max",
    }
    for counter in COUNTERS:
        family = families[f"pf_usage_{counter}"]
        assert family.type == "counter"
        assert {s.name for s in family.samples} == {f"pf_usage_{counter}_total"}
        assert text.count(f"# TYPE pf_usage_{counter}_total counter") == 1  # once per family
    assert families["pf_usage_risk_score"].type == "gauge"

    samples = {
        (f.name, s.labels["tenant"], s.labels["period"]): s.value
        for f in families.values()
        for s in f.samples
    }
    seen = {(t, p) for _, t, p in samples}
    assert seen == {
        ("acme_corp", "2025-01"),
        ("acme_corp", "2025-02"),
        ("a.b:c-d_e", "2025-01"),
        ("plain", "2025-01"),
    }
    for tenant, period in seen:
        usage = json.loads(pfm("usage", tenant, period, "-f", "json").out)
        for counter in COUNTERS:
            assert samples[(f"pf_usage_{counter}", tenant, period)] == usage[counter], counter
        assert samples[("pf_usage_risk_score", tenant, period)] == usage["risk_score_avg"]
        cpu_seconds = samples[("pf_usage_cpu_seconds", tenant, period)]
        assert cpu_seconds == usage["cpu_ms"] / 1000
    assert samples[("pf_usage_network_bytes", "a.b:c-d_e", "2025-01")] == 2**40


def test_label_values_are_escaped(pfm: Cli) -> None:
    row = {
        "tenant_id": 'we"ird\\id',
        "period": "2025-01",
        "risk_score_avg": None,
        "risk_score_max": None,
        **dict.fromkeys(COUNTERS, 1),
    }
    text = exposition([row])
    assert 'tenant="we\\"ird\\\\id"' in text
    (family, *_) = text_string_to_metric_families(text)
    assert family.samples[0].labels["tenant"] == 'we"ird\\id'
    empty = pfm("export-metrics")
    assert empty.code == 0 and "# TYPE pf_usage_cpu_ms_total counter" in empty.out


def test_whole_values_print_as_integers(pfm: Cli, tmp_path: Path) -> None:
    pfm.publish(event("acme_corp", "2025-01", cpu_ms=1_002_860, network_bytes=2**40 + 1))
    text = exposition_of(pfm, tmp_path)
    assert 'pf_usage_cpu_ms_total{period="2025-01",tenant="acme_corp"} 1002860\n' in text
    labels = '{period="2025-01",tenant="acme_corp"}'
    assert f"pf_usage_network_bytes_total{labels} {2**40 + 1}\n" in text
    assert 'pf_usage_cpu_seconds_total{period="2025-01",tenant="acme_corp"} 1002.86\n' in text
    assert "e+" not in text


def promtool() -> Path:
    """Prometheus' own checker: ``make test`` builds it into .cache/bin (``make promtool``).
    Missing is a failure, not a skip: this is the proof the exposition passes its lint."""
    local = Path(__file__).resolve().parents[3] / ".cache" / "bin" / "promtool"
    found = local if local.exists() else shutil.which("promtool")
    assert found, "promtool is missing: run `make promtool`"
    return Path(found)


def promtool_check(text: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool()), "check", "metrics", *flags], input=text, capture_output=True, text=True
    )


def test_promtool_check_metrics(pfm: Cli, tmp_path: Path) -> None:
    """Valid for Prometheus' own parser; its linter's one remark is the contract's name
    (abbreviated unit), and ``--base-units`` leaves it nothing to remark."""
    pfm.publish(
        event("acme_corp", "2025-01", **SEED),
        event("a.b:c-d_e", "2025-02", cpu_ms=123_456_789, network_bytes=2**40),
    )
    text = exposition_of(pfm, tmp_path)
    parsed = promtool_check(text, "--lint=none", "--extended")
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
    linted = promtool_check(text)
    remarks = [line for line in (linted.stdout + linted.stderr).splitlines() if line.strip()]
    assert remarks == ["pf_usage_cpu_ms_total metric names should not contain abbreviated units"], (
        remarks
    )
    clean = promtool_check(exposition_of(pfm, tmp_path, "--base-units"))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "pf_usage_cpu_ms_total" not in exposition_of(pfm, tmp_path, "--base-units")


def exposition_of(pfm: Cli, tmp_path: Path, *flags: str) -> str:
    out = tmp_path / "metrics.prom"
    assert pfm("export-metrics", "-o", str(out), *flags).code == 0
    return out.read_text()
