"""Counters never wrap: 128-bit sums in the fold, the ledger, the snapshot and the views;
an event that would pass the ceiling is dead-lettered on its own and the rest still count."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from aggregator.fold import COUNTER_CEILING
from aggregator.ledger import LedgerSet, ledger_path
from aggregator.snapshot import snapshot_files
from aggregator.views import open_usage
from bench.ledger_load import publish_usage
from common.settings import Settings
from schemas.codec import COUNTERS
from tests.support.events import make_event
from tests.support.ledgers import set_total

INT64_MAX = 2**63 - 1
JAN = 1_735_689_600_000_000 + 86_400_000_000  # 2025-01-02T00:00:00Z


def _settings(tmp_path: Path) -> Settings:
    return Settings(metering_data_dir=tmp_path / "data")


def _usage(cfg: Settings, tenant: str) -> dict[str, int]:
    with open_usage(cfg.snapshot_dir, cfg.metering_topic) as reader:
        row = reader.con.execute(
            f"SELECT events, {', '.join(COUNTERS)} FROM usage WHERE tenant_id = ?", [tenant]
        ).fetchone()
    assert row is not None
    return dict(zip(("events", *COUNTERS), row, strict=True))


def _dead(cfg: Settings) -> list[tuple[int, str, str]]:
    with open_usage(cfg.snapshot_dir, cfg.metering_topic) as reader:
        rows = reader.con.execute(
            'SELECT "offset", reason_code, reason FROM dead_letters ORDER BY "offset"'
        ).fetchall()
    return [(int(o), code, reason) for o, code, reason in rows]


def _event(tenant: str, **counters: int) -> dict[str, object]:
    zero = dict.fromkeys(COUNTERS, 0)
    return make_event(tenant, occurred_at=JAN, **{**zero, **counters})


def test_two_events_of_2_62_sum_to_2_63_not_a_negative_number(tmp_path: Path) -> None:
    cfg = _settings(tmp_path)
    publish_usage(cfg, [_event("big", cpu_ms=2**62), _event("big", cpu_ms=2**62)])
    assert _usage(cfg, "big")["cpu_ms"] == 2**63


def test_the_same_on_different_partitions(tmp_path: Path) -> None:
    cfg = _settings(tmp_path)
    publish_usage(cfg, [_event("big", cpu_ms=2**62)], partition=0)
    publish_usage(cfg, [_event("big", cpu_ms=2**62)], partition=1)
    assert _usage(cfg, "big")["cpu_ms"] == 2**63


def test_every_counter_at_the_avro_maximum_many_times_is_exact(tmp_path: Path) -> None:
    cfg = _settings(tmp_path)
    top = dict.fromkeys(COUNTERS, INT64_MAX)
    publish_usage(cfg, [_event("big", **top) for _ in range(1000)])  # one batch
    publish_usage(cfg, [_event("big", **top) for _ in range(3)])  # stored + delta
    publish_usage(cfg, [_event("big", **top) for _ in range(2)], partition=3)
    assert _usage(cfg, "big") == {"events": 1005, **dict.fromkeys(COUNTERS, 1005 * INT64_MAX)}
    # the snapshot holds them exactly (Parquet has no 128-bit integer: DECIMAL(38, 0))
    (first, *_) = snapshot_files(cfg.snapshot_dir, cfg.metering_topic, "aggregates")
    column = pq.read_table(first).column("cpu_ms")
    assert str(column.type) == "decimal128(38, 0)"
    assert int(column[0].as_py()) == 1003 * INT64_MAX


def test_the_network_overflow_case_then_ordinary_events_all_count(tmp_path: Path) -> None:
    """The case that stopped a partition for good: 2**63 - 1 bytes, then one more byte."""
    cfg = _settings(tmp_path)
    publish_usage(cfg, [_event("big", network_bytes=INT64_MAX)])
    publish_usage(cfg, [_event("big", network_bytes=1), _event("other", api_calls=2)])
    publish_usage(cfg, [_event("other", api_calls=3)])
    assert _usage(cfg, "big")["network_bytes"] == 2**63
    assert _usage(cfg, "other")["api_calls"] == 5
    assert _dead(cfg) == []


def test_an_event_past_the_ceiling_is_dead_lettered_alone_and_the_rest_count(
    tmp_path: Path,
) -> None:
    cfg = _settings(tmp_path)
    publish_usage(cfg, [_event("big", cpu_ms=1)])  # offset 0
    set_total(cfg, 0, "big", "cpu_ms", COUNTER_CEILING - 5)
    refused = _event("big", cpu_ms=10, api_calls=7)
    publish_usage(
        cfg,
        [
            _event("big", cpu_ms=3),  # offset 1: fits (ceiling - 2)
            refused,  # offset 2: would pass it
            _event("big", cpu_ms=2, api_calls=1),  # offset 3: fits exactly
            _event("other", cpu_ms=INT64_MAX),  # offset 4: another tenant, unaffected
        ],
    )
    publish_usage(cfg, [refused])  # offset 5: delivered again: refused again, not a duplicate
    publish_usage(cfg, [_event("big", api_calls=4)])  # offset 6: later events still count
    big = _usage(cfg, "big")
    assert big["cpu_ms"] == COUNTER_CEILING
    assert (big["events"], big["api_calls"]) == (4, 5)
    assert _usage(cfg, "other")["cpu_ms"] == INT64_MAX
    dead = _dead(cfg)
    assert [(o, code) for o, code, _ in dead] == [(2, "counter_ceiling"), (5, "counter_ceiling")]
    assert "cpu_ms of big in 2025-01" in dead[0][2] and str(refused["event_id"]) in dead[0][2]


def test_a_ledger_with_bigint_counters_is_widened_when_opened(tmp_path: Path) -> None:
    cfg = _settings(tmp_path)
    path = ledger_path(cfg.ledger_dir, cfg.metering_topic, 0)
    publish_usage(cfg, [_event("big", cpu_ms=INT64_MAX - 1)])
    con = duckdb.connect(str(path))  # make it look like a file from before the change
    try:
        for counter in COUNTERS:
            con.execute(f"ALTER TABLE aggregates ALTER {counter} TYPE BIGINT")
    finally:
        con.close()
    publish_usage(cfg, [_event("big", cpu_ms=5)])
    assert _usage(cfg, "big")["cpu_ms"] == INT64_MAX + 4
    con = duckdb.connect(str(path), read_only=True)
    try:
        kinds = con.execute(
            "SELECT DISTINCT data_type FROM duckdb_columns() WHERE table_name = 'aggregates' "
            "AND list_contains(?, column_name)",
            [list(COUNTERS)],
        ).fetchall()
    finally:
        con.close()
    assert kinds == [("HUGEINT",)]


def test_an_old_snapshot_with_bigint_counters_reads_beside_a_new_one(tmp_path: Path) -> None:
    cfg = _settings(tmp_path)
    publish_usage(cfg, [_event("old", cpu_ms=7)], partition=0)
    publish_usage(cfg, [_event("new", cpu_ms=INT64_MAX), _event("new", cpu_ms=1)], partition=1)
    (old, _) = snapshot_files(cfg.snapshot_dir, cfg.metering_topic, "aggregates")
    con = duckdb.connect()
    try:
        casts = ", ".join(f"{c}::BIGINT AS {c}" for c in COUNTERS)
        con.execute(
            f"COPY (SELECT * REPLACE ({casts}) FROM read_parquet('{old}')) "
            f"TO '{old}.tmp' (FORMAT parquet)"
        )
    finally:
        con.close()
    Path(f"{old}.tmp").replace(old)
    assert str(pq.read_schema(old).field("cpu_ms").type) == "int64"
    assert _usage(cfg, "old")["cpu_ms"] == 7
    assert _usage(cfg, "new")["cpu_ms"] == 2**63


@pytest.mark.parametrize("counter", COUNTERS)
def test_each_counter_is_128_bit_in_the_ledger(tmp_path: Path, counter: str) -> None:
    cfg = _settings(tmp_path)
    publish_usage(cfg, [_event("big", **{counter: INT64_MAX}) for _ in range(4)])
    assert _usage(cfg, "big")[counter] == 4 * INT64_MAX
    ledgers = LedgerSet(cfg.ledger_dir, cfg.metering_topic, lock_timeout=10)
    try:
        ledger = ledgers.acquire(0)
        assert ledger.bound == 4 * INT64_MAX
    finally:
        ledgers.close(None)
