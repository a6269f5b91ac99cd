"""The fold in Quix Streams 3.28 (runs in ``.cache/peers/quix``), as its docs write a
stateful app: a StreamingDataFrame over the topic, a stateful ``apply`` whose ``State``
(RocksDB, keyed by the message key = tenant, backed by a changelog topic) holds the seen
ids, the sessions and the aggregates, ``processing_guarantee="exactly-once"`` (changelog
writes and offsets in one Kafka transaction). Stops after ``--events`` outputs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from quixstreams import Application
from quixstreams.state import State

from bench.peers.fold import Aggregate, Decoder, app_args, fold_event, write_result

STALL_SECONDS = 30.0


def main() -> None:
    args = app_args()
    decode = Decoder()
    latest: dict[tuple[str, str], Aggregate] = {}

    def fold(event: dict[str, Any], state: State) -> Aggregate | None:
        return fold_event(state, event)

    def keep(agg: Aggregate | None) -> None:
        if agg is not None:
            latest[agg["tenant_id"], agg["period"]] = agg

    started = time.perf_counter()
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        state_dir=args.workdir / "state",
        loglevel=logging.WARNING,
    )
    topic = app.topic(args.topic, key_deserializer="bytes", value_deserializer="bytes")
    sdf = app.dataframe(topic)
    sdf = sdf.apply(lambda value, key, _ts, _headers: decode(value, key), metadata=True)
    sdf = sdf.filter(lambda event: event is not None)
    sdf = sdf.apply(fold, stateful=True)
    sdf = sdf.update(keep)
    app.run(count=args.events, timeout=STALL_SECONDS, collect=False)
    write_result(args.result, time.perf_counter() - started, latest.values())


if __name__ == "__main__":
    main()
