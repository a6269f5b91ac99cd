"""Security: secrets never leave the process in logs, output or files; webhook deliveries that
are forged, stale or replayed change nothing; Kafka TLS/SASL settings reach librdkafka.

The full flow runs with known values of every secret setting and ``LOG_LEVEL=DEBUG``:
simulate-usage, consume, bill --stripe (our stateful Stripe test server), every read command
with ``-o`` files, ``webhooks serve`` with good and bad deliveries, and the error paths most
likely to echo a secret (Stripe answering 401 with the key it was given, Stripe unreachable,
Kafka TLS/SASL misconfigured). Then every stdout, stderr, log line and file written is searched
for the secrets. (tests/billing/stripe/test_webhooks.py covers bad signatures, tampering,
staleness and plain replays; here only what it does not.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from billing.model import InvoiceStatus
from common.settings import load_settings
from consumer.kafka import consumer_config
from consumer.worker import Worker
from emitter import Emitter
from pf_metering.commands.consume_cmds import worker_config
from tests.fixtures.cli import Cli, Result
from tests.fixtures.stripe import (
    API_KEY,
    WEBHOOK_SECRET,
    stripe_signature,
)
from tests.fixtures.webhooks import (
    PAST_DUE,
    Endpoint,
    T,
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
    flow = {**env, **SECRETS, "KAFKA_SASL_USERNAME": "svc", "STRIPE_API_BASE": fake_stripe.url,
            "LOG_LEVEL": "DEBUG"}  # fmt: skip
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
    for args in (["invoices", "acme-sec", "-o", f"{out}/invoices.json"],
                 ["generate-invoice", "acme-sec", "2025-01", "-o", f"{out}/inv.json"],
                 ["usage", "acme-sec", "2025-01", "-f", "csv", "-o", f"{out}/usage.csv"],
                 ["export-metrics", "-o", f"{out}/metrics.prom"], ["tiers", "-o", f"{out}/t.json"],
                 ["tenants", "list", "-f", "json"], ["dead-letters", "-f", "json"],
                 ["sql", "SELECT * FROM usage", "-f", "csv", "-o", f"{out}/q.csv"]):  # fmt: skip
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

    written = [p for p in [*Path(env["METERING_DATA_DIR"]).rglob("*"), *out.rglob("*")]
               if p.is_file()]  # fmt: skip
    assert len(written) >= 20 and len(said.texts) >= 30  # what was searched
    assert any(" DEBUG " in text for text in said.texts)  # at the most talkative level
    for name, secret in SECRETS.items():
        for text in said.texts:
            assert secret not in text, name
        for path in written:
            assert secret.encode() not in path.read_bytes(), (name, path)


# --- webhooks: what tests/billing/stripe/test_webhooks.py does not cover ----------------------


def test_a_captured_signature_moved_to_a_fresh_timestamp_is_refused(endpoint: Endpoint) -> None:
    payload = event("evt_1", "invoice.paid", "in_acme01", PAST_DUE)
    captured = stripe_signature(payload, WEBHOOK_SECRET, T - 3600)  # an hour old: stale
    forged = captured.replace(f"t={T - 3600}", f"t={T}")  # the replayer freshens the stamp
    assert endpoint.deliver(payload, forged)[0] == 400
    doubled = f"t={T},{captured}"  # two timestamps: the signed one must be the checked one
    assert endpoint.deliver(payload, doubled)[0] == 400
    assert endpoint.status(PAST_DUE) is InvoiceStatus.sent and endpoint.events() == []


def test_a_replayed_event_id_cannot_change_a_status_again(endpoint: Endpoint) -> None:
    assert endpoint.deliver(event("evt_1", "invoice.paid", "in_acme01", PAST_DUE))[0] == 200
    voided = event("evt_1", "invoice.voided", "in_acme01", PAST_DUE)  # same id, other content
    assert endpoint.deliver(voided) == (200, {"status": "duplicate"})
    assert endpoint.status(PAST_DUE) is InvoiceStatus.paid
    assert endpoint.events() == [("evt_1", "sent -> paid")]


def raw_post(url: str, head: str, body: bytes = b"") -> int:
    """Send a hand-made request; return the status code."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        return int(sock.recv(1024).split()[1])


def test_oversized_or_unsized_bodies_are_refused_unread(endpoint: Endpoint) -> None:
    url = endpoint.url
    signed = stripe_signature(b"{}", WEBHOOK_SECRET, T)
    head = f"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: {signed}"
    assert raw_post(url, head) == 411  # no Content-Length
    assert raw_post(url, head + "\r\nContent-Length: 2000000000") == 413  # never read
    assert raw_post(url, head + "\r\nContent-Length: -1") == 413
    assert endpoint.events() == []


# --- Kafka TLS and SASL settings reach librdkafka ----------------------------------------------


def secure_settings(**extra: Any) -> Any:
    return load_settings(
        kafka_bootstrap_servers="127.0.0.1:9",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc",
        kafka_sasl_password=SASL_PASSWORD,
        kafka_ssl_ca_location="/nonexistent/pf-ca.pem",
        metering_data_dir=Path("/nonexistent-data"),
        **extra,
    )


def test_worker_and_emitter_hand_tls_and_sasl_settings_to_librdkafka() -> None:
    from confluent_kafka import KafkaException

    settings = secure_settings()
    conf = consumer_config(settings.kafka_common(), "g", "cooperative-sticky")
    assert {k: conf[k] for k in ("security.protocol", "sasl.mechanism", "sasl.username",
                                 "sasl.password", "ssl.ca.location")} == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc", "sasl.password": SASL_PASSWORD,
        "ssl.ca.location": "/nonexistent/pf-ca.pem",
    }  # fmt: skip
    # librdkafka itself refuses the missing CA file: the setting got all the way there
    with pytest.raises(KafkaException, match=r"ssl\.ca\.location"):
        Worker(worker_config(settings))
    with pytest.raises(KafkaException, match=r"ssl\.ca\.location"):
        Emitter("127.0.0.1:9", "t", config=settings.kafka_common())


def test_sasl_reaches_the_broker_handshake(env: dict[str, str], tmp_path: Path) -> None:
    """SASL_PLAINTEXT against the test broker's PLAINTEXT listener: librdkafka starts a SASL
    SCRAM handshake, which the broker cannot answer; the worker reports it, password unsaid."""
    log = tmp_path / "worker.log"
    sasl = {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "svc", "KAFKA_SASL_PASSWORD": SASL_PASSWORD}  # fmt: skip
    with log.open("w") as sink:
        proc = subprocess.Popen([str(BIN), "consume", "--drain"], env={**os.environ, **env, **sasl},
                                stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
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
