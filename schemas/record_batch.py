"""The records of one partition's slice of a poll, as the fold reads them.

``RecordBatch`` keeps offsets, keys and values as three lists, filled straight from the
messages (no tuple per message: docs/performance.md, "Why the code is shaped this way"),
and still behaves as a ``Sequence[Record]`` for the per-record path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, overload


class Record(NamedTuple):
    """What the ledger needs of one Kafka message."""

    offset: int
    key: bytes | None
    value: bytes | None


class RecordBatch(Sequence[Record]):
    """Records of one partition in offset order, column-wise."""

    __slots__ = ("keys", "offsets", "values")

    def __init__(
        self, offsets: list[int], keys: list[bytes | None], values: list[bytes | None]
    ) -> None:
        self.offsets = offsets
        self.keys = keys
        self.values = values

    def __len__(self) -> int:
        return len(self.offsets)

    @overload
    def __getitem__(self, index: int) -> Record: ...
    @overload
    def __getitem__(self, index: slice) -> RecordBatch: ...
    def __getitem__(self, index: int | slice) -> Record | RecordBatch:
        if isinstance(index, slice):
            return RecordBatch(self.offsets[index], self.keys[index], self.values[index])
        return Record(self.offsets[index], self.keys[index], self.values[index])

    @classmethod
    def concat(cls, parts: list[RecordBatch]) -> RecordBatch:
        """One batch of ``parts`` (consecutive slices of one partition, in order)."""
        if len(parts) == 1:
            return parts[0]
        out = cls([], [], [])
        for part in parts:
            out.extend(part.offsets, part.keys, part.values)
        return out

    def extend(
        self, offsets: list[int], keys: list[bytes | None], values: list[bytes | None]
    ) -> None:
        """Append the next records of the partition, in offset order."""
        self.offsets.extend(offsets)  # list.extend, not a comprehension (docs/performance.md)
        self.keys.extend(keys)
        self.values.extend(values)

    def since(self, offset: int) -> RecordBatch:
        """The records at or after ``offset`` (redelivered ones below it dropped)."""
        if min(self.offsets, default=offset) >= offset:
            return self
        keep = [i for i, o in enumerate(self.offsets) if o >= offset]
        return RecordBatch(
            [self.offsets[i] for i in keep],
            [self.keys[i] for i in keep],
            [self.values[i] for i in keep],
        )


def columns_of(
    records: Sequence[Record],
) -> tuple[list[int], list[bytes | None], list[bytes | None]]:
    """(offsets, keys, values) of ``records``, without copying a RecordBatch."""
    if isinstance(records, RecordBatch):
        return records.offsets, records.keys, records.values
    return [r.offset for r in records], [r.key for r in records], [r.value for r in records]
