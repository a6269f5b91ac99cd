"""Bad input on the command line (docs/spec.md, "The command line"): malformed periods, unknown
tenants and tiers, broken tiers files, SQL injection through tenant ids, and ``sql`` statements
that write or reach outside the documented views. Each is refused with exactly one ``error:
...`` line, a non-zero exit and no traceback, and the stored data (ledger, snapshot, billing
file) is unchanged, compared file by file and table by table before and after every single
command.

Most commands run in this process through the console script's ``main`` (same parsing, same
error handling, no 2 s interpreter start each). Keys from Kafka shown escaped:
tests/broker/pf_metering/test_cli_escapes.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import typer

from bench.ledger_load import publish_usage
from common import settings as config
from common.settings import load_settings
from pf_metering.cli import build_app
from pf_metering.commands import AREAS
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import CUSTOM, SEED, event
from tests.fixtures.stripe import API_KEY, WEBHOOK_SECRET
from tests.support.books import stored
from tests.support.cli_runner import run_cli
from tests.support.events import make_event

SASL_PASSWORD = "kafka-sasl-pw-0123456789SECRET"
AS_OF = "2025-03-01T02:00:00Z"
REFUSED: list[list[str]] = []  # every refused command line, for the report


@pytest.fixture(scope="module", autouse=True)
def _count_refusals() -> Iterator[None]:
    yield
    print(f"\n{len(REFUSED)} bad command lines refused in one line, data unchanged after each")


@pytest.fixture(scope="module")
def stored_books(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Usage of two tenants, a third added, two periods billed. Shared by the module's tests:
    each of them proves it changed nothing."""
    data = tmp_path_factory.mktemp("books") / "data"
    env = {"METERING_DATA_DIR": str(data), "METERING_GROUP": "g-bad-input"}
    publish_usage(
        load_settings(metering_data_dir=data),
        [event("acme", "2025-01", **SEED), event("beta.eu", "2025-02", api_calls=7)],
    )
    run_cli("tenants", "add", "gamma", "--tier", "professional", env=env, check=True)
    run_cli("bill", "--as-of", AS_OF, "--quiet", env=env, check=True)
    return data


@dataclass
class Books:
    """The stored data and what it must stay."""

    data: Path
    pfm: Cli
    baseline: dict[str, str]

    def refused(self, args: list[str], fragment: str) -> None:
        """``args`` is refused in one line naming ``fragment``, and nothing stored changes."""
        run = self.pfm(*args)
        run.error(fragment)
        for secret in (API_KEY, WEBHOOK_SECRET, SASL_PASSWORD):
            assert secret not in run.out + run.err
        assert stored(self.data) == self.baseline, args
        REFUSED.append(args)


@pytest.fixture
def books(stored_books: Path, pfm: Cli, monkeypatch: pytest.MonkeyPatch) -> Books:
    """The shared books, with secrets in the environment and no broker (nothing here may
    reach one)."""
    for name, value in (
        ("METERING_DATA_DIR", str(stored_books)),
        ("STRIPE_SECRET_KEY", API_KEY),
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ("KAFKA_SASL_PASSWORD", SASL_PASSWORD),
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9"),
    ):
        monkeypatch.setenv(name, value)
    return Books(stored_books, pfm, stored(stored_books))


BAD_PERIODS = [
    "2025-13",
    "2025-1",
    "25-01",
    "2025-00",
    "2025/01",
    "2025-01-01",
    "",
    " ",
    "abcd-ef",
    "1969-12",
    "0000-01",
    "2025-01; DROP TABLE invoices",
    "+2025-01",
    "2025-01\n2025-02",
    "2025-0\uff11",
]
PERIOD_COMMANDS = [
    ["usage", "acme", "{}"],
    ["generate-invoice", "acme", "{}"],
    ["tenants", "set-tier", "acme", "basic", "--from", "{}"],
    ["simulate-usage", "acme", "1", "--period", "{}"],
]


def test_malformed_periods(books: Books) -> None:
    for period in BAD_PERIODS:
        for command in PERIOD_COMMANDS:
            if period == "" and command[0] == "simulate-usage":
                continue  # `--period ''` means "this month" there (commands/produce.py)
            books.refused([a.replace("{}", period) for a in command], "invalid period")


def test_a_period_in_other_digits_is_malformed(books: Books) -> None:
    books.refused(["usage", "acme", "٢٠٢٥-01"], "invalid period")


INJECTIONS = [
    "x' OR '1'='1",
    "acme'; DROP TABLE invoices; --",
    'acme" OR 1=1 --',
    "' UNION SELECT * FROM invoices --",
    "acme%",
    "acme;",
    "../../etc/passwd",
    "a" * 129,
    "",
    "acme\x00",
    "acme\r",
    "\uff41cme",
    "acme\u202e",
    "acme/*",
    "acme)",
]
TENANT_COMMANDS = [
    ["usage", "{}", "2025-01"],
    ["invoices", "{}"],
    ["generate-invoice", "{}", "2025-01"],
    ["tenants", "add", "{}"],
    ["tenants", "set-tier", "{}", "basic"],
    ["simulate-usage", "{}", "1"],
]


def test_sql_injection_through_tenant_ids(books: Books) -> None:
    for tenant in INJECTIONS:
        for command in TENANT_COMMANDS:
            books.refused([a.replace("{}", tenant) for a in command], "invalid tenant id")


def test_unknown_tenants_and_tiers(books: Books) -> None:
    for args in (
        ["usage", "ghost", "2025-01"],
        ["invoices", "ghost"],
        ["generate-invoice", "ghost", "2025-01"],
        ["tenants", "set-tier", "ghost", "basic"],
    ):
        books.refused(args, "unknown tenant 'ghost'")
    for tier in ("gold", "Basic", "basic'; DROP TABLE tenants; --", ""):
        books.refused(["tenants", "add", "delta", "--tier", tier], "unknown tier")
        books.refused(["tenants", "set-tier", "acme", tier], "unknown tier")


def test_other_bad_options(books: Books) -> None:
    for as_of, fragment in (
        ("yesterday", "invalid --as-of"),
        ("2025-13-01", "invalid --as-of"),
        ("0001-01-01", "before 1970"),
        ("2999-01-01", "in the future"),
    ):
        books.refused(["bill", "--as-of", as_of], fragment)
    books.refused(["usage", "acme", "2025-01", "-f", "xml"], "'xml' is not one of")
    books.refused(["invoices", "acme", "-o", "/nonexistent/x.json"], "does not exist")
    books.refused(["consume", "--assignment-strategy", "eager"], "unknown assignment")
    books.refused(["simulate-usage", "acme", "--", "-5"], "SESSIONS must be zero or more")
    books.refused(["generate-invoice", "acme", "2024-12"], "starts in 2025-01")


def _api_calls(kind: str, ranges: str, rest: str = "") -> str:
    """CUSTOM with API calls priced by ``kind`` over ``ranges`` (or ``rest``) instead."""
    table = f'[tiers.startup.prices.api_calls]\nkind = "{kind}"\n'
    table += rest or f"ranges = [{ranges}]"
    return CUSTOM.replace("api_call_price = 0.001\n", "") + f"\n{table}\n"


BROKEN_TIERS = {
    "missing": (None, "cannot read tiers file"),
    "a folder": ("", "cannot read tiers file"),
    "not TOML": ("[tiers.x\n", "invalid tiers file"),
    "negative price": (CUSTOM.replace("violation_price = 1", "violation_price = -1"),
                       "tiers.startup.violation_price"),
    "unknown key": (CUSTOM.replace("[tiers.startup]\n", "[tiers.startup]\nbogus = 1\n"),
                    "tiers.startup.bogus"),
    "price as text": (CUSTOM.replace("api_call_price = 0.001", 'api_call_price = "cheap"'),
                      "tiers.startup.api_call_price"),
    "overlapping ranges": (_api_calls("graduated", "{up_to = 9, price = 1}, {from = 5, price = 1}"),
                           "prices.api_calls.graduated: ranges.1 starts at 5, overlapping"),
    "unsorted ranges": (_api_calls("volume", "{ from = 0, up_to = 9, price = 1 }, { from = 20, "
                                   "price = 1 }, { from = 9, up_to = 20, price = 1 }"),
                        "tiers.startup.prices.api_calls.volume: ranges are not sorted"),
    "a gap in ranges": (_api_calls("graduated", "{ up_to = 9, price = 1 }, {from = 10, price = 1}"),
                        "tiers.startup.prices.api_calls.graduated: gap: no price from 9 to 10"),
    "negative range price": (_api_calls("graduated", "{ up_to = 9, price = -1 }, { price = 1 }"),
                             "tiers.startup.prices.api_calls.graduated.ranges.0.price"),
    "package of 0": (_api_calls("package", "", "size = 0\nprice = 1"),
                     "tiers.startup.prices.api_calls.package.size"),
    "unknown price kind": (_api_calls("tiered", "{ price = 1 }"),
                           "tiers.startup.prices.api_calls: Input tag 'tiered'"),
    "negative commitment": (CUSTOM.replace("[tiers.startup]\n",
                                           "[tiers.startup]\nminimum_commitment_usd = -1\n"),
                            "tiers.startup.minimum_commitment_usd"),
}  # fmt: skip
TIER_COMMANDS = [
    ["tiers"],
    ["usage", "acme", "2025-01"],
    ["generate-invoice", "beta.eu", "2025-02"],
    ["bill", "--as-of", "2025-04-01T02:00:00Z"],
    ["tenants", "add", "delta", "--tier", "basic"],
    ["tenants", "set-tier", "acme", "basic"],
]


@pytest.mark.parametrize("kind", [*BROKEN_TIERS, "not UTF-8"])
def test_broken_tiers_file(
    books: Books, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    text, fragment = BROKEN_TIERS.get(kind, ("\x00\xff garbage", "tiers file"))
    path = tmp_path / "tiers.toml"
    if text == "":
        path.mkdir()
    elif text is not None:
        path.write_bytes(text.encode("latin-1") if kind == "not UTF-8" else text.encode())
    monkeypatch.setenv("METERING_TIERS_FILE", str(path))
    for command in TIER_COMMANDS:
        books.refused(command, fragment)


READ_ONLY = "sql is read-only"
ONE_STATEMENT = "sql takes exactly one statement"
NO_FILES = "Permission Error"
SQL = {
    "DROP TABLE usage": READ_ONLY,
    "DELETE FROM usage": READ_ONLY,
    "UPDATE usage SET events = 0": READ_ONLY,
    "INSERT INTO usage SELECT * FROM usage": READ_ONLY,
    "CREATE TABLE x AS SELECT 1": READ_ONLY,
    "ATTACH 'data/billing.duckdb' AS b": READ_ONLY,
    "attach '/tmp/pf-pwned.db'": READ_ONLY,
    "COPY usage TO '/tmp/pf-pwned.csv'": READ_ONLY,
    "EXPORT DATABASE '/tmp/pf-pwned'": READ_ONLY,
    "INSTALL httpfs": READ_ONLY,
    "LOAD httpfs": READ_ONLY,
    "SET enable_external_access = true": READ_ONLY,
    "RESET lock_configuration": READ_ONLY,
    "CALL pragma_version()": READ_ONLY,
    "CHECKPOINT": READ_ONLY,
    "sElEcT * FrOm usage; DrOp TaBlE usage": ONE_STATEMENT,
    "SELECT 1; DROP TABLE usage": ONE_STATEMENT,
    "SELECT 1 /* ; */ ; DELETE FROM usage": ONE_STATEMENT,
    "SELECT 1;;SELECT 2": ONE_STATEMENT,
    "WITH x AS (SELECT 1) INSERT INTO usage SELECT * FROM x": READ_ONLY,
    "SELECT * FROM usage -- \nUNION ALL SELECT * FROM usage; COPY usage TO 'x'": ONE_STATEMENT,
    "EXPLAIN COPY usage TO '/tmp/pf-pwned.csv'": READ_ONLY,
    "DESCRIBE ATTACH 'x'": "syntax error",
    "SELECT * FROM query('DROP TABLE usage')": "Expected a single SELECT statement",
    "SELECT * FROM query('SELECT * FROM read_csv(''/etc/passwd'')')": NO_FILES,
    "SELECT * FROM read_csv('/etc/passwd')": NO_FILES,
    "SELECT * FROM read_csv_auto('/etc/passwd', header = false)": NO_FILES,
    "SELECT * FROM read_text('/etc/passwd')": NO_FILES,
    "SELECT * FROM read_blob('/etc/shadow')": NO_FILES,
    "SELECT * FROM read_json('pyproject.toml')": NO_FILES,
    "SELECT * FROM read_parquet('data/snapshot/*/*.parquet')": NO_FILES,
    "FROM read_parquet('/etc/passwd')": NO_FILES,
    "SELECT * FROM glob('/*')": NO_FILES,
    "SELECT * FROM duckdb_secrets()": NO_FILES,
    "SELECT * FROM '/etc/passwd'": "does not exist",
    "SELECT getenv('STRIPE_SECRET_KEY')": "getenv does not exist",
    "SELECT getenv('KAFKA_SASL_PASSWORD')": "getenv does not exist",
    "DROP/**/TABLE usage": READ_ONLY,
    "VACUUM": READ_ONLY,
    "": ONE_STATEMENT,
    "PRAGMA enable_profiling": READ_ONLY,
    "EXPLAIN ANALYZE COPY usage TO '/tmp/pf-pwned.csv'": READ_ONLY,
}


def test_sql_refuses_writes_files_and_settings(books: Books) -> None:
    ok = books.pfm("sql", "SELECT sum(events) AS n FROM usage", "-f", "json")
    assert ok.json() == [{"n": 2}]  # the views answer: refusals below are not a broken setup
    for query, fragment in SQL.items():
        books.refused(["sql", query], fragment)
    for pwned in ("/tmp/pf-pwned.db", "/tmp/pf-pwned.csv", "/tmp/pf-pwned"):
        assert not Path(pwned).exists()


def test_an_event_from_1950_does_not_stop_billing_for_everyone(pfm: Cli) -> None:
    old = make_event("old", occurred_at=-618_000_000 * 1_000_000)  # May 1950
    publish_usage(config.load_settings(), [event("acme", "2025-01", api_calls=1)])
    publish_usage(config.load_settings(), [old], partition=1)
    run = pfm("bill", "--as-of", "2025-04-01T02:00:00Z")
    assert run.code == 0, run.err


def _command_names(app: typer.Typer) -> list[str]:
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return sorted(group.commands)


def test_each_command_line_imports_the_area_that_defines_its_command() -> None:
    """The table ``register`` picks areas by must name exactly what each area registers,
    else a command would be missing from a command line that names it."""
    everything = _command_names(build_app())
    listed = sorted(name for names in AREAS.values() for name in names)
    assert listed == everything
    for area, names in AREAS.items():
        alone = typer.Typer()
        alone.callback()(lambda: None)  # a group even when the area has one command
        importlib.import_module(f"pf_metering.commands.{area}").register(alone)
        assert _command_names(alone) == sorted(names), area
        for name in names:
            assert name in _command_names(build_app([name, "--help"]))
    # no command, an option first or an unknown word: every command, for help and errors
    for args in ([], ["--help"], ["no-such-command"]):
        assert _command_names(build_app(args)) == everything
