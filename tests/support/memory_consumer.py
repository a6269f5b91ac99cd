"""An in-memory broker and consumer: the part of confluent-kafka's ``Consumer`` the worker
uses (``consumer.kafka.ConsumerClient``), with a consumer group's rebalances.

A group's partitions are dealt round-robin over its members in the order they joined.
As in librdkafka, a member's rebalance callbacks run inside its ``consume()``: first
``on_revoke`` for what it lost, then ``on_assign`` for what it gained (only partitions no
other member still holds); with an eager strategy (``range``, ``roundrobin``) every
change revokes everything and assigns everything anew. A member subscribed without
callbacks (``passive``) takes its partitions at once, as soon as they are free.
``on_consume`` runs at the start of every ``consume()`` with the call's number (from 1):
tests use it to change the world while a worker runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from consumer.kafka import RebalanceCallback

Record = tuple[bytes | None, bytes | None]


@dataclass
class TopicMeta:
    partitions: dict[int, None]
    error: KafkaError | None = None


@dataclass
class Metadata:
    topics: dict[str, TopicMeta]


@dataclass
class MemoryBroker:
    """Topics (partition -> records) and one consumer group's members and offsets."""

    topics: dict[str, list[list[Record]]] = field(default_factory=dict)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    members: list[MemoryConsumer] = field(default_factory=list)
    fetch_records: int = 1_000_000  # records a consume() returns of one partition, at most
    unreachable: KafkaError | None = None  # raised by metadata and offset requests

    def create_topic(self, topic: str, partitions: int) -> None:
        self.topics[topic] = [[] for _ in range(partitions)]

    def produce(self, topic: str, partition: int, key: bytes | None, value: bytes | None) -> int:
        log = self.topics[topic][partition]
        log.append((key, value))
        return len(log) - 1

    def consumer(self, config: dict[str, Any] | None = None) -> MemoryConsumer:
        """A consumer factory for the worker (``Worker(..., consumer_factory=broker.consumer)``)."""
        return MemoryConsumer(self, config or {})

    def holder(self, topic: str, partition: int) -> MemoryConsumer | None:
        for member in self.members:
            if member.topic == topic and partition in member.owned:
                return member
        return None

    def rebalance(self) -> None:
        for topic in {m.topic for m in self.members}:
            group = [m for m in self.members if m.topic == topic]
            for i, member in enumerate(group):
                member.target = set(range(i, len(self.topics[topic]), len(group)))
        for member in self.members:
            if member.passive:
                member.take_free()

    def check_reachable(self) -> None:
        if self.unreachable is not None:
            raise KafkaException(self.unreachable)


class MemoryConsumer:
    """One member of the group (implements ``consumer.kafka.ConsumerClient``)."""

    def __init__(self, broker: MemoryBroker, config: dict[str, Any]) -> None:
        self.broker = broker
        self.eager = config.get("partition.assignment.strategy", "range") != "cooperative-sticky"
        self.topic = ""
        self.on_assign: RebalanceCallback | None = None
        self.on_revoke: RebalanceCallback | None = None
        self.target: set[int] = set()  # what the group gave this member
        self.owned: set[int] = set()  # what the member was told it holds
        self.positions: dict[int, int] = {}  # assigned partition -> next offset to fetch
        self.fetched: set[int] = set()  # partitions whose end a fetch reported (cached)
        self.paused: set[int] = set()  # partitions fetches skip (their cached end stays known)
        self.assigned_at: list[dict[int, int]] = []  # the offsets of every assign call
        self.commits: list[dict[int, int]] = []
        self.async_commits_lost = 0  # this many asynchronous commits are refused (a rebalance)
        self.calls = 0
        self.on_consume: Callable[[int], None] | None = None
        self.closed = False

    @property
    def passive(self) -> bool:
        return self.on_assign is None

    # -- group membership ----------------------------------------------------------------
    def subscribe(
        self,
        topics: list[str],
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
        on_lost: RebalanceCallback | None = None,
    ) -> None:
        (self.topic,) = topics
        self.on_assign, self.on_revoke = on_assign, on_revoke
        self.broker.members.append(self)
        self.broker.rebalance()

    def take_free(self) -> None:
        """A passive member's rebalance: let go of what it lost, take what is free."""
        self.owned &= self.target
        for p in sorted(self.target - self.owned):
            if self.broker.holder(self.topic, p) is None:
                self.owned.add(p)

    def _rebalance(self) -> None:
        free = {p for p in self.target if self.broker.holder(self.topic, p) in (None, self)}
        lost = self.owned - self.target
        gained = free - self.owned
        if self.eager and (lost or gained):
            lost, gained = set(self.owned), free
        if lost:
            self._call(self.on_revoke, lost)
            self.owned -= lost
            for p in lost:
                self.positions.pop(p, None)
            for member in self.broker.members:
                if member.passive:
                    member.take_free()
        if gained:
            self.owned |= gained
            self._call(self.on_assign, gained)

    def _call(self, callback: RebalanceCallback | None, partitions: set[int]) -> None:
        if callback is not None:
            callback(self, [TopicPartition(self.topic, p) for p in sorted(partitions)])

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.positions = {}
        self.incremental_assign(partitions)

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            start = 0 if tp.offset in (OFFSET_BEGINNING, OFFSET_INVALID) else tp.offset
            self.positions[tp.partition] = start
        self.assigned_at.append({tp.partition: tp.offset for tp in partitions})

    def close(self) -> None:
        if self.owned:
            self._call(self.on_revoke, self.owned)
        self.owned, self.positions, self.closed = set(), {}, True
        self.broker.members.remove(self)
        self.broker.rebalance()

    # -- fetching ------------------------------------------------------------------------
    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        self.calls += 1
        if self.on_consume is not None:
            self.on_consume(self.calls)
        self._rebalance()
        out: list[Message] = []
        for p, start in sorted(self.positions.items()):
            if p in self.paused:
                continue
            log = self.broker.topics[self.topic][p]
            limit = min(num_messages - len(out), self.broker.fetch_records)
            taken = log[start : start + limit]
            out += [
                Message(topic=self.topic, partition=p, offset=start + i, key=k, value=v)
                for i, (k, v) in enumerate(taken)
            ]
            self.positions[p] = start + len(taken)
            self.fetched.add(p)
        return out

    # -- offsets and metadata ------------------------------------------------------------
    @overload
    def commit(self, *, offsets: list[TopicPartition], asynchronous: Literal[True]) -> None: ...
    @overload
    def commit(self, *, offsets: list[TopicPartition], asynchronous: Literal[False]) -> None: ...
    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> None:
        if asynchronous and self.async_commits_lost > 0:
            self.async_commits_lost -= 1  # (librdkafka reports it only to a commit callback)
            return
        done = {tp.partition: tp.offset for tp in offsets}
        self.commits.append(done)
        for p, offset in done.items():
            self.broker.committed[(self.topic, p)] = offset

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        if cached:
            if partition.partition not in self.fetched:
                return OFFSET_INVALID, OFFSET_INVALID
        else:
            self.broker.check_reachable()
        return 0, len(self.broker.topics[partition.topic][partition.partition])

    def committed(
        self, partitions: list[TopicPartition], timeout: float = -1
    ) -> list[TopicPartition]:
        self.broker.check_reachable()
        offsets = self.broker.committed
        return [
            TopicPartition(
                tp.topic, tp.partition, offsets.get((tp.topic, tp.partition), OFFSET_INVALID)
            )
            for tp in partitions
        ]

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Metadata:
        self.broker.check_reachable()
        names = [topic] if topic is not None else list(self.broker.topics)
        return Metadata(
            {t: TopicMeta(dict.fromkeys(range(len(self.broker.topics[t])))) for t in names}
        )
