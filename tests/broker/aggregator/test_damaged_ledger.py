"""A ledger that held data, overwritten with random bytes, stops the worker in one line and
is left as it is (never set aside and rebuilt from the topic, which may no longer hold
everything); restored from a backup, the worker goes on and every total is exact."""

from __future__ import annotations

import random

from common.settings import load_settings
from tests.support.cli_runner import assert_user_error, run_cli
from tests.support.worker_harness import (
    drain,
    expected_totals,
    ledger_totals,
    produce,
    random_events,
)


def test_a_damaged_ledger_stops_the_worker_and_is_left_as_it_is(env: dict[str, str]) -> None:
    events = random_events(2_000, tenants=12, seed=5)
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events)
    drain(env)
    settings = load_settings(metering_data_dir=env["METERING_DATA_DIR"])
    paths = sorted(settings.ledger_dir.rglob("p-*.duckdb"))
    victim = paths[0]
    original = victim.read_bytes()
    damaged = random.Random(11).randbytes(4096)
    victim.write_bytes(damaged)
    for _ in range(2):
        failed = run_cli("consume", "--drain", env=env)
        assert_user_error(failed, f"cannot open ledger {victim}: damaged")
        assert victim.read_bytes() == damaged and list(victim.parent.glob("*.torn-*")) == []
    victim.write_bytes(original)  # restored from a backup: all is there
    drain(env)
    assert ledger_totals(env) == expected_totals(events)
