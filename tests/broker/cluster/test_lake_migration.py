"""``pf-metering lake migrate``: an embedded installation moved into cluster mode loses and
doubles nothing. Embedded workers count a first stream (re-sends included); its usage is
migrated; cluster workers then count a second stream that re-sends events of the first, and
the lake's totals equal an independent fold of every distinct event. Running the migration
again changes nothing; after the cluster has counted, a migration of the old files is
refused and the lake is left as it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb

from tests.support import worker_harness as harness
from tests.support.cli_runner import assert_user_error, run_cli
from tests.support.lake_reads import lake_totals

EMBEDDED = {"METERING_CATALOG": "", "METERING_LAKE_PATH": ""}


def migrate(env: dict[str, str], source: str) -> list[dict[str, Any]]:
    proc = run_cli("lake", "migrate", "--from", source, "-f", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


def test_migration_resumes_exactly_where_embedded_workers_stopped(
    env: dict[str, str], cluster_env: dict[str, str], tmp_path: Path
) -> None:
    bootstrap, topic = env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"]
    embedded = {**env, **EMBEDDED}
    first = harness.random_events(1200, seed=11)
    harness.produce(bootstrap, topic, harness.with_duplicates(first, 0.1))
    harness.drain(embedded)
    assert harness.ledger_totals(embedded) == harness.expected_totals(first)

    cluster = {**env, **cluster_env, "METERING_DATA_DIR": str(tmp_path / "cluster-host")}
    source = embedded["METERING_DATA_DIR"]
    # a worker still holding the last partition's file: refused there, after the others
    held = duckdb.connect(str(max(Path(source).glob("ledger/*/p-*.duckdb"))))
    try:
        busy = run_cli("lake", "migrate", "--from", source, env=cluster)
        assert_user_error(busy, "stop the embedded workers first")
    finally:
        held.close()
    rows = migrate(cluster, source)  # the rest, the earlier ones found migrated
    assert rows[-1]["outcome"] == "migrated" and len(rows) == 6
    assert {r["outcome"] for r in rows[:-1]} <= {"already migrated", "empty"}
    assert sum(r["next_offset"] or 0 for r in rows) == len(harness.with_duplicates(first, 0.1))
    assert lake_totals(cluster) == harness.expected_totals(first)
    again = migrate(cluster, source)
    assert {r["outcome"] for r in again} <= {"already migrated", "empty"}
    assert lake_totals(cluster) == harness.expected_totals(first)

    second = harness.random_events(1200, seed=12)
    resent = first[::7]  # counted by the embedded workers: duplicates now
    harness.produce(bootstrap, topic, [*second, *resent])
    done = harness.drain(cluster)
    assert f"{len(resent)} duplicates" in done.stderr, done.stderr
    assert f"{len(second)} counted" in done.stderr, done.stderr
    expected = harness.expected_totals([*first, *second])
    assert lake_totals(cluster) == expected

    refused = run_cli("lake", "migrate", "--from", source, env=cluster)
    assert_user_error(refused, "already holds usage in the lake")
    assert lake_totals(cluster) == expected


def test_migrate_refuses_bad_sources(cluster_env: dict[str, str], tmp_path: Path) -> None:
    missing = run_cli("lake", "migrate", "--from", str(tmp_path / "nope"))
    assert_user_error(missing, "no such directory")
    (tmp_path / "empty").mkdir()
    empty = run_cli("lake", "migrate", "--from", str(tmp_path / "empty"))
    assert_user_error(empty, "no embedded ledgers of topic")
    embedded = run_cli("lake", "migrate", "--from", str(tmp_path), env=EMBEDDED)
    assert_user_error(embedded, "needs cluster mode")
