"""``LOG_FORMAT=json``: what a worker and the nightly job write on stderr is one JSON object per
line with ts, level, logger and message (so log shippers need no parsing rules), and configured
secrets never appear in it."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from tests.support.cli_runner import run_cli
from tests.support.events import make_event
from tests.support.worker_harness import produce, produce_raw

SECRET = "sk_test_do-not-log-me-4242"
LEVELS = {"debug", "info", "warning", "error", "critical"}


def json_log_records(stderr: str) -> list[dict[str, Any]]:
    """Every non-empty stderr line, parsed; fails on the first line that is not a JSON log."""
    records = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"not a JSON log line: {line!r}") from exc
        assert isinstance(record, dict), line
        assert {"ts", "level", "logger", "message"} <= record.keys(), line
        assert record["ts"].endswith("Z") and datetime.fromisoformat(record["ts"]), line
        assert record["level"] in LEVELS, line
        assert isinstance(record["logger"], str) and isinstance(record["message"], str), line
        records.append(record)
    return records


def test_worker_and_bill_log_json_lines(env: dict[str, str]) -> None:
    produce(
        env["KAFKA_BOOTSTRAP_SERVERS"],
        env["METERING_TOPIC"],
        [make_event(f"tenant-{i}") for i in range(12)],
    )
    produce_raw(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], [(b"t", b"not avro")])
    logging_env = {
        **env,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "DEBUG",
        "STRIPE_SECRET_KEY": SECRET,
    }
    worker = run_cli("consume", "--drain", "--quiet", env=logging_env, check=True)
    records = json_log_records(worker.stderr)
    assert any(r["message"].startswith("assigned") for r in records), records
    assert SECRET not in worker.stderr + worker.stdout
    bill = run_cli("bill", "--quiet", env=logging_env, check=True)
    json_log_records(bill.stderr)
    assert SECRET not in bill.stderr + bill.stdout
