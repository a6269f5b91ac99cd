"""``bill``: the nightly job (``billing.nightly``) from the command line."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import typer

from billing import nightly
from billing.invoicing import Rules
from common.errors import UserError
from pf_metering.commands.books import STRIPE_OPTION, read_usage, utc_now
from pf_metering.commands.common import QUIET_OPTION, billing_connect, output_path, settings_of
from pf_metering.commands.stripe_cmds import (
    PushFailed,
    push_invoices,
    raise_if_failed,
    stripe_requested,
    void_in_stripe,
)
from pf_metering.progress import status
from schemas.periods import Period


def _parse_as_of(text: str | None, now: datetime) -> datetime:
    if text is None:
        return now
    try:
        moment = datetime.fromisoformat(text.strip())
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise UserError(
            f"invalid --as-of {text[:40]!r}: expected ISO-8601, e.g. 2025-02-01T02:00:00Z"
        ) from exc
    if moment > now:
        raise UserError(f"--as-of {text} lies in the future")
    if moment.year < 1970:  # no period before 1970 exists; earlier instants overflow
        raise UserError(f"--as-of {text[:40]} lies before 1970")
    return moment


def _announce(targets: Mapping[str, list[Period]]) -> None:
    for line in nightly.plan(targets):
        print(line, file=sys.stderr)


def bill(
    ctx: typer.Context,
    as_of: str = typer.Option(
        None, "--as-of", help="close periods as of this ISO-8601 time (default: now)"
    ),
    stripe: bool = STRIPE_OPTION,
    quiet: bool = QUIET_OPTION,
    metrics_file: Path = typer.Option(
        None, "--metrics-file", help="write job metrics here (node-exporter textfile)"
    ),
) -> None:
    """The nightly job: finalize every closed, not yet invoiced period of every tenant (from its
    first period, base fee even without usage; a period whose invoice was voided: a new one
    that replaces it), with late-usage corrections; then push (and finish voiding in Stripe
    what an interrupted `invoices void` or `reissue` left undone); in cluster
    mode, then maintain the lake (``lake maintain``)."""
    cfg = settings_of(ctx)
    now = utc_now()
    moment = _parse_as_of(as_of, now)
    connect = billing_connect(cfg)
    metrics_path = output_path(metrics_file, "--metrics-file")  # before billing, not after
    unvoided: list[str] = []
    with nightly.recorded(metrics_path) as run:
        usage = read_usage(cfg, quiet=quiet)
        rules = Rules.from_settings(cfg)
        with status(f"billing {len(usage.rows)} tenant-periods of usage", quiet):
            result = nightly.finalize(
                connect, usage, rules, as_of=moment, now=now, on_plan=None if quiet else _announce
            )
        run.finalized, run.failures = len(result.invoices), result.failures
        for failure in result.failures:  # quiet or not: the job fails because of these
            print(f"not billed: {failure}", file=sys.stderr)
        if not quiet:
            print(nightly.summary(result), file=sys.stderr)
        if stripe_requested(cfg, stripe):
            run.pushes = push_invoices(cfg, nightly.unsent(connect), quiet=quiet)
            for invoice in nightly.unvoided(connect):
                try:
                    void_in_stripe(cfg, invoice, pending=True)
                except PushFailed:
                    unvoided.append(invoice.invoice_id)
    if cfg.cluster_mode:
        with status("maintaining the lake", quiet):
            maintained = nightly.maintain_lake(cfg, now)
        if not quiet:
            print(maintained.summary(), file=sys.stderr)
    nightly.raise_if_not_billed(run.failures)
    raise_if_failed(run.pushes)
    if unvoided:
        raise PushFailed(f"voiding in Stripe failed for {', '.join(unvoided)} (rerun to resume)")


def register(app: typer.Typer) -> None:
    app.command("bill")(bill)
