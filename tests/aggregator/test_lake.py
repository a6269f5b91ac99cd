"""The DuckLake shell against a real PostgreSQL catalog: extensions from the wheels, two
connections (two hosts) sharing one lake, secrets kept out of what DuckDB shows, and one-line
errors naming the setting when the catalog cannot be reached or the lake path is wrong."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from aggregator.lake import RETRY, catalog_unreachable, open_lake
from aggregator.lake_maintenance import maintain
from common.errors import CatalogError
from common.settings import load_settings
from tests.support.postgres import create_database, local_postgres, running_postgres
from tests.support.waiting import free_port


def test_two_connections_share_one_lake(cluster_env: dict[str, str], tmp_path: Path) -> None:
    settings = load_settings()
    writer = open_lake(settings)
    reader = open_lake(load_settings(METERING_DATA_DIR=tmp_path / "other-host"))
    writer.execute("CREATE TABLE lake.usage (tenant VARCHAR, events BIGINT)")
    writer.execute("INSERT INTO lake.usage SELECT 't' || (i % 7), 1 FROM range(5000) t(i)")
    assert reader.execute("SELECT sum(events) FROM lake.usage").fetchone() == (5000,)
    parquet = list((tmp_path / "lake").rglob("*.parquet"))
    assert parquet, "the rows went to data files under METERING_LAKE_PATH"
    loaded = dict(
        writer.execute(
            "SELECT extension_name, installed_from FROM duckdb_extensions() WHERE loaded"
        ).fetchall()
    )
    for name in ("ducklake", "postgres_scanner"):
        assert "duckdb_extension_" in loaded[name], loaded  # the wheel's file, not a download
    for name, value in RETRY.items():
        got = writer.execute(f"SELECT current_setting('{name}')").fetchone()
        assert got is not None and float(got[0]) == value


def test_the_catalog_password_stays_out_of_what_duckdb_shows(
    cluster_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the local server trusts loopback, so any password is accepted: it only must not show
    uri = cluster_env["METERING_CATALOG"].replace("pfmeter@", "pfmeter:pw-Hunter2@", 1)
    monkeypatch.setenv("METERING_CATALOG", uri)
    con = open_lake(load_settings())
    shown = con.execute("SELECT * FROM duckdb_databases()").fetchall()
    shown += con.execute("SELECT * FROM duckdb_secrets()").fetchall()
    assert "pw-Hunter2" not in repr(shown)
    assert con.execute("SELECT count(*) FROM ducklake_snapshots('lake')").fetchone() == (1,)


def test_an_unreachable_catalog_is_one_line_without_the_password(
    data_env: dict[str, str], tmp_path: Path
) -> None:
    settings = load_settings(
        metering_catalog=f"postgresql://pfmeter:pw-Hunter2@127.0.0.1:{free_port()}/metering",
        metering_lake_path=str(tmp_path / "lake"),
    )
    with pytest.raises(CatalogError) as err:
        open_lake(settings)
    message = str(err.value)
    assert message.startswith("cannot reach METERING_CATALOG (postgresql://pfmeter@127.0.0.1:")
    assert "refused" in message.lower() and "\n" not in message
    assert "pw-Hunter2" not in message and "pw-Hunter2" not in str(err.value.__cause__)


def test_a_missing_catalog_database_names_the_setting(
    data_env: dict[str, str], postgres: str, tmp_path: Path
) -> None:
    settings = load_settings(
        metering_catalog=postgres.rsplit("/", 1)[0] + "/no_such_db",
        metering_lake_path=str(tmp_path / "lake"),
    )
    with pytest.raises(CatalogError, match=r"^cannot reach METERING_CATALOG .*no_such_db"):
        open_lake(settings)


def test_another_lake_path_for_the_same_catalog_is_refused(
    cluster_env: dict[str, str], tmp_path: Path
) -> None:
    open_lake(load_settings()).execute("CREATE TABLE lake.t AS SELECT 1 AS x")
    with pytest.raises(CatalogError, match=r"^METERING_LAKE_PATH .* is not where this lake"):
        open_lake(load_settings(metering_lake_path=str(tmp_path / "elsewhere")))


def test_an_s3_lake_on_s3_compatible_storage(s3_lake_env: dict[str, str], tmp_path: Path) -> None:
    lake = s3_lake_env["METERING_LAKE_PATH"]
    writer = open_lake(load_settings())
    writer.execute("CREATE TABLE lake.usage (tenant VARCHAR, events BIGINT)")
    for _ in range(4):
        writer.execute("INSERT INTO lake.usage SELECT 't' || (i % 7), 1 FROM range(100) t(i)")
    reader = open_lake(load_settings(METERING_DATA_DIR=tmp_path / "other-host"))
    assert reader.execute("SELECT sum(events) FROM lake.usage").fetchone() == (400,)
    files = writer.execute(f"SELECT count(*) FROM glob('{lake}/**/*.parquet')").fetchone()
    assert files == (4,)  # the data files are objects in the bucket, under the prefix
    assert "s3-Secret-Value" not in repr(
        writer.execute("SELECT * FROM duckdb_secrets()").fetchall()
    )
    done = maintain(
        writer,
        load_settings(METERING_LAKE_RETENTION="0s", METERING_LAKE_FILE_GRACE="0s"),
        now=datetime.now(UTC),
    )
    assert done.files_after == 1 and done.files_deleted >= 4
    assert writer.execute(f"SELECT count(*) FROM glob('{lake}/**/*.parquet')").fetchone() == (1,)
    assert reader.execute("SELECT sum(events) FROM lake.usage").fetchone() == (400,)


def test_an_open_lake_outlives_a_postgres_restart(data_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    with running_postgres(port) as server:
        settings = load_settings(
            metering_catalog=create_database(server), metering_lake_path=str(tmp_path / "lake")
        )
        con = open_lake(settings)
        con.execute("CREATE TABLE lake.t AS SELECT 1 AS x")
        assert local_postgres("stop", port).returncode == 0
        with pytest.raises(duckdb.Error) as down:
            con.execute("INSERT INTO lake.t VALUES (2)")
        assert catalog_unreachable(down.value)
        assert local_postgres("start", port).returncode == 0
        con.execute("INSERT INTO lake.t VALUES (3)")  # the same connection, reconnected
        assert con.execute("SELECT sum(x) FROM lake.t").fetchone() == (4,)
