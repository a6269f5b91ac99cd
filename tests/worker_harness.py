"""Running real worker processes against the real broker, and checking the ledger."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from aggregator.fold import Totals, fold_totals
from aggregator.views import open_usage
from emitter import Emitter
from pf_metering.config import load_settings
from schemas.codec import COUNTERS
from tests.cli_runner import BIN


def produce(
    bootstrap: str, topic: str, events: list[dict[str, Any]], version: int | None = None
) -> None:
    with Emitter(bootstrap, topic, schema_version=version, validate_events=False) as emitter:
        for e in events:
            emitter.emit(e)


def produce_raw(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes | None]]) -> None:
    with Emitter(bootstrap, topic) as emitter:
        for key, value in items:
            emitter.produce_raw(key, value)


def random_events(
    n: int, tenants: int = 20, seed: int = 1, period: tuple[int, int] = (2025, 1)
) -> list[dict[str, Any]]:
    """``n`` valid events over ``tenants`` tenants, dated inside ``period``."""
    rng = random.Random(seed)
    start = int(datetime(*period, 1, tzinfo=UTC).timestamp() * 1_000_000)
    out = []
    for _ in range(n):
        tenant = f"tenant_{rng.randrange(tenants)}.x"
        out.append(
            {
                "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
                "tenant_id": tenant,
                "session_id": f"s-{rng.randrange(n // 5 + 1)}",
                "occurred_at": start + rng.randrange(27 * 86_400 * 1_000_000),
                "source": rng.choice(["gateway", "policy-kernel"]),
                **{c: rng.randrange(0, 1000) for c in COUNTERS},
                "risk_score": rng.choice([None, round(rng.random(), 3)]),
            }
        )
    return out


def with_duplicates(
    events: list[dict[str, Any]], ratio: float, seed: int = 2
) -> list[dict[str, Any]]:
    """Interleave re-sends of earlier events (same event produced again)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for e in events:
        out.append(e)
        if out and rng.random() < ratio:
            out.append(dict(rng.choice(out)))
    return out


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN), "consume", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def drain(env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(BIN), "consume", "--drain"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def kill_randomly(env: dict[str, str], kills: int, seed: int = 3, max_wait: float = 4.0) -> int:
    """Start a worker and SIGKILL it at random moments, ``kills`` times; returns kills done."""
    rng = random.Random(seed)
    done = 0
    for _ in range(kills):
        proc = start_worker(env)
        time.sleep(rng.uniform(0.3, max_wait))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            done += 1
        proc.wait()
    return done


def ledger_totals(env: dict[str, str]) -> dict[tuple[str, str], dict[str, int]]:
    settings = load_settings(
        metering_data_dir=env["METERING_DATA_DIR"], metering_topic=env["METERING_TOPIC"]
    )
    reader = open_usage(settings.snapshot_dir, settings.metering_topic)
    cols = ["tenant_id", "period", "events", "sessions", *COUNTERS]
    rows = reader.con.execute(f"SELECT {', '.join(cols)} FROM usage").fetchall()
    reader.close()
    return {(r[0], r[1]): dict(zip(cols[2:], r[2:], strict=True)) for r in rows}


def expected_totals(events: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, int]]:
    def flat(t: Totals) -> dict[str, int]:
        return {
            "events": t.events,
            "sessions": len(t.sessions),
            **{c: t.counters[c] for c in COUNTERS},
        }

    return {k: flat(v) for k, v in fold_totals(events).items()}
