"""Logging set-up: text or JSON lines on stderr, with every configured secret redacted."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from common.settings import Settings

REDACTED = "[redacted]"
_NUMBERS = re.compile(r"\d+")


def secrets_of(settings: Settings) -> list[str]:
    values = [
        settings.stripe_secret_key,
        settings.stripe_webhook_secret,
        settings.kafka_sasl_password,
        settings.kafka_ssl_key_password,
        settings.aws_secret_access_key,
        settings.aws_session_token,
        settings.metering_alert_secret,
    ]
    found = [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]
    return found + [p for p in [settings.catalog_password()] if p]


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def escape_controls(text: str) -> str:
    """``text`` with every control or format character (ESC, CR, LF, BEL, bidi overrides)
    written as its escape, so data in a message can neither forge a line nor drive the
    terminal that shows it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class _RedactingFormatter(logging.Formatter):
    """One line per record: the message and every field are redacted first (a secret is
    found as it was given, before JSON or escaping could rewrite it), then their control
    characters escaped, then the line is formatted. Only a traceback spans more lines."""

    def __init__(self, secrets: list[str], as_json: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.secrets = secrets
        self.as_json = as_json

    def _clean(self, text: str) -> str:
        return escape_controls(redact(text, self.secrets))

    def format(self, record: logging.LogRecord) -> str:
        message = self._clean(record.getMessage())
        trace = ""
        if record.exc_info:
            trace = self.formatException(record.exc_info)
        elif record.exc_text:
            trace = record.exc_text
        trace = "\n".join(self._clean(line) for line in trace.split("\n") if line)
        if self.as_json:
            payload: dict[str, Any] = {
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": message,
            }
            for key, value in getattr(record, "fields", {}).items():
                payload[key] = (
                    value if isinstance(value, int | float | bool) else (self._clean(str(value)))
                )
            if trace:
                payload["traceback"] = trace
            return json.dumps(payload)
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {message}"
        return f"{line}\n{trace}" if trace else line


class Repeats:
    """Lets a text through once per ``window`` seconds, numbers aside (librdkafka repeats
    connection failures every few milliseconds while a broker is down, each with its own
    timings: "after 0ms", "after 12ms")."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self.seen: dict[str, float] = {}

    def first(self, text: str, now: float) -> bool:
        """Whether ``text`` was not let through in the ``window`` seconds before ``now``."""
        text = _DIGITS.sub("#", text)
        last = self.seen.get(text)
        if last is not None and now - last < self.window:
            return False
        if len(self.seen) > 1000:
            self.seen.clear()
        self.seen[text] = now
        return True


class RepeatFilter(logging.Filter):
    """Drops a log message repeated within ``window`` seconds (``Repeats``)."""

    def __init__(self, window: float = 60.0) -> None:
        super().__init__()
        self.repeats = Repeats(window)

    def filter(self, record: logging.LogRecord) -> bool:
        # numbers apart: "after 6ms in state AUTH" repeats "after 0ms in state AUTH"
        return self.repeats.first(_NUMBERS.sub("#", record.getMessage()), record.created)


_DIGITS = re.compile(r"\d+")


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, or while ``logs_through`` is active its ``write`` (a progress display's
    console, so log lines print above the bar, never over it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.write: Callable[[str], None] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.write is None:
            super().emit(record)
            return
        try:
            self.write(self.format(record))
        except Exception:
            self.handleError(record)


def configure(settings: Settings) -> None:
    """Root logging at ``LOG_LEVEL`` on stderr, secrets redacted; librdkafka's repeats
    dropped; stripe-python's line per HTTP request only at DEBUG."""
    handler = _Handler()
    handler.setFormatter(_RedactingFormatter(secrets_of(settings), settings.log_format == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = settings.log_level.upper()
    root.setLevel(level)
    rdkafka = logging.getLogger("rdkafka")
    rdkafka.filters[:] = [RepeatFilter()]
    logging.getLogger("stripe").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


@contextmanager
def logs_through(write: Callable[[str], None]) -> Iterator[None]:
    """While inside, every log line goes to ``write`` (one formatted line, no newline)."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, _Handler)]
    before = [h.write for h in handlers]
    for h in handlers:
        h.write = write
    try:
        yield
    finally:
        for h, old in zip(handlers, before, strict=True):
            h.write = old
