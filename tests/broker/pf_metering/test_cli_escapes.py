"""Bad input from Kafka on the command line: keys with terminal escapes, shown escaped."""

from __future__ import annotations

from schemas.codec import default_codec
from tests.fixtures.cli import Cli
from tests.support.events import make_event
from tests.support.worker_harness import drain, produce_raw


def test_dead_letters_and_sql_never_print_terminal_escapes(env: dict[str, str], pfm: Cli) -> None:
    """Kafka keys come from anyone: an ANSI or OSC sequence in one must reach the operator's
    terminal escaped, in every format."""
    evil = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x9b1m\r\u202e".encode()
    mismatched = default_codec().encode(make_event("acme"))
    produce_raw(
        env["KAFKA_BOOTSTRAP_SERVERS"],
        env["METERING_TOPIC"],
        [(evil, b"not avro"), (evil, mismatched)],
    )
    drain(env)
    formats: tuple[list[str], ...] = ([], ["-f", "csv"], ["-f", "json"])
    runs = [pfm("dead-letters", *fmt) for fmt in formats]
    runs += [pfm("sql", "SELECT decode(key) AS k, reason FROM dead_letters", *f) for f in formats]
    for run in runs:
        assert run.code == 0, run.err
        shown = run.out.replace("\r\n", "\n")  # CSV's own line ends aside
        for control in ("\x1b", "\x07", "\x9b", "\r", "\u202e"):
            assert control not in shown, (control, run.out)
    letters = runs[2].json()
    assert [d["key"] for d in letters] == [evil.decode()] * 2  # exact in JSON
    assert {d["reason_code"] for d in letters} == {"not_single_object", "key_mismatch"}
    blobs = pfm("sql", "SELECT key FROM dead_letters", "-f", "json").json()
    assert blobs == [{"key": evil.hex()}] * 2
