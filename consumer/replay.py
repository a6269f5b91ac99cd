"""Dead-letter replay: requests from ``pf-metering dead-letters replay``, applied by the
workers that hold the partitions.

Why the worker replays (not a re-publish to Kafka): a partition's ledger belongs to the
one worker holding it, and only that worker can apply a replay in the same transaction as
the dead letters' new states, so each dead letter's outcome is decided once. A request is
a file ``<METERING_DATA_DIR>/replay/<id>.json``; each worker, between batches, replays it
on the partitions it holds (``PartitionLedger.replayable`` / ``replay``: the same decode,
validation, partition check and dedup as live events; the request id is stored in the
ledger with the outcome, so applying it twice changes nothing) and writes the outcome to
``replay/<id>/p-0003.json`` for the command to report. A partition that changes owner
later still gets the request: the new owner sees it is not recorded in the ledger.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aggregator.ledger import CommitResult, ReplayRequest

# How long a request stays pending for partitions not yet replayed (a partition that has
# no dead letters of it by then has nothing to replay).
REQUEST_TTL_SECONDS = 7 * 86_400


def replay_dir(data_dir: Path) -> Path:
    return data_dir / "replay"


def post_request(data_dir: Path, reason: str | None, partition: int | None) -> ReplayRequest:
    """Write a new request (atomically: written aside, then renamed)."""
    stamp = time.time()
    request_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(stamp))}-{uuid.uuid4().hex[:8]}"
    request = ReplayRequest(request_id, stamp, reason, partition)
    folder = replay_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{request_id}.json"
    tmp = folder / f".{final.name}.tmp"
    tmp.write_text(json.dumps(asdict(request)))
    os.replace(tmp, final)
    return request


def pending_requests(data_dir: Path, now: float | None = None) -> list[ReplayRequest]:
    """Requests younger than ``REQUEST_TTL_SECONDS``, oldest first."""
    now = time.time() if now is None else now
    out = []
    for path in sorted(replay_dir(data_dir).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            request = ReplayRequest(
                str(doc["request_id"]),
                float(doc["requested_at"]),
                doc.get("reason"),
                doc.get("partition"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if now - request.requested_at <= REQUEST_TTL_SECONDS:
            out.append(request)
    return out


def write_result(data_dir: Path, request: ReplayRequest, partition: int, res: CommitResult) -> None:
    folder = replay_dir(data_dir) / request.request_id
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"p-{partition:04d}.json"
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"partition": partition, **asdict(res)}))
    os.replace(tmp, final)


def read_results(data_dir: Path, request_id: str) -> dict[int, dict[str, Any]]:
    out = {}
    for path in (replay_dir(data_dir) / request_id).glob("p-*.json"):
        try:
            doc = json.loads(path.read_text())
            out[int(doc["partition"])] = doc
        except (OSError, ValueError, KeyError):
            continue
    return out


__all__ = ["pending_requests", "post_request", "read_results", "replay_dir", "write_result"]
