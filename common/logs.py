"""Logging set-up: text or JSON lines on stderr, with every configured secret redacted."""

from __future__ import annotations

import json
import logging
import sys
import time

from common.settings import Settings

REDACTED = "[redacted]"


def secrets_of(settings: Settings) -> list[str]:
    values = [
        settings.stripe_secret_key,
        settings.stripe_webhook_secret,
        settings.kafka_sasl_password,
        settings.kafka_ssl_key_password,
    ]
    return [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


class _RedactingFormatter(logging.Formatter):
    def __init__(self, secrets: list[str], as_json: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.secrets = secrets
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        if self.as_json:
            payload = {
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
            payload.update(getattr(record, "fields", {}))
            text = json.dumps(payload, default=str)
        else:
            text = super().format(record)
        return redact(text, self.secrets)


class Repeats:
    """Lets a text through once per ``window`` seconds (librdkafka repeats connection
    failures every few milliseconds while a broker is down)."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self.seen: dict[str, float] = {}

    def first(self, text: str, now: float) -> bool:
        """Whether ``text`` was not let through in the ``window`` seconds before ``now``."""
        last = self.seen.get(text)
        if last is not None and now - last < self.window:
            return False
        if len(self.seen) > 1000:
            self.seen.clear()
        self.seen[text] = now
        return True


class RepeatFilter(logging.Filter):
    """Drops a log message repeated within ``window`` seconds (``Repeats``)."""

    def __init__(self, window: float = 30.0) -> None:
        super().__init__()
        self.repeats = Repeats(window)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.repeats.first(record.getMessage(), record.created)


def configure(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(secrets_of(settings), settings.log_format == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    rdkafka = logging.getLogger("rdkafka")
    rdkafka.filters[:] = [RepeatFilter()]
