"""A finalized period corrected afterwards by correction events (schema v3, folded into a real
ledger and snapshot), on a real billing DuckDB file: the next invoice carries the signed
difference, re-rated with the period's prices, line by line (a credit is a negative line),
exactly once; a total never goes below zero, what is left is a credit balance carried to the
following invoices, and every movement of it is in the credit ledger."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from billing import credit_store
from billing.credits import CreditMovement
from billing.model import CREDIT_APPLIED, CREDIT_CARRIED, USAGE_CORRECTION, Invoice, add_up
from billing.rating import Usage, rate
from billing.tiers import BUILTIN_TIERS
from tests.fixtures.seeds import PRICED, SEED, correction, event
from tests.support.books import Books, at

BASIC, PRO = BUILTIN_TIERS["basic"], BUILTIN_TIERS["professional"]


@pytest.fixture
def books(data_env: dict[str, str]) -> Iterator[Books]:
    yield Books()


def lines_of(invoice: Invoice, code: str) -> list[tuple[str | None, str | None, Decimal]]:
    return [(ln.period, ln.corrects, ln.amount) for ln in invoice.lines if ln.code == code]


def movements(books: Books, tenant: str) -> list[CreditMovement]:
    with books.con() as con:
        return credit_store.movements_of(con, tenant)


def test_a_period_corrected_down_is_credited_line_by_line_on_the_next_invoice(
    books: Books,
) -> None:
    books.add("acme", "professional", at(2025, 1, 3))
    books.publish(event("acme", "2025-01", **SEED))
    (jan,) = books.bill(at(2025, 2, 1, 2)).invoices
    assert jan.total == Decimal("182.64")
    before = jan.model_dump()

    books.publish(correction("acme", "2025-01", cpu_ms=-SEED["cpu_ms"]))  # never used
    (feb,) = books.bill(at(2025, 3, 1, 2)).invoices
    now = Usage.from_mapping({**SEED, "cpu_ms": 0})
    expected = {
        after.code: after.amount - billed.amount
        for billed, after in zip(rate(PRO, Usage(**SEED)).lines, rate(PRO, now).lines, strict=True)
        if after.amount != billed.amount
    }
    assert set(expected) == {"cpu", "risk_adjustment"}  # the risk line follows the subtotal
    assert lines_of(feb, USAGE_CORRECTION) == [
        ("2025-01", code, amount) for code, amount in expected.items()
    ]
    assert expected["cpu"] == Decimal("-0.29")  # a credit: a negative line
    credited = add_up(expected.values())
    assert credited == rate(PRO, now).total - jan.total  # the period costs its rating now
    assert feb.total == Decimal("180.00") + credited > 0
    assert lines_of(feb, CREDIT_CARRIED) == lines_of(feb, CREDIT_APPLIED) == []
    assert feb.computed_from["late_usage"][0]["billed"]["cpu_ms"] == SEED["cpu_ms"]
    assert feb.computed_from["late_usage"][0]["now"]["cpu_ms"] == 0
    assert books.invoices("acme")[0].model_dump() == before  # January never changed

    (mar,) = books.bill(at(2025, 4, 1, 2)).invoices
    assert lines_of(mar, USAGE_CORRECTION) == []  # carried once: billed usage moved with it
    assert books.bill(at(2025, 4, 1, 2)).invoices == []


def test_usage_that_only_grew_stays_one_late_usage_line(books: Books) -> None:
    books.publish(event("acme", "2025-01", **SEED))
    books.bill(at(2025, 2, 1, 2))
    books.publish(event("acme", "2025-01", api_calls=1000, violations=1))
    (feb,) = books.bill(at(2025, 3, 1, 2)).invoices
    assert lines_of(feb, "late_usage") == [("2025-01", None, Decimal("2.00"))]
    assert lines_of(feb, USAGE_CORRECTION) == []


def test_credit_beyond_an_invoice_is_carried_across_the_following_invoices(
    books: Books,
) -> None:
    books.publish(event("acme", "2025-01", **{**SEED, "violations": 122}))  # 120 usd more
    (jan,) = books.bill(at(2025, 2, 1, 2)).invoices
    assert jan.total == Decimal("173.66")

    books.publish(correction("acme", "2025-01", violations=-120))  # a bug of ours
    feb, mar, apr, may = books.bill(at(2025, 6, 1, 2)).invoices
    assert lines_of(feb, USAGE_CORRECTION) == [("2025-01", "violations", Decimal("-120.00"))]
    assert lines_of(feb, CREDIT_CARRIED) == [(None, None, Decimal("70.00"))]
    assert (feb.total, feb.credit_balance) == (Decimal("0.00"), Decimal("70.00"))
    assert lines_of(mar, CREDIT_APPLIED) == [(None, None, Decimal("-50.00"))]
    assert (mar.total, mar.credit_balance) == (Decimal("0.00"), Decimal("20.00"))
    assert lines_of(apr, CREDIT_APPLIED) == [(None, None, Decimal("-20.00"))]
    assert (apr.total, apr.credit_balance) == (Decimal("30.00"), Decimal("0.00"))
    assert lines_of(may, CREDIT_APPLIED) == [] and may.total == Decimal("50.00")
    for invoice in (feb, mar, apr, may):
        assert invoice.total == add_up(ln.amount for ln in invoice.lines) >= 0
    assert books.invoices("acme")[1:] == [feb, mar, apr, may]  # stored as shown

    assert movements(books, "acme") == [
        CreditMovement("acme", feb.invoice_id, feb.invoice_id, Decimal("70.00")),
        CreditMovement("acme", mar.invoice_id, feb.invoice_id, Decimal("-50.00")),
        CreditMovement("acme", apr.invoice_id, feb.invoice_id, Decimal("-20.00")),
    ]
    rated = rate(BASIC, Usage(**SEED)).total + 4 * BASIC.base_price_usd  # January now, and 4 bases
    assert add_up(i.total for i in (jan, feb, mar, apr, may)) == rated  # money conserved


def test_the_oldest_credit_is_used_first_and_the_ledger_names_both_invoices(
    books: Books,
) -> None:
    books.publish(event("acme", "2025-01", violations=130), event("acme", "2025-02", violations=90))
    jan, feb = books.bill(at(2025, 3, 1, 2)).invoices
    assert (jan.total, feb.total) == (Decimal("180.00"), Decimal("140.00"))
    books.publish(correction("acme", "2025-01", violations=-130))
    (mar,) = books.bill(at(2025, 4, 1, 2)).invoices  # 50 - 130: 80 carried
    books.publish(correction("acme", "2025-02", violations=-90))
    (apr,) = books.bill(at(2025, 5, 1, 2)).invoices  # 50 - 90 = -40: 40 carried
    (may,) = books.bill(at(2025, 6, 1, 2)).invoices  # 50 of the 120
    (jun,) = books.bill(at(2025, 7, 1, 2)).invoices
    (jul,) = books.bill(at(2025, 8, 1, 2)).invoices
    assert [i.credit_balance for i in (mar, apr, may, jun, jul)] == [
        Decimal(n) for n in ("80.00", "120.00", "70.00", "20.00", "0.00")
    ]
    assert [i.total for i in (mar, apr, may, jun, jul)] == [
        Decimal(n) for n in ("0.00", "0.00", "0.00", "0.00", "30.00")
    ]
    assert movements(books, "acme") == [
        CreditMovement("acme", mar.invoice_id, mar.invoice_id, Decimal("80.00")),
        CreditMovement("acme", apr.invoice_id, apr.invoice_id, Decimal("40.00")),
        CreditMovement("acme", may.invoice_id, mar.invoice_id, Decimal("-50.00")),
        CreditMovement("acme", jun.invoice_id, mar.invoice_id, Decimal("-30.00")),
        CreditMovement("acme", jun.invoice_id, apr.invoice_id, Decimal("-20.00")),
        CreditMovement("acme", jul.invoice_id, apr.invoice_id, Decimal("-20.00")),
    ]
    assert jun.computed_from["credit"]["movements"] == [
        {"source_invoice_id": mar.invoice_id, "amount": "-30.00"},
        {"source_invoice_id": apr.invoice_id, "amount": "-20.00"},
    ]


def test_a_draft_previews_the_credit_without_moving_the_balance(books: Books) -> None:
    books.publish(event("acme", "2025-01", violations=100))
    books.bill(at(2025, 2, 1, 2))
    books.publish(correction("acme", "2025-01", violations=-100))
    draft = books.generate("acme", "2025-02", at(2025, 2, 10))
    assert (draft.total, draft.credit_balance) == (Decimal("0.00"), Decimal("50.00"))
    again = books.generate("acme", "2025-02", at(2025, 2, 11))
    assert again == draft  # recomputed the same: the preview moved nothing
    assert movements(books, "acme") == []
    (feb,) = books.bill(at(2025, 3, 1, 2)).invoices
    assert feb.invoice_id == draft.invoice_id and feb.credit_balance == Decimal("50.00")
    assert [m.amount for m in movements(books, "acme")] == [Decimal("50.00")]


def test_a_correction_is_rerated_through_graduated_prices_and_the_minimum_commitment(
    books: Books, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not unit price x delta: 190,000 of 200,000 API calls taken back credits 190.00 of
    graduated usage, but the period falls under its 100.00 commitment, so 35.00 of that
    comes back as the true-up: January costs its rating now, 100.00."""
    (tmp_path / "tiers.toml").write_text(PRICED)
    monkeypatch.setenv("METERING_TIERS_FILE", str(tmp_path / "tiers.toml"))
    books.publish(event("acme", "2025-01", api_calls=200_000))
    books.set_tier("acme", "scale", "2025-01")
    (jan,) = books.bill(at(2025, 2, 1, 2)).invoices
    assert jan.total == Decimal("255.00")  # 10 + 1,000 x 0.01 + 9,000 x 0.005 + 190,000 x 0.001
    books.publish(correction("acme", "2025-01", api_calls=-190_000))
    (feb,) = books.bill(at(2025, 3, 1, 2)).invoices
    assert lines_of(feb, USAGE_CORRECTION) == [
        ("2025-01", "api_calls", Decimal("-190.00")),
        ("2025-01", "minimum_commitment", Decimal("35.00")),
    ]
    assert jan.total - Decimal("155.00") == Decimal("100.00")  # January costs its rating now
    # February's own 100.00 (base and true-up) less 155.00: 55.00 carried, nothing due
    assert lines_of(feb, CREDIT_CARRIED) == [(None, None, Decimal("55.00"))]
    assert (feb.total, feb.credit_balance) == (Decimal("0.00"), Decimal("55.00"))
