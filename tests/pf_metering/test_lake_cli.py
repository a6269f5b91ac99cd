"""``pf-metering lake maintain`` and the nightly ``bill`` in cluster mode, as users run them:
a JSON report, one-line errors naming the setting (never the password), and the nightly job
maintaining the lake after billing."""

from __future__ import annotations

import json

from aggregator.lake import open_lake
from common.settings import load_settings
from tests.support.cli_runner import assert_user_error, run_cli
from tests.support.lake_writer import create, write
from tests.support.waiting import free_port


def test_maintain_reports_what_it_did(cluster_env: dict[str, str]) -> None:
    con = open_lake(load_settings())
    create(con)
    assert write(con, 6) == 0
    con.close()
    proc = run_cli("lake", "maintain", "-f", "json", env={"METERING_LAKE_RETENTION": "0s"})
    assert proc.returncode == 0, proc.stderr
    [report] = json.loads(proc.stdout)
    assert report["skipped"] is False and report["files_merged"] >= 6
    assert report["files_after"] < report["files_before"]
    assert "lake maintenance: " in proc.stderr


def test_maintain_needs_cluster_mode(data_env: dict[str, str]) -> None:
    proc = run_cli("lake", "maintain", env={"METERING_CATALOG": "", "METERING_LAKE_PATH": ""})
    assert_user_error(proc, "needs cluster mode: set METERING_CATALOG")


def test_an_unreachable_catalog_is_one_line(data_env: dict[str, str]) -> None:
    uri = f"postgresql://pfmeter:pw-Hunter2@127.0.0.1:{free_port()}/metering"
    proc = run_cli("lake", "maintain", env={"METERING_CATALOG": uri, "METERING_LAKE_PATH": "/tmp"})
    assert_user_error(proc, "cannot reach METERING_CATALOG (postgresql://pfmeter@127.0.0.1:")
    assert "pw-Hunter2" not in proc.stderr + proc.stdout


def test_the_nightly_job_maintains_the_lake_in_cluster_mode(cluster_env: dict[str, str]) -> None:
    proc = run_cli("bill")
    assert proc.returncode == 0, proc.stderr
    assert "lake maintenance: " in proc.stderr
    embedded = run_cli("bill", env={"METERING_CATALOG": "", "METERING_LAKE_PATH": ""})
    assert embedded.returncode == 0 and "lake maintenance" not in embedded.stderr
