"""``simulate-usage`` against a broker that refuses its client (SASL it cannot answer):
librdkafka's lines go through logging (the JSON format, the redaction filter, without
repeats) and the command fails in one line naming the settings, instead of running on."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.cli_runner import assert_user_error, run_cli
from tests.support.log_lines import LINE

BAD_SASL = {
    "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "KAFKA_SASL_USERNAME": "svc",
    "KAFKA_SASL_PASSWORD": "kafka-pw-0123456789SECRET",
}


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_simulate_usage_logs_librdkafka_and_fails_when_refused(
    env: dict[str, str], fmt: str
) -> None:
    run = run_cli(
        "simulate-usage",
        "acme",
        "2",
        "--quiet",
        timeout=90,
        env={**env, **BAD_SASL, "LOG_FORMAT": fmt},
    )
    assert_user_error(run, "KAFKA_BOOTSTRAP_SERVERS")  # the broker check or the refused flush
    assert "SASL SCRAM-SHA-512" in run.stderr.splitlines()[-1]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    logged = lines[:-1]
    for line in logged:  # whatever librdkafka said went through logging
        if fmt == "json":
            assert json.loads(line)["logger"] == "rdkafka", line
        else:
            assert LINE.match(line) and " rdkafka: " in line, line
    said = [json.loads(ln)["message"] if fmt == "json" else LINE.sub("", ln) for ln in logged]
    assert len(said) == len({re.sub(r"\d+", "#", text) for text in said})  # no repeats
    assert BAD_SASL["KAFKA_SASL_PASSWORD"] not in run.stderr + run.stdout
