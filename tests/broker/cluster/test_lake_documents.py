"""Cluster mode's shared documents: a schema version published and a replay requested on
one host reach a worker on another (each host its own ``METERING_DATA_DIR``, sharing only
Kafka, the catalog and the lake path); two hosts racing to create one document get it once."""

from __future__ import annotations

import json
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from aggregator.lake import open_lake
from aggregator.lake_documents import LakeDocuments
from common.settings import load_settings
from schemas.codec import Codec, discover, schema_of_raw
from tests.support import worker_harness as harness
from tests.support.cli_runner import run_cli
from tests.support.events import v4_schema
from tests.support.lake_reads import lake_totals
from tests.support.waiting import wait_for


def test_two_hosts_creating_one_document_get_it_once(cluster_env: dict[str, str]) -> None:
    boards = [LakeDocuments(open_lake(load_settings()), "schemas") for _ in range(2)]
    won: list[bool] = []
    start = threading.Barrier(2)

    def race(board: LakeDocuments, i: int) -> None:
        start.wait()
        won.append(board.create("v0009.json", f"from {i}"))

    threads = [threading.Thread(target=race, args=(b, i)) for i, b in enumerate(boards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False, True]
    winner = boards[0].read("v0009.json")
    assert winner in ("from 0", "from 1") and boards[1].read("v0009.json") == winner
    boards[1].put("r/p-0001.json", "one")
    boards[0].put("r/p-0001.json", "two")
    assert boards[1].names("r/p-*.json") == ["r/p-0001.json"]
    assert boards[1].names("*.json") == ["v0009.json"]
    assert boards[1].read("r/p-0001.json") == "two"


def test_a_version_and_a_replay_from_another_host_reach_the_worker(
    env: dict[str, str], cluster_env: dict[str, str], tmp_path: Path
) -> None:
    bootstrap, topic = env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"]
    cluster = {**env, **cluster_env}
    worker_host = {**cluster, **harness.SMALL_BATCHES, "METERING_DATA_DIR": str(tmp_path / "a")}
    other_host = {**cluster, "METERING_DATA_DIR": str(tmp_path / "b")}
    schema = v4_schema()
    (tmp_path / "v4.avsc").write_text(json.dumps(schema))
    writer = Codec([*discover(), schema_of_raw(schema, 4, tmp_path / "v4.avsc")])
    known = harness.random_events(300, tenants=6, seed=51)
    new = harness.random_events(120, tenants=6, seed=52)

    def as_v4(e: dict[str, Any]) -> tuple[bytes | None, bytes | None]:
        return e["tenant_id"].encode(), writer.encode({**e, "region": None, "zone": "z"}, 4)

    def open_reasons() -> Counter[str]:
        proc = run_cli("dead-letters", "-f", "json", env=other_host, check=True)
        return Counter(d["reason_code"] for d in json.loads(proc.stdout) if d["state"] == "open")

    harness.produce(bootstrap, topic, known)
    harness.produce_raw(bootstrap, topic, [as_v4(e) for e in new])
    proc = harness.start_worker(worker_host)
    try:
        wait_for(lambda: open_reasons() == {"unknown_fingerprint": len(new)}, "v4 dead-lettered")
        assert lake_totals(other_host) == harness.expected_totals(known)
        run_cli("schemas", "add", str(tmp_path / "v4.avsc"), env=other_host, check=True)
        replay = run_cli("dead-letters", "replay", env=other_host)
        assert replay.returncode == 0, replay.stderr
        assert f"{len(new)} counted, 0 duplicates" in replay.stdout, replay.stdout
        assert lake_totals(other_host) == harness.expected_totals(known + new)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    listed = run_cli(
        "schemas", "list", "-f", "json", env={**cluster, "METERING_DATA_DIR": str(tmp_path / "c")}
    )
    assert [v["version"] for v in json.loads(listed.stdout)] == [1, 2, 3, 4]
    assert not (tmp_path / "b" / "schemas").exists() and not (tmp_path / "b" / "replay").exists()
