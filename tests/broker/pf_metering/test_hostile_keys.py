"""Kafka keys from anyone, as rich markup or spreadsheet formulas: ``dead-letters`` and
``sql`` show them as the text they are, in every run and format, and CSV cells never start a
formula (JSON stays exact)."""

from __future__ import annotations

import csv
import io

from tests.fixtures.cli import Cli
from tests.support.events import MARKUP
from tests.support.worker_harness import drain, produce_raw


def test_dead_letter_keys_with_markup_show_as_they_are(env: dict[str, str], pfm: Cli) -> None:
    produce_raw(
        env["KAFKA_BOOTSTRAP_SERVERS"],
        env["METERING_TOPIC"],
        [(key.encode(), b"not avro") for key in MARKUP],
    )
    drain(env)
    for _ in range(2):  # and on every later run
        table = pfm("dead-letters")
        assert table.code == 0, table.err
        for key in MARKUP:
            assert key in table.out, (key, table.out)
    keys = [row["key"] for row in csv.DictReader(io.StringIO(pfm("dead-letters", "-f", "csv").out))]
    assert sorted(keys) == sorted(MARKUP)


FORMULAS = ['=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1)", "=1"]


def test_csv_cells_never_start_a_formula(env: dict[str, str], pfm: Cli) -> None:
    produce_raw(
        env["KAFKA_BOOTSTRAP_SERVERS"],
        env["METERING_TOPIC"],
        [(key.encode(), b"not avro") for key in FORMULAS],
    )
    drain(env)
    letters = list(csv.DictReader(io.StringIO(pfm("dead-letters", "-f", "csv").out)))
    assert sorted(row["key"] for row in letters) == sorted("'" + key for key in FORMULAS)
    assert pfm("dead-letters", "-f", "json").json()[0]["key"] in FORMULAS  # JSON stays exact
    rows = list(csv.reader(io.StringIO(pfm("sql", "SELECT '=1+1' AS f, -5 AS n", "-f", "csv").out)))
    assert rows == [["f", "n"], ["'=1+1", "-5"]]  # numbers as they are
