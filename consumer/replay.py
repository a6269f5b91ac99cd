"""Dead-letter replay: requests from ``pf-metering dead-letters replay``, applied by the
workers that hold the partitions.

Why the worker replays (not a re-publish to Kafka): a partition's ledger belongs to the
one worker holding it, and only that worker can apply a replay in the same transaction as
the dead letters' new states, so each dead letter's outcome is decided once. A request is
a document ``<id>.json`` (``common.documents``: a file in ``<METERING_DATA_DIR>/replay``, or
the lake's in cluster mode, so a request made on any host reaches every worker); each
worker, between batches, replays it
on the partitions it holds (``PartitionLedger.replayable`` / ``replay``: the same decode,
validation, partition check and dedup as live events; the request id is stored in the
ledger with the outcome, so applying it twice changes nothing) and writes the outcome to
``<id>/p-0003.json`` for the command to report. A partition that changes owner
later still gets the request: the new owner sees it is not recorded in the ledger.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aggregator.ledger import CommitResult, ReplayRequest
from common.documents import Documents, FolderDocuments

# How long a request stays pending for partitions not yet replayed (a partition that has
# no dead letters of it by then has nothing to replay).
REQUEST_TTL_SECONDS = 7 * 86_400


def replay_dir(data_dir: Path) -> Path:
    return data_dir / "replay"


def folder_board(data_dir: Path) -> Documents:
    """Embedded mode's requests and outcomes: files under ``replay_dir``."""
    return FolderDocuments(replay_dir(data_dir))


def post_request(board: Documents, reason: str | None, partition: int | None) -> ReplayRequest:
    """Store a new request."""
    stamp = time.time()
    request_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(stamp))}-{uuid.uuid4().hex[:8]}"
    request = ReplayRequest(request_id, stamp, reason, partition)
    board.create(f"{request_id}.json", json.dumps(asdict(request)))
    return request


def pending_requests(board: Documents, now: float | None = None) -> list[ReplayRequest]:
    """Requests younger than ``REQUEST_TTL_SECONDS``, oldest first."""
    now = time.time() if now is None else now
    out = []
    for name in board.names("*.json"):
        try:
            doc = json.loads(board.read(name) or "")
            request = ReplayRequest(
                str(doc["request_id"]),
                float(doc["requested_at"]),
                doc.get("reason"),
                doc.get("partition"),
            )
        except (ValueError, KeyError, TypeError):
            continue
        if now - request.requested_at <= REQUEST_TTL_SECONDS:
            out.append(request)
    return out


def write_result(
    board: Documents, request: ReplayRequest, partition: int, res: CommitResult
) -> None:
    name = f"{request.request_id}/p-{partition:04d}.json"
    board.put(name, json.dumps({"partition": partition, **asdict(res)}))


def read_results(board: Documents, request_id: str) -> dict[int, dict[str, Any]]:
    out = {}
    for name in board.names(f"{request_id}/p-*.json"):
        try:
            doc = json.loads(board.read(name) or "")
            out[int(doc["partition"])] = doc
        except (ValueError, KeyError, TypeError):
            continue
    return out


__all__ = [
    "folder_board",
    "pending_requests",
    "post_request",
    "read_results",
    "replay_dir",
    "write_result",
]
