"""The fold: what a batch's fresh events add to the per-(tenant, period) aggregates.

``fold_fresh`` runs inside the ledger's commit transaction, on the ledger's connection:
it sums the fresh events per tenant and period (``deltas_of``, in 128-bit integers), holds
back every event that would take a counter past ``COUNTER_CEILING`` (``refuse_over_ceiling``),
records the sessions the rest open (``sessions_of`` anti-joined with the sessions already
seen) and MERGEs the sums into ``aggregates``. Dedup, offsets and dead letters are the
ledger's (``aggregator.ledger``).

Why the sums cannot wrap: one event's counter is an Avro long (< 2**63, never negative), a
batch sums in Int128, the ledger stores HUGEINT, and no (tenant, period, partition) row may
pass ``COUNTER_CEILING`` = 10**28: with at most 2**31 partitions (Kafka's partition ids are
32-bit) a view's sum over partitions stays below 2.2e37, inside DECIMAL(38,0) (the Parquet
snapshot) and HUGEINT (the views), and a stored total plus a batch's delta (< 2**80) never
reaches 2**127. DuckDB's ``sum`` does not check for overflow, so the ceiling is what keeps
the views exact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import duckdb
import polars as pl
import pyarrow as pa

from schemas.codec import COUNTERS
from schemas.prepare import DeadLetter

COUNTER_CEILING = 10**28
"""The most one counter of one tenant and period may total in one partition's ledger."""
CEILING_REASON = "counter_ceiling"
# Sums leave polars as Decimal(38, 0): exact in Arrow, Parquet and DuckDB alike (polars'
# Int128, which sums them, has no Arrow type).
_WIDE = pl.Decimal(38, 0)

# Columns MERGE adds up; the others combine with greatest/least.
_ADDED = ("events", "sessions", *COUNTERS, "risk_score_sum", "risk_score_count")
_MERGE_AGGREGATES = f"""
    MERGE INTO {{a}}.aggregates t USING batch_deltas d
    ON t.tenant_id = d.tenant_id AND t.period = d.period
    WHEN MATCHED THEN UPDATE SET {", ".join(f"{c} = t.{c} + d.{c}" for c in _ADDED)},
      risk_score_max = greatest(t.risk_score_max, d.risk_score_max),
      first_occurred_at = least(t.first_occurred_at, d.first_occurred_at),
      last_occurred_at = greatest(t.last_occurred_at, d.last_occurred_at)
    WHEN NOT MATCHED THEN INSERT BY NAME"""


def deltas_of(events: pl.DataFrame) -> pl.DataFrame:
    """Per (tenant_id, period): event count, counter sums (exact: Decimal(38, 0), summed in
    Int128), risk-score sum/count/max and the first and last occurred_at: what these events
    add to the aggregates."""
    risk, at = pl.col("risk_score"), pl.col("occurred_at")
    return events.group_by("tenant_id", "period").agg(
        pl.len().cast(pl.Int64).alias("events"),
        *[pl.col(c).cast(pl.Int128).sum().cast(_WIDE) for c in COUNTERS],
        risk.sum().alias("risk_score_sum"),
        risk.count().cast(pl.Int64).alias("risk_score_count"),
        risk.max().alias("risk_score_max"),
        at.min().alias("first_occurred_at"),
        at.max().alias("last_occurred_at"),
    )


def sessions_of(events: pl.DataFrame) -> pl.DataFrame:
    """The distinct (tenant_id, period, session_id) of these events."""
    return events.select("tenant_id", "period", "session_id").unique()


def with_sessions(deltas: pl.DataFrame, opened: pl.DataFrame, partition: int) -> pa.Table:
    """``deltas`` plus ``sessions`` (the sessions the batch opened per tenant and period)
    and ``partition``: the rows MERGE folds into the aggregates."""
    per_key = opened.group_by("tenant_id", "period").agg(pl.len().cast(pl.Int64).alias("sessions"))
    return (
        deltas.join(per_key, on=["tenant_id", "period"], how="left")
        .with_columns(pl.col("sessions").fill_null(0), pl.lit(partition).alias("partition"))
        .to_arrow()
    )


@dataclass(frozen=True)
class Folded:
    """What ``fold_fresh`` did: the events it refused (dead letters: their counters would
    pass the ceiling) and a new upper bound of every counter total in the ledger."""

    refused: list[DeadLetter]
    bound: int


def largest_delta(deltas: pl.DataFrame) -> int:
    """The largest counter sum in ``deltas`` (0 when it is empty)."""
    tops = deltas.select(pl.col(c).max() for c in COUNTERS).row(0) if deltas.height else ()
    return int(max((t for t in tops if t is not None), default=0))


def stored_maximum(con: duckdb.DuckDBPyConnection, alias: str) -> int:
    """The largest counter total ``alias``'s aggregates hold (0 when empty)."""
    row = con.execute(
        f"SELECT max(greatest({', '.join(COUNTERS)})) FROM {alias}.aggregates"
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def refuse_over_ceiling(
    con: duckdb.DuckDBPyConnection, alias: str, events: pl.DataFrame, deltas: pl.DataFrame
) -> tuple[pl.DataFrame, list[DeadLetter]]:
    """Split ``events`` into those that fit under ``COUNTER_CEILING`` and dead letters.

    Only (tenant, period)s whose stored totals plus ``deltas`` pass the ceiling are looked
    at, event by event in offset order: an event that would take one of its counters past
    the ceiling is refused, the ones after it still count if they fit."""
    con.register("ceiling_deltas", deltas.select("tenant_id", "period", *COUNTERS).to_arrow())
    try:
        stored = ", ".join(f"coalesce(t.{c}, 0)::HUGEINT" for c in COUNTERS)
        over = " OR ".join(
            f"coalesce(t.{c}, 0) + d.{c} > {COUNTER_CEILING}::HUGEINT" for c in COUNTERS
        )
        rows = con.execute(
            f"""SELECT d.tenant_id, d.period, {stored} FROM ceiling_deltas d
                LEFT JOIN {alias}.aggregates t USING (tenant_id, period) WHERE {over}"""
        ).fetchall()
    finally:
        con.unregister("ceiling_deltas")
    totals = {(r[0], r[1]): [int(v) for v in r[2:]] for r in rows}
    if not totals:
        return events, []
    keys = pl.DataFrame(list(totals), schema=["tenant_id", "period"], orient="row")
    suspects = events.join(keys, on=["tenant_id", "period"]).sort("offset")
    refused: list[DeadLetter] = []
    for event in suspects.iter_rows(named=True):
        running = totals[(event["tenant_id"], event["period"])]
        added = [t + event[c] for t, c in zip(running, COUNTERS, strict=True)]
        past = [c for c, value in zip(COUNTERS, added, strict=True) if value > COUNTER_CEILING]
        if past:
            reason = (
                f"{CEILING_REASON}: {past[0]} of {event['tenant_id']} in {event['period']} "
                f"would pass 10^28 in this partition (event {event['event_id']})"
            )
            refused.append(DeadLetter(event["offset"], event["tenant_id"].encode(), None, reason))
        else:
            running[:] = added
    gone = pl.Series("offset", [d.offset for d in refused], pl.Int64)
    return events.filter(~pl.col("offset").is_in(gone.implode())), refused


def fold_fresh(
    con: duckdb.DuckDBPyConnection, alias: str, fresh: pa.Table, partition: int, bound: int
) -> Folded:
    """Fold ``fresh`` (events counted for the first time) into ``alias``'s sessions and
    aggregates, refusing what would pass the ceiling. ``bound`` is an upper bound of every
    counter total stored (from ``stored_maximum`` or the last ``Folded``): while the batch's
    largest sum keeps it under the ceiling, no look-up is made. Must run inside the caller's
    transaction; registers nothing it leaves."""
    frame = pl.from_arrow(fresh)
    assert isinstance(frame, pl.DataFrame)
    deltas = deltas_of(frame)
    refused: list[DeadLetter] = []
    checked = bound + largest_delta(deltas) > COUNTER_CEILING
    if checked:
        frame, refused = refuse_over_ceiling(con, alias, frame, deltas)
        if refused:
            deltas = deltas_of(frame)
    registered: list[str] = []
    try:
        con.register("batch_sessions", sessions_of(frame).to_arrow())
        registered.append("batch_sessions")
        opened = con.execute(
            f"""SELECT f.* FROM batch_sessions f
                ANTI JOIN {alias}.sessions s ON s.tenant_id = f.tenant_id
                  AND s.period = f.period AND s.session_id = f.session_id"""
        ).to_arrow_table()
        con.register("opened_sessions", opened)
        registered.append("opened_sessions")
        con.execute(f"INSERT INTO {alias}.sessions SELECT * FROM opened_sessions")
        opened_frame = pl.from_arrow(opened)
        assert isinstance(opened_frame, pl.DataFrame)
        con.register("batch_deltas", with_sessions(deltas, opened_frame, partition))
        registered.append("batch_deltas")
        con.execute(_MERGE_AGGREGATES.format(a=alias))
    finally:
        for name in registered:
            with contextlib.suppress(duckdb.Error):
                con.unregister(name)
    bound = stored_maximum(con, alias) if checked else bound + largest_delta(deltas)
    return Folded(refused, bound)
