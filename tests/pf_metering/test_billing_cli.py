"""The billing commands as users run them: usage, tenants, bill, generate-invoice, invoices,
their formats (table, JSON per docs/spec.md, "The command line", RFC 4180 CSV), ``-o``,
errors, and ``--stripe``.

Most runs call the console script's ``main`` in this process (same argument parsing, error
handling and output, without a 2 s interpreter start each); a few run the real script."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from bench.ledger_load import publish_usage
from common import settings as config
from schemas.periods import Period
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import SEED, correction, event
from tests.fixtures.stripe import API_KEY
from tests.support.cli_runner import run_cli
from tests.support.stripe_server import FakeStripe

INVOICE_FIELDS = {
    "invoice_id", "tenant_id", "period", "period_start", "period_end", "tier", "currency",
    "status", "lines", "subtotal", "total", "due_date", "created_at", "stripe_invoice_id",
}  # fmt: skip
USAGE_FIELDS = [
    "tenant_id", "period", "tier", "events", "sessions", "cpu_ms", "network_bytes", "api_calls",
    "tool_executions", "data_retrievals", "egress_scans", "policy_checks", "violations",
    "risk_score_avg", "risk_score_max", "quotas",
]  # fmt: skip


def test_usage_formats_zeros_and_errors(pfm: Cli, tmp_path: Path) -> None:
    pfm.publish(event("acme_corp", "2025-01", **SEED), event("acme_corp", "2025-01", api_calls=7))
    run = pfm("usage", "acme_corp", "2025-01", "-f", "json")
    data = run.json()
    assert list(data) == USAGE_FIELDS
    assert data["events"] == 2 and data["api_calls"] == 107 and data["cpu_ms"] == 3_600_000
    assert data["risk_score_avg"] == pytest.approx(0.25) and data["tier"] == "basic"
    cpu = next(q for q in data["quotas"] if q["quota"] == "cpu_ms")
    assert cpu == {
        "quota": "cpu_ms",
        "used": "3600000",
        "limit": "3600000",
        "utilisation_pct": "100.00",
        "exceeded": False,
    }
    assert "usage data as of" in run.err  # freshness on stderr

    table = pfm("usage", "acme_corp", "2025-01")
    assert table.code == 0 and "3,600,000" in table.out and "data_retrievals" in table.out

    out = tmp_path / "feb.csv"
    assert pfm("usage", "acme_corp", "2025-02", "-f", "csv", "-o", str(out)).code == 0
    raw = out.read_bytes()
    assert raw.count(b"\r\n") == 2  # RFC 4180: CRLF line ends
    (row,) = csv.DictReader(io.StringIO(raw.decode()))
    assert row["period"] == "2025-02" and row["events"] == "0" and row["cpu_ms"] == "0"
    assert row["quota_cpu_ms_exceeded"] == "False"

    pfm("usage", "ghost", "2025-01").error("unknown tenant 'ghost'")
    for bad in ("2025-13", "2025-1", "25-01"):
        pfm("usage", "acme_corp", bad).error(f"invalid period '{bad}'")
    assert pfm("tenants", "add", "ghost").code == 0
    assert pfm("usage", "ghost", "2025-01", "-f", "json").json()["events"] == 0


def test_tenants_add_set_tier_and_list(billing_mode: str, pfm: Cli, tmp_path: Path) -> None:
    pfm.publish(event("acme", "2025-01", api_calls=1))
    assert pfm("tenants", "add", "beta", "--tier", "professional").code == 0
    assert pfm("tenants", "add", "beta").code == 0  # again: no change
    pfm("tenants", "add", "beta", "--tier", "basic").error("already exists with tier")
    assert pfm("tenants", "set-tier", "acme", "enterprise", "--from", "2025-02").code == 0
    pfm("tenants", "set-tier", "acme", "gold").error("unknown tier 'gold'")
    pfm("tenants", "set-tier", "nobody", "basic").error("unknown tenant 'nobody'")
    pfm("tenants", "set-tier", "acme", "basic", "--from", "2025-1").error("invalid period")
    pfm("tenants", "add", "bad id!").error("invalid tenant id")

    listed = {t["tenant_id"]: t for t in pfm("tenants", "list", "-f", "json").json()}
    assert set(listed) == {"acme", "beta"}
    assert listed["acme"]["tier"] == "enterprise" and listed["acme"]["first_period"] == "2025-01"
    assert listed["acme"]["tier_history"] == [
        {"from": "2025-01", "tier": "basic"},  # from its first period, as billed
        {"from": "2025-02", "tier": "enterprise"},
    ]
    assert listed["beta"]["tier"] == "professional" and listed["beta"]["added_at"]
    assert listed["beta"]["first_period"] == str(Period.of(datetime.now(UTC)))

    out = tmp_path / "tenants.csv"
    assert pfm("tenants", "list", "-f", "csv", "-o", str(out)).code == 0
    rows = list(csv.DictReader(out.open(newline="")))
    assert [r["tenant_id"] for r in rows] == ["acme", "beta"]
    assert rows[0]["tier_history"] == "basic from 2025-01; enterprise from 2025-02"
    assert pfm("usage", "acme", "2025-01", "-f", "json").json()["tier"] == "basic"
    assert pfm("usage", "acme", "2025-02", "-f", "json").json()["tier"] == "enterprise"


def test_bill_generate_and_list_invoices(billing_mode: str, pfm: Cli, tmp_path: Path) -> None:
    pfm.publish(event("acme", "2025-01", **SEED))
    billed = pfm("bill", "--as-of", "2025-02-01T02:00:00Z")
    assert billed.code == 0 and "1 invoice(s) finalized for 1 tenant(s)" in billed.err

    doc = pfm("generate-invoice", "acme", "2025-01", "-f", "json").json()
    assert set(doc) >= INVOICE_FIELDS
    assert [ln["amount"] for ln in doc["lines"]] == [
        "50.00", "0.36", "0.05", "0.10", "0.50", "0.13", "0.02", "0.50", "2.00",
    ]  # fmt: skip
    assert doc["total"] == "53.66" and doc["subtotal"] == "53.66" and doc["currency"] == "usd"
    cpu = doc["lines"][1]
    assert cpu == {
        "code": "cpu",
        "description": "CPU time (ms)",
        "quantity": "3600000",
        "unit_price": "0.0000001",
        "amount": "0.36",
    }
    assert doc["status"] == "overdue"  # finalized, unpaid, due 2025-03-03
    assert doc["due_date"].startswith("2025-03-03") and doc["period_end"].startswith("2025-02-01")
    assert doc["computed_from"]["usage"]["cpu_ms"] == 3_600_000

    pfm.publish(event("acme", "2025-01", api_calls=1000))  # late
    assert pfm("bill", "--as-of", "2025-03-01T02:00:00Z", "--quiet").err == ""
    out = tmp_path / "invoices.json"
    assert pfm("invoices", "acme", "-o", str(out)).code == 0  # -o alone: JSON
    invoices = json.loads(out.read_text())
    assert [i["period"] for i in invoices] == ["2025-01", "2025-02"]
    assert invoices[0]["invoice_id"] == doc["invoice_id"] and invoices[0]["total"] == "53.66"
    late = [ln for ln in invoices[1]["lines"] if ln["code"] == "late_usage"]
    assert late == [
        {
            "code": "late_usage",
            "description": "late usage for 2025-01 (basic): api_calls +1000",
            "quantity": "1",
            "unit_price": "1.00",
            "amount": "1.00",
            "period": "2025-01",
        }
    ]
    assert invoices[1]["total"] == "51.00"
    table = pfm("invoices", "acme")
    assert "2025-01: 1.00" in table.out and doc["invoice_id"] in table.out

    shown = pfm("generate-invoice", "acme", "2025-01")
    assert shown.code == 0 and "53.66" in shown.out and "0.0000001" in shown.out

    current = str(Period.of(datetime.now(UTC)))
    draft = pfm("generate-invoice", "acme", current, "-f", "json").json()
    assert draft["status"] == "draft" and draft["total"] == "50.00"
    assert (
        pfm("generate-invoice", "acme", current, "-f", "json").json()["invoice_id"]
        == (draft["invoice_id"])
    )
    pfm("generate-invoice", "acme", "2025-01", "-f", "csv").error("csv")
    pfm("generate-invoice", "ghost", "2025-01").error("unknown tenant 'ghost'")
    pfm("invoices", "ghost").error("unknown tenant 'ghost'")
    pfm("bill", "--as-of", "yesterday").error("invalid --as-of")
    pfm("bill", "--as-of", "2999-01-01").error("lies in the future")


def test_bill_and_generate_push_to_stripe(
    billing_mode: str, pfm: Cli, monkeypatch: pytest.MonkeyPatch, fake_stripe: FakeStripe
) -> None:
    pfm.publish(event("acme", "2025-01", **SEED), event("beta", "2025-01", api_calls=3))
    pfm("bill", "--as-of", "2025-02-01T02:00:00Z", "--stripe").error("STRIPE_SECRET_KEY")
    monkeypatch.setenv("STRIPE_SECRET_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", fake_stripe.url)
    run = pfm("bill", "--as-of", "2025-02-01T02:00:00Z", "--stripe")  # resumes the pending ones
    assert run.code == 0, run.err
    docs = [pfm("invoices", t, "-f", "json").json()[0] for t in ("acme", "beta")]
    for doc in docs:
        assert doc["status"] in ("sent", "overdue") and doc["stripe_invoice_id"]
        (remote,) = fake_stripe.invoices_for(doc["invoice_id"])
        assert remote["id"] == doc["stripe_invoice_id"]
        cents = sum(item["amount"] for item in fake_stripe.items_of(remote["id"]))
        assert cents == Decimal(doc["total"]) * 100

    pfm.publish(event("gamma", "2025-02", api_calls=3))
    monkeypatch.setenv("STRIPE_ENABLED", "true")
    doc = pfm("generate-invoice", "gamma", "2025-02", "-f", "json").json()
    assert doc["stripe_invoice_id"] and fake_stripe.invoices_for(doc["invoice_id"])


def test_real_console_script(data_env: dict[str, str], tmp_path: Path) -> None:
    publish_usage(config.load_settings(), [event("acme", "2025-01", **SEED)])
    out = tmp_path / "inv.json"
    run_cli("generate-invoice", "acme", "2025-01", "-o", str(out), check=True)
    assert json.loads(out.read_text())["total"] == "53.66"


def test_invoice_as_html_and_job_metrics_file(pfm: Cli, tmp_path: Path) -> None:
    pfm.publish(event("acme", "2025-01", **SEED))
    prom = tmp_path / "bill.prom"
    assert pfm("bill", "--as-of", "2025-02-01T02:00:00Z", "--metrics-file", str(prom)).code == 0
    text = prom.read_text()
    assert "pf_invoices_finalized_total 1.0" in text and "pf_stripe_errors_total 0.0" in text
    page = tmp_path / "inv.html"
    assert pfm("generate-invoice", "acme", "2025-01", "-f", "html", "-o", str(page)).code == 0
    html_text = page.read_text()
    doc = pfm("generate-invoice", "acme", "2025-01", "-f", "json").json()
    assert html_text.lstrip().lower().startswith("<!doctype html")
    assert doc["invoice_id"] in html_text and "53.66" in html_text


def test_sql_joins_usage_with_billing_tables(billing_mode: str, pfm: Cli) -> None:
    pfm.publish(event("acme", "2025-01", **SEED))
    assert pfm("bill", "--as-of", "2025-02-01T02:00:00Z", "--quiet").code == 0
    rows = pfm(
        "sql",
        "SELECT i.tenant_id, i.period, i.total, u.events, t.tenant_id AS known "
        "FROM invoices i JOIN usage u USING (tenant_id, period) "
        "LEFT JOIN tenants t USING (tenant_id)",
        "-f",
        "json",
    ).json()
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["tenant_id"], row["period"], row["events"]) == ("acme", "2025-01", 1)
    assert Decimal(str(row["total"])) == Decimal("53.66")


def test_corrections_and_credits_in_json_tables_and_sql(billing_mode: str, pfm: Cli) -> None:
    """A period corrected by a correction event after it was billed: the JSON documents carry
    ``credit_balance``, the correction's ``period`` and ``corrects``, the credit lines; the
    ``invoices`` table shows them; ``sql`` reads the credit ledger."""
    pfm.publish(event("acme", "2025-01", violations=100))
    assert pfm("bill", "--as-of", "2025-02-01T02:00:00Z", "--quiet").code == 0
    pfm.publish(correction("acme", "2025-01", violations=-100))
    assert pfm("bill", "--as-of", "2025-04-01T02:00:00Z", "--quiet").code == 0
    feb = pfm("generate-invoice", "acme", "2025-02", "-f", "json").json()
    assert INVOICE_FIELDS | {"credit_balance"} <= set(feb)
    assert (feb["total"], feb["credit_balance"]) == ("0.00", "50.00")
    earlier = [ln for ln in feb["lines"] if ln["code"] in ("usage_correction", "credit_carried")]
    assert [(ln["code"], ln.get("period"), ln.get("corrects"), ln["amount"]) for ln in earlier] == [
        ("usage_correction", "2025-01", "violations", "-100.00"),
        ("credit_carried", None, None, "50.00"),
    ]
    assert feb["computed_from"]["credit"] == {
        "balance_before": "0.00",
        "movements": [{"source_invoice_id": feb["invoice_id"], "amount": "50.00"}],
        "balance_after": "50.00",
    }
    listed = pfm("invoices", "acme", "-f", "json").json()
    assert [(i["period"], i["total"], i["credit_balance"]) for i in listed] == [
        ("2025-01", "150.00", "0.00"),
        ("2025-02", "0.00", "50.00"),
        ("2025-03", "0.00", "0.00"),
    ]
    mar = listed[2]
    assert [ln["amount"] for ln in mar["lines"] if ln["code"] == "credit_applied"] == ["-50.00"]
    table = pfm("invoices", "acme")
    assert table.code == 0 and "credit balance" in table.out and "2025-01: -100.00" in table.out
    rows = pfm(
        "sql",
        "SELECT i.period, m.amount, m.source_invoice_id = i.invoice_id AS own "
        "FROM credit_movements m JOIN invoices i USING (invoice_id) ORDER BY i.period",
        "-f",
        "json",
    ).json()
    assert [(r["period"], Decimal(str(r["amount"])), r["own"]) for r in rows] == [
        ("2025-02", Decimal("50.00"), True),
        ("2025-03", Decimal("-50.00"), False),
    ]
