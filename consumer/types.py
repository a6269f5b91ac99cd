"""What flows through the worker's steps (``consumer.steps``) and what they share.

A ``Batch`` is one partition's records ``[first_offset, next_offset)``; each step hands the
next one the same batch with its own payload (records -> decoded -> committed), so where a
batch came from and what committing it makes safe (``committable``) travel as data. After
the batches of one hand-over comes ``END_OF_POLL``, through every step.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from schemas.prepare import PreparedBatch
from schemas.record_batch import RecordBatch

T = TypeVar("T")
U = TypeVar("U")
T_contra = TypeVar("T_contra", contravariant=True)


@dataclass(frozen=True, slots=True)
class Batch(Generic[T]):
    """One partition's records ``[first_offset, next_offset)`` and a step's payload."""

    partition: int
    first_offset: int
    next_offset: int
    payload: T

    @property
    def committable(self) -> Mapping[int, int]:
        """Partition -> the offset to resume from once this batch is committed."""
        return {self.partition: self.next_offset}

    def carrying(self, payload: U) -> Batch[U]:
        """The same records with the next step's payload."""
        return Batch(self.partition, self.first_offset, self.next_offset, payload)


class EndOfPoll:
    """Follows the batches of one hand-over through every step ("batch done")."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_POLL"


END_OF_POLL = EndOfPoll()


class Step(Protocol[T_contra]):
    """A step of the chain: does its work on ``item`` and submits the result to its next
    step. A ``consumer.pipeline.Stage`` is one too: it runs the step behind it on its own
    thread, in order."""

    def submit(self, item: T_contra) -> None: ...


@dataclass
class Head:
    """Where a partition stands once every batch handed over is applied (``next_offset``
    is advanced by the main thread)."""

    next_offset: int | None


@dataclass(frozen=True, slots=True)
class Polled:
    """Payload into ``Decode``: the records, their partition's head, the clock of the poll."""

    records: RecordBatch
    head: Head
    now_micros: int


@dataclass(frozen=True, slots=True)
class Decoded:
    """Payload into ``CommitToLedger``: the validated columns and the decode's duration."""

    prepared: PreparedBatch
    decode_seconds: float


COMMITS_KEPT = 10_000
"""Commit times a worker keeps for its summary (a long-running one keeps the latest)."""


@dataclass
class WorkerStats:
    """What the worker did so far (updated by ``CommitToLedger``)."""

    consumed: int = 0
    counted: int = 0
    duplicates: int = 0
    dead: int = 0
    forwarded: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)  # (before the Kafka client)
    commit_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=COMMITS_KEPT))
    """How long each of the last ``COMMITS_KEPT`` ledger commits took (the transaction only)."""

    def commit_percentiles_ms(self) -> tuple[float, float] | None:
        """p50 and p99 of the kept commit times in milliseconds (None before any commit)."""
        kept = sorted(self.commit_seconds)
        if not kept:
            return None
        p99 = kept[min(len(kept) - 1, int(0.99 * len(kept)))]
        return statistics.median(kept) * 1000, p99 * 1000


__all__ = [
    "END_OF_POLL",
    "Batch",
    "Decoded",
    "EndOfPoll",
    "Head",
    "Polled",
    "Step",
    "WorkerStats",
]
