"""What the dedup ids of the late-usage horizon cost: disk, and time per batch commit.

    .venv/bin/python -m bench.dedup_cost [--ids 30000000] [--partitions 6] [--batch 100000]

Preloads ``--ids`` dedup ids (spread over the partitions, dated inside the horizon) into
fresh partition ledgers, checkpoints them and reports their size on disk; then commits
batches of ``--batch`` fresh events into one partition (the real ``PartitionLedger.commit``:
hash, anti-join with ``seen_events``, fold, inserts) and the same batches into an empty
ledger, so the difference is what the stored ids cost per batch. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from aggregator.ledger import EVENT_HASH, LedgerSet, ledger_path
from bench.events import synthetic_events
from bench.worker_run import preload_seen_ids
from schemas.codec import default_codec
from schemas.prepare import Record, prepare_batch

TOPIC = "dedup-cost"


def commit_seconds(
    ledger_dir: Path, batches: list[list[Record]], now: int
) -> tuple[list[float], list[float]]:
    """Seconds of each batch's commit, and of its dedup anti-join alone (run just before
    the commit, as the commit runs it)."""
    codec = default_codec()
    ledgers = LedgerSet(ledger_dir, TOPIC, lock_timeout=10)
    try:
        ledger = ledgers.acquire(0)
        took, joins = [], []
        for records in batches:
            batch = prepare_batch(0, records, codec, now, None)
            ledgers.con.register("probe", batch.events)
            began = time.perf_counter()
            ledgers.con.execute(
                f"""SELECT count(*) FROM (SELECT {EVENT_HASH} AS h FROM probe) b
                    ANTI JOIN {ledger.alias}.seen_events s ON s.h = b.h"""
            ).fetchall()
            joins.append(time.perf_counter() - began)
            ledgers.con.unregister("probe")
            began = time.perf_counter()
            ledger.commit(batch)
            took.append(time.perf_counter() - began)
        return took, joins
    finally:
        ledgers.close(None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ids", type=int, default=30_000_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    codec = default_codec()
    now = int(time.time() * 1_000_000)
    events = synthetic_events(args.batch * args.batches, tenants=1000, seed=61).to_dicts()
    records = [Record(i, e["tenant_id"].encode(), codec.encode(e)) for i, e in enumerate(events)]
    batches = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    with tempfile.TemporaryDirectory(dir=".") as work:
        loaded, empty = Path(work) / "loaded", Path(work) / "empty"
        preload = preload_seen_ids(loaded, TOPIC, args.partitions, args.ids)
        files = list(ledger_path(loaded, TOPIC, 0).parent.glob("p-*.duckdb*"))
        disk = sum(f.stat().st_size for f in files)
        with_ids, join_with = commit_seconds(loaded, batches, now)
        without, join_without = commit_seconds(empty, batches, now)
    result = {
        "ids": args.ids,
        "partitions": args.partitions,
        "ids_per_partition": args.ids // args.partitions,
        "preload_seconds": round(preload, 1),
        "disk_bytes": disk,
        "disk_bytes_per_id": round(disk / args.ids, 1),
        "batch": args.batch,
        "commit_seconds_with_ids": [round(t, 3) for t in with_ids],
        "commit_seconds_empty": [round(t, 3) for t in without],
        "anti_join_seconds_with_ids": [round(t, 3) for t in join_with],
        "anti_join_seconds_empty": [round(t, 3) for t in join_without],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
