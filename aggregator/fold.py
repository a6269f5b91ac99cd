"""The fold: what a batch's fresh events add to the per-(tenant, period) aggregates.

``fold_fresh`` runs inside the ledger's commit transaction, on the ledger's connection:
it sums the fresh events per tenant and period (``deltas_of``), records the sessions they
open (``sessions_of`` anti-joined with the sessions already seen) and MERGEs the sums into
``aggregates``. Dedup, offsets and dead letters are the ledger's (``aggregator.ledger``).
"""

from __future__ import annotations

import contextlib

import duckdb
import polars as pl
import pyarrow as pa

from schemas.codec import COUNTERS

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
    """Per (tenant_id, period): event count, counter sums, risk-score sum/count/max and the
    first and last occurred_at: what these events add to the aggregates."""
    risk, at = pl.col("risk_score"), pl.col("occurred_at")
    return events.group_by("tenant_id", "period").agg(
        pl.len().cast(pl.Int64).alias("events"),
        *[pl.col(c).sum() for c in COUNTERS],
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


def fold_fresh(con: duckdb.DuckDBPyConnection, alias: str, fresh: pa.Table, partition: int) -> None:
    """Fold ``fresh`` (events counted for the first time) into ``alias``'s sessions and
    aggregates. Must run inside the caller's transaction; registers nothing it leaves."""
    frame = pl.from_arrow(fresh)
    assert isinstance(frame, pl.DataFrame)
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
        con.register("batch_deltas", with_sessions(deltas_of(frame), opened_frame, partition))
        registered.append("batch_deltas")
        con.execute(_MERGE_AGGREGATES.format(a=alias))
    finally:
        for name in registered:
            with contextlib.suppress(duckdb.Error):
                con.unregister(name)
