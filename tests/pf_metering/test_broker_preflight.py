"""An unreachable broker (issue 17, point 1): the commands that need it check first and fail
in one line naming KAFKA_BOOTSTRAP_SERVERS and the address, not librdkafka's stream."""

from __future__ import annotations

import pytest

from tests.support.cli_runner import assert_user_error, run_cli


@pytest.mark.parametrize(
    "args", [("simulate-usage", "acme-corp", "5"), ("consume", "--drain")], ids=str
)
def test_unreachable_broker_fails_fast_in_one_line(
    data_env: dict[str, str], args: tuple[str, ...]
) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KAFKA_CONNECT_TIMEOUT": "2"}
    proc = run_cli(*args, env=env, timeout=60)  # (before: 121 s and ~1,000 lines)
    assert_user_error(
        proc, "cannot reach the Kafka broker at 127.0.0.1:1 (KAFKA_BOOTSTRAP_SERVERS)"
    )
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [proc.stderr.strip()], (
        proc.stderr
    )  # that one line and nothing else
