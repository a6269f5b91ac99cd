"""The fold: what a batch's fresh events add to the per-(tenant, period) aggregates.

``fold_fresh`` runs inside the ledger's commit transaction, on the ledger's connection:
it sums the fresh events per tenant and period (``deltas_of``, in 128-bit integers), holds
back every event that would take a counter past ``COUNTER_CEILING`` and every correction
that would take one below zero (``refuse_unfit``), records the sessions the rest open
(``sessions_of`` anti-joined with the sessions already seen), the corrections it applied,
and MERGEs the sums into ``aggregates``. Dedup, offsets and dead letters are the ledger's
(``aggregator.ledger``).

Corrections (``correction`` True: signed deltas) only adjust the counters: they are not
events, open no session, carry no risk score and leave first/last occurred_at alone. One
is applied whole or refused whole (``negative_total``), judged in offset order against the
totals of everything before it in the partition, so the outcome does not depend on how
the log was cut into batches; the rest of the batch still applies.

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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import duckdb
import polars as pl
import pyarrow as pa

from schemas.codec import COUNTERS
from schemas.prepare import Correction, DeadLetter

COUNTER_CEILING = 10**28
"""The most one counter of one tenant and period may total in one partition's ledger."""
CEILING_REASON = "counter_ceiling"
NEGATIVE_REASON = "negative_total"
FOLD_REASONS = (CEILING_REASON, NEGATIVE_REASON)
"""The reasons the fold gives to valid events it refuses (beside validation's REASONS)."""
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


def has_corrections(events: pl.DataFrame) -> bool:
    return "correction" in events.columns and bool(events.get_column("correction").any())


def deltas_of(events: pl.DataFrame, corrections: bool = False) -> pl.DataFrame:
    """Per (tenant_id, period): event count, counter sums (exact: Decimal(38, 0), summed in
    Int128), risk-score sum/count/max and the first and last occurred_at: what these events
    add to the aggregates. With ``corrections`` (some rows are), those add their deltas
    to the counters and nothing else."""
    risk, at = pl.col("risk_score"), pl.col("occurred_at")
    count = pl.len()
    if corrections:
        usage = ~pl.col("correction")
        count, at = usage.sum(), at.filter(usage)
    return events.group_by("tenant_id", "period").agg(
        count.cast(pl.Int64).alias("events"),
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


def _with_value(dead: DeadLetter, notes: Mapping[int, Correction] | None) -> DeadLetter:
    """A refused correction keeps its raw value (``dead-letters replay`` can retry it)."""
    note = (notes or {}).get(dead.offset)
    return dead if note is None else replace(dead, value=note.value)


def _applied_corrections(frame: pl.DataFrame, notes: Mapping[int, Correction]) -> pl.DataFrame:
    """The rows of the ``corrections`` table for the corrections in ``frame``."""
    applied = frame.filter(pl.col("correction")).select(
        "tenant_id", "period", "event_id", "offset", *COUNTERS
    )
    offsets = applied.get_column("offset").to_list()
    return applied.with_columns(
        pl.Series("corrects_event_id", [notes[o].corrects_event_id for o in offsets], pl.String),
        pl.Series("reason", [notes[o].reason for o in offsets], pl.String),
    )


@dataclass(frozen=True)
class Folded:
    """What ``fold_fresh`` did: the events it refused (dead letters: their counters would
    pass the ceiling, or a correction's would go below zero) and a new upper bound of every
    counter total in the ledger; and the later copies of a correction applied in this
    batch (``repeated``: duplicates, not counted)."""

    refused: list[DeadLetter]
    bound: int
    repeated: list[int] = field(default_factory=list)  # offsets of corrections seen twice


def largest_delta(deltas: pl.DataFrame) -> int:
    """The largest counter sum in ``deltas`` (0 when it is empty or none is positive)."""
    tops = deltas.select(pl.col(c).max() for c in COUNTERS).row(0) if deltas.height else ()
    return max(0, int(max((t for t in tops if t is not None), default=0)))


def stored_maximum(con: duckdb.DuckDBPyConnection, alias: str) -> int:
    """The largest counter total ``alias``'s aggregates hold (0 when empty)."""
    row = con.execute(
        f"SELECT max(greatest({', '.join(COUNTERS)})) FROM {alias}.aggregates"
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def refuse_unfit(
    con: duckdb.DuckDBPyConnection,
    alias: str,
    events: pl.DataFrame,
    deltas: pl.DataFrame,
    ceiling: bool,
) -> tuple[pl.DataFrame, list[DeadLetter], list[int]]:
    """Split ``events`` into those that fit, dead letters (their value not kept) and the
    offsets of repeated corrections (duplicates).

    Only (tenant, period)s with a correction, or (with ``ceiling``) whose stored totals plus
    ``deltas`` pass the ceiling, are looked at, event by event in offset order: an event
    that would take one of its counters past ``COUNTER_CEILING``, or a correction that
    would take one below zero, is refused; the ones after it still count if they fit.
    ``events`` may hold several copies of a correction (a refused copy leaves the next one
    to be judged, as a copy in a later batch would be): the copies after one applied, or
    after a usage event of the same id, are repeated."""
    corrected = (
        events.filter(pl.col("correction")).select("tenant_id", "period").unique()
        if has_corrections(events)
        else None
    )
    table = deltas.select("tenant_id", "period", *COUNTERS)
    table = table.with_columns(
        pl.lit(False).alias("corrected")
        if corrected is None
        else pl.struct("tenant_id", "period")
        .is_in(corrected.to_struct().implode())
        .alias("corrected")
    )
    con.register("fold_deltas", table.to_arrow())
    try:
        stored = ", ".join(f"coalesce(t.{c}, 0)::HUGEINT" for c in COUNTERS)
        over = " OR ".join(
            f"coalesce(t.{c}, 0) + d.{c} > {COUNTER_CEILING}::HUGEINT" for c in COUNTERS
        )
        rows = con.execute(
            f"""SELECT d.tenant_id, d.period, {stored} FROM fold_deltas d
                LEFT JOIN {alias}.aggregates t USING (tenant_id, period)
                WHERE d.corrected OR ({over if ceiling else "false"})"""
        ).fetchall()
    finally:
        con.unregister("fold_deltas")
    totals = {(r[0], r[1]): [int(v) for v in r[2:]] for r in rows}
    if not totals:
        return events, [], []
    keys = pl.DataFrame(list(totals), schema=["tenant_id", "period"], orient="row")
    columns = ("offset", "tenant_id", "period", "event_id", "correction", *COUNTERS)
    suspects = events.join(keys, on=["tenant_id", "period"]).sort("offset").select(columns)
    refused: list[DeadLetter] = []
    repeated: list[int] = []
    taken: set[tuple[str, str]] = set()  # ids applied in this batch
    for offset, tenant, period, event_id, correction, *values in suspects.iter_rows():
        if (tenant, event_id) in taken:
            repeated.append(offset)
            continue
        running = totals[(tenant, period)]
        added = [t + v for t, v in zip(running, values, strict=True)]
        reason = _unfit(tenant, period, event_id, correction, running, values, added)
        if reason is None:
            running[:] = added
            taken.add((tenant, event_id))
        else:
            refused.append(DeadLetter(offset, tenant.encode(), None, reason))
    gone = pl.Series("offset", [d.offset for d in refused] + repeated, pl.Int64)
    return events.filter(~pl.col("offset").is_in(gone.implode())), refused, repeated


def _unfit(
    tenant: str,
    period: str,
    event_id: str,
    correction: bool,
    running: list[int],
    values: list[int],
    added: list[int],
) -> str | None:
    """Why one event cannot be applied to ``running`` (its (tenant, period) totals so far),
    or None."""
    for name, total, delta, value in zip(COUNTERS, running, values, added, strict=True):
        if correction and value < 0:
            return (
                f"{NEGATIVE_REASON}: the correction would take {name} of {tenant} in {period} "
                f"below zero ({total} {delta:+d}); nothing of it applied (event {event_id})"
            )
    past = [c for c, value in zip(COUNTERS, added, strict=True) if value > COUNTER_CEILING]
    if past:
        return (
            f"{CEILING_REASON}: {past[0]} of {tenant} in {period} "
            f"would pass 10^28 in this partition (event {event_id})"
        )
    return None


def fold_fresh(
    con: duckdb.DuckDBPyConnection,
    alias: str,
    fresh: pa.Table,
    partition: int,
    bound: int,
    notes: Mapping[int, Correction] | None = None,
) -> Folded:
    """Fold ``fresh`` (events counted for the first time) into ``alias``'s sessions and
    aggregates, refusing what would pass the ceiling or take a total below zero. ``bound``
    is an upper bound of every counter total stored (from ``stored_maximum`` or the last
    ``Folded``): while the batch's largest sum keeps it under the ceiling and it holds no
    correction, no look-up is made. ``notes``: the batch's corrections by offset (their
    reasons go to the ``corrections`` table, their values into refusals). Must run inside
    the caller's transaction; registers nothing it leaves."""
    frame = pl.from_arrow(fresh)
    assert isinstance(frame, pl.DataFrame)
    corrections = has_corrections(frame)
    deltas = deltas_of(frame, corrections)
    refused: list[DeadLetter] = []
    checked = bound + largest_delta(deltas) > COUNTER_CEILING
    repeated: list[int] = []
    if checked or corrections:
        frame, refused, repeated = refuse_unfit(con, alias, frame, deltas, checked)
        if refused or repeated:
            deltas = deltas_of(frame, corrections)
            refused = [_with_value(d, notes) for d in refused]
    usage = frame.filter(~pl.col("correction")) if corrections else frame
    registered: list[str] = []
    try:
        if corrections:
            applied = _applied_corrections(frame, notes or {})
            if applied.height:
                con.register("applied_corrections", applied.to_arrow())
                registered.append("applied_corrections")
                con.execute(
                    f"""INSERT INTO {alias}.corrections BY NAME
                        SELECT *, now() AS applied_at FROM applied_corrections"""
                )
        con.register("batch_sessions", sessions_of(usage).to_arrow())
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
    return Folded(refused, bound, repeated)
