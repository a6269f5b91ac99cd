"""Hostile data and queries never break a command or exhaust the machine: data shows as text
(never rich markup), ``sql`` decides on DuckDB's parse and runs within its time, memory and
spill bounds, ``-o`` replaces a file whole and never writes through a symbolic link unasked,
and extreme numbers in a tiers file are refused
when it is loaded, naming the file and the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import Cli
from tests.fixtures.seeds import CUSTOM, SEED, event
from tests.support.cli_runner import BIN, FILE_SIZE_LIMITED
from tests.support.events import MARKUP

# --- 1. data renders as text, never as markup -------------------------------------------------


def test_sql_cells_and_column_names_with_markup_show_as_they_are(pfm: Cli) -> None:
    for text in MARKUP:
        quoted = text.replace("'", "''")
        run = pfm("sql", f"SELECT '{quoted}' AS x, 1 AS \"{text}\"")
        assert run.code == 0, run.err
        assert run.out.count(text) == 2, run.out


def test_tier_display_names_show_as_text_escaped(
    pfm: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = {
        "[/]x": "[/]x",
        "\x1b[31mred\x1b[0m": "\\x1b[31mred\\x1b[0m",
        "pay\u202eusd": "pay\\u202eusd",
        "a[foo]b[/foo]": "a[foo]b[/foo]",
    }
    for name, shown in names.items():
        path = tmp_path / "tiers.toml"
        path.write_text(CUSTOM.replace('"Startup"', '"' + name.replace("\x1b", "\\u001b") + '"'))
        monkeypatch.setenv("METERING_TIERS_FILE", str(path))
        run = pfm("tiers")
        assert run.code == 0, run.err
        assert shown in run.out and "\x1b" not in run.out and "\u202e" not in run.out
        assert pfm("tiers", "-f", "json").json()[-1]["display_name"] == name  # exact in JSON


# --- 2. sql: DuckDB's parse decides; time, memory, spill and rows are bounded ------------------

LEGITIMATE = [
    "SELECT count(*) AS n FROM usage WHERE tenant_id = 'reset-corp'",
    "SELECT count(*) AS n FROM usage WHERE tenant_id = 'use-me'",
    "SELECT 'a;b' AS x",
    "SELECT 1 AS x /* ATTACH */",
    "SELECT 'drop table usage; delete' AS x",
    "SELECT 1 AS x -- ; DROP TABLE usage",
    'SELECT tenant_id AS "set", events AS "call" FROM usage',
    "WITH copy AS (SELECT 1 AS load) SELECT load FROM copy",
    "FROM usage SELECT tenant_id",
    "DESCRIBE usage",
    "SUMMARIZE usage",
    "VALUES ('install')",
    "  select 1 as x ;  ",
]
REFUSED_BY_TYPE = {
    "PRAGMA enable_profiling": "PRAGMA statement is refused",
    "EXPLAIN ANALYZE SELECT 1": "EXPLAIN statement is refused",
    "USE memory": "SET statement is refused",
    "CALL pragma_version()": "CALL statement is refused",
    "PIVOT usage ON period": "sql takes exactly one statement",
    "SELEC 1": 'syntax error at or near "SELEC"',
}


def test_sql_takes_what_duckdb_parses_as_one_query(pfm: Cli) -> None:
    pfm.publish(event("reset-corp", "2025-01", **SEED))
    for query in LEGITIMATE:
        assert pfm("sql", query).code == 0, query
    assert pfm("sql", LEGITIMATE[0], "-f", "json").json() == [{"n": 1}]
    for query, fragment in REFUSED_BY_TYPE.items():
        pfm("sql", query).error(fragment)


SLOW = {"METERING_SQL_TIMEOUT": "2"}
SMALL = {"METERING_SQL_MEMORY_LIMIT": "100MB", "METERING_SQL_SPILL_LIMIT": "50MB"}
BOUNDS = [  # the harmless one first: code without bounds fails there, not on the others
    ("SELECT * FROM range(1000)", {"METERING_SQL_MAX_ROWS": "100"}, "METERING_SQL_MAX_ROWS (100)"),
    # endless, then huge: the time limit stops them
    ("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t",
     SLOW, "METERING_SQL_TIMEOUT (2 s)"),
    ("SELECT count(*) FROM range(1000000) a, range(1000000) b", SLOW, "METERING_SQL_TIMEOUT"),
    # a string doubling each round: the memory limit stops it
    ("WITH RECURSIVE t(s) AS (SELECT 'x' UNION ALL SELECT s || s FROM t) "
     "SELECT max(length(s)) FROM t", SMALL, "METERING_SQL_MEMORY_LIMIT (100MB)"),
    # distinct values spilled: the spill limit stops it
    ("SELECT count(DISTINCT (range::VARCHAR || repeat('x', 40))) FROM range(20000000)", SMALL,
     "METERING_SQL_SPILL_LIMIT (50MB)"),
]  # fmt: skip


def test_sql_stops_at_its_bounds_in_one_line(
    pfm: Cli, data_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # DuckDB's default spill folder would be ./.tmp
    for query, limits, fragment in BOUNDS:
        with monkeypatch.context() as scoped:
            for name, value in limits.items():
                scoped.setenv(name, value)
            pfm("sql", query).error(fragment)
    assert not (tmp_path / ".tmp").exists()
    data = Path(data_env["METERING_DATA_DIR"])
    assert list(data.glob(".sql-spill-*")) == []  # each query's spill folder is gone
    monkeypatch.setenv("METERING_SQL_MAX_ROWS", "100")
    assert pfm("sql", "SELECT * FROM range(100)").code == 0  # within bounds


def test_sql_spill_folder_is_private_and_unreadable_by_queries(pfm: Cli) -> None:
    where = pfm("sql", "SELECT current_setting('temp_directory') AS t", "-f", "json").json()
    folder = Path(where[0]["t"])
    assert folder.name.startswith(".sql-spill-") and not folder.exists()  # removed after
    for query in (
        f"SELECT * FROM glob('{folder.parent}/.sql-spill-*/**')",
        f"SELECT * FROM read_text('{folder}/x')",
        "SELECT * FROM glob('.tmp/**')",
    ):
        pfm("sql", query).error("Permission Error")
    pfm("sql", "SET temp_directory = '/tmp'").error("SET statement is refused")


@pytest.mark.parametrize(
    ("name", "value"),
    [("METERING_SQL_TIMEOUT", "0"), ("METERING_SQL_TIMEOUT", "forever"),
     ("METERING_SQL_MEMORY_LIMIT", "lots"), ("METERING_SQL_MEMORY_LIMIT", "1GB; SET x=1"),
     ("METERING_SQL_SPILL_LIMIT", "-1GB"), ("METERING_SQL_MAX_ROWS", "0")],
)  # fmt: skip
def test_sql_bounds_are_validated_settings(
    pfm: Cli, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    pfm("sql", "SELECT 1").error(f"invalid {name}")


# --- 5. -o files: replaced whole, never through a symbolic link unasked --------------------


def test_output_refuses_a_symbolic_link_unless_asked(pfm: Cli, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    for args in (["tiers"], ["export-metrics"], ["sql", "SELECT 1 AS x", "-f", "csv"]):
        pfm(*args, "-o", str(link)).error("is a symbolic link")
        assert victim.read_text() == "precious" and link.is_symlink()
    assert pfm("--follow-symlinks", "tiers", "-o", str(link)).code == 0
    assert link.is_symlink() and '"basic"' in victim.read_text()  # written to the target


def test_output_replaces_a_file_whole_keeping_its_mode(pfm: Cli, tmp_path: Path) -> None:
    out = tmp_path / "tiers.json"
    out.write_text("old")
    out.chmod(0o640)
    other_name = tmp_path / "hard-link.json"
    os.link(out, other_name)  # a file rewritten in place would change under both names
    assert pfm("tiers", "-o", str(out)).code == 0
    assert '"basic"' in out.read_text() and other_name.read_text() == "old"
    assert out.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard-link.json", "tiers.json"]


def test_output_on_a_full_disk_leaves_the_old_file_whole(
    data_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "tiers.json"
    out.write_text('{"valid": true}')
    proc = subprocess.run(  # files may grow to 512 bytes: the new text does not fit
        [sys.executable, "-c", FILE_SIZE_LIMITED, "512", str(BIN), "tiers", "-o", str(out)],
        env={**os.environ, **data_env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and proc.stderr.splitlines()[-1].startswith("error: cannot write")
    assert out.read_text() == '{"valid": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["tiers.json"]  # no temporary file left


# --- 6. extreme numbers in the tiers file -----------------------------------------------------

EXTREMES = {
    "base_price_usd = 20.00": ['"1e999999999"', "1e400", "1" * 100_000 + ".5", '"1000000000001"',
                               '"1E+13"'],
    "violation_price = 1": ['"1e-999999999"', "0." + "0" * 12 + "1", '"-0.01"'],
}  # fmt: skip


def test_extreme_prices_are_refused_when_the_file_is_loaded(
    pfm: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tiers.toml"
    monkeypatch.setenv("METERING_TIERS_FILE", str(path))
    pfm.publish(event("acme", "2025-01", **SEED))
    for line, values in EXTREMES.items():
        key = line.split(" = ")[0]
        for value in values:
            path.write_text(CUSTOM.replace(line, f"{key} = {value}"))
            for args in (["tiers"], ["bill", "--as-of", "2025-02-01T02:00:00Z"]):
                pfm(*args).error(f"invalid tiers file {path}: tiers.startup.{key}")
    for text, fragment in (
        (CUSTOM + "[tiers.startup.x]\n" + "a = " + "[" * 100_000 + "]" * 100_000, "too deeply"),
        (CUSTOM.replace("cpu_ms = 1_000_000", "cpu_ms = " + "9" * 30), "quotas.cpu_ms"),
        (CUSTOM.replace("cpu_ms = 1_000_000", "cpu_ms = " + "9" * 5000), "digits"),
    ):
        path.write_text(text)
        pfm("tiers").error(fragment)
    path.write_text(CUSTOM.replace("base_price_usd = 20.00", "base_price_usd = 1000000000000"))
    assert pfm("tiers", "-f", "json").json()[-1]["base_price_usd"] == "1000000000000.00"
