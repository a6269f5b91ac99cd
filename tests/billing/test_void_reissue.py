"""Void and reissue on a real billing DuckDB file and a real usage snapshot: the void invoice
stays readable, its period stays unbilled until reissued, the reissue charges the period from
the usage as it is now without charging any usage twice or losing any (billed usage and late
usage on other invoices), one invoice per tenant and period that is not void under
concurrency, and bad input refused in one line with nothing stored changed."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from billing import credit_store, invoice_store, invoicing
from billing.credits import CreditMovement
from billing.db import billing_db
from billing.model import USAGE_CORRECTION, Invoice, InvoiceStatus, add_up
from billing.rating import Usage, rate
from billing.tiers import BUILTIN_TIERS
from common import settings as config
from schemas.periods import Period
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import SEED, event
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
        return invoicing.reissue(
            con, books.usage(), books.rules(), invoice_id, now=now or at(2025, 6, 2)
        )


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


def test_void_keeps_the_invoice_readable_and_leaves_the_period_unbilled(books: Books) -> None:
    books.publish(event("acme", "2025-01", **SEED))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    voided = void(books, jan.invoice_id, "  duplicate of a manual invoice  ", "alice")
    assert voided.status is InvoiceStatus.void
    assert (voided.void_reason, voided.voided_by) == ("duplicate of a manual invoice", "alice")
    assert voided.voided_at == at(2025, 6, 1) and voided.replaced_by is None
    unchanged = {"status", "void_reason", "voided_by", "voided_at"}
    assert voided.model_dump(exclude=unchanged) == jan.model_dump(exclude=unchanged)
    assert [i.period for i in books.bill(at(2025, 3, 2)).invoices] == ["2025-02"]  # not Jan
    assert books.bill(at(2025, 3, 2)).invoices == []
    assert books.generate("acme", "2025-01", now=at(2025, 3, 3)) == voided
    with books.con() as con:
        assert invoice_store.invoice_for(con, "acme", "2025-01") == voided


def test_reissue_charges_the_period_as_it_is_now_and_links_both_ways(books: Books) -> None:
    books.publish(event("acme", "2025-01", **SEED))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    assert jan.total == Decimal("53.66")
    void(books, jan.invoice_id)
    books.publish(event("acme", "2025-01", api_calls=900))  # after the void, before reissue
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
    assert stored_invoices[0].lines == jan.lines  # the void one never changes its charges
    (feb,) = books.bill(at(2025, 3, 2)).invoices  # the 900 calls are not late usage now
    assert [ln for ln in feb.lines if ln.code == "late_usage"] == []
    with books.con() as con:
        billed = invoice_store.get_billed(con, "acme", "2025-01")
    assert billed is not None and billed.invoice_id == new.invoice_id
    assert billed.usage == all_jan


def test_reissue_credits_late_usage_already_charged_on_a_later_invoice(books: Books) -> None:
    """January's late usage went on February's invoice; January is then voided, more of its
    usage arrives, and it is reissued: the reissue charges January whole and gives February's
    late line back, so January is charged exactly its rating, once."""
    books.publish(event("acme", "2025-01", **SEED))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    books.publish(event("acme", "2025-01", api_calls=1000))
    (feb,) = books.bill(at(2025, 3, 2)).invoices
    (late,) = [ln for ln in feb.lines if ln.code == "late_usage"]
    assert late.amount == Decimal("1.00")
    void(books, jan.invoice_id)
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
    back, so February's reissue carries it again, with what arrived since."""
    books.publish(event("acme", "2025-01", api_calls=10), event("acme", "2025-02", api_calls=10))
    books.bill(at(2025, 2, 2))
    books.publish(event("acme", "2025-01", api_calls=1000))
    (feb,) = books.bill(at(2025, 3, 2)).invoices
    assert [ln.amount for ln in feb.lines if ln.code == "late_usage"] == [Decimal("1.00")]
    void(books, feb.invoice_id)
    assert books.bill(at(2025, 3, 3)).invoices == []  # the void took January's 1.00 back...
    books.publish(event("acme", "2025-01", api_calls=500))
    new = reissue(books, feb.invoice_id)  # ...and the reissue charges it, and the 500 since
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
    void(books, jan.invoice_id)
    new = reissue(books, jan.invoice_id)
    now = Usage.from_mapping({**SEED, "api_calls": 0})
    assert [(ln.code, ln.amount) for ln in new.lines if ln.period == "2025-01"] == [
        (USAGE_CORRECTION, Decimal("0.10"))
    ]
    assert new.total == rate(BASIC, now).total + Decimal("0.10") == Decimal("53.66")
    assert charged_for(books.invoices("acme"), "2025-01") == rate(BASIC, now).total
    (mar,) = books.bill(at(2025, 4, 2)).invoices
    assert [ln for ln in mar.lines if ln.period == "2025-01"] == []


def test_an_invoice_that_moved_the_credit_balance_is_not_voided(books: Books) -> None:
    books.publish(event("acme", "2025-01", api_calls=5))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    with books.con() as con:
        credit_store.record_movements(
            con,
            [CreditMovement("acme", jan.invoice_id, jan.invoice_id, Decimal("1.00"))],
            at(2025, 2, 2),
        )
    data = Path(config.load_settings().metering_data_dir)
    before = stored(data)
    with pytest.raises(invoicing.VoidRefused, match="moved the tenant's credit balance"):
        void(books, jan.invoice_id)
    assert stored(data) == before


def test_a_void_in_stripe_frees_the_period_for_a_reissue(books: Books) -> None:
    books.publish(event("acme", "2025-01", api_calls=10))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    with books.con() as con:
        assert invoice_store.set_status_by_invoice_id(con, jan.invoice_id, InvoiceStatus.void)
        voided = invoice_store.get_invoice(con, jan.invoice_id)
    assert voided is not None and voided.voided_by == "stripe"
    assert voided.void_reason == "voided in Stripe" and voided.voided_at is not None
    assert reissue(books, jan.invoice_id).replaces == jan.invoice_id


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
    """Both read the void invoice before either writes (a barrier holds them there): one
    commits, the other fails cleanly and leaves nothing."""
    books.publish(event("acme", "2025-01", api_calls=5))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    void(books, jan.invoice_id)
    barrier = threading.Barrier(2, timeout=60)
    link = invoice_store.link_replacement

    def meet_then_link(con: duckdb.DuckDBPyConnection, void_id: str, new_id: str) -> bool:
        barrier.wait()
        return link(con, void_id, new_id)

    monkeypatch.setattr(invoice_store, "link_replacement", meet_then_link)
    usage, rules = books.usage(), books.rules()
    path = config.load_settings().billing_db

    def run(_: int) -> Invoice | Exception:
        try:
            with billing_db(path, 10) as con:
                return invoicing.reissue(con, usage, rules, jan.invoice_id, now=at(2025, 6, 2))
        except (invoicing.ReissueRaced, invoicing.VoidRefused) as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(run, range(2)))
    made = [o for o in outcomes if isinstance(o, Invoice)]
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert len(made) == 1 and len(failed) == 1, outcomes
    assert "reissued by another run" in str(failed[0])
    invoices = books.invoices("acme")
    assert [i.invoice_id for i in live(invoices)] == [made[0].invoice_id]
    assert invoices[0].replaced_by == made[0].invoice_id and len(invoices) == 2


def test_two_reissue_processes_at_once_make_one_invoice(books: Books) -> None:
    books.publish(event("acme", "2025-01", api_calls=5))
    (jan,) = books.bill(at(2025, 2, 2)).invoices
    void(books, jan.invoice_id)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(
            pool.map(lambda _: run_cli("invoices", "reissue", jan.invoice_id, "-q"), range(2))
        )
    assert sorted(r.returncode == 0 for r in runs) == [False, True], [r.stderr for r in runs]
    loser = next(r for r in runs if r.returncode != 0)
    assert_user_error(loser, "reissued")
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
    pfm: Cli, billed: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    jan = billed["2025-01"]
    monkeypatch.setenv("USER", "carol")
    monkeypatch.setenv("LOGNAME", "carol")
    run = pfm("invoices", "void", jan, "--reason", "tier was wrong", "-f", "json")
    doc = run.json()
    assert doc["status"] == "void" and doc["void_reason"] == "tier was wrong"
    assert doc["voided_by"] == "carol" and doc["voided_at"] and doc["replaced_by"] is None
    assert f"voided {jan} (acme, 2025-01)" in run.err
    again = pfm("invoices", "reissue", jan, "-f", "json").json()
    assert again["replaces"] == jan and again["status"] == "finalized"
    assert again["total"] == "53.66" and again["void_reason"] is None
    listed = pfm("invoices", "acme", "-f", "json").json()
    assert [(d["invoice_id"], d["status"]) for d in listed[:2]] == [
        (jan, "void"),
        (again["invoice_id"], "finalized"),
    ]
    assert listed[0]["replaced_by"] == again["invoice_id"]
    assert pfm("invoices", "list", "acme", "-f", "json").json() == listed
    table = pfm("invoices", "acme")
    assert table.code == 0 and f"replaced by {again['invoice_id']}" in table.out.replace("\n", "")
    shown = pfm("generate-invoice", "acme", "2025-01", "-f", "json").json()
    assert shown["invoice_id"] == again["invoice_id"]  # the period's live invoice
    by = pfm("invoices", "void", again["invoice_id"], "--reason", "again", "--by", "dave")
    assert by.code == 0 and "VOID" in by.out and "dave" in by.out


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
        (["invoices", "reissue", jan], "is finalized, not void"),
        (["invoices", "reissue", mar], "is draft, not void"),
        (["invoices", "reissue", "INV-nope"], "unknown invoice 'INV-nope'"),
    ]
    for args, fragment in refused:
        pfm(*args).error(fragment)
        assert stored(data) == before, args
    assert pfm("invoices", "void", jan, "--reason", "wrong").code == 0
    before = stored(data)
    pfm("invoices", "void", jan, "--reason", "twice").error("is void already")
    assert stored(data) == before
    new = pfm("invoices", "reissue", jan, "-f", "json").json()["invoice_id"]
    before = stored(data)
    for args, fragment in [
        (["invoices", "reissue", jan], f"was reissued already, as {new}"),
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
    void(books, jan.invoice_id)
    assert reissue(books, jan.invoice_id).total == add_up(ln.amount for ln in jan.lines)
