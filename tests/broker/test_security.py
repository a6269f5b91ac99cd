"""Security: secrets never leave the process in logs, output or files; a SASL handshake reaches
the broker with the password unsaid. (Forged and replayed webhook deliveries:
tests/billing/stripe/test_webhook_forgery.py; TLS/SASL settings reaching librdkafka:
tests/consumer/test_kafka_security.py.)

The full flow runs with known values of every secret setting and ``LOG_LEVEL=DEBUG``:
simulate-usage, consume, bill --stripe (our stateful Stripe test server), every read command
with ``-o`` files, ``webhooks serve`` with good and bad deliveries, and the error paths most
likely to echo a secret (Stripe answering 401 with the key it was given, Stripe unreachable,
Kafka TLS/SASL misconfigured). Then every stdout, stderr, log line and file written is searched
for the secrets.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.cli import Cli, Result
from tests.fixtures.stripe import (
    API_KEY,
    WEBHOOK_SECRET,
    stripe_signature,
)
from tests.fixtures.webhooks import (
    event,
    post,
)
from tests.support.cli_runner import BIN, run_cli
from tests.support.stripe_server import FakeStripe, running

SASL_PASSWORD = "kafka-sasl-pw-0123456789SECRET"
SSL_KEY_PASSWORD = "kafka-ssl-key-pw-0123456789SECRET"
SECRETS = {
    "STRIPE_SECRET_KEY": API_KEY,
    "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "KAFKA_SASL_PASSWORD": SASL_PASSWORD,
    "KAFKA_SSL_KEY_PASSWORD": SSL_KEY_PASSWORD,
}
BAD_TLS = {
    "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "KAFKA_SSL_CA_LOCATION": "/nonexistent/pf-ca.pem",
}


class Transcript:
    """Everything the commands printed, to be searched for secrets at the end."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, *texts: str) -> None:
        self.texts.extend(texts)

    def subprocess(self, env: dict[str, str], *args: str, ok: bool = True) -> str:
        proc = run_cli(*args, env=env)
        self.add(proc.stdout, proc.stderr)
        assert (proc.returncode == 0) == ok, proc.stderr
        return proc.stdout + proc.stderr

    def cli(self, pfm: Cli, *args: str, ok: bool = True) -> Result:
        run = pfm(*args)
        self.add(run.out, run.err)
        assert (run.code == 0) == ok, run.err
        return run


def serve_webhooks(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [str(BIN), "webhooks", "serve", "--port", "0"],
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()
    assert first.startswith("listening on http://"), first
    return proc, first.split()[-1]


def test_no_secret_in_any_output_of_a_full_flow(
    env: dict[str, str],
    pfm: Cli,
    fake_stripe: FakeStripe,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    flow = {
        **env,
        **SECRETS,
        "KAFKA_SASL_USERNAME": "svc",
        "STRIPE_API_BASE": fake_stripe.url,
        "LOG_LEVEL": "DEBUG",
    }
    for name, value in flow.items():
        monkeypatch.setenv(name, value)
    said = Transcript()
    out = tmp_path / "out"
    out.mkdir()

    said.subprocess(flow, "simulate-usage", "acme-sec", "4", "--period", "2025-01", "--seed", "7")
    said.subprocess(flow, "consume", "--drain")
    said.cli(pfm, "bill", "--as-of", "2025-02-01T02:00:00Z", "--stripe")
    (doc,) = said.cli(pfm, "invoices", "acme-sec", "-f", "json").json()
    assert doc["stripe_invoice_id"] and fake_stripe.calls
    assert fake_stripe.calls[0].headers["authorization"] == f"Bearer {API_KEY}"  # it was used
    for args in (
        ["invoices", "acme-sec", "-o", f"{out}/invoices.json"],
        ["generate-invoice", "acme-sec", "2025-01", "-o", f"{out}/inv.json"],
        ["usage", "acme-sec", "2025-01", "-f", "csv", "-o", f"{out}/usage.csv"],
        ["export-metrics", "-o", f"{out}/metrics.prom"],
        ["tiers", "-o", f"{out}/t.json"],
        ["tenants", "list", "-f", "json"],
        ["dead-letters", "-f", "json"],
        ["sql", "SELECT * FROM usage", "-f", "csv", "-o", f"{out}/q.csv"],
    ):
        said.cli(pfm, *args)

    server, url = serve_webhooks(flow)
    try:
        paid = event("evt_sec_1", "invoice.paid", doc["stripe_invoice_id"], doc["invoice_id"])
        now = int(time.time())
        replies = [
            post(url, paid, stripe_signature(paid, "whsec_forged", now)),
            post(url, paid, stripe_signature(paid, WEBHOOK_SECRET, now - 3600)),
            post(url, paid, stripe_signature(paid, WEBHOOK_SECRET, now)),
            post(url, paid, stripe_signature(paid, WEBHOOK_SECRET, now)),
        ]
    finally:
        server.terminate()
        _, logs = server.communicate(timeout=30)
    said.add(logs)
    assert [r[0] for r in replies] == [400, 400, 200, 200]
    assert replies[2][1] == {"status": "sent -> paid"} and replies[3][1] == {"status": "duplicate"}

    # Error paths: Stripe answering 401 with the key it got; Stripe unreachable; bad TLS.
    wrong = FakeStripe(api_key="sk_test_the_one_stripe_expects")
    with running(wrong):
        monkeypatch.setenv("STRIPE_API_BASE", wrong.url)
        run = said.cli(pfm, "bill", "--as-of", "2025-03-01T02:00:00Z", "--stripe", ok=False)
    assert "Invalid API Key provided: [redacted]" in run.err  # the echo reached us, redacted
    monkeypatch.setenv("STRIPE_API_BASE", "http://127.0.0.1:9")
    said.cli(pfm, "bill", "--as-of", "2025-03-01T02:00:00Z", "--stripe", ok=False)
    for args in (["consume", "--drain"], ["simulate-usage", "acme-sec", "1"]):
        text = said.subprocess({**flow, **BAD_TLS}, *args, ok=False)
        assert "ssl.ca.location" in text

    written = [
        p for p in [*Path(env["METERING_DATA_DIR"]).rglob("*"), *out.rglob("*")] if p.is_file()
    ]
    assert len(written) >= 20 and len(said.texts) >= 30  # what was searched
    assert any(" DEBUG " in text for text in said.texts)  # at the most talkative level
    for name, secret in SECRETS.items():
        for text in said.texts:
            assert secret not in text, name
        for path in written:
            assert secret.encode() not in path.read_bytes(), (name, path)


# --- Kafka SASL reaches the broker -------------------------------------------------------------


def test_sasl_reaches_the_broker_handshake(env: dict[str, str], tmp_path: Path) -> None:
    """SASL_PLAINTEXT against the test broker's PLAINTEXT listener: librdkafka starts a SASL
    SCRAM handshake, which the broker cannot answer; the worker reports it, password unsaid."""
    log = tmp_path / "worker.log"
    sasl = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "svc",
        "KAFKA_SASL_PASSWORD": SASL_PASSWORD,
    }
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [str(BIN), "consume", "--drain"],
            env={**os.environ, **env, **sasl},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "_AUTHENTICATION" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert "SASL" in text and "SCRAM-SHA-512" in text and SASL_PASSWORD not in text
