"""The partition contract (pure): a tenant's events belong to one partition of the topic.

``partition_for(tenant_id, n)`` = murmur2 of the UTF-8 tenant_id, made positive, modulo
the partition count: exactly what Apache Kafka's Java client does for a keyed record
(``Utils.toPositive(Utils.murmur2(key)) % n``) and what librdkafka (confluent-kafka, the Go
and .NET clients) does with ``partitioner=murmur2_random``. Dedup is per partition, so a
producer that partitions otherwise would make one event countable twice; the worker
forwards such events to the partition named here.
"""

from __future__ import annotations

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``) as a signed 32-bit int."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    end = length & ~3
    for i in range(0, end, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(tenant_id: str, partitions: int) -> int:
    """The partition a tenant's events belong to in a topic of ``partitions`` partitions."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, not {partitions}")
    return (murmur2(tenant_id.encode("utf-8")) & 0x7FFFFFFF) % partitions


__all__ = ["murmur2", "partition_for"]
