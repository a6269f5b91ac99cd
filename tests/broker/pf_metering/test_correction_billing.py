"""A finalized period corrected from the CLI, through the real broker and worker: ``usage
correct`` lowers the period after its invoice was finalized, and the next ``bill`` credits it
on the following invoice (a negative ``usage_correction`` line), carries what its total
cannot absorb as a credit balance, exactly once."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from schemas.periods import Period
from tests.fixtures.seeds import event
from tests.support.cli_runner import run_cli
from tests.support.worker_harness import drain, produce


def invoices(env: dict[str, str], tenant: str) -> list[dict[str, Any]]:
    proc = run_cli("invoices", tenant, "-f", "json", env=env, check=True)
    return list(json.loads(proc.stdout))


def test_a_finalized_period_corrected_from_the_cli_is_credited_once(env: dict[str, str]) -> None:
    now = Period.of(datetime.now(UTC))
    used, next_one = now.previous().previous(), now.previous()
    produce(
        env["KAFKA_BOOTSTRAP_SERVERS"],
        env["METERING_TOPIC"],
        [event("acme", str(used), violations=120, api_calls=1000)],
    )
    drain(env)
    closed = (used.end.replace(hour=2)).isoformat()
    run_cli("bill", "--quiet", "--as-of", closed, env=env, check=True)
    (first,) = invoices(env, "acme")
    assert (first["period"], first["total"]) == (str(used), "171.00")  # 50 + 120 + 1

    run_cli(
        "usage", "correct", "acme", str(used), "--violations", "-120",
        "--reason", "policy engine double-counted", env=env, check=True,
    )  # fmt: skip
    drain(env)
    run_cli("bill", "--quiet", env=env, check=True)
    run_cli("bill", "--quiet", env=env, check=True)  # again: nothing more
    old, new = invoices(env, "acme")
    assert old == first  # the finalized invoice never changes
    corrections = [ln for ln in new["lines"] if ln["code"] == "usage_correction"]
    assert [(ln["period"], ln["corrects"], ln["amount"]) for ln in corrections] == [
        (str(used), "violations", "-120.00")
    ]
    carried = [ln["amount"] for ln in new["lines"] if ln["code"] == "credit_carried"]
    assert (new["period"], carried, new["total"]) == (str(next_one), ["70.00"], "0.00")
    assert new["credit_balance"] == "70.00"
