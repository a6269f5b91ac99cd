"""Invoices from usage: drafts for open periods, finalization of closed ones (one tenant or the
nightly ``bill`` over all), and late-usage corrections.

Each function here is one unit of work on an open billing connection, inside one transaction:
it reads the invoices and billed usage, rates in Python, and writes everything in bulk. DuckDB
lets one process at a time open the file, so two ``bill`` runs serialize, and the second finds
every period invoiced; UNIQUE(tenant_id, period) backs that up.

Late usage: a finalized invoice never changes. When a (tenant, period) already finalized has
more usage now than ``billed_usage`` records, the tenant's next invoice to be finalized (for a
later period) carries a ``late_usage`` line for it, and ``billed_usage`` moves to the new
counters in the same transaction, so each late event is charged exactly once. The line is rated
with the prices the period was billed with (recorded in ``billed_usage.prices``), never with
what the tiers file says today. Usage of a period before the tenant's first billed one (see
``billing.tenants``) is late usage too, rated with the prices of its tier when first charged.

Void: a finalized invoice is never edited, only marked void (its credit movements reversed);
the period is then billed again, by ``bill``, ``generate`` or at once by ``reissue``, into a
new invoice that names the one it replaces and charges the period whole (see
``_Session.replacement``).

One tenant never blocks the others: a tenant whose invoice cannot be made (a tier that is not
defined, an amount no invoice can hold) is left out with its reason (``BillFailure``) and
everybody else is finalized.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

import duckdb
import pyarrow as pa

from aggregator.views import UsageReader
from billing import credit_store, invoice_store
from billing.corrections import correction_lines
from billing.credits import CreditLot, CreditMovement, Settlement, settle
from billing.db import transaction
from billing.invoice_store import Billed, InvoiceKey, to_json_text
from billing.model import (
    EARLIER_PERIODS,
    MAX_MONEY,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    add_up,
    money,
)
from billing.rating import Usage, rate
from billing.tenants import Tenant, load_tenants, record_starts
from billing.tiers import Tier, get_tier, load_tiers, price_facts, tier_from_facts
from common.errors import OperationError, UserError
from common.settings import Settings
from schemas.codec import COUNTERS
from schemas.periods import Period

USAGE_COLUMNS = (
    "tenant_id",
    "period",
    "events",
    "sessions",
    *COUNTERS,
    "risk_score_avg",
    "risk_score_max",
)
_USAGE_VIEW = "_usage_now"
_STARTS_VIEW = "_billing_starts"


class InvoiceRefused(UserError):
    """An invoice that cannot be made as rated (an amount beyond what an invoice holds)."""


@dataclass(frozen=True)
class BillFailure:
    """A tenant left out of a run: the period it stopped at and why."""

    tenant_id: str
    period: str
    reason: str

    def __str__(self) -> str:
        return f"tenant {self.tenant_id!r}, {self.period}: {self.reason}"


@dataclass(frozen=True)
class Rules:
    """What rating and closing depend on: tiers, grace, payment terms."""

    tiers: dict[str, Tier]
    grace: timedelta
    due_days: int

    @classmethod
    def from_settings(cls, cfg: Settings) -> Rules:
        return cls(load_tiers(cfg.metering_tiers_file), cfg.metering_grace, cfg.metering_due_days)

    def last_closed(self, as_of: datetime) -> Period:
        """The latest period closed at ``as_of`` (now >= end + grace)."""
        return Period.of(as_of - self.grace).previous()


@dataclass(frozen=True)
class UsageData:
    """The usage view's rows (per tenant and period), read once from the snapshot."""

    table: pa.Table
    rows: dict[tuple[str, str], dict[str, Any]]
    lake_snapshot: int | None = None  # cluster mode: the DuckLake snapshot they were read at

    @classmethod
    def read(cls, reader: UsageReader, tenant_id: str | None = None) -> UsageData:
        where, params = ("WHERE tenant_id = ?", [tenant_id]) if tenant_id else ("", [])
        table = reader.con.execute(
            f"SELECT {', '.join(USAGE_COLUMNS)} FROM usage {where}", params
        ).to_arrow_table()
        rows = {(r["tenant_id"], r["period"]): r for r in table.to_pylist()}
        return cls(table, rows, reader.lake_snapshot)

    def first_periods(self) -> dict[str, Period]:
        first: dict[str, str] = {}
        for tenant, period in self.rows:
            if tenant not in first or period < first[tenant]:
                first[tenant] = period
        return {t: Period.parse(p) for t, p in first.items()}

    def row(self, tenant_id: str, period: Period) -> dict[str, Any] | None:
        return self.rows.get((tenant_id, str(period)))

    def usage(self, tenant_id: str, period: Period) -> Usage:
        return Usage.from_mapping(self.row(tenant_id, period) or {})


@dataclass(frozen=True)
class LateUsage:
    """Usage of a period beyond what its invoices charged (nothing, for a period before the
    tenant's first billed one), and the prices it is rated with."""

    billed: Billed
    tier: Tier
    now: Usage


@dataclass(frozen=True)
class ChargedElsewhere:
    """A correction line (``late_usage``, ``usage_correction``) of a reissued period on
    another invoice that is not void: the reissue charges the period whole, so it gives that
    line back (same code, the opposite amount)."""

    period: str
    invoice_id: str
    code: str
    amount: Decimal

    def line(self) -> InvoiceLine:
        return InvoiceLine(
            code=self.code,
            description=(
                f"{self.code} for {self.period} already charged on {self.invoice_id}, "
                f"given back: this invoice charges {self.period} whole"
            ),
            quantity=Decimal(1),
            unit_price=-self.amount,
            amount=-self.amount,
            period=self.period,
        )

    def facts(self) -> dict[str, str]:
        return {
            "period": self.period,
            "invoice_id": self.invoice_id,
            "code": self.code,
            "amount": money(self.amount),
        }


@lru_cache(maxsize=256)
def prices_text(tier: Tier) -> str:
    """The prices ``tier`` rates with, as recorded in ``billed_usage.prices`` (once per tier:
    ``bill`` records thousands)."""
    return to_json_text(price_facts(tier))


def new_invoice_id(now: datetime) -> str:
    """``INV-<millis>-<8 hex>``, the original tool's format."""
    return f"INV-{int(now.timestamp() * 1000)}-{secrets.token_hex(4)}"


def _usage_facts(row: Mapping[str, Any] | None) -> dict[str, Any]:
    facts: dict[str, Any] = {k: 0 for k in ("events", "sessions", *COUNTERS)}
    facts.update(risk_score_avg=None, risk_score_max=None)
    if row is not None:
        facts.update({k: row[k] for k in facts if row.get(k) is not None})
    for key in ("events", "sessions", *COUNTERS):  # 128-bit sums arrive as Decimal
        facts[key] = int(facts[key])
    return facts


def check_amounts(invoice: Invoice) -> None:
    """Refuse an invoice with an amount beyond ``MAX_MONEY`` (what DECIMAL(38, 2) holds)."""
    amounts = [("total", invoice.total), ("subtotal", invoice.subtotal)]
    amounts.append(("credit balance", invoice.credit_balance))
    amounts += [(f"line {ln.code}", ln.amount) for ln in invoice.lines]
    for what, amount in amounts:
        if abs(amount) > MAX_MONEY:
            raise InvoiceRefused(
                f"{what} of {money(amount)} usd is beyond the largest amount an invoice can "
                f"hold ({money(MAX_MONEY)} usd); check that usage before billing it"
            )


def settled_invoice(
    *,
    invoice_id: str,
    tenant_id: str,
    period: Period,
    tier: Tier,
    usage_row: Mapping[str, Any] | None,
    late: Sequence[LateUsage],
    status: InvoiceStatus,
    created_at: datetime,
    finalized_at: datetime | None,
    due_days: int,
    issued_at: datetime | None = None,
    credit: Sequence[CreditLot] = (),
    charged_elsewhere: Sequence[ChargedElsewhere] = (),
    replaces: str | None = None,
    lake_snapshot: int | None = None,
) -> tuple[Invoice, Settlement]:
    """One invoice and how it meets the tenant's credit ``credit`` (pure).

    Lines: the period's rating, then per earlier period in ``late`` its correction
    (``billing.corrections``), then the credit line (``billing.credits``): the total is
    never negative, and ``credit_balance`` is the balance left afterwards.

    Due ``due_days`` after the period's end; one issued after that date (a backfill, a
    late first bill) is due ``due_days`` after its issue instead, and says so
    (``computed_from["issued_late"]`` holds the regular due date). ``issued_at``: when
    the invoice counts as issued (``bill --as-of``'s moment; default ``finalized_at``).
    ``charged_elsewhere`` and ``replaces``: a replacement's (see ``_Session.replacement``),
    given back before the credit line. ``lake_snapshot``: the DuckLake snapshot ``usage_row``
    and ``late`` were read at (cluster mode)."""
    rating = rate(tier, Usage.from_mapping(usage_row or {}))
    late_lines: list[InvoiceLine] = [
        line
        for item in late
        for line in correction_lines(item.billed.period, item.tier, item.billed.usage, item.now)
    ]
    lines = [*rating.lines, *late_lines, *(c.line() for c in charged_elsewhere)]
    charges = add_up(ln.amount for ln in lines)
    settlement = settle(tenant_id, invoice_id, str(period), charges, credit)
    if settlement.line is not None:
        lines.append(settlement.line)
    computed_from: dict[str, Any] = {
        "tier": dict(price_facts(tier)),
        "usage": _usage_facts(usage_row),
    }
    due_date = period.due_date(due_days)
    issued = issued_at or finalized_at
    if finalized_at is not None and issued is not None and issued > due_date:
        computed_from["issued_late"] = {"regular_due_date": due_date.isoformat()}
        due_date = issued + timedelta(days=due_days)
    if late:
        computed_from["late_usage"] = [
            {
                "period": item.billed.period,
                "tier": item.tier.name,
                "prices": dict(price_facts(item.tier)),
                "billed": item.billed.usage.as_dict(),
                "billed_by": item.billed.invoice_id or None,
                "now": item.now.as_dict(),
            }
            for item in late
        ]
    if settlement.line is not None:
        computed_from["credit"] = {
            "balance_before": money(add_up(lot.remaining for lot in credit)),
            "movements": [
                {"source_invoice_id": m.source_invoice_id, "amount": money(m.amount)}
                for m in settlement.movements
            ],
            "balance_after": money(settlement.balance),
        }
    if replaces is not None:
        computed_from["replaces"] = replaces
    if charged_elsewhere:
        computed_from["late_usage_credited"] = [c.facts() for c in charged_elsewhere]
    invoice = Invoice(
        invoice_id=invoice_id,
        tenant_id=tenant_id,
        period=str(period),
        period_start=period.start,
        period_end=period.end,
        tier=tier.name,
        status=status,
        lines=lines,
        subtotal=rating.subtotal,
        total=add_up(ln.amount for ln in lines),
        due_date=due_date,
        created_at=created_at,
        finalized_at=finalized_at,
        computed_from=computed_from,
        quotas=list(rating.quotas),
        credit_balance=settlement.balance,
        replaces=replaces,
        lake_snapshot=lake_snapshot,
    )
    check_amounts(invoice)
    return invoice, settlement


# --- units of work --------------------------------------------------------------------------


@dataclass
class _Session:
    """One unit of work: the connection, the usage, the rules and the clock."""

    con: duckdb.DuckDBPyConnection
    usage: UsageData
    rules: Rules
    now: datetime
    as_of: datetime | None = None  # bill --as-of: the moment its invoices count as issued

    def tier_of(self, tenant: Tenant, period: Period) -> Tier:
        name = tenant.tier_for(period)
        tier = self.rules.tiers.get(name)
        if tier is None:
            raise UserError(
                f"tenant {tenant.tenant_id!r} is on tier {name!r} in {period}, which is not "
                "defined (built-in tiers plus METERING_TIERS_FILE)"
            )
        return tier

    def billed_tier(self, billed: Billed) -> Tier:
        """The prices ``billed``'s period was charged at (by name from the tiers file only
        for a row written before prices were recorded, whose invoice is gone)."""
        if billed.prices is not None:
            return tier_from_facts(billed.prices)
        return get_tier(self.rules.tiers, billed.tier)

    def pending_late(
        self, tenants: Mapping[str, Tenant]
    ) -> tuple[dict[str, list[LateUsage]], dict[str, BillFailure]]:
        """Per tenant, periods with usage beyond what was billed, oldest first: finalized
        periods whose usage grew, and periods before the tenant's first billed one that no
        invoice has charged. Also, per tenant, why some of it cannot be rated."""
        starts = pa.table(
            {
                "tenant_id": pa.array([t.tenant_id for t in tenants.values() if t.billed_from]),
                "first_period": pa.array(
                    [str(t.billed_from) for t in tenants.values() if t.billed_from], pa.string()
                ),
            }
        )
        self.con.register(_USAGE_VIEW, self.usage.table)
        self.con.register(_STARTS_VIEW, starts)
        try:
            changed = invoice_store.changed_since_billed(self.con, _USAGE_VIEW)
            early = invoice_store.never_billed_before(self.con, _USAGE_VIEW, _STARTS_VIEW)
        finally:
            self.con.unregister(_USAGE_VIEW)
            self.con.unregister(_STARTS_VIEW)
        pending: dict[str, list[LateUsage]] = {}
        broken: dict[str, BillFailure] = {}
        for billed in changed:
            try:
                tier = self.billed_tier(billed)
            except UserError as exc:
                broken.setdefault(billed.tenant_id, _late_failure(billed, exc))
                continue
            now = self.usage.usage(billed.tenant_id, Period.parse(billed.period))
            pending.setdefault(billed.tenant_id, []).append(LateUsage(billed, tier, now))
        for tenant_id, period in early:
            now = self.usage.usage(tenant_id, Period.parse(period))
            if tenant_id not in tenants or now == Usage():
                continue
            never = Billed(tenant_id, period, "", Usage(), "", None)
            try:
                tier = self.tier_of(tenants[tenant_id], Period.parse(period))
            except UserError as exc:
                broken.setdefault(tenant_id, _late_failure(never, exc))
                continue
            pending.setdefault(tenant_id, []).append(LateUsage(never, tier, now))
        for items in pending.values():
            items.sort(key=lambda x: x.billed.period)
        return pending, broken

    def pending_for_drafts(
        self, tenants: Mapping[str, Tenant], tenant_id: str | None = None
    ) -> tuple[dict[str, list[LateUsage]], dict[str, BillFailure]]:
        """``pending_late`` as an open period's draft carries it: without what a void invoice
        not replaced yet charged last (its period, and the late usage it carried), which the
        invoice that replaces it charges again, before any open period is finalized."""
        pending, broken = self.pending_late(tenants)
        voids = invoice_store.unreplaced_voids(self.con, tenant_id)
        kept = {
            t: [x for x in items if x.billed.invoice_id not in voids]
            for t, items in pending.items()
        }
        return kept, broken

    def build(
        self,
        tenant: Tenant,
        period: Period,
        existing: InvoiceKey | None,
        late: Sequence[LateUsage],
        status: InvoiceStatus,
        credit: Sequence[CreditLot],
    ) -> tuple[Invoice, Settlement]:
        return settled_invoice(
            invoice_id=existing.invoice_id if existing else new_invoice_id(self.now),
            tenant_id=tenant.tenant_id,
            period=period,
            tier=self.tier_of(tenant, period),
            usage_row=self.usage.row(tenant.tenant_id, period),
            late=late,
            status=status,
            created_at=existing.created_at if existing else self.now,
            finalized_at=self.now if status is InvoiceStatus.finalized else None,
            due_days=self.rules.due_days,
            issued_at=self.as_of,
            credit=credit,
            lake_snapshot=self.usage.lake_snapshot,
        )

    def preview(
        self,
        tenant: Tenant,
        period: Period,
        existing: InvoiceKey | None,
        pending: Mapping[str, Sequence[LateUsage]],
        broken: Mapping[str, BillFailure],
        credit: Sequence[CreditLot],
    ) -> Invoice:
        """The draft of open ``period`` (not written): its rating, the late usage
        ``pending`` for earlier periods, then the credit balance ``credit``; what
        ``generate`` shows and the alert watcher's amount. ``InvoiceRefused`` if it cannot
        be made."""
        tenant_id = tenant.tenant_id
        if tenant_id in broken:
            raise InvoiceRefused(str(broken[tenant_id]))
        late = [x for x in pending.get(tenant_id, ()) if Period.parse(x.billed.period) < period]
        try:
            draft, _ = self.build(tenant, period, existing, late, InvoiceStatus.draft, credit)
        except UserError as exc:
            raise InvoiceRefused(str(BillFailure(tenant_id, str(period), str(exc)))) from exc
        return draft

    def fresh(
        self,
        tenant: Tenant,
        period: Period,
        existing: InvoiceKey | None,
        carried: Sequence[LateUsage],
        credit: Sequence[CreditLot],
    ) -> _Made:
        """The first finalized invoice of ``period`` (``existing``: its draft), carrying
        the late usage ``carried``."""
        tenant_id = tenant.tenant_id
        invoice, settlement = self.build(
            tenant, period, existing, carried, InvoiceStatus.finalized, credit
        )
        tier = self.tier_of(tenant, period)
        usage = self.usage.usage(tenant_id, period)
        iid = invoice.invoice_id
        billed = [Billed(tenant_id, str(period), tier.name, usage, iid, prices_text(tier))]
        billed += [
            Billed(
                tenant_id,
                x.billed.period,
                x.tier.name,
                x.now,
                iid,
                x.billed.prices or prices_text(x.tier),
            )
            for x in carried
        ]
        return _Made(invoice, settlement, billed)

    def replacement(self, tenant: Tenant, void_id: str, credit: Sequence[CreditLot]) -> _Made:
        """The invoice that bills again the period of void ``void_id`` from the usage as it
        is now, naming it (which gains ``replaced_by``).

        Nothing is charged twice or lost (billed usage): the period's own lines rate all its
        usage now; a correction line (late usage, usage correction) of that period on another
        invoice that is not void is given back (``ChargedElsewhere``); the late usage the void
        invoice carried for earlier periods is carried again, with any of it still pending
        where the void invoice was the last to charge that period; then the credit balance
        settles it as any invoice."""
        old = invoice_store.get_invoice(self.con, void_id)
        assert old is not None and old.status is InvoiceStatus.void, void_id
        period = Period.parse(old.period)
        tenant_id = tenant.tenant_id
        new_id = new_invoice_id(self.now)
        billed: list[Billed] = []
        carried: list[LateUsage] = []
        for entry in old.computed_from.get("late_usage", []):
            prices = to_json_text(entry["prices"])
            base = Billed(
                tenant_id,
                entry["period"],
                entry["tier"],
                Usage.from_mapping(entry["billed"]),
                entry.get("billed_by") or "",
                prices,
            )
            last = invoice_store.get_billed(self.con, tenant_id, entry["period"])
            if last is not None and last.invoice_id == old.invoice_id:
                now = self.usage.usage(tenant_id, Period.parse(entry["period"]))
                billed.append(Billed(tenant_id, base.period, base.tier, now, new_id, prices))
            else:  # a later invoice charged more of it since: carry again what ``old`` did
                now = Usage.from_mapping(entry["now"])
            carried.append(LateUsage(base, tier_from_facts(prices), now))
        elsewhere = [
            ChargedElsewhere(old.period, other.invoice_id, line.code, line.amount)
            for other in invoice_store.list_invoices(self.con, tenant_id)
            if other.status not in (InvoiceStatus.void, InvoiceStatus.draft)
            for line in other.lines
            if line.code in EARLIER_PERIODS and line.period == old.period and line.amount != 0
        ]
        tier = self.tier_of(tenant, period)
        invoice, settlement = settled_invoice(
            invoice_id=new_id,
            tenant_id=tenant_id,
            period=period,
            tier=tier,
            usage_row=self.usage.row(tenant_id, period),
            late=carried,
            status=InvoiceStatus.finalized,
            created_at=self.now,
            finalized_at=self.now,
            due_days=self.rules.due_days,
            issued_at=self.as_of,
            credit=credit,
            charged_elsewhere=elsewhere,
            replaces=old.invoice_id,
            lake_snapshot=self.usage.lake_snapshot,
        )
        if not invoice_store.link_replacement(self.con, old.invoice_id, new_id):
            raise ReissueRaced(f"invoice {old.invoice_id} was billed again by another run")
        own = self.usage.usage(tenant_id, period)
        billed.append(Billed(tenant_id, old.period, tier.name, own, new_id, prices_text(tier)))
        return _Made(invoice, settlement, billed)

    def finalize(
        self,
        tenants: Mapping[str, Tenant],
        targets: Mapping[str, Sequence[Period]],
        index: Mapping[tuple[str, str], InvoiceKey],
    ) -> tuple[list[Invoice], list[BillFailure]]:
        """Finalize ``targets`` (tenant -> periods with no invoice, a draft, or void ones
        only: then a replacement), carrying late usage.

        A tenant whose invoice for a period cannot be made keeps the invoices of its earlier
        periods and gets none from that period on; it is reported, the others go on."""
        pending, broken = self.pending_late(tenants)
        lots = credit_store.credit_lots(self.con)
        invoices: list[Invoice] = []
        billed: list[Billed] = []
        movements: list[CreditMovement] = []
        failures: list[BillFailure] = []
        starts: dict[str, Period] = {}
        for tenant_id, periods in targets.items():
            if tenant_id in broken:
                failures.append(broken[tenant_id])
                continue
            tenant = tenants[tenant_id]
            waiting = pending.get(tenant_id, [])
            credit = lots.get(tenant_id, ())
            for period in sorted(periods):
                key = index.get((tenant_id, str(period)))
                try:
                    if key is not None and key.status is InvoiceStatus.void:
                        made = self.replacement(tenant, key.invoice_id, credit)
                    else:
                        carried = [x for x in waiting if Period.parse(x.billed.period) < period]
                        made = self.fresh(tenant, period, key, carried, credit)
                except UserError as exc:
                    failures.append(BillFailure(tenant_id, str(period), str(exc)))
                    break
                charged = {b.period for b in made.billed}
                waiting = [x for x in waiting if x.billed.period not in charged]
                credit = made.settlement.lots
                movements.extend(made.settlement.movements)
                invoices.append(made.invoice)
                billed.extend(made.billed)
                starts.setdefault(tenant_id, tenant.billed_from or tenant.first_period)
        invoice_store.write_invoices(self.con, invoices)
        invoice_store.record_billed(self.con, billed, self.now)
        credit_store.record_movements(self.con, movements, self.now)
        record_starts(self.con, starts)
        return invoices, failures


@dataclass(frozen=True)
class _Made:
    """An invoice a run makes, the billed usage it moves and how it meets the credit."""

    invoice: Invoice
    settlement: Settlement
    billed: list[Billed]


@dataclass(frozen=True)
class OpenDrafts:
    """The drafts of open periods as ``generate`` computes them, without writing any (the
    alert watcher's amounts): what they depend on beyond their own usage (late usage
    pending, credit balances) is read once per pass."""

    session: _Session
    pending: dict[str, list[LateUsage]]
    broken: dict[str, BillFailure]
    lots: dict[str, tuple[CreditLot, ...]]

    @classmethod
    def read(
        cls,
        con: duckdb.DuckDBPyConnection,
        usage: UsageData,
        rules: Rules,
        tenants: Mapping[str, Tenant],
        now: datetime,
    ) -> OpenDrafts:
        session = _Session(con, usage, rules, now)
        pending, broken = session.pending_for_drafts(tenants)
        return cls(session, pending, broken, credit_store.credit_lots(con))

    def inputs(self, tenant_id: str) -> tuple[object, ...]:
        """What a draft of the tenant depends on besides its period's usage and tier."""
        late = tuple(self.pending.get(tenant_id, ()))
        return (late, self.lots.get(tenant_id, ()), self.broken.get(tenant_id))

    def draft(self, tenant: Tenant, period: Period) -> Invoice:
        """The draft of ``period``; ``InvoiceRefused`` if it cannot be made."""
        credit = self.lots.get(tenant.tenant_id, ())
        return self.session.preview(tenant, period, None, self.pending, self.broken, credit)


def _late_failure(billed: Billed, exc: UserError) -> BillFailure:
    return BillFailure(billed.tenant_id, billed.period, f"late usage cannot be rated: {exc}")


@dataclass(frozen=True)
class BillResult:
    last_closed: Period
    tenants: int
    invoices: list[Invoice]
    failures: list[BillFailure]

    @property
    def late_lines(self) -> int:
        """Lines for earlier periods (late usage and corrections)."""
        return sum(ln.code in EARLIER_PERIODS for inv in self.invoices for ln in inv.lines)


def bill(
    con: duckdb.DuckDBPyConnection,
    usage: UsageData,
    rules: Rules,
    *,
    as_of: datetime,
    now: datetime | None = None,
    on_plan: Callable[[Mapping[str, list[Period]]], None] | None = None,
) -> BillResult:
    """The nightly job: finalize every closed, not yet finalized period of every tenant, from
    its first period on (no usage: base fee only); a period whose invoices are all void is
    billed again, into one that replaces the latest. Tenants that cannot be billed are in
    ``failures``; everything else is finalized. ``on_plan`` is shown the periods of each
    tenant about to be finalized, before any is."""
    session = _Session(con, usage, rules, now or datetime.now(UTC), as_of)
    last = rules.last_closed(as_of)
    with transaction(con):
        tenants = load_tenants(con, usage.first_periods())
        index = invoice_store.invoice_index(con)
        targets: dict[str, list[Period]] = {}
        for tenant in tenants.values():
            todo = [
                p
                for p in tenant.first_period.through(last)
                if (key := index.get((tenant.tenant_id, str(p)))) is None or key.to_bill
            ]
            if todo:
                targets[tenant.tenant_id] = todo
        if on_plan is not None:
            on_plan(targets)
        invoices, failures = session.finalize(tenants, targets, index)
    return BillResult(last, len(tenants), invoices, failures)


def known_tenant(con: duckdb.DuckDBPyConnection, usage: UsageData, tenant_id: str) -> Tenant:
    """The tenant, or a UserError if it never sent an event and was never added."""
    tenant = load_tenants(con, usage.first_periods(), tenant_id).get(tenant_id)
    if tenant is None:
        raise UserError(f"unknown tenant {tenant_id!r}")
    return tenant


def generate(
    con: duckdb.DuckDBPyConnection,
    usage: UsageData,
    rules: Rules,
    tenant_id: str,
    period: Period,
    *,
    now: datetime | None = None,
) -> Invoice:
    """The invoice of ``tenant_id`` for ``period``: the finalized one if it exists; finalized
    now if the period is closed (its invoices all void: a new one that replaces the latest);
    otherwise a draft preview, recomputed (same invoice_id).

    ``usage`` must hold at least this tenant's rows."""
    session = _Session(con, usage, rules, now or datetime.now(UTC))
    with transaction(con):
        tenant = known_tenant(con, usage, tenant_id)
        if period < tenant.first_period:
            carried = "; its usage is charged as late usage on the next invoice"
            raise UserError(
                f"tenant {tenant_id!r} starts in {tenant.first_period}; "
                f"it has no invoice for {period}{carried if tenant.billed_from else ''}"
            )
        if period.start > session.now:
            raise UserError(f"period {period} has not started yet")
        index = invoice_store.invoice_index(con, tenant_id)
        existing = index.get((tenant_id, str(period)))
        if existing is None or existing.to_bill:
            if period.is_closed(session.now, rules.grace):
                _, failures = session.finalize({tenant_id: tenant}, {tenant_id: [period]}, index)
                if failures:
                    raise InvoiceRefused(str(failures[0]))
            else:
                pending, broken = session.pending_for_drafts({tenant_id: tenant}, tenant_id)
                credit = credit_store.credit_lots(con, tenant_id).get(tenant_id, ())
                draft_key = existing if existing is not None and existing.is_draft else None
                draft = session.preview(tenant, period, draft_key, pending, broken, credit)
                invoice_store.write_invoices(con, [draft])
        invoice = invoice_store.invoice_for(con, tenant_id, str(period))
    assert invoice is not None
    return invoice


# --- void and reissue --------------------------------------------------------------------

MAX_REASON = 500
REISSUE_REASON = "reissued"
"""The void reason of an invoice ``reissue`` replaced, unless one is given."""


class VoidRefused(UserError):
    """A void or reissue that bad input or the invoice's state rules out (nothing changed)."""


class AlreadyVoid(VoidRefused):
    """The invoice is void already (its Stripe side may still be resumed)."""

    def __init__(self, message: str, invoice: Invoice) -> None:
        super().__init__(message)
        self.invoice = invoice


class ReissueRaced(OperationError):
    """Another run voided or reissued the same invoice at the same moment and committed
    first."""


def check_reason(reason: str) -> str:
    """The void reason, stripped: some text, at most ``MAX_REASON`` characters, one line."""
    text = reason.strip()
    if not text:
        raise VoidRefused("--reason is empty: say why the invoice is void (any text)")
    if len(text) > MAX_REASON:
        raise VoidRefused(f"--reason is {len(text)} characters; at most {MAX_REASON}")
    if any(not ch.isprintable() for ch in text):
        raise VoidRefused("--reason holds a control character (a newline?): one line of text")
    return text


def existing_invoice(con: duckdb.DuckDBPyConnection, invoice_id: str) -> Invoice:
    """The invoice, or ``VoidRefused`` naming the unknown id."""
    invoice = invoice_store.get_invoice(con, invoice_id)
    if invoice is None:
        raise VoidRefused(f"unknown invoice {invoice_id[:64]!r} (`invoices TENANT` lists ids)")
    return invoice


def void_note(invoice: Invoice) -> str:
    """``since <when>, by <who>: <reason>`` of a void invoice."""
    when = f"{invoice.voided_at:%Y-%m-%d %H:%M}Z" if invoice.voided_at else "?"
    return f"since {when}, by {invoice.voided_by or '?'}: {invoice.void_reason or ''}"


def _live(con: duckdb.DuckDBPyConnection, invoice_id: str, doing: str) -> Invoice:
    """The finalized (sent, paid, overdue) invoice to be ``doing`` ("voided", "reissued"):
    ``VoidRefused`` for a draft, ``AlreadyVoid`` for a void one."""
    invoice = existing_invoice(con, invoice_id)
    if invoice.status is InvoiceStatus.draft:
        raise VoidRefused(
            f"invoice {invoice_id} is a draft ({invoice.period} is still open): only a "
            f"finalized invoice can be {doing}; a draft is recomputed until its period closes"
        )
    if invoice.status is not InvoiceStatus.void:
        return invoice
    note = void_note(invoice)
    if doing == "voided":
        raise AlreadyVoid(f"invoice {invoice_id} is void already ({note})", invoice)
    if invoice.replaced_by is not None:
        again = f"replaced by {invoice.replaced_by}; `invoices reissue {invoice.replaced_by}`"
    else:
        again = (
            f"`generate-invoice {invoice.tenant_id} {invoice.period}` (or `bill`) bills the "
            "period again into an invoice that replaces it"
        )
    raise AlreadyVoid(f"invoice {invoice_id} is void ({note}): {again}", invoice)


def _void(
    con: duckdb.DuckDBPyConnection, invoice: Invoice, reason: str, by: str, now: datetime
) -> Invoice:
    """Mark live ``invoice`` void and reverse its credit movements (inside the caller's
    transaction): credit it applied goes back to its lot, credit it carried is taken back.
    Refused (``VoidRefused``) while a later invoice uses credit it carried."""
    iid = invoice.invoice_id
    if not invoice_store.void_invoice(con, iid, reason, by, now):
        raise ReissueRaced(f"invoice {iid} was voided by another run at the same moment")
    users = credit_store.reverse(con, iid, now)
    if users:  # raised inside the transaction: the void above is rolled back
        later = ", ".join(f"{uid} ({period})" for uid, period in users)
        first = users[-1][0]
        raise VoidRefused(
            f"invoice {iid} carried credit that {later} applied since: void that first "
            f"(`invoices void {first} --reason TEXT`), then {iid}"
        )
    voided = invoice_store.get_invoice(con, iid)
    assert voided is not None
    return voided


def void(
    con: duckdb.DuckDBPyConnection, invoice_id: str, reason: str, by: str, now: datetime
) -> Invoice:
    """Void a finalized invoice (sent, paid, overdue too): it stays readable with its reason,
    who (``by``) and when, its credit movements are reversed, and the next ``bill`` or
    ``generate`` of its period makes an invoice that replaces it. A draft or a void invoice
    is refused, and so is an empty reason, with nothing changed."""
    text = check_reason(reason)
    with transaction(con):
        voided = _void(con, _live(con, invoice_id, "voided"), text, by, now)
    return voided


@dataclass(frozen=True)
class Reissue:
    """A reissued invoice, void now, and the invoice that replaces it."""

    void: Invoice
    invoice: Invoice


def reissue(
    con: duckdb.DuckDBPyConnection,
    usage: UsageData,
    rules: Rules,
    invoice_id: str,
    *,
    by: str,
    reason: str = REISSUE_REASON,
    now: datetime | None = None,
) -> Reissue:
    """Void finalized ``invoice_id`` (as ``void``) and bill its period again from the usage
    as it is now into a new finalized invoice that names it, in one transaction (what it
    charges: ``_Session.replacement``). A draft or a void invoice is refused with nothing
    changed. ``usage`` must hold the tenant's rows."""
    text = check_reason(reason)
    session = _Session(con, usage, rules, now or datetime.now(UTC))
    try:
        with transaction(con):
            old = _live(con, invoice_id, "reissued")
            tenant = known_tenant(con, usage, old.tenant_id)
            _void(con, old, text, by, session.now)
            index = invoice_store.invoice_index(con, old.tenant_id)
            targets = {old.tenant_id: [Period.parse(old.period)]}
            made, failures = session.finalize({old.tenant_id: tenant}, targets, index)
            if failures:
                raise InvoiceRefused(str(failures[0]))
            voided = invoice_store.get_invoice(con, invoice_id)
    except (duckdb.TransactionException, duckdb.ConstraintException) as exc:
        raise ReissueRaced(
            f"invoice {invoice_id} was voided or reissued by another run at the same moment; "
            "`invoices TENANT` shows its replacement"
        ) from exc
    assert voided is not None and len(made) == 1
    return Reissue(voided, made[0])
