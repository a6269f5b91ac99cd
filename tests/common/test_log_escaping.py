"""Every log line is one line of plain text: control and format characters from data are
escaped (text and JSON), secrets are redacted before formatting (so JSON's own escaping
cannot hide one from the filter), and librdkafka's lines from ``simulate-usage`` go through
logging too (tests/broker/emitter/test_refused_client.py)."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.logs import configure
from common.settings import Settings, load_settings
from tests.fixtures.stripe import WEBHOOK_SECRET, stripe_signature
from tests.support.cli_runner import BIN
from tests.support.log_lines import LINE

CONTROLS = ["\x1b[2J", "\r", "\n", "\x07", "\u202e", "\x9b1m", "\x00"]
HOSTILE = "pay" + "".join(CONTROLS) + "me"
SECRETS = ['sk_live_"quoted"\\back', "pw\twith-tab", "ends-with-backslash\\"]


@pytest.fixture(name="capture")
def capture_fixture() -> Iterator[Callable[[Settings], io.StringIO]]:
    """Set logging up as ``configure`` does, writing to a buffer; restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def configured(settings: Settings) -> io.StringIO:
        configure(settings)
        buffer = io.StringIO()
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(buffer)
        return buffer

    yield configured
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_control_characters_are_escaped_and_secrets_redacted_first(
    capture: Callable[[Settings], io.StringIO], fmt: str
) -> None:
    buffer = capture(
        load_settings(
            log_format=fmt,
            log_level="DEBUG",
            stripe_secret_key=SECRETS[0],
            kafka_sasl_password=SECRETS[1],
            stripe_webhook_secret=SECRETS[2],
        )
    )
    log = logging.getLogger("pf_metering.test")
    log.warning("event %s rejected", HOSTILE)
    log.info("keys %s | %s | %s", *SECRETS)
    try:
        raise ValueError(f"bad {HOSTILE} {SECRETS[0]}")
    except ValueError:
        log.debug("unexpected", exc_info=True)
    text = buffer.getvalue()
    lines = text.splitlines()
    for secret in SECRETS:
        assert secret not in text and json.dumps(secret)[1:-1] not in text, secret
        assert secret.encode("unicode_escape").decode() not in text, secret
    for control in CONTROLS:
        if control != "\n":
            assert control not in text, repr(control)
    if fmt == "json":
        records = [json.loads(line) for line in lines]
        assert len(records) == 3
        assert records[0]["message"] == "event pay\\x1b[2J\\r\\n\\x07\\u202e\\x9b1m\\x00me rejected"
        assert records[1]["message"] == "keys [redacted] | [redacted] | [redacted]"
        assert "ValueError: bad pay\\x1b" in records[2]["traceback"]
    else:
        assert lines[0].endswith("event pay\\x1b[2J\\r\\n\\x07\\u202e\\x9b1m\\x00me rejected")
        assert lines[1].endswith("keys [redacted] | [redacted] | [redacted]")
        assert sum(bool(LINE.match(line)) for line in lines) == 3  # only the traceback wraps


def test_webhook_request_lines_and_event_ids_are_logged_escaped(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "METERING_DATA_DIR": str(tmp_path / "data"),
        "LOG_LEVEL": "DEBUG",
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    server = subprocess.Popen(
        [str(BIN), "webhooks", "serve", "--port", "0"], env=env, stderr=subprocess.PIPE
    )
    assert server.stderr is not None
    url = server.stderr.readline().decode().split()[-1]
    host, port = url.removeprefix("http://").split(":")
    try:
        for line, status in (
            (b"GET /\x1b[31mred HTTP/1.1", b" 404 "),
            (b"GET /x\rforged HTTP/1.1", b" 400 "),
        ):
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(line + b"\r\nHost: x\r\n\r\n")
                assert status in sock.recv(1024), line
        payload = json.dumps(
            {
                "id": "evt_\x1b[2J\rx",
                "type": "invoice.paid",
                "data": {"object": {"id": "in_\u202e"}},
            }
        ).encode()
        signature = stripe_signature(payload, WEBHOOK_SECRET, int(time.time()))
        head = (
            f"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: {signature}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(head.encode() + payload)
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        server.terminate()
        _, logs = server.communicate(timeout=60)
    text = logs.decode()
    assert "/\\x1b[31mred" in text and "evt_\\x1b[2J\\rx" in text  # logged, escaped
    for control in ("\x1b", "\r", "\u202e"):
        assert control not in text, repr(control)
