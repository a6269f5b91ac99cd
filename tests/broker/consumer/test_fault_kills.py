"""SIGKILL at random points of a long run with duplicates and corrections interleaved:
afterwards events, sessions and the eight counters of every tenant and period reconcile
exactly with an independent count of what was produced (docs/spec.md, "Guarantees": nothing
lost, nothing counted twice), and the corrections refused (below zero) are exactly the
reference fold's.

Kill points are drawn against progress, not wall time, so they land inside the run on any
machine: each worker life is killed once it has committed a random number of events, after a
further random pause shorter than a batch (or, for some lives, at a random moment of start-up).
The worker runs with ``LOG_LEVEL=DEBUG``, whose per-batch trace (``batch`` -> ``committing``
-> ``committed`` -> ``batch done``) tells where each kill landed; after a kill inside a ledger
transaction the partition's stored offset is read back to see whether it had committed.

Each life joins a fresh consumer group: the broker keeps a SIGKILLed member until its session
times out (30 s), and a newcomer to the same group waits for that. The ledger, not the group,
holds the offsets, so this changes nothing for exactness; under soak every fifth life reuses
the previous life's group and does wait the session out.

``make test`` runs the short form (60k events, 20 kills); ``PF_SOAK=1`` (``make soak``) runs
200k events and 30 kills.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import worker_harness as harness
from tests.support.cli_runner import run_cli
from tests.support.log_lines import ASSIGNED, BATCH, BATCH_DONE, SPAN
from tests.support.oracle import fold_log

SOAK = os.environ.get("PF_SOAK") == "1"
EVENTS = 200_000 if SOAK else 60_000
KILLS = 30 if SOAK else 20
STARTUP_KILL_SHARE = 0.15
RUN_ENV = {
    "METERING_BATCH_SIZE": "1000",
    "METERING_SNAPSHOT_SECONDS": "0.5",
    "LOG_LEVEL": "DEBUG",
}


@dataclass
class Life:
    """What one worker process did before its SIGKILL, from its DEBUG trace."""

    log: Path
    assigned: bool = False
    committed_events: int = 0
    last: str = "start"  # the last trace step seen
    last_span: tuple[int, int, int] | None = None  # partition, from, to of that step
    _read: int = 0

    def refresh(self) -> None:
        with self.log.open() as f:
            f.seek(self._read)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]
        self._read += len(complete.encode())
        for line in complete.splitlines():
            if ASSIGNED in line:
                self.assigned, self.last = True, "assigned"
            elif BATCH_DONE in line:
                self.last = "done"
            elif BATCH in line:
                self.last = "batch"
            elif m := SPAN.search(line):
                self.last = m.group(1)
                self.last_span = (int(m.group(2)), int(m.group(3)), int(m.group(4)))
                if self.last == "committed":
                    self.committed_events += self.last_span[2] - self.last_span[1]

    @property
    def where(self) -> str:
        """Where the kill landed."""
        return {
            "start": "starting (before partitions were assigned)",
            "assigned": "assigned, before the first batch",
            "done": "between batches (polling)",
            "batch": "mid-batch: decoding",
            "committing": "mid-batch: inside the ledger transaction",
            "committed": "mid-batch: after a partition commit, before the batch ended",
        }[self.last]


@dataclass
class KillReport:
    lives: list[Life] = field(default_factory=list)
    inside_transaction_rolled_back: int = 0
    inside_transaction_committed: int = 0

    @property
    def places(self) -> Counter[str]:
        return Counter(life.where for life in self.lives)

    @property
    def mid_batch(self) -> int:
        return sum(life.last in ("batch", "committing", "committed") for life in self.lives)

    def summary(self) -> str:
        places = "; ".join(f"{n} {where}" for where, n in sorted(self.places.items()))
        return (
            f"{len(self.lives)} SIGKILLs, {self.mid_batch} mid-batch ({places}); inside a "
            f"transaction: {self.inside_transaction_rolled_back} rolled back, "
            f"{self.inside_transaction_committed} had just committed"
        )


def _wait(life: Life, proc: subprocess.Popen[str], until: float, goal: int) -> None:
    """Follow the trace until ``goal`` events are committed, or the worker sits idle."""
    quiet_since, seen = time.monotonic(), life._read
    while time.monotonic() < until:
        life.refresh()
        if life.committed_events >= goal:
            return
        if life._read != seen:
            quiet_since, seen = time.monotonic(), life._read
        elif life.assigned and time.monotonic() - quiet_since > 3:
            return  # nothing left to consume: kill it idle
        assert proc.poll() is None, f"worker exited: {life.log.read_text()[-3000:]}"
        time.sleep(0.003)
    raise AssertionError(f"worker made no progress: {life.log.read_text()[-3000:]}")


def kill_at_random_points(
    env: dict[str, str], produced: int, kills: int, rng: random.Random, logs: Path
) -> KillReport:
    """Run ``kills`` worker lives over the backlog, each SIGKILLed at a random point: most
    once they committed a random share of what is left (so kills spread over the whole run
    however fast the worker is), some at a random moment of start-up."""
    report = KillReport()
    done = 0  # events committed so far, from the traces
    group = env["METERING_GROUP"]
    for i in range(kills):
        if not (SOAK and i % 5 == 4):
            group = f"{env['METERING_GROUP']}-life{i}"
        life = Life(logs / f"life-{i:02d}.log")
        proc = harness.start_worker({**env, **RUN_ENV, "METERING_GROUP": group}, log=life.log)
        try:
            if rng.random() < STARTUP_KILL_SHARE:
                time.sleep(rng.uniform(0.1, 1.5))
            else:
                share = max(produced - done, 0) / (kills - i + 1)
                goal = max(1, int(rng.uniform(0.2, 1.8) * share))
                _wait(life, proc, time.monotonic() + 180, goal)
                time.sleep(rng.uniform(0, 0.05))
            assert proc.poll() is None, f"worker exited by itself: {life.log.read_text()[-3000:]}"
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        life.refresh()
        done += life.committed_events
        report.lives.append(life)
        if life.last == "committing" and life.last_span is not None:
            partition, start, end = life.last_span
            stored = harness.ledger_state(env)[partition][0] or 0  # no row yet: offset 0
            assert stored in (start, end), (stored, life.last_span)  # all or nothing
            if stored == start:
                report.inside_transaction_rolled_back += 1
            else:
                report.inside_transaction_committed += 1
    return report


@pytest.mark.soak
def test_sigkill_at_random_points_of_a_long_run(env: dict[str, str], tmp_path: Path) -> None:
    usage = harness.random_events(EVENTS, tenants=60, seed=101)
    events = harness.with_duplicates(harness.with_corrections(usage, ratio=0.01), ratio=0.1)
    harness.produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events)
    report = kill_at_random_points(env, len(events), KILLS, random.Random(7), tmp_path)
    print(f"\n{len(events)} records ({EVENTS} distinct events): {report.summary()}")
    assert len(report.lives) == KILLS
    assert report.mid_batch >= KILLS // 2, report.summary()
    harness.drain(env)
    assert harness.ledger_totals(env) == harness.expected_totals(events)
    # corrections: each refused copy one negative_total dead letter, as the reference says
    letters = json.loads(run_cli("dead-letters", "-f", "json", env=env, check=True).stdout)
    refused = fold_log(events).refused
    assert refused and len(refused) < sum(e.get("kind") == "correction" for e in events)
    assert sorted(d["reason"].rsplit("(event ", 1)[1] for d in letters) == sorted(
        f"{e['event_id']})" for e in refused
    )
    # the stored ledgers agree with the published snapshot, partition by partition
    stored: dict[tuple[str, str], dict[str, int]] = {}
    for _offset, totals in harness.ledger_state(env).values():
        for key, row in totals.items():
            assert key not in stored  # a tenant lives in one partition
            stored[key] = row
    assert stored == harness.ledger_totals(env)
