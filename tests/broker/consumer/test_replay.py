"""A new schema version before the workers know it: its events are dead-lettered, published
with ``schemas add``, replayed while a worker runs, replayed again (nothing changes);
an incompatible version is refused; poison values stay dead. Totals reconciled with the
independent count (``tests.oracle``)."""

from __future__ import annotations

import copy
import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

from schemas.codec import Codec, default_codec, discover, schema_of_raw
from tests.support.cli_runner import assert_user_error, run_cli
from tests.support.events import v4_schema
from tests.support.waiting import free_port, scrape, wait_for
from tests.support.worker_harness import (
    SMALL_BATCHES,
    expected_totals,
    ledger_totals,
    produce,
    produce_raw,
    random_events,
    read_while_running,
    start_worker,
)


def dead_letters(env: dict[str, str]) -> list[dict[str, Any]]:
    proc = run_cli("dead-letters", "-f", "json", env=env, check=True)
    return list(json.loads(proc.stdout))


def states(env: dict[str, str]) -> Counter[tuple[str, str]]:
    return Counter((d["state"], d["reason_code"]) for d in dead_letters(env))


def test_new_version_dead_lettered_published_replayed_twice(
    env: dict[str, str], tmp_path: Path
) -> None:
    bootstrap, topic = env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"]
    schema = v4_schema()
    v4 = schema_of_raw(schema, 4, tmp_path / "v4.avsc")
    writer = Codec([*discover(), v4])
    known = random_events(400, tenants=8, seed=41)
    new = random_events(200, tenants=8, seed=42)
    again = known[:20]  # counted already; re-sent as v4: duplicates once replayed

    def as_v4(e: dict[str, Any]) -> tuple[bytes | None, bytes | None]:
        return e["tenant_id"].encode(), writer.encode({**e, "region": None, "zone": "z"}, 4)

    codec = default_codec()
    negative = {**random_events(1, tenants=1, seed=43)[0], "api_calls": -1}
    poison: list[tuple[bytes | None, bytes | None]] = [
        (b"tenant_0.x", b"not avro"),
        (b"tenant_0.x", codec.encode(negative)),
        (b"tenant_0.x", writer.encode({**negative, "region": None, "zone": "z"}, 4)),
    ]
    produce(bootstrap, topic, known)
    produce_raw(bootstrap, topic, [as_v4(e) for e in new + again] + poison)

    port = free_port()
    proc = start_worker({**env, **SMALL_BATCHES}, "--metrics-port", str(port))
    try:
        unknown = len(new) + len(again) + 1
        wait_for(
            lambda: read_while_running(lambda: states(env))
            == {("open", "unknown_fingerprint"): unknown, ("open", "not_single_object"): 1,
                ("open", "negative_counter"): 1},
            "the v4 events dead-lettered",
        )  # fmt: skip
        assert ledger_totals(env) == expected_totals(known)
        metrics = scrape(port)
        assert metrics['pf_dead_letters_open{reason="unknown_fingerprint"}'] == unknown

        # an incompatible version is refused, one error line, nothing published
        bad = copy.deepcopy(schema)
        bad["fields"][5]["type"] = "int"
        (tmp_path / "bad.avsc").write_text(json.dumps(bad))
        assert_user_error(
            run_cli("schemas", "add", str(tmp_path / "bad.avsc"), env=env), "changes type"
        )
        # replaying before the version is published changes nothing but the reasons' state
        proc1 = run_cli("dead-letters", "replay", "--reason", "unknown_fingerprint", env=env)
        assert proc1.returncode == 0, proc1.stderr
        assert "0 counted" in proc1.stdout and f"{unknown} still failing" in proc1.stdout
        assert ledger_totals(env) == expected_totals(known)

        (tmp_path / "v4.avsc").write_text(json.dumps(schema))
        run_cli("schemas", "add", str(tmp_path / "v4.avsc"), env=env, check=True)
        # live events of the new version are counted from now on, without a replay
        live = random_events(50, tenants=8, seed=44)
        produce_raw(bootstrap, topic, [as_v4(e) for e in live])
        expected = expected_totals(known + live)
        wait_for(lambda: read_while_running(lambda: ledger_totals(env)) == expected, "live v4")

        replay = run_cli("dead-letters", "replay", env=env)
        assert replay.returncode == 0, replay.stderr
        assert f"{len(new)} counted, {len(again)} duplicates, 0 forwarded, 3 still failing" in (
            replay.stdout
        )
        expected = expected_totals(known + live + new)
        wait_for(lambda: read_while_running(lambda: ledger_totals(env)) == expected, "replayed")
        want = {
            ("replayed_counted", "unknown_fingerprint"): len(new),
            ("replayed_duplicate", "unknown_fingerprint"): len(again),
            ("still_failing", "not_single_object"): 1,
            ("still_failing", "negative_counter"): 2,  # the v4 one now says why
        }
        wait_for(lambda: read_while_running(lambda: states(env)) == want, "replay states")
        before = {(d["partition"], d["offset"]): d for d in dead_letters(env)}

        # replaying again changes nothing
        twice = run_cli("dead-letters", "replay", env=env)
        assert twice.returncode == 0, twice.stderr
        assert "0 counted, 0 duplicates, 0 forwarded, 3 still failing" in twice.stdout
        assert ledger_totals(env) == expected
        after = {(d["partition"], d["offset"]): d for d in dead_letters(env)}
        assert after == before
        wait_for(
            lambda: scrape(port).get('pf_dead_letters_open{reason="unknown_fingerprint"}') == 0,
            "no open unknown_fingerprint dead letters",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert ledger_totals(env) == expected
    listed = json.loads(run_cli("schemas", "list", "-f", "json", env=env, check=True).stdout)
    assert [v["version"] for v in listed] == [1, 2, 3, 4]
