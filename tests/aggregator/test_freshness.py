"""Freshness (issue 17, point 8): readers say the newest committed data and how far behind
the log end the snapshot is, not the oldest partition's last publish."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from aggregator.ledger import LedgerSet
from aggregator.snapshot import freshness, topic_dir
from schemas.codec import default_codec
from schemas.prepare import Record, prepare_batch
from tests.support.events import make_event

TOPIC = "pf.usage.events"


def commit_and_publish(tmp_path: Path, partition: int, events: int, log_end: int | None) -> None:
    codec = default_codec()
    ledgers = LedgerSet(tmp_path / "ledger", TOPIC, lock_timeout=10)
    try:
        ledger = ledgers.acquire(partition)
        records = [Record(i, b"acme", codec.encode(make_event("acme"))) for i in range(events)]
        ledger.commit(prepare_batch(partition, records, codec, int(time.time() * 1e6), None))
        ledger.log_end = log_end
    finally:
        ledgers.close(tmp_path / "snapshot")


def manifest_path(tmp_path: Path, partition: int) -> Path:
    return topic_dir(tmp_path / "snapshot", TOPIC) / f"p-{partition:04d}.manifest.json"


def manifest_of(tmp_path: Path, partition: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(manifest_path(tmp_path, partition).read_text())
    return data


def age_manifest(tmp_path: Path, partition: int, seconds: float) -> None:
    path = manifest_path(tmp_path, partition)
    manifest = manifest_of(tmp_path, partition)
    manifest["published_at"] -= seconds
    manifest["committed_at"] -= seconds
    path.write_text(json.dumps(manifest))


def test_freshness_is_the_newest_commit_and_the_distance_to_the_log_end(tmp_path: Path) -> None:
    commit_and_publish(tmp_path, 0, 10, log_end=10)  # caught up
    commit_and_publish(tmp_path, 1, 10, log_end=10)
    age_manifest(tmp_path, 1, 185)  # an idle, caught-up partition: published long ago
    seen = freshness(tmp_path / "snapshot", TOPIC)
    newest = manifest_of(tmp_path, 0)["committed_at"]
    assert seen.newest_committed_at == newest
    text = seen.describe(now=newest + 3)
    assert "(3 s old, newest commit" in text, text
    assert "caught up with the log end" in text and "2 partition(s)" in text

    commit_and_publish(tmp_path, 2, 10, log_end=110_010)
    text = freshness(tmp_path / "snapshot", TOPIC).describe()
    assert "110,000 record(s) behind the log end" in text, text


def test_an_unknown_log_end_is_said(tmp_path: Path) -> None:
    commit_and_publish(tmp_path, 0, 3, log_end=None)
    assert "log end not known" in freshness(tmp_path / "snapshot", TOPIC).describe()
    assert freshness(tmp_path / "nothing", TOPIC).describe().startswith("no usage data")
