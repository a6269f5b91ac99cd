"""``make bench`` works end to end on a tiny run (structure only: no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import run
from tests.support.waiting import free_port


def test_bench_runs_and_writes_its_results(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("PF_BENCH_POSTGRES_PORT", str(free_port()))  # (scaling's cluster mode)
    out = tmp_path / "bench-results.json"
    argv = [
        "--events",
        "3000",
        "--tenants",
        "20",
        "--preload-ids",
        "5000",
        "--skip-bill",
        "--peers",
        "java",
    ]
    results = run.main([*argv, "--output", str(out)])
    assert json.loads(out.read_text()) == results
    rates = (
        "raw_consume_events_per_s",
        "naive_events_per_s",
        "worker_events_per_s",
        "worker_process_events_per_s",
    )
    for key in rates:
        assert results[key]["median"] > 0 and len(results[key]["samples"]) == 1
    assert results["events"] == 3000 and results["preload_ids"] == 5000
    assert results["worker_peak_rss_bytes"] > 0
    assert results["c_over_a"] > 0 and results["c_over_b"] > 0
    # timed from the Kafka client's creation, the worker is faster than from process start
    worker, process = results["worker_seconds"][0], results["worker_process_seconds"][0]
    assert 0 < worker < process
    assert results["emitter_events_per_s"] > 0 and results["emitter_dict_events_per_s"] > 0
    assert results["machine"]["cpus"] >= 1
    # the Java consumer runs where deploy/local-kafka cached its jars, else says why not
    java = results["peers"]["java"]
    assert java["status"] == "ok" or java["status"].startswith("not available")
    if java["status"] == "ok":
        assert (
            java["process_events_per_s"] > 0 and "worker_over_java_own_timing" in results["targets"]
        )
    assert set(results["targets"]) >= {"c_over_a", "c_over_a_whole_process"}
    # embedded against cluster mode, 1 and 3 workers: every group reconciled (else it raises)
    scaling = results["scaling"]
    for name in ("embedded_x1", "embedded_x3", "cluster_x1", "cluster_x3"):
        row = scaling[name]
        assert row["events_per_s"] > 0 and row["cpu_seconds_per_million"] > 0, name
        assert 0 < row["commit_p50_ms"] <= row["commit_p99_ms"], name
    assert set(scaling["targets"]) == {
        "cluster_c_over_a",
        "cluster_cpu_per_event_over_embedded",
    }
