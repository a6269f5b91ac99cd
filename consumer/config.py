"""What a worker needs to know, given to it whole (the CLI builds it from the settings)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class WorkerConfig:
    """The topic and group, where the files go, and the worker's limits."""

    topic: str
    group: str
    kafka: Mapping[str, Any] = field(repr=False)  # librdkafka settings (may hold secrets)
    data_dir: Path  # query.duckdb is written here
    ledger_dir: Path
    snapshot_dir: Path
    batch_size: int  # records of one partition handed over at once, at most
    late_usage_months: int  # a period stays billable this long after it ends (0: forever)
    snapshot_seconds: float  # a committed ledger is published at least this often
    lock_timeout: float  # seconds to wait for another worker to let go of a ledger file
    shutdown_seconds: float = 10.0  # a stop request ends the worker within this long
    drain_timeout: float = 120.0  # seconds a --drain waits for a broker out of reach
    # how often pending replay requests are looked for (a folder listing embedded; a lake
    # query in cluster mode, so less often there: docs/performance.md)
    replay_check_seconds: float = 1.0
    # records fetched straight from librdkafka where it can (consumer/native_fetch.py)
    native_fetch: bool = True
