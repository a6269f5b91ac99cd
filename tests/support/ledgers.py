"""Editing a partition's ledger file directly, as if very many events had come."""

from __future__ import annotations

import duckdb

from aggregator.ledger import ledger_path
from common.settings import Settings


def set_total(cfg: Settings, partition: int, tenant: str, counter: str, value: int) -> None:
    """Set ``tenant``'s stored ``counter`` in ``partition``'s ledger (the worker not running)."""
    con = duckdb.connect(str(ledger_path(cfg.ledger_dir, cfg.metering_topic, partition)))
    try:
        con.execute(
            f"UPDATE aggregates SET {counter} = ?::HUGEINT WHERE tenant_id = ?",
            [str(value), tenant],
        )
    finally:
        con.close()
