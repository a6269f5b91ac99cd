"""Lag and drain arithmetic (no I/O): how far partitions are from their ends, and when a
``--drain`` is done. A partition's end is its high watermark; a next offset of None means
nothing of the partition is consumed yet (0); an end that is negative is not known yet."""

from __future__ import annotations

from collections.abc import Collection, Mapping


def lag(high: int, next_offset: int | None) -> int | None:
    """Records from ``next_offset`` to the end ``high`` (None: the end is not known)."""
    return None if high < 0 else max(0, high - (next_offset or 0))


def remaining(lags: Collection[int | None]) -> int | None:
    """Records left in the partitions held (None: none held, or one's end not known)."""
    if not lags or None in lags:
        return None
    return sum(x for x in lags if x is not None)


def held_lag(lags: Mapping[int, int], held: Collection[int]) -> int:
    """The last known lags of the partitions still ``held``, summed."""
    return sum(v for p, v in lags.items() if p in held)


def drained(
    ends: Mapping[int, int], ours: Mapping[int, int | None], theirs: Mapping[int, int]
) -> bool:
    """True once every partition in ``ends`` is consumed to its end: a partition held here
    by its next offset (``ours``), any other by the group's committed offset (``theirs``;
    missing or negative: nothing committed)."""
    return all(_done(p, ours, theirs) >= end for p, end in ends.items())


def _done(partition: int, ours: Mapping[int, int | None], theirs: Mapping[int, int]) -> int:
    if partition in ours:
        return ours[partition] or 0
    return max(theirs.get(partition, 0), 0)


__all__ = ["drained", "held_lag", "lag", "remaining"]
