"""``consumer.lag``: lag and drain arithmetic."""

from __future__ import annotations

from consumer import lag


def test_lag_counts_from_the_next_offset_to_the_end() -> None:
    assert lag.lag(high=100, next_offset=40) == 60
    assert lag.lag(high=100, next_offset=None) == 100  # nothing consumed yet
    assert lag.lag(high=100, next_offset=100) == 0
    assert lag.lag(high=100, next_offset=120) == 0  # (an end seen before the last fetch)
    assert lag.lag(high=-1, next_offset=5) is None  # the end not known yet
    assert lag.lag(high=-1001, next_offset=None) is None


def test_remaining_is_known_only_when_every_partition_held_is() -> None:
    assert lag.remaining([3, 0, 7]) == 10
    assert lag.remaining([0, 0]) == 0
    assert lag.remaining([3, None]) is None
    assert lag.remaining([]) is None  # nothing held: not "nothing left"


def test_held_lag_sums_only_the_partitions_still_held() -> None:
    assert lag.held_lag({0: 5, 1: 7, 2: 100}, held={0: "a", 1: "b"}.keys()) == 12
    assert lag.held_lag({}, held=[0]) == 0


def test_drained_needs_every_partition_at_its_end_ours_or_the_groups() -> None:
    ends = {0: 10, 1: 20, 2: 0}
    assert lag.drained(ends, ours={0: 10}, theirs={1: 20})
    assert not lag.drained(ends, ours={0: 9}, theirs={1: 20})
    assert not lag.drained(ends, ours={0: 10}, theirs={1: 19})
    assert not lag.drained(ends, ours={0: 10}, theirs={})  # partition 1: nothing committed
    assert not lag.drained(ends, ours={0: 10}, theirs={1: -1001})  # (no committed offset)
    assert not lag.drained(ends, ours={0: None}, theirs={1: 20})  # held, nothing consumed
    assert lag.drained({2: 0}, ours={2: None}, theirs={})  # an empty partition
    assert lag.drained(ends, ours={0: 10, 1: 20}, theirs={1: 0})  # ours wins over theirs
    assert lag.drained({}, ours={}, theirs={})
