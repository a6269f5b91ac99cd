"""The validation rules of ``schemas.validation`` as one polars expression over a batch.

It is one-sided: ``surely_valid`` is True only for rows that
``validate`` accepts (ignoring the Kafka key, which callers compare themselves). A row it
does not vouch for goes through ``validate`` itself, so every reason text stays exactly
the per-record one. The tenant rule is not re-implemented at all: ``validate`` itself
judges each distinct tenant of the batch (a batch holds few), so its regex and the way
it is applied can change without this module drifting from it. And every batch is
audited: ``validate`` re-checks the vouched rows holding the extremes of every field
(shortest and longest strings, smallest and largest numbers); if it refuses one, the
rules here have drifted from it and nothing of the batch is vouched for.
"""

from __future__ import annotations

import logging

import polars as pl

from schemas.codec import COUNTERS
from schemas.validation import (
    MAX_FUTURE_MICROS,
    MAX_ID_LEN,
    MIN_OCCURRED_MICROS,
    USAGE,
    validate,
)

# The logger's name is pinned: operators filter on it; it predates the module's move.
log = logging.getLogger("schemas.bulk_validation")
_STRINGS = ("event_id", "tenant_id", "session_id", "source")
_NUMBERS = ("occurred_at", *COUNTERS, "risk_score")

# An event valid in every respect but its tenant: validate(probe) judges the tenant alone.
_PROBE = {
    "event_id": "probe", "session_id": "probe", "source": "probe", "occurred_at": 0,
    **dict.fromkeys(COUNTERS, 0), "risk_score": None,
}  # fmt: skip


def tenant_accepted(tenant: object) -> bool:
    """Whether ``validate`` accepts ``tenant`` as a tenant_id."""
    return validate({**_PROBE, "tenant_id": tenant}, now_micros=0) is None


def _id_ok(name: str) -> pl.Expr:
    # len_chars counts code points, like Python's len()
    return pl.col(name).str.len_chars().is_between(1, MAX_ID_LEN)


def _tenant_ok(events: pl.DataFrame) -> pl.Expr:
    tenants = events.get_column("tenant_id").unique().to_list()
    accepted = [t for t in tenants if t is not None and tenant_accepted(t)]
    if len(accepted) == len(tenants):
        return pl.lit(True)
    return pl.col("tenant_id").is_in(pl.lit(pl.Series(accepted, dtype=pl.String)).implode())


def surely_valid(events: pl.DataFrame, now_micros: int) -> pl.Expr:
    """True where ``validate(event, now_micros)`` surely returns None (key not checked),
    for rows of ``events``; only usage events (a ``kind`` column, if any, says which)."""
    risk = pl.col("risk_score")
    # only usage events: a correction's rules are validate's alone (corrections are rare)
    kind = [pl.col("kind") == USAGE] if "kind" in events.columns else []
    rules = [
        *kind,
        _id_ok("event_id"),
        _tenant_ok(events),
        _id_ok("session_id"),
        _id_ok("source"),
        *[pl.col(name) >= 0 for name in COUNTERS],
        risk.is_null() | (risk.is_finite() & (risk >= 0.0) & (risk <= 1.0)),
        pl.col("occurred_at") <= now_micros + MAX_FUTURE_MICROS,
        pl.col("occurred_at") >= MIN_OCCURRED_MICROS,
    ]
    return pl.all_horizontal(rules).fill_null(False)


def vouched(events: pl.DataFrame, now_micros: int) -> pl.Series:
    """``surely_valid`` for every row of ``events``, audited (see the module doc)."""
    mask = events.select(surely_valid(events, now_micros)).to_series()
    if mask.any() and not _audit(events, mask, now_micros):
        log.warning(
            "vectorised validation vouched for an event validate() refuses: "
            "checking this batch event by event"
        )
        return pl.repeat(False, events.height, eager=True)
    return mask


def _audit(events: pl.DataFrame, mask: pl.Series, now_micros: int) -> bool:
    rows = events.select(*_STRINGS, *_NUMBERS).with_row_index("i")
    if not mask.all():
        rows = rows.filter(mask)
    at = pl.col("i")
    picks = [
        *[at.get(pl.col(c).str.len_chars().arg_min()) for c in _STRINGS],
        *[at.get(pl.col(c).str.len_chars().arg_max()) for c in _STRINGS],
        *[at.get(pl.col(c).arg_min()) for c in _NUMBERS],
        *[at.get(pl.col(c).arg_max()) for c in _NUMBERS],
    ]
    chosen = {i for i in rows.select(p.alias(str(n)) for n, p in enumerate(picks)).row(0)}
    return all(
        validate(events.row(i, named=True), now_micros) is None for i in chosen if i is not None
    )
