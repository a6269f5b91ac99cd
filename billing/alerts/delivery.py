"""Posting one alert to ``METERING_ALERT_URL``, signed like Stripe's webhooks.

Header ``Pf-Metering-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` with
``METERING_ALERT_SECRET`` (verify it as you would ``Stripe-Signature``), and
``Pf-Metering-Event-Id`` (also the body's ``id``: deduplicate on it). A 2xx is delivered;
anything else (another status, a timeout, a refused or broken connection) is a failed attempt,
retried later with exponential backoff. Redirects are not followed. Nothing said about a
failure names more of the URL than its host and port (a path or query may hold a token).
"""

from __future__ import annotations

import http.client
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from pydantic import SecretStr

from billing.backoff import RetryPolicy
from billing.stripe.webhooks import sign

SIGNATURE_HEADER = "Pf-Metering-Signature"
EVENT_ID_HEADER = "Pf-Metering-Event-Id"
RETRY = RetryPolicy(max_attempts=0, base_delay=1.0, max_delay=300.0)
"""Between attempts: 0.5-1 s after the first failure, doubling, at most 5 minutes (there is no
last attempt: an alert is retried until it is delivered)."""


def signature(payload: bytes, secret: str, timestamp: int) -> str:
    """The signature header's value for ``payload`` sent at ``timestamp``."""
    return f"t={timestamp},v1={sign(payload, secret, timestamp)}"


@dataclass(frozen=True)
class Outcome:
    """What one attempt did: delivered (a 2xx), or why not."""

    delivered: bool
    error: str | None = None


@dataclass
class Endpoint:
    """Where alerts go and how they are signed."""

    url: str
    secret: SecretStr
    timeout: float
    retry: RetryPolicy = RETRY
    rng: random.Random = field(default_factory=random.Random)

    @property
    def where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"

    def retry_at(self, failed_attempts: int, now: datetime) -> datetime:
        return now + timedelta(seconds=self.retry.delay(failed_attempts, self.rng))

    def post(self, event_id: str, payload: bytes, now: datetime) -> Outcome:
        """One attempt at delivering ``payload``."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        secure = parts.scheme == "https"
        kind = http.client.HTTPSConnection if secure else http.client.HTTPConnection
        conn = kind(host, parts.port, timeout=self.timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "pf-metering-alerts",
            SIGNATURE_HEADER: signature(
                payload, self.secret.get_secret_value(), int(now.timestamp())
            ),
            EVENT_ID_HEADER: event_id,
        }
        try:
            conn.request("POST", target, body=payload, headers=headers)
            response = conn.getresponse()
            response.read(65_536)
        except TimeoutError:
            return Outcome(False, f"no answer from {self.where} within {self.timeout:g} s")
        except (OSError, http.client.HTTPException) as exc:
            return Outcome(False, f"cannot post to {self.where}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()
        if 200 <= response.status < 300:
            return Outcome(True)
        return Outcome(False, f"HTTP {response.status} from {self.where}")
