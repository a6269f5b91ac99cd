"""Numbers people can read: tables round, JSON keeps exact values (money as strings); every
table fits ``COLUMNS=80`` (issue 17, points 6 and 10)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from pf_metering.output import readable
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import SEED, event

NETWORK = 53_678_000  # bytes: 51.1913299560546875 MiB


def odd_event(period: str = "2025-01") -> dict[str, object]:
    e = event("acme_corp", period, **{**SEED, "network_bytes": NETWORK})
    return {**e, "risk_score": 0.24536121794871796}


def test_tables_round_and_json_stays_exact(pfm: Cli) -> None:
    pfm.publish(odd_event())
    table = pfm("usage", "acme_corp", "2025-01").out
    assert "0.2454" in table and "0.24536" not in table
    assert "51.19" in table and "51.1913" not in table
    data = pfm("usage", "acme_corp", "2025-01", "-f", "json").json()
    assert data["risk_score_avg"] == 0.24536121794871796
    network = next(q for q in data["quotas"] if q["quota"] == "network_mb")
    assert network["used"] == "51.1913299560546875"
    invoice = pfm("generate-invoice", "acme_corp", "2025-01").out
    assert "51.19" in invoice and "51.1913" not in invoice
    doc = pfm("generate-invoice", "acme_corp", "2025-01", "-f", "json").json()
    line = next(ln for ln in doc["lines"] if ln["code"] == "network")
    assert line["quantity"] == "51.1913299560546875"
    assert isinstance(doc["total"], str) and Decimal(doc["total"]) > 0


def test_sql_tables_round_floats(pfm: Cli) -> None:
    pfm.publish(odd_event())
    out = pfm("sql", "SELECT risk_score_avg FROM usage").out
    assert "0.2454" in out and "0.24536" not in out


@pytest.mark.parametrize(
    ("value", "shown"),
    [(3_600_000, "3,600,000"), (51.19145870208740234375, "51.19"), (0.24536121794871796, "0.2454"),
     (Decimal("0.0000001"), "0.0000001"), (0.5, "0.5"), (Decimal("12.000"), "12")],
)  # fmt: skip
def test_readable(value: float | Decimal, shown: str) -> None:
    assert readable(value) == shown


def test_every_table_fits_80_columns(
    pfm: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    pfm.publish(odd_event("2025-01"), event("globex_long-tenant.name:eu", "2025-01", **SEED))
    pfm("tenants", "add", "initech", "--tier", "enterprise")
    assert pfm("bill", "--as-of", "2025-02-02T00:00:00Z").code == 0
    commands = [
        ("tiers",),
        ("tenants", "list"),
        ("usage", "acme_corp", "2025-01"),
        ("generate-invoice", "acme_corp", "2025-01"),
        ("invoices", "acme_corp"),
        ("dead-letters",),
        ("sql", "SELECT * FROM usage"),
        ("sql", "SELECT * FROM invoices"),
    ]
    for args in commands:
        run = pfm(*args)
        assert run.code == 0, (args, run.err)
        wide = [line for line in run.out.splitlines() if len(line) > 80]
        assert not wide, (args, wide)
    listing = pfm("tenants", "list").out
    assert "globex_long-tenant.name:eu" in listing  # whole, not cut
