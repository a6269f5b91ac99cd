"""The fold in Bytewax 0.21 (runs in ``.cache/peers/bytewax``), as its docs build a
dataflow: KafkaSource (``tail=False``: ends at the end of each partition) -> filter_map
(decode, valid) -> key_on(tenant) -> stateful_map (a ``DictState`` per tenant) -> a sink
keeping the newest aggregate per (tenant, period). Recovery is on: every epoch Bytewax
snapshots the changed states and the source offsets together into its SQLite recovery
partitions, so a restart resumes both from the same point.
"""

from __future__ import annotations

import time
from typing import Any

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSource, KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main

from bench.peers.fold import Aggregate, Decoder, DictState, app_args, fold_event, write_result

Latest = dict[tuple[str, str], Aggregate]


class _LatestPartition(StatelessSinkPartition[tuple[str, Aggregate | None]]):
    def __init__(self, latest: Latest) -> None:
        self.latest = latest

    def write_batch(self, items: list[tuple[str, Aggregate | None]]) -> None:
        for _tenant, agg in items:
            if agg is not None:
                self.latest[agg["tenant_id"], agg["period"]] = agg


class LatestSink(DynamicSink[tuple[str, Aggregate | None]]):
    """Keeps the newest aggregate per (tenant, period) in ``latest``."""

    def __init__(self) -> None:
        self.latest: Latest = {}

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _LatestPartition:
        return _LatestPartition(self.latest)


def fold(state: DictState | None, event: dict[str, Any]) -> tuple[DictState, Aggregate | None]:
    state = DictState() if state is None else state
    return state, fold_event(state, event)


def main() -> None:
    args = app_args()
    decode = Decoder()

    def valid(message: KafkaSourceMessage[bytes, bytes]) -> dict[str, Any] | None:
        return decode(message.value, message.key)

    started = time.perf_counter()
    recovery = args.workdir / "recovery"
    recovery.mkdir(parents=True, exist_ok=True)
    init_db_dir(recovery, 1)
    flow = Dataflow("pf_fold")
    source = KafkaSource([args.bootstrap], [args.topic], tail=False)
    messages = op.input("kafka", flow, source)
    events = op.filter_map("decode", messages, valid)
    keyed = op.key_on("tenant", events, lambda event: event["tenant_id"])
    aggregates = op.stateful_map("fold", keyed, fold)
    sink = LatestSink()
    op.output("latest", aggregates, sink)
    cli_main(flow, workers_per_process=1, recovery_config=RecoveryConfig(recovery))
    write_result(args.result, time.perf_counter() - started, sink.latest.values())


if __name__ == "__main__":
    main()
