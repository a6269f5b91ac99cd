"""Stripe webhooks, the pure part: signature verification and event -> local status (no I/O).

Status mapping (docs/spec.md, "Statuses": draft, finalized, sent, paid, overdue, void):

- ``invoice.paid`` -> paid
- ``invoice.voided`` -> void
- ``invoice.marked_uncollectible`` -> overdue. Stripe's "uncollectible" writes the debt off but
  the invoice can still be paid (a later ``invoice.paid`` moves it to paid); "void" would claim
  nothing is owed, which is false.
- ``invoice.payment_failed`` -> overdue once our due date has passed, otherwise no change
  (the invoice stays sent: a failed attempt before the due date is not yet a late payment).

paid and void are final: Stripe delivers events out of order and more than once, so a late
``invoice.payment_failed`` never takes a paid invoice back.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from billing.model import InvoiceStatus

DEFAULT_TOLERANCE = 300
"""Seconds a signature's timestamp may differ from our clock (Stripe's default)."""

FINAL = frozenset({InvoiceStatus.paid, InvoiceStatus.void})

HANDLED = (
    "invoice.paid",
    "invoice.payment_failed",
    "invoice.voided",
    "invoice.marked_uncollectible",
)


class SignatureError(ValueError):
    """The request is not a genuine, fresh Stripe delivery (answered with 400)."""


class EventError(ValueError):
    """A genuine delivery whose body is not a Stripe event we can read (answered with 400)."""


@dataclass(frozen=True)
class Event:
    event_id: str
    type: str
    object_id: str | None
    metadata: dict[str, str]

    @property
    def invoice_id(self) -> str | None:
        """Our invoice id, which the push put in the Stripe invoice's metadata."""
        return self.metadata.get("invoice_id") or None


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    """HMAC-SHA256 of ``"<timestamp>.<payload>"`` as Stripe computes it, in hex."""
    signed = str(timestamp).encode() + b"." + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def verify(
    payload: bytes,
    header: str | None,
    secret: str,
    *,
    now: float,
    tolerance: int = DEFAULT_TOLERANCE,
) -> None:
    """Raise SignatureError unless a ``v1`` signature of ``header`` matches and is fresh.

    Stale is older than ``tolerance`` seconds (replay protection); a timestamp as far in the
    future is refused too, since it can only come from a wrong clock or a forgery."""
    if not header:
        raise SignatureError("missing Stripe-Signature header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError as exc:
                raise SignatureError("malformed timestamp in Stripe-Signature") from exc
        elif key == "v1":
            candidates.append(value)
    if timestamp is None:
        raise SignatureError("no timestamp in Stripe-Signature")
    if not candidates:
        raise SignatureError("no v1 signature in Stripe-Signature")
    expected = sign(payload, secret, timestamp)
    # bytes, not str: compare_digest refuses text that is not ASCII (a forged header may be)
    given = [c.encode("utf-8", "replace") for c in candidates]
    if not any(hmac.compare_digest(expected.encode(), c) for c in given):
        raise SignatureError("signature does not match the payload")
    if abs(now - timestamp) > tolerance:
        raise SignatureError(f"signature timestamp outside the {tolerance} s tolerance")


def parse_event(payload: bytes) -> Event:
    try:
        body: Any = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventError("body is not JSON") from exc
    except RecursionError as exc:
        raise EventError("body is nested too deeply") from exc
    if not isinstance(body, dict):
        raise EventError("body is not a JSON object")
    event_id, event_type = body.get("id"), body.get("type")
    if not isinstance(event_id, str) or not event_id or not isinstance(event_type, str):
        raise EventError("event without id or type")
    data = body.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    obj = obj if isinstance(obj, dict) else {}
    meta = obj.get("metadata")
    metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    object_id = obj.get("id")
    return Event(event_id, event_type, object_id if isinstance(object_id, str) else None, metadata)


def next_status(
    event_type: str, current: InvoiceStatus, *, due_date: datetime, now: datetime
) -> InvoiceStatus | None:
    """The status an event moves a local invoice to, or None for no change."""
    if current in FINAL:
        return None
    target: InvoiceStatus | None
    if event_type == "invoice.paid":
        target = InvoiceStatus.paid
    elif event_type == "invoice.voided":
        target = InvoiceStatus.void
    elif event_type == "invoice.marked_uncollectible":
        target = InvoiceStatus.overdue
    elif event_type == "invoice.payment_failed":
        target = InvoiceStatus.overdue if now >= due_date else None
    else:
        target = None
    return None if target == current else target
