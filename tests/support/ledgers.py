"""Editing a partition's ledger file directly, as if very many events had come, or as if a
period's usage had been corrected down: a real DuckDB write, then the snapshot republished."""

from __future__ import annotations

import duckdb

from aggregator.ledger import LedgerSet, ledger_path
from common.settings import Settings


def set_total(
    cfg: Settings, partition: int, tenant: str, counter: str, value: int, period: str | None = None
) -> None:
    """Set ``tenant``'s stored ``counter`` (in ``period``, or every period) in ``partition``'s
    ledger (the worker not running)."""
    where, params = ("AND period = ?", [period]) if period else ("", [])
    con = duckdb.connect(str(ledger_path(cfg.ledger_dir, cfg.metering_topic, partition)))
    try:
        con.execute(
            f"UPDATE aggregates SET {counter} = ?::HUGEINT WHERE tenant_id = ? {where}",
            [str(value), tenant, *params],
        )
    finally:
        con.close()


def set_published_total(
    cfg: Settings, partition: int, tenant: str, counter: str, value: int, period: str | None = None
) -> None:
    """``set_total``, then publish the partition's snapshot, which billing reads."""
    set_total(cfg, partition, tenant, counter, value, period)
    ledgers = LedgerSet(cfg.ledger_dir, cfg.metering_topic, lock_timeout=10)
    ledgers.acquire(partition)
    ledgers.close(cfg.snapshot_dir)
