"""Synthetic usage events for the throughput bench, generated column-wise.

Why: building a million event dicts in Python takes longer than sending them; polars
draws the columns in well under a second, so the bench measures the emitter, not the
generator. Every event is valid, ids are unique, and all of them fall inside the dedup
window of the newest one.
"""

from __future__ import annotations

import time

import polars as pl

from schemas.codec import COUNTERS

SOURCES = ("gateway", "policy-kernel", "egress-firewall", "retrieval-gateway")
DAY_MICROS = 86_400 * 1_000_000


def _draw(n: int, low: int, high: int, seed: int) -> pl.Expr:
    """``n`` pseudo-random integers in [low, high] (a seeded hash of the row number)."""
    return (pl.int_range(n).hash(seed) % (high - low + 1)).cast(pl.Int64) + low


def synthetic_events(n: int, tenants: int, seed: int = 1) -> pl.DataFrame:
    """``n`` valid usage events over ``tenants`` tenants, dated in the last 20 days.

    About four events a session (as ``simulate-usage`` makes), a session belongs to one
    tenant, half the events carry a risk score.
    """
    now = int(time.time() * 1_000_000)
    frame = pl.select(
        pl.int_range(n, dtype=pl.Int64).alias("i"),
        _draw(n, 0, max(n // 4, 1), seed + 1).alias("session"),
        _draw(n, 60_000_000, 20 * DAY_MICROS, seed + 2).alias("age"),
        _draw(n, 0, len(SOURCES) - 1, seed + 3).alias("source_index"),
        _draw(n, 0, 10_000, seed + 4).alias("risk"),
        _draw(n, 100, 10_099, seed + 5).alias("cpu_ms"),
        _draw(n, 1_024, 1_049_599, seed + 6).alias("network_bytes"),
        _draw(n, 1, 50, seed + 7).alias("api_calls"),
        _draw(n, 1, 20, seed + 8).alias("tool_executions"),
        _draw(n, 1, 10, seed + 9).alias("data_retrievals"),
        _draw(n, 1, 5, seed + 10).alias("egress_scans"),
        _draw(n, 10, 109, seed + 11).alias("policy_checks"),
        _draw(n, 0, 2, seed + 12).alias("violations"),
    )
    sources = pl.Series(SOURCES)
    return frame.select(
        pl.format("{}-{}", pl.col("i"), pl.col("i").hash(seed)).alias("event_id"),
        pl.format("tenant-{}", pl.col("session") % tenants).alias("tenant_id"),
        pl.format("s-{}", pl.col("session")).alias("session_id"),
        (now - pl.col("age")).alias("occurred_at"),
        pl.col("source_index").map_batches(lambda idx: sources.gather(idx)).alias("source"),
        *[pl.col(c).cast(pl.Int64) for c in COUNTERS],
        pl.when(pl.col("risk") % 2 == 0)
        .then(pl.col("risk") / 10_000)
        .otherwise(None)
        .alias("risk_score"),
    )
