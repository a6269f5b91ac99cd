"""Cluster-mode test helpers: prepared batches and events for lake ledgers, and the lake's
usage totals read the way every reader reads them (one snapshot)."""

from __future__ import annotations

import time
from typing import Any

from aggregator.lake import open_lake
from aggregator.lake_ledger import open_lake_usage
from common.settings import Settings, load_settings
from schemas.codec import COUNTERS, default_codec
from schemas.prepare import PreparedBatch, prepare_batch
from schemas.record_batch import RecordBatch
from tests.support.events import make_event

TOPIC = "pf.usage.events"
CODEC = default_codec()


def batch(partition: int, first: int, events: list[dict[str, Any]]) -> PreparedBatch:
    values: list[bytes | None] = [CODEC.encode(e) for e in events]
    offsets = list(range(first, first + len(values)))
    records = RecordBatch(offsets, [e["tenant_id"].encode() for e in events], values)
    return prepare_batch(partition, records, CODEC, int(time.time() * 1_000_000), None)


def events(n: int, tenants: int = 3, start: int = 0) -> list[dict[str, Any]]:
    return [
        make_event(f"t{i % tenants}", event_id=f"e-{start + i}", cpu_ms=i + 1) for i in range(n)
    ]


def totals(cfg: Settings) -> dict[tuple[str, str], tuple[int, ...]]:
    reader = open_lake_usage(open_lake(cfg), TOPIC)
    try:
        rows = reader.con.execute(
            f"SELECT tenant_id, period, events, sessions, {', '.join(COUNTERS)} FROM usage"
        ).fetchall()
    finally:
        reader.close()
    return {(r[0], r[1]): tuple(int(v) for v in r[2:]) for r in rows}


def lake_totals(env: dict[str, str]) -> dict[tuple[str, str], dict[str, int]]:
    # (the catalog and the lake path: cluster_env's, in the environment)
    settings = load_settings(
        metering_data_dir=env["METERING_DATA_DIR"], metering_topic=env["METERING_TOPIC"]
    )
    reader = open_lake_usage(open_lake(settings), settings.metering_topic)
    cols = ["tenant_id", "period", "events", "sessions", *COUNTERS]
    rows = reader.con.execute(f"SELECT {', '.join(cols)} FROM usage").fetchall()
    reader.close()
    return {(r[0], r[1]): {c: int(v) for c, v in zip(cols[2:], r[2:], strict=True)} for r in rows}
