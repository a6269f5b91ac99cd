"""Putting events into a real ledger and snapshot without Kafka (for benches and tests)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from aggregator.lake import open_lake
from aggregator.lake_ledger import LakeLedgerSet
from aggregator.ledger import LedgerSet
from common.settings import Settings
from schemas.codec import default_codec
from schemas.prepare import Record, prepare_batch


def publish_usage(settings: Settings, events: Sequence[dict[str, Any]], partition: int = 0) -> None:
    """Fold ``events`` into partition ``partition``'s ledger (appending) and publish it; in
    cluster mode, commit them to the partition's ledger in the lake."""
    codec = default_codec()
    ledgers: LedgerSet | LakeLedgerSet
    if settings.cluster_mode:
        ledgers = LakeLedgerSet(partial(open_lake, settings), settings.metering_topic)
    else:
        ledgers = LedgerSet(
            settings.ledger_dir,
            settings.metering_topic,
            lock_timeout=10,
            snapshot_dir=settings.snapshot_dir,
        )
    try:
        ledger = ledgers.acquire(partition)
        start = ledger.next_offset or 0
        records = [
            Record(start + i, e["tenant_id"].encode(), codec.encode(e))
            for i, e in enumerate(events)
        ]
        now = int(time.time() * 1_000_000)
        ledger.commit(prepare_batch(partition, records, codec, now, None))
    finally:
        ledgers.close(settings.snapshot_dir)
