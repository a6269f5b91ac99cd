"""Stripe from the command line: ``webhooks serve``, and the push used by ``bill --stripe`` and
``generate-invoice --stripe`` (``stripe_requested`` then ``push_to_stripe``).

The invoice store is imported where it is used, so the rest of the CLI never depends on it.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Protocol

import typer

from billing.model import Invoice
from billing.stripe.webhook_server import (
    InvoiceStatusStore,
    WebhookApp,
    WebhookServer,
    raise_open_file_limit,
)
from common.errors import OperationError, UserError
from common.settings import Settings
from pf_metering.commands.common import billing_connect, settings_of

webhooks_app = typer.Typer(help="The Stripe webhook endpoint.", no_args_is_help=True)


if TYPE_CHECKING:  # stripe-python takes seconds to import: only the push loads it
    from billing.stripe.push import PushResult, SentMarker

    class InvoiceStore(SentMarker, InvoiceStatusStore, Protocol):
        """What Stripe needs from ``billing.invoice_store``."""


def _invoice_store() -> InvoiceStore:
    from billing import invoice_store

    return invoice_store


class PushFailed(OperationError):
    """Some invoices failed to push to Stripe (each one's outcome was printed)."""


def stripe_requested(cfg: Settings, flag: bool) -> bool:
    """``--stripe`` on the command line, or ``STRIPE_ENABLED=true`` in the settings."""
    return flag or cfg.stripe_enabled


def push_to_stripe(
    cfg: Settings,
    invoices: Sequence[Invoice],
    store: SentMarker | None = None,
    *,
    quiet: bool = False,
) -> list[PushResult]:
    """``push_invoices``, then ``PushFailed`` if any failed."""
    results = push_invoices(cfg, invoices, store, quiet=quiet)
    raise_if_failed(results)
    return results


def push_invoices(
    cfg: Settings,
    invoices: Sequence[Invoice],
    store: SentMarker | None = None,
    *,
    quiet: bool = False,
) -> list[PushResult]:
    """Push invoices (``bill`` passes every finalized one, so a rerun resumes earlier pushes)
    and print one line per invoice on stderr (``quiet``: failures only)."""
    from billing.stripe.gateway import StripeGateway
    from billing.stripe.push import PushOutcome, StripePusher

    gateway = StripeGateway.from_settings(cfg)
    pusher = StripePusher(gateway, store or _invoice_store(), billing_connect(cfg))
    results = pusher.push_all(invoices)
    for r in results:
        if r.outcome is PushOutcome.failed:
            line = f"stripe: {r.invoice_id} ({r.tenant_id}) failed: {r.error}"
        elif quiet:
            continue
        else:
            line = (
                f"stripe: {r.invoice_id} ({r.tenant_id}) {r.outcome.value} as {r.stripe_invoice_id}"
            )
        print(line, file=sys.stderr)
    return results


def void_in_stripe(cfg: Settings, invoice: Invoice, *, pending: bool = False) -> bool:
    """Void (void locally) ``invoice`` in Stripe, printing the outcome on stderr; ``PushFailed``
    if that failed (a rerun resumes). ``pending``: only if an earlier void left it undone
    (False when there was nothing to resume)."""
    from billing.stripe.gateway import StripeGateway
    from billing.stripe.voiding import StripeVoider

    voider = StripeVoider(StripeGateway.from_settings(cfg), billing_connect(cfg))
    if pending and not voider.pending(invoice):
        return False
    result = voider.void(invoice)
    head = f"stripe: {invoice.invoice_id} ({invoice.tenant_id})"
    if result.action is None:
        print(f"{head} failed: {result.error}", file=sys.stderr)
        raise PushFailed(
            f"invoice {invoice.invoice_id} is void, but voiding it in Stripe failed; rerun "
            f"`invoices void {invoice.invoice_id} --reason TEXT --stripe` (or `bill --stripe`) "
            "to resume"
        )
    done = {
        "voided": f"voided in Stripe as {result.stripe_invoice_id}",
        "credited": f"paid in Stripe: credit note {result.credit_note_id} for its total",
        "deleted": "its Stripe draft deleted",
        "absent": "never reached Stripe: nothing to void there",
    }
    print(f"{head} {done[result.action.value]}", file=sys.stderr)
    return True


def raise_if_failed(results: Sequence[PushResult]) -> None:
    """``PushFailed`` naming every invoice that failed to push, if any did."""
    failed = [r.invoice_id for r in results if not r.ok]
    if failed:
        raise PushFailed(
            f"{len(failed)} of {len(results)} invoices failed to push to Stripe: "
            + ", ".join(failed)
        )


@webhooks_app.command("serve")
def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8788, "--port", min=0, max=65535, help="port (0: any free one)"),
) -> None:
    """Receive Stripe webhooks: verify signatures and move local invoice statuses."""
    cfg = settings_of(ctx)
    if cfg.stripe_webhook_secret is None or not cfg.stripe_webhook_secret.get_secret_value():
        raise UserError("STRIPE_WEBHOOK_SECRET is not set; it is needed to verify webhooks")
    app = WebhookApp(
        cfg.stripe_webhook_secret.get_secret_value(), _invoice_store(), billing_connect(cfg)
    )
    raise_open_file_limit()  # a connection is a file: take what the hard limit allows
    try:
        server = WebhookServer((host, port), app)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"listening on {server.url}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("stopped", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.add_typer(webhooks_app, name="webhooks")
