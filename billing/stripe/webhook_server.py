"""The Stripe webhook endpoint: a stdlib HTTP shell around ``billing.stripe.webhooks``.

Each delivery opens the billing DuckDB file for just that request (``Connect``, which waits
while another process holds the file lock), so the endpoint runs next to workers and the
billing job. Answers: 400 for a bad or stale signature or an unreadable event, 200 for an event
processed, already seen, about an unknown invoice, or of a type we ignore, 500 when the billing
file stays locked (Stripe then redelivers later).

Writes are ordered so a crash between them is harmless: the status change first, then the
event id. A redelivery after such a crash recomputes the same status and changes nothing.
"""

from __future__ import annotations

import io
import json
import logging
import resource
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import duckdb

from billing.model import Invoice, InvoiceStatus
from billing.stripe import state as stripe_state
from billing.stripe.state import Connect
from billing.stripe.webhooks import (
    DEFAULT_TOLERANCE,
    HANDLED,
    Event,
    EventError,
    SignatureError,
    next_status,
    parse_event,
    verify,
)
from common.errors import OperationError

# The logger's name is pinned: operators filter on it; it predates the module's move.
log = logging.getLogger("billing.webhook_server")

WEBHOOK_PATHS = frozenset({"/", "/webhooks/stripe"})
MAX_BODY = 1024 * 1024


class InvoiceStatusStore(Protocol):
    """What webhooks need from the invoice store (``billing.invoice_store``)."""

    def get_invoice(self, con: duckdb.DuckDBPyConnection, invoice_id: str) -> Invoice | None: ...

    def set_status_by_invoice_id(
        self, con: duckdb.DuckDBPyConnection, invoice_id: str, status: InvoiceStatus
    ) -> bool: ...


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, str]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class WebhookApp:
    """Verifies, deduplicates and applies one delivery; knows nothing about HTTP."""

    secret: str
    store: InvoiceStatusStore
    connect: Connect
    tolerance: int = DEFAULT_TOLERANCE
    clock: Callable[[], datetime] = _utcnow
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def handle(self, payload: bytes, signature: str | None) -> Reply:
        now = self.clock()
        try:
            verify(payload, signature, self.secret, now=now.timestamp(), tolerance=self.tolerance)
            event = parse_event(payload)
        except (SignatureError, EventError) as exc:
            log.warning("webhook rejected: %s", exc)
            return Reply(400, {"error": str(exc)})
        try:
            with self._lock:  # one delivery at a time: no write conflicts between threads
                outcome = self._apply(event, now)
        except (OperationError, duckdb.Error, OSError) as exc:
            log.error("webhook %s not processed: %s", event.event_id, exc)
            return Reply(500, {"error": "billing database unavailable, retry later"})
        log.info("webhook %s %s: %s", event.event_id, event.type, outcome)
        return Reply(200, {"status": outcome})

    def _apply(self, event: Event, now: datetime) -> str:
        with self.connect() as con:
            if stripe_state.event_seen(con, event.event_id):
                return "duplicate"
            invoice_id, outcome = self._route(con, event, now)
            stripe_state.record_event(con, event.event_id, event.type, invoice_id, outcome)
        return outcome

    def _route(
        self, con: duckdb.DuckDBPyConnection, event: Event, now: datetime
    ) -> tuple[str | None, str]:
        if event.type not in HANDLED:
            return None, "ignored"
        invoice_id = event.invoice_id
        if invoice_id is None and event.object_id is not None:
            invoice_id = stripe_state.invoice_id_for(con, event.object_id)
        invoice = self.store.get_invoice(con, invoice_id) if invoice_id else None
        if invoice is None:
            log.warning(
                "webhook %s: no local invoice for Stripe invoice %s (invoice_id %s)",
                event.event_id,
                event.object_id,
                invoice_id,
            )
            return invoice_id, "unknown_invoice"
        if event.object_id and invoice.stripe_invoice_id not in (None, event.object_id):
            log.warning(
                "webhook %s is about Stripe invoice %s, but %s was pushed as %s",
                event.event_id,
                event.object_id,
                invoice.invoice_id,
                invoice.stripe_invoice_id,
            )
            return invoice.invoice_id, "other_stripe_invoice"
        target = next_status(event.type, invoice.status, due_date=invoice.due_date, now=now)
        if target is None:
            return invoice.invoice_id, f"unchanged ({invoice.status.value})"
        self.store.set_status_by_invoice_id(con, invoice.invoice_id, target)
        return invoice.invoice_id, f"{invoice.status.value} -> {target.value}"


MAX_CONNECTIONS = 2048
"""Connections served at once (a thread each); more wait in the listen backlog."""
REQUEST_TIMEOUT = 10.0
"""Seconds a request may take to arrive whole (head and body), and a kept-alive connection
may stay idle, before the server closes it."""
BACKLOG = 1024
SPARE_FILES = 64
"""File descriptors kept free for the billing file and the process itself."""


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class WebhookServer(ThreadingHTTPServer):
    """Bounded: at most ``max_connections`` at once (never more than the open-file limit
    allows), each closed once a request has taken ``request_timeout`` seconds to arrive or
    it idled that long; a listen backlog of ``BACKLOG``."""

    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        app: WebhookApp,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        super().__init__(address, _Handler)
        self.app = app
        self.request_timeout = request_timeout
        files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if files != resource.RLIM_INFINITY:
            max_connections = max(1, min(max_connections, files - SPARE_FILES))
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        self._slots.acquire()  # full: the accept loop waits, new connections queue
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _DeadlineReader(io.RawIOBase):
    """Reads a socket, each read given only what is left of the request's time."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = time.monotonic()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request took too long to arrive")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class KeepAliveHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive with TCP_NODELAY: headers and body go out in separate writes, and
    without it Nagle's algorithm and delayed ACKs hold back every keep-alive response."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Handler(KeepAliveHandler):
    """Every read of a request is bounded by what is left of its ``request_timeout``."""

    server: WebhookServer

    def setup(self) -> None:
        super().setup()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.server.request_timeout
        super().handle_one_request()

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] not in WEBHOOK_PATHS:
            self._send(404, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True  # the unread body must not be taken for a request
            self._send(411, {"error": "Content-Length required"})
            return
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._send(413, {"error": "body too large"})
            return
        payload = self.rfile.read(length)
        if len(payload) < length:
            self.close_connection = True
            return  # the client went away mid-body
        self.connection.settimeout(self.server.request_timeout)  # for the answer
        try:
            reply = self.server.app.handle(payload, self.headers.get("Stripe-Signature"))
        except Exception:  # a bug must still get an answer (Stripe then redelivers)
            log.exception("webhook not processed")
            reply = Reply(500, {"error": "internal error, retry later"})
        self._send(reply.status, reply.body)

    def _send(self, status: int, body: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)
