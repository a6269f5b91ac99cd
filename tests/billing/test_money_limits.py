"""Money never wraps and one tenant never blocks the others: invoices from 128-bit usage,
amounts beyond what an invoice or Stripe holds refused for that invoice alone, a tenant that
cannot be billed reported by name while everybody else is billed, prices versioned (a tiers
file edited between bills never changes a past period), and usage older than the tenant's
first billed period charged as late usage instead of invoices back in time."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from aggregator.fold import COUNTER_CEILING
from billing.db import billing_db
from billing.invoicing import InvoiceRefused
from billing.model import MAX_MONEY, MONEY_SQL, InvoiceStatus
from billing.stripe.push import PushRefused, check_stripe_limits
from billing.tiers import PRICE_FIELDS
from common import settings as config
from common.errors import UserError
from tests.fixtures.seeds import event
from tests.fixtures.stripe import make_invoice
from tests.support.books import Books, at
from tests.support.cli_runner import assert_user_error, run_cli
from tests.support.ledgers import set_published_total

INT64_MAX = 2**63 - 1


@pytest.fixture
def books(data_env: dict[str, str]) -> Books:
    return Books()


def _tiers_file(path: Path, **tiers: dict[str, str]) -> Path:
    """A tiers file with each named tier at 0 for every price but those given."""
    out = []
    for name, prices in tiers.items():
        out.append(f"[tiers.{name}]\nbase_price_usd = {prices.get('base_price_usd', '10.00')}")
        out += [f"{field} = {prices.get(field, '0')}" for field in PRICE_FIELDS.values()]
    path.write_text("\n".join(out) + "\n")
    return path


def _use_tiers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **tiers: dict[str, str]) -> Path:
    """``_tiers_file`` in ``tmp_path``, named by METERING_TIERS_FILE."""
    path = _tiers_file(tmp_path / "tiers.toml", **tiers)
    monkeypatch.setenv("METERING_TIERS_FILE", str(path))
    return path


# --- usage past 2**63 is billed positive and exact ---------------------------------------


def test_two_events_of_2_62_cpu_ms_make_a_positive_exact_invoice(books: Books) -> None:
    books.publish(event("big", "2025-01", cpu_ms=2**62), event("big", "2025-01", cpu_ms=2**62))
    (invoice,) = books.bill(at(2025, 2, 2)).invoices
    cpu = next(ln for ln in invoice.lines if ln.code == "cpu")
    assert (cpu.quantity, cpu.amount) == (Decimal(2**63), Decimal("922337203685.48"))  # x 0.0000001
    assert invoice.total == Decimal("922337203735.48")  # + 50.00 base, never negative


def test_a_line_of_1e16_usd_is_finalized_exactly_and_everybody_else_too(books: Books) -> None:
    """tool_executions = 2**62 on basic (0.01 each): 46,116,860,184,273,879.04 usd, which did
    not fit DECIMAL(18, 2) and stopped the whole job."""
    books.publish(event("huge", "2025-01", tool_executions=2**62), event("small", "2025-01"))
    result = books.bill(at(2025, 2, 2))
    assert result.failures == []
    by_tenant = {i.tenant_id: i for i in result.invoices}
    tools = next(ln for ln in by_tenant["huge"].lines if ln.code == "tool_executions")
    assert tools.amount == Decimal("46116860184273879.04")
    assert by_tenant["huge"].total == Decimal("46116860184273929.04")  # + 50.00 base
    assert books.invoices("huge")[0].total == by_tenant["huge"].total  # stored exactly
    assert by_tenant["small"].total == Decimal("50.00")


def test_an_amount_no_invoice_can_hold_is_refused_for_that_tenant_alone(
    books: Books, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _use_tiers(monkeypatch, tmp_path, dear={"violation_price": "1000000000"})
    books.publish(event("dear-co", "2025-01", violations=1), event("cheap", "2025-01"))
    set_published_total(config.load_settings(), 0, "dear-co", "violations", COUNTER_CEILING)
    books.set_tier("dear-co", "dear", "2025-01")
    result = books.bill(at(2025, 2, 2))
    assert [i.tenant_id for i in result.invoices] == ["cheap"]
    (failure,) = result.failures
    assert (failure.tenant_id, failure.period) == ("dear-co", "2025-01")
    assert "beyond the largest amount an invoice can hold" in failure.reason
    assert books.invoices("dear-co") == []
    with pytest.raises(InvoiceRefused, match="tenant 'dear-co', 2025-01: total of 1000"):
        books.generate("dear-co", "2025-01", at(2025, 2, 2))


def test_bill_names_the_tenants_it_could_not_bill_and_exits_non_zero(
    books: Books, data_env: dict[str, str], tmp_path: Path
) -> None:
    path = _tiers_file(tmp_path / "tiers.toml", gone={"api_call_price": "1.00"})
    env = {**data_env, "METERING_TIERS_FILE": str(path)}
    books.publish(event("leaving", "2025-01", api_calls=1), event("staying", "2025-01"))
    run_cli("tenants", "set-tier", "leaving", "gone", "--from", "2025-01", env=env, check=True)
    path.write_text("[tiers]\n")  # the tier is removed from the file
    proc = run_cli("bill", "--as-of", "2025-02-02T00:00:00Z", env=env)
    assert_user_error(proc, "1 tenant(s) could not be billed: leaving")
    assert "not billed: tenant 'leaving', 2025-01: " in proc.stderr
    assert "tier 'gone' in 2025-01, which is not defined" in proc.stderr
    assert [i.period for i in books.invoices("staying")] == ["2025-01"]
    assert books.invoices("leaving") == []
    proc = run_cli("generate-invoice", "leaving", "2025-01", env=env)
    assert_user_error(proc, "tenant 'leaving', 2025-01: tenant 'leaving' is on tier 'gone'")


# --- Stripe's own limit, per invoice ---------------------------------------------------


def test_stripe_limits_are_checked_per_line_and_total_naming_the_invoice() -> None:
    fits = make_invoice("acme", "2025-01", [("base", "999999.99"), ("risk_adjustment", "-0.99")])
    check_stripe_limits(fits)
    line = make_invoice("acme", "2025-02", [("base", "50.00"), ("cpu", "1000000.00")])
    with pytest.raises(PushRefused, match=rf"invoice {line.invoice_id}: line 1-cpu is 100000000"):
        check_stripe_limits(line)
    total = make_invoice("acme", "2025-03", [("base", "600000.00"), ("cpu", "600000.00")])
    with pytest.raises(PushRefused, match="its total is 120000000 cents; Stripe accepts at most"):
        check_stripe_limits(total)


# --- prices are versioned --------------------------------------------------------------


def test_late_usage_is_rated_with_the_prices_its_period_was_billed_with(
    books: Books, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _use_tiers(monkeypatch, tmp_path, custom={"api_call_price": "1.00"})
    books.publish(event("acme", "2025-01", api_calls=10))
    books.set_tier("acme", "custom", "2025-01")
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    assert jan.total == Decimal("20.00")  # 10.00 base + 10 x 1.00
    assert jan.computed_from["tier"]["api_call_price"] == "1.00"

    _tiers_file(path, custom={"api_call_price": "2.00"})  # the price changes in the file
    books.publish(event("acme", "2025-01", api_calls=3))  # late usage of January
    (feb,) = books.bill(at(2025, 3, 2)).invoices
    late = next(ln for ln in feb.lines if ln.code == "late_usage")
    assert late.amount == Decimal("3.00")  # January's 1.00, not today's 2.00
    assert feb.computed_from["late_usage"][0]["prices"]["api_call_price"] == "1.00"
    assert feb.computed_from["tier"]["api_call_price"] == "2.00"  # February: today's prices

    books.set_tier("acme", "basic", "2025-03")
    path.write_text("[tiers]\n")  # the tier is removed altogether
    books.publish(event("acme", "2025-01", api_calls=4), event("acme", "2025-02", api_calls=5))
    (mar,) = books.bill(at(2025, 4, 2)).invoices
    lates = {ln.period: ln.amount for ln in mar.lines if ln.code == "late_usage"}
    assert lates == {"2025-01": Decimal("4.00"), "2025-02": Decimal("10.00")}  # 1.00 and 2.00
    assert mar.tier == "basic"


def test_a_billing_file_from_before_is_widened_and_gets_recorded_prices(
    books: Books, tmp_path: Path
) -> None:
    """DECIMAL(18, 2) money, BIGINT billed counters, no prices, no billing_starts, no credit
    balances."""
    books.publish(event("acme", "2025-01", api_calls=10))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    cfg = config.load_settings()
    con = duckdb.connect(str(cfg.billing_db))
    try:
        con.execute("ALTER TABLE invoices ALTER subtotal TYPE DECIMAL(18, 2)")
        con.execute("ALTER TABLE invoices ALTER total TYPE DECIMAL(18, 2)")
        for counter in ("cpu_ms", "api_calls"):
            con.execute(f"ALTER TABLE billed_usage ALTER {counter} TYPE BIGINT")
        con.execute("ALTER TABLE billed_usage DROP COLUMN prices")
        con.execute("DROP TABLE billing_starts")
        con.execute("CREATE TABLE old AS SELECT * EXCLUDE (credit_balance) FROM invoices")
        con.execute("DROP TABLE invoices")  # (an index on a later column blocks DROP COLUMN)
        con.execute("ALTER TABLE old RENAME TO invoices")
        con.execute("DROP TABLE credit_movements")
        (computed,) = con.execute("SELECT computed_from FROM invoices").fetchall()[0]
        tier = json.loads(computed)["tier"]
        del tier["display_name"]  # invoices from before did not record it
        con.execute("UPDATE invoices SET computed_from = ?", [json.dumps({"tier": tier})])
    finally:
        con.close()
    with billing_db(cfg.billing_db, 10) as con:
        types = dict(
            con.execute(
                "SELECT table_name || '.' || column_name, data_type FROM duckdb_columns() "
                "WHERE column_name IN ('total', 'api_calls', 'prices', 'first_period', "
                "'credit_balance', 'amount')"
            ).fetchall()
        )
        prices = con.execute("SELECT prices FROM billed_usage").fetchone()
        starts = con.execute("SELECT * FROM billing_starts").fetchall()
        balances = con.execute("SELECT credit_balance FROM invoices_shown").fetchall()
    assert types == {
        "invoices.total": "DECIMAL(38,2)",
        "invoices_shown.total": "DECIMAL(38,2)",  # (the view over it, widened with it)
        "invoices.credit_balance": "DECIMAL(38,2)",  # invoices from before: no balance
        "invoices_shown.credit_balance": "DECIMAL(38,2)",
        "credit_movements.amount": "DECIMAL(38,2)",
        "billed_usage.api_calls": "HUGEINT",
        "billed_usage.prices": "VARCHAR",
        "billing_starts.first_period": "VARCHAR",
    }
    assert prices is not None and json.loads(prices[0])["api_call_price"] == "0.001"
    assert starts == [("acme", "2025-01")] and balances == [(Decimal("0.00"),)]
    assert books.invoices("acme")[0].credit_balance == 0
    books.publish(event("acme", "2025-01", api_calls=1000))
    (feb,) = books.bill(at(2025, 3, 2)).invoices
    assert [ln.amount for ln in feb.lines if ln.code == "late_usage"] == [Decimal("1.00")]
    assert jan.status is InvoiceStatus.finalized


# --- usage older than the first billed period ------------------------------------------


def test_usage_before_the_first_billed_period_is_a_late_line_not_invoices_back_in_time(
    books: Books, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    books.publish(event("acme", "2025-01", api_calls=1))
    assert len(books.bill(at(2025, 6, 2)).invoices) == 5  # 2025-01 .. 2025-05
    books.publish(event("acme", "2024-11", api_calls=2000, violations=1))
    result = books.bill(at(2025, 7, 2))
    assert [i.period for i in result.invoices] == ["2025-06"]  # nothing back in time
    assert books.invoices("acme")[0].period == "2025-01"
    (late,) = [ln for ln in result.invoices[0].lines if ln.code == "late_usage"]
    # usage only, at basic's prices (2.00 + 1.00): no base fee for a month never billed
    assert (late.period, late.amount) == ("2024-11", Decimal("3.00"))
    assert result.invoices[0].computed_from["late_usage"][0]["billed_by"] is None

    # more of it later: only the difference, at the prices it was first charged with
    _use_tiers(monkeypatch, tmp_path, other={})
    books.set_tier("acme", "other", "2025-07")
    books.publish(event("acme", "2024-11", api_calls=1000), event("acme", "2024-12"))
    (jul,) = books.bill(at(2025, 8, 2)).invoices
    lates = {ln.period: ln.amount for ln in jul.lines if ln.code == "late_usage"}
    assert lates == {"2024-11": Decimal("1.00")}  # a month with events but no usage: no line
    with pytest.raises(UserError, match=r"starts in 2025-01.*late usage on the next invoice"):
        books.generate("acme", "2024-11", at(2025, 8, 2))


def test_money_limit_is_what_decimal_38_2_holds() -> None:
    assert Decimal("999999999999999999999999999999999999.99") == MAX_MONEY
    assert MONEY_SQL == "DECIMAL(38, 2)"
