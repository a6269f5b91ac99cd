"""The billing file and the usage snapshot of one test, driven through the billing API."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from aggregator.views import open_usage
from bench.ledger_load import publish_usage
from billing import invoice_store, invoicing, tenants
from billing.db import billing_db
from billing.model import Invoice
from common import settings as config
from schemas.periods import Period


def at(year: int, month: int, day: int = 1, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


@dataclass
class Books:
    """The billing file and the usage snapshot of one test."""

    partition: int = 0

    def publish(self, *events: dict[str, Any]) -> None:
        publish_usage(config.load_settings(), list(events), self.partition)

    def usage(self, tenant_id: str | None = None) -> invoicing.UsageData:
        cfg = config.load_settings()
        reader = open_usage(cfg.snapshot_dir, cfg.metering_topic)
        try:
            return invoicing.UsageData.read(reader, tenant_id)
        finally:
            reader.close()

    def rules(self) -> invoicing.Rules:
        return invoicing.Rules.from_settings(config.load_settings())

    def con(self) -> Any:
        cfg = config.load_settings()
        return billing_db(cfg.billing_db, 10)

    def bill(self, as_of: datetime) -> invoicing.BillResult:
        with self.con() as con:
            return invoicing.bill(con, self.usage(), self.rules(), as_of=as_of, now=as_of)

    def generate(self, tenant: str, period: str, now: datetime) -> Invoice:
        with self.con() as con:
            return invoicing.generate(
                con, self.usage(tenant), self.rules(), tenant, Period.parse(period), now=now
            )

    def invoices(self, tenant: str) -> list[Invoice]:
        with self.con() as con:
            return invoice_store.list_invoices(con, tenant)

    def add(self, tenant: str, tier: str | None, now: datetime) -> None:
        with self.con() as con:
            known = tenants.load_tenants(con, self.usage().first_periods(), tenant).get(tenant)
            tenants.add_tenant(con, known, tenant, tier, now)

    def set_tier(self, tenant: str, tier: str, start: str) -> None:
        with self.con() as con:
            tenants.set_tier(con, tenant, tier, Period.parse(start), at(2025, 1))


def stored(data_dir: Path) -> dict[str, str]:
    """What is stored: every file's bytes, and the billing file's tables row by row (opening
    it rewrites headers, so its bytes are not a fair measure)."""
    out: dict[str, str] = {}
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and not path.name.startswith("billing.duckdb"):
            out[str(path.relative_to(data_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    con = duckdb.connect(str(data_dir / "billing.duckdb"), read_only=True)
    try:
        for (table,) in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall():
            rows = con.execute(f'SELECT * FROM "{table}" ORDER BY ALL').fetchall()
            out[f"billing.duckdb:{table}"] = hashlib.sha256(repr(rows).encode()).hexdigest()
    finally:
        con.close()
    return out
