"""Void and reissue on a real billing DuckDB file and a real usage snapshot: the void invoice
stays readable, billing its period again (``bill``, ``generate``, or ``reissue`` at once)
makes an invoice that names it and charges the period from the usage as it is now without
charging any usage twice or losing any (billed usage and late usage on other invoices), one
invoice per tenant and period that is not void under concurrency, and bad input refused in
one line with nothing stored changed."""

from __future__ import annotations

import concurrent.futures
import shutil
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing import credit_store, invoice_store, invoicing
from billing.credits import CreditMovement
from billing.db import billing_db
from billing.model import (
    CREDIT_APPLIED,
    CREDIT_LINES,
    USAGE_CORRECTION,
    Invoice,
    InvoiceStatus,
    add_up,
)
from billing.rating import Usage, rate
from billing.tiers import BUILTIN_TIERS
from common import settings as config
from schemas.periods import Period
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import SEED, correction, event
from tests.support.books import Books, at, stored
from tests.support.cli_runner import assert_user_error, run_cli
from tests.support.ledgers import set_published_total

BASIC = BUILTIN_TIERS["basic"]


@pytest.fixture
def books(data_env: dict[str, str]) -> Iterator[Books]:
    yield Books()


def void(books: Books, invoice_id: str, reason: str = "wrong usage", by: str = "ops") -> Invoice:
    with books.con() as con:
        return invoicing.void(con, invoice_id, reason, by, at(2025, 6, 1))


def reissue(books: Books, invoice_id: str, now: Any = None) -> Invoice:
    with books.con() as con:
        done = invoicing.reissue(
            con, books.usage(), books.rules(), invoice_id, by="ops", now=now or at(2025, 6, 2)
        )
    assert done.void.invoice_id == invoice_id and done.void.status is InvoiceStatus.void
    assert done.void.replaced_by == done.invoice.invoice_id
    return done.invoice


def live(invoices: list[Invoice]) -> list[Invoice]:
    return [i for i in invoices if i.status is not InvoiceStatus.void]


def charged_for(invoices: list[Invoice], period: str) -> Decimal:
    """What the invoices that are not void charge for ``period``: its own invoice's total
    (less its late lines for other periods), plus late lines for it on other invoices."""
    total = Decimal(0)
    for inv in live(invoices):
        for line in inv.lines:
            if line.period == period or (inv.period == period and line.period is None):
                total += line.amount
    return total


def test_void_keeps_the_invoice_readable_and_billing_again_replaces_it(books: Books) -> None:
    books.publish(event("acme", "2025-01", **SEED))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    voided = void(books, jan.invoice_id, "  duplicate of a manual invoice  ", "alice")
    assert voided.status is InvoiceStatus.void
    assert (voided.void_reason, voided.voided_by) == ("duplicate of a manual invoice", "alice")
    assert voided.voided_at == at(2025, 6, 1) and voided.replaced_by is None
    unchanged = {"status", "void_reason", "voided_by", "voided_at"}
    assert voided.model_dump(exclude=unchanged) == jan.model_dump(exclude=unchanged)
    with books.con() as con:
        assert invoice_store.invoice_for(con, "acme", "2025-01") == voided
    new, feb = books.bill(at(2025, 3, 2)).invoices  # January billed again, then February
    assert (new.period, feb.period) == ("2025-01", "2025-02")
    assert new.replaces == jan.invoice_id and new.total == jan.total == Decimal("53.66")
    assert [ln for ln in feb.lines if ln.code == "late_usage"] == []  # charged once
    assert books.bill(at(2025, 3, 2)).invoices == []
    assert books.invoices("acme")[0].replaced_by == new.invoice_id
    assert books.generate("acme", "2025-01", now=at(2025, 3, 3)) == new


def test_generate_bills_a_void_period_again_into_a_replacement(books: Books) -> None:
    books.publish(event("acme", "2025-01", **SEED))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    void(books, jan.invoice_id)
    books.publish(event("acme", "2025-01", api_calls=900))  # after the void
    new = books.generate("acme", "2025-01", now=at(2025, 6, 2))
    assert new.replaces == jan.invoice_id and new.status is InvoiceStatus.finalized
    assert new.total == Decimal("54.56") and new.computed_from["replaces"] == jan.invoice_id
    assert books.generate("acme", "2025-01", now=at(2025, 6, 3)) == new  # the same one again
    again = void(books, new.invoice_id, "twice")
    third = books.generate("acme", "2025-01", now=at(2025, 6, 4))
    assert third.replaces == again.invoice_id and third.total == new.total
    assert [(i.status, i.replaced_by) for i in books.invoices("acme")] == [
        (InvoiceStatus.void, new.invoice_id),
        (InvoiceStatus.void, third.invoice_id),
        (InvoiceStatus.finalized, None),
    ]


def test_a_draft_leaves_to_the_replacement_what_a_void_invoice_charged(books: Books) -> None:
    """January's usage grows after its invoice: February's draft carries the difference; once
    January is void, its replacement charges January whole, so the draft (and an amount
    alert, which counts the draft's lines) no longer does, and February is final without it."""
    books.publish(event("acme", "2025-01", **SEED))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    books.publish(event("acme", "2025-01", api_calls=1000))
    draft = books.generate("acme", "2025-02", now=at(2025, 2, 15))
    assert [(ln.code, ln.amount) for ln in draft.lines if ln.period] == [
        ("late_usage", Decimal("1.00"))
    ]
    void(books, jan.invoice_id)
    draft = books.generate("acme", "2025-02", now=at(2025, 2, 16))
    assert [ln for ln in draft.lines if ln.period] == []
    new, feb = books.bill(at(2025, 3, 2)).invoices
    assert new.replaces == jan.invoice_id and new.total == Decimal("54.66")
    assert feb.invoice_id == draft.invoice_id and feb.lines == draft.lines


def test_reissue_charges_the_period_as_it_is_now_and_links_both_ways(books: Books) -> None:
    books.publish(event("acme", "2025-01", **SEED))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    assert jan.total == Decimal("53.66")
    books.publish(event("acme", "2025-01", api_calls=900))  # after the bill, before reissue
    new = reissue(books, jan.invoice_id)
    all_jan = Usage.from_mapping({**SEED, "api_calls": SEED["api_calls"] + 900})
    assert new.total == rate(BASIC, all_jan).total == Decimal("54.56")
    assert new.status is InvoiceStatus.finalized and new.period == "2025-01"
    assert new.replaces == jan.invoice_id and new.computed_from["replaces"] == jan.invoice_id
    assert new.invoice_id != jan.invoice_id and new.issued_late
    stored_invoices = books.invoices("acme")
    assert [(i.invoice_id, i.status) for i in stored_invoices] == [
        (jan.invoice_id, InvoiceStatus.void),
        (new.invoice_id, InvoiceStatus.finalized),
    ]
    assert stored_invoices[0].replaced_by == new.invoice_id
    assert stored_invoices[0].void_reason == "reissued" and stored_invoices[0].voided_by == "ops"
    assert stored_invoices[0].lines == jan.lines  # the void one never changes its charges
    (feb,) = books.bill(at(2025, 3, 2)).invoices  # the 900 calls are not late usage now
    assert [ln for ln in feb.lines if ln.code == "late_usage"] == []
    with books.con() as con:
        billed = invoice_store.get_billed(con, "acme", "2025-01")
    assert billed is not None and billed.invoice_id == new.invoice_id
    assert billed.usage == all_jan


def test_reissue_credits_late_usage_already_charged_on_a_later_invoice(books: Books) -> None:
    """January's late usage went on February's invoice; more of its usage arrives, and it is
    reissued: the reissue charges January whole and gives February's late line back, so
    January is charged exactly its rating, once."""
    books.publish(event("acme", "2025-01", **SEED))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    books.publish(event("acme", "2025-01", api_calls=1000))
    (feb,) = books.bill(at(2025, 3, 2)).invoices
    (late,) = [ln for ln in feb.lines if ln.code == "late_usage"]
    assert late.amount == Decimal("1.00")
    books.publish(event("acme", "2025-01", api_calls=2000))
    new = reissue(books, jan.invoice_id)
    credit = [ln for ln in new.lines if ln.code == "late_usage"]
    assert [(ln.period, ln.amount) for ln in credit] == [("2025-01", Decimal("-1.00"))]
    assert feb.invoice_id in credit[0].description
    assert new.computed_from["late_usage_credited"] == [
        {"period": "2025-01", "invoice_id": feb.invoice_id, "code": "late_usage", "amount": "1.00"}
    ]
    all_jan = Usage.from_mapping({**SEED, "api_calls": SEED["api_calls"] + 3000})
    assert new.subtotal == rate(BASIC, all_jan).subtotal
    invoices = books.invoices("acme")
    assert charged_for(invoices, "2025-01") == rate(BASIC, all_jan).total  # once, none lost
    (mar,) = books.bill(at(2025, 4, 2)).invoices
    assert [ln for ln in mar.lines if ln.code == "late_usage"] == []
    books.publish(event("acme", "2025-01", api_calls=500))  # later still: a late line again
    (apr,) = books.bill(at(2025, 5, 2)).invoices
    assert [(ln.period, ln.amount) for ln in apr.lines if ln.code == "late_usage"] == [
        ("2025-01", Decimal("0.50"))
    ]


def test_reissue_carries_again_the_late_usage_the_void_invoice_carried(books: Books) -> None:
    """February's invoice carried January's late usage; voiding February takes that charge
    back, so the next ``bill``, which bills February again, carries it again, with what
    arrived since."""
    books.publish(event("acme", "2025-01", api_calls=10), event("acme", "2025-02", api_calls=10))
    books.bill(at(2025, 2, 2))
    books.publish(event("acme", "2025-01", api_calls=1000))
    (feb,) = books.bill(at(2025, 3, 2)).invoices
    assert [ln.amount for ln in feb.lines if ln.code == "late_usage"] == [Decimal("1.00")]
    void(books, feb.invoice_id)  # takes January's 1.00 back...
    books.publish(event("acme", "2025-01", api_calls=500))
    (new,) = books.bill(at(2025, 3, 3)).invoices  # ...February again charges it, and the 500
    assert new.replaces == feb.invoice_id
    assert [(ln.period, ln.amount) for ln in new.lines if ln.code == "late_usage"] == [
        ("2025-01", Decimal("1.50"))
    ]
    assert new.total == Decimal("50.01") + Decimal("1.50")
    invoices = books.invoices("acme")
    assert charged_for(invoices, "2025-01") == rate(BASIC, Usage(api_calls=1510)).total
    (mar,) = books.bill(at(2025, 4, 2)).invoices
    assert [ln for ln in mar.lines if ln.code == "late_usage"] == []


def test_reissue_gives_back_a_correction_credited_on_a_later_invoice(books: Books) -> None:
    """January corrected down after it was final: February credits it (usage_correction).
    January's reissue rates it as it is now and gives February's credit back, so January is
    charged exactly its rating now, once."""
    books.publish(event("acme", "2025-01", **SEED))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    set_published_total(config.load_settings(), 0, "acme", "api_calls", 0, "2025-01")
    (feb,) = books.bill(at(2025, 3, 2)).invoices
    assert [(ln.code, ln.amount) for ln in feb.lines if ln.period == "2025-01"] == [
        (USAGE_CORRECTION, Decimal("-0.10"))
    ]
    new = reissue(books, jan.invoice_id)
    now = Usage.from_mapping({**SEED, "api_calls": 0})
    assert [(ln.code, ln.amount) for ln in new.lines if ln.period == "2025-01"] == [
        (USAGE_CORRECTION, Decimal("0.10"))
    ]
    assert new.total == rate(BASIC, now).total + Decimal("0.10") == Decimal("53.66")
    assert charged_for(books.invoices("acme"), "2025-01") == rate(BASIC, now).total
    (mar,) = books.bill(at(2025, 4, 2)).invoices
    assert [ln for ln in mar.lines if ln.period == "2025-01"] == []


def test_a_void_in_stripe_frees_the_period_to_be_billed_again(books: Books) -> None:
    books.publish(event("acme", "2025-01", api_calls=10))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    with books.con() as con:
        assert invoice_store.set_status_by_invoice_id(con, jan.invoice_id, InvoiceStatus.void)
        voided = invoice_store.get_invoice(con, jan.invoice_id)
    assert voided is not None and voided.voided_by == "stripe"
    assert voided.void_reason == "voided in Stripe" and voided.voided_at is not None
    assert books.generate("acme", "2025-01", now=at(2025, 6, 2)).replaces == jan.invoice_id


# --- the credit balance: a void reverses what the invoice moved ---------------------------


def balance(books: Books) -> Decimal:
    """The tenant's balance as the ledger has it (the sum of its movements), checked against
    its lots: none below zero, and together the same."""
    with books.con() as con:
        moved = add_up(m.amount for m in credit_store.movements_of(con, "acme"))
        lots = credit_store.credit_lots(con, "acme").get("acme", ())
        per_lot = con.execute(
            "SELECT min(s) FROM (SELECT sum(amount) s FROM credit_movements "
            "GROUP BY source_invoice_id)"
        ).fetchone()
    assert per_lot is not None and (per_lot[0] is None or per_lot[0] >= 0)
    assert moved == add_up(lot.remaining for lot in lots)
    return moved


def on_lines(invoices: list[Invoice]) -> Decimal:
    """The balance the invoices that are not void show: credit carried less credit applied."""
    return add_up(
        ln.amount for inv in live(invoices) for ln in inv.lines if ln.code in CREDIT_LINES
    )


@pytest.fixture
def credited(books: Books) -> list[Invoice]:
    """January corrected down by 120 usd: February carries 70, March applies 50, April 20."""
    books.publish(event("acme", "2025-01", **{**SEED, "violations": 122}))
    books.bill(at(2025, 2, 1, 2))
    books.publish(correction("acme", "2025-01", violations=-120))
    feb, mar, apr, may = books.bill(at(2025, 6, 1, 2)).invoices
    assert [i.credit_balance for i in (feb, mar, apr)] == [Decimal(n) for n in ("70", "20", "0")]
    assert balance(books) == 0
    return [feb, mar, apr, may]


def test_a_void_gives_applied_credit_back_and_billing_again_applies_it(
    books: Books, credited: list[Invoice]
) -> None:
    feb, apr = credited[0], credited[2]
    void(books, apr.invoice_id)
    assert balance(books) == Decimal("20.00") == on_lines(books.invoices("acme"))
    with books.con() as con:
        (reversal,) = [m for m in credit_store.movements_on(con, apr.invoice_id) if m.reversal]
    assert reversal == CreditMovement(
        "acme", apr.invoice_id, feb.invoice_id, Decimal("20.00"), reversal=True
    )
    (again,) = books.bill(at(2025, 6, 2)).invoices
    assert again.replaces == apr.invoice_id and again.total == apr.total == Decimal("30.00")
    assert [ln.amount for ln in again.lines if ln.code == CREDIT_APPLIED] == [Decimal("-20.00")]
    assert balance(books) == 0 == on_lines(books.invoices("acme"))


def test_a_reissue_of_an_invoice_that_applied_credit_applies_it_again(
    books: Books, credited: list[Invoice]
) -> None:
    new = reissue(books, credited[1].invoice_id)
    assert [ln.amount for ln in new.lines if ln.code == CREDIT_APPLIED] == [Decimal("-50.00")]
    assert (new.total, new.credit_balance) == (Decimal("0.00"), Decimal("0.00"))
    assert balance(books) == 0 == on_lines(books.invoices("acme"))
    with books.con() as con:
        assert [lot for lots in credit_store.credit_lots(con).values() for lot in lots] == []


def test_a_void_of_an_invoice_whose_carried_credit_was_applied_later_is_refused(
    books: Books, credited: list[Invoice]
) -> None:
    feb, mar, apr = credited[:3]
    data = Path(config.load_settings().metering_data_dir)
    before = stored(data)
    acts: list[Callable[[], Invoice]] = [
        partial(void, books, feb.invoice_id),
        partial(reissue, books, feb.invoice_id),
    ]
    for act in acts:
        with pytest.raises(invoicing.VoidRefused) as refused:
            act()
        message = str(refused.value)
        assert f"{mar.invoice_id} (2025-03), {apr.invoice_id} (2025-04) applied" in message
        assert f"`invoices void {apr.invoice_id} --reason TEXT`" in message
        assert stored(data) == before
    void(books, apr.invoice_id)
    void(books, mar.invoice_id)
    voided = void(books, feb.invoice_id)  # nothing uses its credit now
    assert voided.status is InvoiceStatus.void
    assert balance(books) == 0 == on_lines(books.invoices("acme"))
    again = books.bill(at(2025, 6, 2)).invoices  # February, March, April billed again
    assert [(i.period, i.replaces) for i in again] == [
        (x.period, x.invoice_id) for x in (feb, mar, apr)
    ]
    assert [(i.total, i.credit_balance) for i in again] == [
        (x.total, x.credit_balance) for x in (feb, mar, apr)
    ]
    assert balance(books) == 0 == on_lines(books.invoices("acme"))


def test_a_void_in_stripe_reverses_the_credit_it_can(
    books: Books, credited: list[Invoice], caplog: pytest.LogCaptureFixture
) -> None:
    feb, apr = credited[0], credited[2]
    with books.con() as con:
        assert invoice_store.set_status_by_invoice_id(con, apr.invoice_id, InvoiceStatus.void)
        assert invoice_store.set_status_by_invoice_id(con, apr.invoice_id, InvoiceStatus.void)
    assert balance(books) == Decimal("20.00") == on_lines(books.invoices("acme"))  # once
    with books.con() as con:  # Stripe voided it anyway: the ledger is kept, and it is said
        assert invoice_store.set_status_by_invoice_id(con, feb.invoice_id, InvoiceStatus.void)
    assert balance(books) == Decimal("20.00")
    assert f"invoice {feb.invoice_id} was voided in Stripe, but" in caplog.text


def test_a_ledger_from_before_reversals_is_rebuilt_with_its_rows(
    books: Books, credited: list[Invoice]
) -> None:
    with books.con() as con:
        rows = con.execute("SELECT * EXCLUDE (reversal) FROM credit_movements ORDER BY ALL")
        old = rows.fetchall()
        con.execute("CREATE TABLE old AS SELECT * EXCLUDE (reversal) FROM credit_movements")
        con.execute("DROP TABLE credit_movements")
        con.execute(
            "CREATE TABLE credit_movements (tenant_id VARCHAR NOT NULL, invoice_id VARCHAR "
            "NOT NULL, source_invoice_id VARCHAR NOT NULL, amount DECIMAL(38, 2) NOT NULL, "
            "created_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (invoice_id, source_invoice_id))"
        )
        con.execute("INSERT INTO credit_movements SELECT * FROM old")
        con.execute("DROP TABLE old")
    with books.con() as con:
        rows = con.execute("SELECT * EXCLUDE (reversal) FROM credit_movements ORDER BY ALL")
        assert rows.fetchall() == old
        assert con.execute("SELECT bool_or(reversal) FROM credit_movements").fetchone() == (False,)
    void(books, credited[2].invoice_id)
    assert balance(books) == Decimal("20.00")


OPS = st.lists(
    st.tuples(st.sampled_from(["void", "reissue", "bill"]), st.integers(0, 7)), max_size=6
)


def test_after_any_voids_and_reissues_the_ledger_is_the_live_invoices_credit(
    books: Books, credited: list[Invoice]
) -> None:
    """Hypothesis: any sequence of voids, reissues and bills (some refused) keeps the sum of
    the ledger's movements equal to the credit the live invoices show (carried less applied),
    no lot below zero, one live invoice per period, and each refusal changes nothing."""
    path = config.load_settings().billing_db
    template = path.with_name("credited.duckdb")
    shutil.copyfile(path, template)
    usage, rules = books.usage(), books.rules()

    @settings(max_examples=20, deadline=None)
    @given(ops=OPS)
    def run(ops: list[tuple[str, int]]) -> None:
        shutil.copyfile(template, path)
        for step, (op, pick) in enumerate(ops):
            moment = at(2025, 6, 2) + timedelta(minutes=step)
            invoices = books.invoices("acme")
            target = live(invoices)[pick % len(live(invoices))].invoice_id
            ledger = balance(books)
            try:
                with billing_db(path, 10) as con:
                    if op == "void":
                        invoicing.void(con, target, "x", "ops", moment)
                    elif op == "reissue":
                        invoicing.reissue(con, usage, rules, target, by="ops", now=moment)
                    else:
                        invoicing.bill(con, usage, rules, as_of=at(2025, 6, 1, 2), now=moment)
            except invoicing.VoidRefused:
                assert books.invoices("acme") == invoices and balance(books) == ledger
            invoices = books.invoices("acme")
            assert balance(books) == on_lines(invoices)
            periods = [i.period for i in live(invoices)]
            assert len(periods) == len(set(periods))
        with billing_db(path, 10) as con:  # billing every void period again restores it all
            invoicing.bill(con, usage, rules, as_of=at(2025, 6, 1, 2), now=at(2025, 6, 3))
        invoices = live(books.invoices("acme"))
        assert [i.period for i in invoices] == [f"2025-0{m}" for m in range(1, 6)]
        assert balance(books) == on_lines(invoices) == 0

    run()


# --- one invoice per tenant and period that is not void ---------------------------------


def test_one_live_invoice_per_tenant_and_period_is_enforced_by_the_billing_file(
    books: Books,
) -> None:
    books.publish(event("acme", "2025-01", api_calls=5))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    second = jan.model_copy(update={"invoice_id": "INV-2-deadbeef"})
    with books.con() as con, pytest.raises(duckdb.ConstraintException):
        invoice_store.write_invoices(con, [second])
    void(books, jan.invoice_id)
    with books.con() as con:
        invoice_store.write_invoices(con, [second])  # the period's live invoice
        third = jan.model_copy(update={"invoice_id": "INV-3-deadbeef"})
        with pytest.raises(duckdb.ConstraintException):
            invoice_store.write_invoices(con, [third])
        void_one = jan.model_copy(update={"invoice_id": "INV-4-dead", "status": InvoiceStatus.void})
        invoice_store.write_invoices(con, [void_one])  # void ones never collide
        rows = con.execute(
            "SELECT status, count(*) FROM invoices GROUP BY ALL ORDER BY ALL"
        ).fetchall()
    assert rows == [("finalized", 1), ("void", 2)]


def test_two_transactions_making_a_live_invoice_at_once_cannot_both_commit(books: Books) -> None:
    books.publish(event("acme", "2025-01", api_calls=5))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    void(books, jan.invoice_id)
    with books.con() as con:
        first, second = con.cursor(), con.cursor()
        first.execute("BEGIN")
        second.execute("BEGIN")
        invoice_store.write_invoices(first, [jan.model_copy(update={"invoice_id": "INV-a"})])
        invoice_store.write_invoices(second, [jan.model_copy(update={"invoice_id": "INV-b"})])
        first.execute("COMMIT")
        with pytest.raises(duckdb.TransactionException, match="constraint"):
            second.execute("COMMIT")
        live_ids = con.execute("SELECT invoice_id FROM invoices WHERE status <> 'void'").fetchall()
    assert live_ids == [("INV-a",)]


def test_two_reissues_at_once_in_one_process_make_one_invoice(
    books: Books, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both read the live invoice before either voids it (a barrier holds them there): one
    commits, the other fails cleanly and leaves nothing."""
    books.publish(event("acme", "2025-01", api_calls=5))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    barrier = threading.Barrier(2, timeout=60)
    mark_void = invoice_store.void_invoice

    def meet_then_void(con: duckdb.DuckDBPyConnection, *args: Any) -> bool:
        barrier.wait()
        return mark_void(con, *args)

    monkeypatch.setattr(invoice_store, "void_invoice", meet_then_void)
    usage, rules = books.usage(), books.rules()
    path = config.load_settings().billing_db

    def run(_: int) -> Invoice | Exception:
        try:
            with billing_db(path, 10) as con:
                done = invoicing.reissue(
                    con, usage, rules, jan.invoice_id, by="ops", now=at(2025, 6, 2)
                )
                return done.invoice
        except (invoicing.ReissueRaced, invoicing.VoidRefused) as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(run, range(2)))
    made = [o for o in outcomes if isinstance(o, Invoice)]
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert len(made) == 1 and len(failed) == 1, outcomes
    assert "by another run" in str(failed[0])
    invoices = books.invoices("acme")
    assert [i.invoice_id for i in live(invoices)] == [made[0].invoice_id]
    assert invoices[0].replaced_by == made[0].invoice_id and len(invoices) == 2


def test_two_reissue_processes_at_once_make_one_invoice(books: Books) -> None:
    books.publish(event("acme", "2025-01", api_calls=5))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(
            pool.map(lambda _: run_cli("invoices", "reissue", jan.invoice_id, "-q"), range(2))
        )
    assert sorted(r.returncode == 0 for r in runs) == [False, True], [r.stderr for r in runs]
    loser = next(r for r in runs if r.returncode != 0)
    assert_user_error(loser, f"invoice {jan.invoice_id} is void")
    invoices = books.invoices("acme")
    assert len(invoices) == 2 and len(live(invoices)) == 1
    assert invoices[0].replaced_by == live(invoices)[0].invoice_id


# --- the command line -----------------------------------------------------------------


OPEN = str(Period.of(datetime.now(UTC)))


@pytest.fixture
def billed(pfm: Cli) -> dict[str, str]:
    """acme billed for January 2025 (finalized), with a draft for this month: period ->
    invoice id."""
    pfm.publish(event("acme", "2025-01", **SEED), event("acme", OPEN, api_calls=1))
    assert pfm("bill", "--as-of", "2025-02-01T02:00:00Z", "-q").code == 0
    assert pfm("generate-invoice", "acme", OPEN).code == 0
    run = pfm("invoices", "acme", "-f", "json")
    return {doc["period"]: doc["invoice_id"] for doc in run.json()}


def test_void_and_reissue_from_the_command_line(
    billing_mode: str, pfm: Cli, billed: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    jan = billed["2025-01"]
    monkeypatch.setenv("USER", "carol")
    monkeypatch.setenv("LOGNAME", "carol")
    run = pfm("invoices", "reissue", jan, "-f", "json")
    again = run.json()
    assert again["replaces"] == jan and again["status"] == "finalized"
    assert again["total"] == "53.66" and again["void_reason"] is None
    assert f"reissued {jan} as {again['invoice_id']}" in run.err
    listed = pfm("invoices", "acme", "-f", "json").json()
    assert [(d["invoice_id"], d["status"]) for d in listed[:2]] == [
        (jan, "void"),
        (again["invoice_id"], "finalized"),
    ]
    assert listed[0]["replaced_by"] == again["invoice_id"]
    assert (listed[0]["void_reason"], listed[0]["voided_by"]) == ("reissued", "carol")
    assert listed[0]["voided_at"]
    assert pfm("invoices", "list", "acme", "-f", "json").json() == listed
    # the void one stays readable by its id, as stored, in every format
    assert pfm("invoices", "show", jan, "-f", "json").json() == listed[0]
    page = pfm("invoices", "show", jan, "-f", "html").out
    assert "VOID" in page and f"invoices show {again['invoice_id']} -f html" in page
    assert f"replaced by {again['invoice_id']}" in pfm("invoices", "show", jan).out.replace(
        "\n", ""
    )
    table = pfm("invoices", "acme")
    assert table.code == 0 and f"replaced by {again['invoice_id']}" in table.out.replace("\n", "")
    shown = pfm("generate-invoice", "acme", "2025-01", "-f", "json").json()
    assert shown["invoice_id"] == again["invoice_id"]  # the period's live invoice
    run = pfm("invoices", "void", again["invoice_id"], "--reason", "tier was wrong", "-f", "json")
    doc = run.json()
    assert doc["status"] == "void" and doc["void_reason"] == "tier was wrong"
    assert doc["voided_by"] == "carol" and doc["replaced_by"] is None
    assert f"voided {again['invoice_id']} (acme, 2025-01)" in run.err
    table = pfm("invoices", "acme")
    assert "not billed again yet" in table.out.replace("\n", "")
    third = pfm("generate-invoice", "acme", "2025-01", "-f", "json").json()
    assert third["replaces"] == again["invoice_id"] and third["total"] == "53.66"
    by = pfm("invoices", "reissue", third["invoice_id"], "--reason", "again", "--by", "dave")
    assert by.code == 0 and f"replaces void {third['invoice_id']}" in by.out.replace("\n", "")
    last = pfm("invoices", "acme", "-f", "json").json()[2]
    assert (last["void_reason"], last["voided_by"]) == ("again", "dave")


def test_bad_void_and_reissue_are_refused_with_nothing_changed(
    pfm: Cli, billed: dict[str, str]
) -> None:
    jan, mar = billed["2025-01"], billed[OPEN]
    data = Path(config.load_settings().metering_data_dir)
    before = stored(data)
    refused = [
        (["invoices", "void", mar, "--reason", "x"], "is a draft"),
        (["invoices", "void", "INV-nope", "--reason", "x"], "unknown invoice 'INV-nope'"),
        (["invoices", "void", jan, "--reason", ""], "--reason is empty"),
        (["invoices", "void", jan, "--reason", "   "], "--reason is empty"),
        (["invoices", "void", jan, "--reason", "a\nb"], "one line"),
        (["invoices", "void", jan, "--reason", "x" * 501], "at most 500"),
        (["invoices", "void", jan, "--reason", "x", "--by", " "], "invalid --by"),
        (["invoices", "void", jan], "Missing option '--reason'"),
        (["invoices", "reissue", mar], "is a draft"),
        (["invoices", "reissue", "INV-nope"], "unknown invoice 'INV-nope'"),
        (["invoices", "reissue", jan, "--reason", " "], "--reason is empty"),
        (["invoices", "reissue", jan, "--by", ""], "invalid --by"),
        (["invoices", "show", mar], f"`generate-invoice acme {OPEN}` shows it recomputed"),
        (["invoices", "show", "INV-nope"], "unknown invoice 'INV-nope'"),
    ]
    for args, fragment in refused:
        pfm(*args).error(fragment)
        assert stored(data) == before, args
    assert pfm("invoices", "void", jan, "--reason", "wrong").code == 0
    before = stored(data)
    pfm("invoices", "void", jan, "--reason", "twice").error("is void already")
    pfm("invoices", "reissue", jan).error(f"invoice {jan} is void (since ")
    run = pfm("invoices", "reissue", jan)
    run.error("`generate-invoice acme 2025-01` (or `bill`) bills the period again")
    assert stored(data) == before
    new = pfm("generate-invoice", "acme", "2025-01", "-f", "json").json()["invoice_id"]
    before = stored(data)
    for args, fragment in [
        (["invoices", "reissue", jan], f"replaced by {new}; `invoices reissue {new}`"),
        (["invoices", "void", jan, "--reason", "x"], "is void already"),
    ]:
        pfm(*args).error(fragment)
        assert stored(data) == before, args


def test_a_billing_file_from_before_voids_is_rebuilt_with_its_rows(books: Books) -> None:
    """UNIQUE(tenant_id, period) cannot be dropped in DuckDB: the table is rebuilt once."""
    books.publish(event("acme", "2025-01", **SEED))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    path = config.load_settings().billing_db
    con = duckdb.connect(str(path))
    try:
        con.execute(
            "CREATE TABLE old AS SELECT * EXCLUDE (void_reason, voided_at, voided_by, "
            "replaces, replaced_by, live_key) FROM invoices"
        )
        con.execute("DROP VIEW invoices_shown")
        con.execute("DROP TABLE invoices")
        old = con.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'old'"
        ).fetchall()
        columns = ", ".join(f"{name} {kind}" for name, kind in old)
        con.execute(
            f"CREATE TABLE invoices ({columns}, PRIMARY KEY (invoice_id), "
            "UNIQUE (tenant_id, period))"
        )
        con.execute("INSERT INTO invoices SELECT * FROM old")
        con.execute("DROP TABLE old")
        con.execute("CREATE VIEW invoices_shown AS SELECT * FROM invoices")
    finally:
        con.close()
    assert books.invoices("acme") == [jan]
    with books.con() as con:
        keys = con.execute("SELECT live_key FROM invoices").fetchall()
        uniques = con.execute(
            "SELECT constraint_column_names FROM duckdb_constraints() "
            "WHERE table_name = 'invoices' AND constraint_type = 'UNIQUE'"
        ).fetchall()
        shown = con.execute("SELECT status, stored_status FROM invoices_shown").fetchall()
    assert keys == [("acme 2025-01",)] and uniques == [(["live_key"],)]
    assert shown == [("overdue", "finalized")]
    assert reissue(books, jan.invoice_id).total == add_up(ln.amount for ln in jan.lines)
