"""The fold in sentry-arroyo 2.48 (runs in ``.cache/peers/arroyo``), as its docs compose a
consumer: a StreamProcessor over a KafkaConsumer, and a strategy chain RunTask(decode) ->
FilterStep(valid) -> Reduce(batches of 10,000 or 1 s) -> RunTask(fold and write the batch
to DuckDB, ``DuckSink``) -> CommitOffsets. Offsets reach Kafka only after their batch is
in DuckDB (at-least-once, arroyo's guarantee; the durable seen ids make it exactly-once
in effect). Stops once every one of ``--events`` records is written.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from arroyo.backends.kafka import KafkaConsumer, KafkaPayload
from arroyo.backends.kafka.configuration import build_kafka_consumer_configuration
from arroyo.commit import ONCE_PER_SECOND
from arroyo.processing import StreamProcessor
from arroyo.processing.strategies import (
    CommitOffsets,
    FilterStep,
    ProcessingStrategy,
    ProcessingStrategyFactory,
    Reduce,
    RunTask,
)
from arroyo.types import BaseValue, Commit, Message, Partition, Topic

from bench.peers.duck_sink import DuckSink
from bench.peers.fold import AppArgs, Decoder, app_args, write_result

Event = dict[str, Any]
BATCH_SIZE = 10_000
BATCH_SECONDS = 1.0


class FoldFactory(ProcessingStrategyFactory[KafkaPayload]):
    """Builds the strategy chain; signals ``processor`` to stop when all are written."""

    def __init__(self, sink: DuckSink, expected: int) -> None:
        self.sink = sink
        self.expected = expected
        self.decode = Decoder()
        self.consumed = self.valid = self.written = 0
        self.processor: StreamProcessor[KafkaPayload] | None = None

    def _decode(self, message: Message[KafkaPayload]) -> Event | None:
        self.consumed += 1
        event = self.decode(message.payload.value, message.payload.key)
        self.valid += event is not None
        return event

    def _write(self, message: Message[list[Event]]) -> None:
        self.sink.write(message.payload)
        self.written += len(message.payload)
        done = self.consumed >= self.expected and self.written == self.valid
        if done and self.processor is not None:
            self.processor.signal_shutdown()

    def create_with_partitions(
        self, commit: Commit, partitions: Mapping[Partition, int]
    ) -> ProcessingStrategy[KafkaPayload]:
        def accumulate(batch: list[Event], value: BaseValue[Event]) -> list[Event]:
            batch.append(value.payload)
            return batch

        write: RunTask[list[Event], None] = RunTask(self._write, CommitOffsets(commit))
        reduce: Reduce[Event, list[Event]] = Reduce(
            BATCH_SIZE, BATCH_SECONDS, accumulate, list, write
        )
        valid = FilterStep(lambda m: m.payload is not None, reduce)
        return RunTask(self._decode, valid)


def run(args: AppArgs) -> DuckSink:
    sink = DuckSink(args.workdir / "arroyo.duckdb")
    consumer = KafkaConsumer(
        build_kafka_consumer_configuration(
            {},
            group_id=args.group,
            auto_offset_reset="earliest",
            bootstrap_servers=[args.bootstrap],
        )
    )
    factory = FoldFactory(sink, args.events)
    processor = StreamProcessor(consumer, Topic(args.topic), factory, ONCE_PER_SECOND)
    factory.processor = processor
    processor.run()
    return sink


def main() -> None:
    args = app_args()
    started = time.perf_counter()
    sink = run(args)
    seconds = time.perf_counter() - started
    write_result(args.result, seconds, sink.aggregates())
    sink.close()


if __name__ == "__main__":
    main()
