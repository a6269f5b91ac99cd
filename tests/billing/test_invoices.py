"""Invoices on a real billing DuckDB file and a real usage snapshot: period close, drafts,
one invoice per tenant and period, tier history, late usage, the Stripe-facing store API."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from billing import invoice_store
from billing.model import Invoice, InvoiceStatus
from billing.rating import MIB, Usage, rate, round_cents
from billing.tiers import BUILTIN_TIERS, PRICE_FIELDS
from common.errors import UserError
from schemas.periods import Period
from tests.fixtures.seeds import SEED, event
from tests.support.books import Books, at
from tests.support.cli_runner import run_cli


@pytest.fixture
def books(data_env: dict[str, str]) -> Iterator[Books]:
    yield Books()


def totals(invoices: list[Invoice]) -> dict[str, str]:
    return {inv.period: str(inv.total) for inv in invoices}


def test_bill_closes_every_period_from_the_first_once(books: Books) -> None:
    books.publish(event("acme", "2025-01", **SEED))
    assert books.bill(at(2025, 2, 1, 0, 59)).invoices == []  # grace: 1 h after the month
    first = books.bill(at(2025, 2, 1, 1, 0)).invoices
    assert totals(first) == {"2025-01": "53.66"}
    result = books.bill(at(2025, 4, 1, 2))
    assert result.last_closed == Period(2025, 3) and result.tenants == 1
    assert totals(result.invoices) == {"2025-02": "50.00", "2025-03": "50.00"}  # base, no usage
    assert books.bill(at(2025, 4, 1, 2)).invoices == []  # again: nothing new
    stored = books.invoices("acme")
    assert [i.period for i in stored] == ["2025-01", "2025-02", "2025-03"]
    assert stored[0].invoice_id == first[0].invoice_id
    assert all(i.status is InvoiceStatus.finalized for i in stored)
    assert stored[0].due_date == at(2025, 3, 3)  # end + 30 days
    assert [ln.amount for ln in stored[1].lines if ln.code != "base"] == [Decimal("0.00")] * 8


def test_due_days_are_configurable(books: Books, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_DUE_DAYS", "10")
    books.publish(event("acme", "2025-01", api_calls=1))
    (invoice,) = books.bill(at(2025, 2, 2)).invoices
    assert invoice.due_date == at(2025, 2, 11)


def test_open_period_is_a_draft_recomputed_under_one_id(books: Books) -> None:
    books.publish(event("acme", "2025-03", api_calls=1000))
    draft = books.generate("acme", "2025-03", now=at(2025, 3, 20))
    assert draft.status is InvoiceStatus.draft and draft.total == Decimal("51.00")
    books.publish(event("acme", "2025-03", api_calls=2000))
    again = books.generate("acme", "2025-03", now=at(2025, 3, 21))
    assert again.invoice_id == draft.invoice_id and again.total == Decimal("53.00")
    assert [i.invoice_id for i in books.invoices("acme")] == [draft.invoice_id]

    (final,) = books.bill(at(2025, 4, 1, 2)).invoices
    assert final.invoice_id == draft.invoice_id and final.status is InvoiceStatus.finalized
    books.publish(event("acme", "2025-03", api_calls=5000))
    later = books.generate("acme", "2025-03", now=at(2025, 5, 1))
    assert later == final  # closed and final: never recomputed
    with pytest.raises(UserError, match="not started"):
        books.generate("acme", "2025-06", now=at(2025, 5, 1))
    with pytest.raises(UserError, match="starts in 2025-03"):
        books.generate("acme", "2025-02", now=at(2025, 5, 1))
    with pytest.raises(UserError, match="unknown tenant 'ghost'"):
        books.generate("ghost", "2025-03", now=at(2025, 5, 1))


def test_generating_a_closed_period_finalizes_it(books: Books) -> None:
    books.publish(event("acme", "2025-01", **SEED))
    invoice = books.generate("acme", "2025-01", now=at(2025, 2, 5))
    assert invoice.status is InvoiceStatus.finalized and invoice.total == Decimal("53.66")
    assert books.generate("acme", "2025-01", now=at(2025, 2, 6)) == invoice
    assert totals(books.bill(at(2025, 2, 6)).invoices) == {}


def test_late_usage_is_billed_once_on_the_next_invoice(books: Books) -> None:
    pro = BUILTIN_TIERS["professional"]
    books.add("acme", "professional", at(2025, 1, 3))
    books.publish(event("acme", "2025-01", **SEED))
    (jan,) = books.bill(at(2025, 2, 1, 2)).invoices
    assert jan.total == Decimal("182.64")
    jan_before = jan.model_dump()

    late = {"api_calls": 333, "violations": 3, "network_bytes": 12_345}
    books.publish(event("acme", "2025-01", **late))  # lands after January was finalized
    (feb,) = books.bill(at(2025, 3, 1, 2)).invoices
    late_lines = [ln for ln in feb.lines if ln.code == "late_usage"]
    assert len(late_lines) == 1 and late_lines[0].period == "2025-01"
    all_jan = Usage.from_mapping({k: SEED[k] + late.get(k, 0) for k in SEED})
    assert late_lines[0].amount == rate(pro, all_jan).total - jan.total  # exact to the cent
    assert feb.total == Decimal("180.00") + late_lines[0].amount  # 200 x 0.9, plus the late line
    assert feb.computed_from["late_usage"][0]["billed"]["api_calls"] == 100
    assert feb.computed_from["late_usage"][0]["now"]["api_calls"] == 433
    assert books.invoices("acme")[0].model_dump() == jan_before  # January never changed

    (mar,) = books.bill(at(2025, 4, 1, 2)).invoices
    assert [ln.code for ln in mar.lines if ln.code == "late_usage"] == []  # billed once only

    books.publish(event("acme", "2025-01", violations=1), event("acme", "2025-02", api_calls=7))
    (apr,) = books.bill(at(2025, 5, 1, 2)).invoices
    corrections = {ln.period: ln.amount for ln in apr.lines if ln.code == "late_usage"}
    assert set(corrections) == {"2025-01", "2025-02"}
    jan_all = Usage.from_mapping({**all_jan.as_dict(), "violations": all_jan.violations + 1})
    billed_for_jan = jan.total + late_lines[0].amount + corrections["2025-01"]
    assert billed_for_jan == rate(pro, jan_all).total  # the period costs exactly its rating
    assert corrections["2025-02"] == rate(pro, Usage(api_calls=7)).total - rate(pro, Usage()).total
    shown = [(i.period, [ln.period for ln in i.lines if ln.period]) for i in books.invoices("acme")]
    assert shown == [
        ("2025-01", []),
        ("2025-02", ["2025-01"]),
        ("2025-03", []),
        ("2025-04", ["2025-01", "2025-02"]),
    ]


def test_open_period_draft_previews_pending_late_usage(books: Books) -> None:
    books.publish(event("acme", "2025-01", api_calls=10))
    books.bill(at(2025, 2, 1, 2))
    books.publish(event("acme", "2025-01", api_calls=1000))
    draft = books.generate("acme", "2025-02", now=at(2025, 2, 10))
    assert [(ln.code, ln.amount) for ln in draft.lines if ln.period] == [
        ("late_usage", Decimal("1.00"))
    ]
    (feb,) = books.bill(at(2025, 3, 1, 2)).invoices
    assert feb.invoice_id == draft.invoice_id
    assert [ln.amount for ln in feb.lines if ln.code == "late_usage"] == [Decimal("1.00")]


def test_tier_history_rates_each_period(books: Books) -> None:
    books.publish(*(event("acme", p, **SEED) for p in ("2025-01", "2025-02", "2025-03")))
    books.set_tier("acme", "professional", "2025-02")
    books.set_tier("acme", "enterprise", "2025-03")
    result = books.bill(at(2025, 3, 1, 2))
    assert [(i.period, i.tier) for i in result.invoices] == [
        ("2025-01", "basic"),
        ("2025-02", "professional"),
    ]
    assert result.invoices[1].total == Decimal("182.64")
    with pytest.raises(UserError, match="finalized invoices up to 2025-02"):
        books.set_tier("acme", "basic", "2025-02")
    (mar,) = books.bill(at(2025, 4, 1, 2)).invoices
    assert mar.tier == "enterprise"


def test_added_tenant_without_usage_pays_the_base_fee(books: Books) -> None:
    books.add("quiet", "enterprise", at(2025, 1, 10))
    books.add("quiet", None, at(2025, 1, 11))  # again: no change
    with pytest.raises(UserError, match="already exists with tier 'enterprise'"):
        books.add("quiet", "basic", at(2025, 1, 12))
    assert totals(books.bill(at(2025, 3, 1, 2)).invoices) == {
        "2025-01": "400.00",
        "2025-02": "400.00",
    }


def test_every_line_is_explained_by_what_the_invoice_records(books: Books) -> None:
    books.publish(event("acme", "2025-01", **SEED), event("acme", "2025-01", network_bytes=77))
    (invoice,) = books.bill(at(2025, 2, 2)).invoices
    stored = books.invoices("acme")[0]
    facts = stored.computed_from
    assert facts["usage"]["events"] == 2 and facts["usage"]["network_bytes"] == MIB + 77
    assert facts["tier"]["name"] == "basic" and facts["tier"]["cpu_price_per_ms"] == "0.0000001"
    by_code = {ln.code: ln for ln in stored.lines}
    assert by_code["network"].quantity == Decimal(MIB + 77) / MIB
    assert by_code["cpu"].quantity == facts["usage"]["cpu_ms"]
    for ln in stored.lines:
        assert ln.amount == round_cents(ln.quantity * ln.unit_price)
    assert stored.total == sum(ln.amount for ln in stored.lines) == invoice.total
    assert {q.quota: q.exceeded for q in stored.quotas}["cpu_ms"] is False


def test_store_api_for_stripe_and_webhooks(books: Books) -> None:
    books.publish(event("acme", "2025-01", api_calls=5), event("beta", "2025-01", api_calls=5))
    first = books.bill(at(2025, 2, 2)).invoices
    draft = books.generate("acme", "2025-02", now=at(2025, 2, 10))
    with books.con() as con:
        unsent = invoice_store.finalized_unsent(con)
        assert sorted(i.invoice_id for i in unsent) == sorted(i.invoice_id for i in first)
        acme = next(i for i in first if i.tenant_id == "acme")
        invoice_store.mark_sent(con, acme.invoice_id, "in_123")
        sent = invoice_store.get_invoice(con, acme.invoice_id)
        assert sent is not None and sent.status is InvoiceStatus.sent
        assert sent.stripe_invoice_id == "in_123" and sent.lines == acme.lines
        assert [i.tenant_id for i in invoice_store.finalized_unsent(con)] == ["beta"]
        assert invoice_store.set_status_by_invoice_id(con, acme.invoice_id, InvoiceStatus.paid)
        assert not invoice_store.set_status_by_invoice_id(con, "INV-nope", InvoiceStatus.paid)
        paid = invoice_store.get_invoice(con, acme.invoice_id)
        assert paid is not None and paid.total == acme.total and paid.lines == acme.lines
        assert invoice_store.get_invoice(con, "INV-nope") is None
        invoice_store.mark_sent(con, draft.invoice_id, "in_draft")  # a draft is never sent
        still = invoice_store.get_invoice(con, draft.invoice_id)
        assert still is not None and still.status is InvoiceStatus.draft
    beta = next(i for i in first if i.tenant_id == "beta")
    assert beta.status_on(at(2025, 3, 3)) is InvoiceStatus.finalized  # due that instant
    assert beta.status_on(at(2025, 3, 4)) is InvoiceStatus.overdue
    assert paid.status_on(at(2026, 1, 1)) is InvoiceStatus.paid


def test_one_invoice_per_tenant_and_period_is_enforced(books: Books) -> None:
    books.publish(event("acme", "2025-01", api_calls=5))
    (invoice,) = books.bill(at(2025, 2, 2)).invoices
    with books.con() as con:
        other = invoice.model_copy(update={"invoice_id": "INV-1-deadbeef"})
        with pytest.raises(duckdb.ConstraintException):
            invoice_store.write_invoices(con, [other])
        with pytest.raises(duckdb.ConstraintException):  # a finalized invoice is not rewritten
            invoice_store.write_invoices(con, [invoice.model_copy(update={"total": Decimal(0)})])
        assert invoice_store.list_invoices(con, "acme") == [invoice]


def test_two_bill_processes_at_once_leave_one_invoice_each(books: Books) -> None:
    books.publish(*(event(f"t_{i:03d}", "2025-01", api_calls=i) for i in range(60)))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(
            pool.map(
                lambda _: run_cli("bill", "--as-of", "2025-03-01T02:00:00Z", "--quiet"), range(2)
            )
        )
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    with books.con() as con:
        rows = con.execute(
            "SELECT count(*), count(DISTINCT (tenant_id, period)), count(DISTINCT invoice_id) "
            "FROM invoices"
        ).fetchone()
        billed = con.execute("SELECT count(*) FROM billed_usage").fetchone()
    assert rows == (120, 120, 120) and billed == (120,)


def test_custom_tier_from_the_tiers_file(
    books: Books, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "tiers.toml"
    prices = "\n".join(f"{field} = 0.0000001" for field in PRICE_FIELDS.values())
    path.write_text(
        f"[tiers.startup]\nbase_price_usd = 20.00\n{prices}\nrisk_multiplier = 0.95\n"
        'quota_mode = "included"\n[tiers.startup.quotas]\ncpu_ms = 1_000_000\n'
    )
    monkeypatch.setenv("METERING_TIERS_FILE", str(path))
    books.publish(event("acme", "2025-01", cpu_ms=3_000_000))
    books.set_tier("acme", "startup", "2025-01")
    (invoice,) = books.bill(at(2025, 2, 2)).invoices
    cpu = next(ln for ln in invoice.lines if ln.code == "cpu")
    assert invoice.tier == "startup" and cpu.quantity == 2_000_000 and cpu.amount == Decimal("0.20")
    assert invoice.total == Decimal("19.19")  # 20.20 - round(20.20 x 0.05) = 20.20 - 1.01

    monkeypatch.delenv("METERING_TIERS_FILE")
    result = books.bill(at(2025, 3, 2))  # acme is left out with its reason, not everybody
    assert result.invoices == []
    assert [(f.tenant_id, f.period) for f in result.failures] == [("acme", "2025-02")]
    assert "tier 'startup' in 2025-02, which is not defined" in result.failures[0].reason
