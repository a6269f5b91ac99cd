"""Fixtures for the Stripe tests: stripe-mock, our stateful fake Stripe, a DuckDB-backed
stand-in for the invoice store, sample invoices and real webhook signatures.

Test modules import what they use from here; a fixture ``x`` is defined as ``x_fixture`` with
``name="x"``, so importing ``x_fixture`` registers it without shadowing the argument name.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path

import duckdb
import pytest

from billing.db import billing_db
from billing.model import Invoice, InvoiceLine, InvoiceStatus
from billing.stripe.gateway import RetryPolicy, StripeGateway
from billing.stripe.push import StripePusher
from billing.stripe.state import Connect
from schemas.periods import Period
from tests.stripe_server import FakeStripe, running

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk_test_pfmetering0123456789abcdefSECRET"
WEBHOOK_SECRET = "whsec_pfmetering0123456789abcdefSECRET"


# --- stripe-mock ---------------------------------------------------------------------------


def stripe_mock_binary() -> Path | None:
    local = REPO / ".cache" / "bin" / "stripe-mock"
    if local.is_file():
        return local
    found = shutil.which("stripe-mock")
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"stripe-mock exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"stripe-mock did not listen on {port}: {log.read_text()[-2000:]}")


@contextmanager
def run_stripe_mock(binary: Path) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "stripe-mock.log"
        port = _free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(binary), "-http-port", str(port), "-strict-version-check"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_listening(port, proc, log)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture(scope="session", name="stripe_mock_url")
def stripe_mock_url_fixture() -> Iterator[str]:
    """The official stripe-mock: ``STRIPE_MOCK_URL`` if set, else the binary started here.

    Missing both is a failure, not a skip: the contract tests are the proof that our requests
    are valid Stripe requests."""
    url = os.environ.get("STRIPE_MOCK_URL")
    if url:
        yield url.rstrip("/")
        return
    binary = stripe_mock_binary()
    if binary is None:
        pytest.fail(
            "stripe-mock not found: run `make stripe-mock` (builds it with Go into "
            ".cache/bin) or set STRIPE_MOCK_URL to a running stripe-mock",
            pytrace=False,
        )
    with run_stripe_mock(binary) as base:
        yield base


# --- our fake Stripe and the push ------------------------------------------------------------


@pytest.fixture(name="fake_stripe")
def fake_stripe_fixture() -> Iterator[FakeStripe]:
    fake = FakeStripe(api_key=API_KEY)
    with running(fake):
        yield fake


@dataclass
class Sleeps:
    """Records backoff pauses instead of sleeping: retry tests never wait or time anything."""

    pauses: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)


def make_gateway(
    url: str, *, attempts: int = 1, sleeps: Sleeps | None = None, api_key: str = API_KEY
) -> StripeGateway:
    gateway = StripeGateway.connect(
        api_key, url, RetryPolicy(max_attempts=attempts, base_delay=0.001, max_delay=0.01)
    )
    gateway.sleep = sleeps or Sleeps()
    return gateway


class DuckInvoiceStore:
    """A stand-in for ``billing.invoice_store`` on a real DuckDB table (same signatures)."""

    DDL = (
        "CREATE TABLE IF NOT EXISTS test_invoices (invoice_id VARCHAR PRIMARY KEY, "
        "status VARCHAR NOT NULL, stripe_invoice_id VARCHAR, doc VARCHAR NOT NULL)"
    )

    def add(self, con: duckdb.DuckDBPyConnection, invoice: Invoice) -> None:
        con.execute(self.DDL)
        con.execute(
            "INSERT OR REPLACE INTO test_invoices VALUES (?, ?, ?, ?)",
            [
                invoice.invoice_id,
                invoice.status.value,
                invoice.stripe_invoice_id,
                invoice.model_dump_json(),
            ],
        )

    def mark_sent(
        self, con: duckdb.DuckDBPyConnection, invoice_id: str, stripe_invoice_id: str
    ) -> None:
        con.execute(
            "UPDATE test_invoices SET status = 'sent', stripe_invoice_id = ? WHERE invoice_id = ?",
            [stripe_invoice_id, invoice_id],
        )

    def set_status_by_invoice_id(
        self, con: duckdb.DuckDBPyConnection, invoice_id: str, status: InvoiceStatus
    ) -> bool:
        row = con.execute(
            "UPDATE test_invoices SET status = ? WHERE invoice_id = ? RETURNING invoice_id",
            [status.value, invoice_id],
        ).fetchone()
        return row is not None

    def get_invoice(self, con: duckdb.DuckDBPyConnection, invoice_id: str) -> Invoice | None:
        con.execute(self.DDL)
        row = con.execute(
            "SELECT status, stripe_invoice_id, doc FROM test_invoices WHERE invoice_id = ?",
            [invoice_id],
        ).fetchone()
        if row is None:
            return None
        invoice = Invoice.model_validate_json(row[2])
        return invoice.model_copy(
            update={"status": InvoiceStatus(row[0]), "stripe_invoice_id": row[1]}
        )


@dataclass
class LocalBilling:
    """The billing DuckDB file of one test, with the invoice store stand-in."""

    path: Path
    store: DuckInvoiceStore = field(default_factory=DuckInvoiceStore)

    @property
    def connect(self) -> Connect:
        return partial(billing_db, self.path, 10.0)

    def add(self, *invoices: Invoice) -> None:
        with self.connect() as con:
            for invoice in invoices:
                self.store.add(con, invoice)

    def get(self, invoice_id: str) -> Invoice:
        with self.connect() as con:
            invoice = self.store.get_invoice(con, invoice_id)
        assert invoice is not None, invoice_id
        return invoice

    def pusher(self, gateway: StripeGateway) -> StripePusher:
        return StripePusher(gateway, self.store, self.connect)

    @contextmanager
    def warm(self) -> Iterator[LocalBilling]:
        """Keep the DuckDB instance alive in this process while the block runs.

        Starting a DuckDB instance costs ~20 ms and the push opens the file after every Stripe
        call; with one connection held here, in-process opens reuse the instance (<1 ms). Only
        for flow tests: the webhook tests check the file is free between requests."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keeper = duckdb.connect(str(self.path))
        try:
            yield self
        finally:
            keeper.close()


@pytest.fixture(name="local_billing")
def local_billing_fixture(tmp_path: Path) -> Iterator[LocalBilling]:
    with LocalBilling(tmp_path / "billing.duckdb").warm() as billing:
        yield billing


def make_invoice(
    tenant_id: str,
    period: str,
    lines: Sequence[tuple[str, str]],
    *,
    status: InvoiceStatus = InvoiceStatus.finalized,
    due_days: int = 30,
) -> Invoice:
    """An invoice with the given (code, amount) lines, as the billing engine would make it."""
    p = Period.parse(period)
    built = [
        InvoiceLine(
            code=code,
            description=f"{code} for {period}",
            quantity=Decimal(1),
            unit_price=Decimal(amount),
            amount=Decimal(amount),
            period="2024-12" if code == "late_usage" else None,
        )
        for code, amount in lines
    ]
    total = sum((line.amount for line in built), Decimal("0.00"))
    subtotal = sum(
        (line.amount for line in built if line.code != "risk_adjustment"), Decimal("0.00")
    )
    finalized = p.end + timedelta(hours=2)
    return Invoice(
        invoice_id=f"inv-{tenant_id}-{period}",
        tenant_id=tenant_id,
        period=period,
        period_start=p.start,
        period_end=p.end,
        tier="basic",
        status=status,
        lines=built,
        subtotal=subtotal,
        total=total,
        due_date=p.due_date(due_days),
        created_at=finalized,
        finalized_at=finalized,
    )


def sample_invoices() -> list[Invoice]:
    """Two tenants, three invoices: zero lines (skipped), a negative risk adjustment, late usage."""
    return [
        make_invoice(
            "acme",
            "2025-01",
            [
                ("base", "50.00"),
                ("cpu", "0.36"),
                ("network", "0.05"),
                ("api_calls", "0.10"),
                ("tool_executions", "0.50"),
                ("data_retrievals", "0.13"),
                ("egress_scans", "0.02"),
                ("policy_checks", "0.00"),
                ("violations", "2.00"),
                ("risk_adjustment", "-0.53"),
            ],
        ),
        make_invoice("acme", "2025-02", [("base", "50.00"), ("risk_adjustment", "0.00")]),
        make_invoice(
            "globex.eu",
            "2025-01",
            [("base", "200.00"), ("api_calls", "12.34"), ("late_usage", "3.10")],
        ),
    ]


# --- webhooks ------------------------------------------------------------------------------


def stripe_signature(payload: bytes, secret: str, timestamp: int) -> str:
    """A ``Stripe-Signature`` header as Stripe sends it, computed here independently."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)
