"""``simulate-usage``: realistic events for one tenant, sent through the Emitter."""

from __future__ import annotations

import sys
from collections import Counter
from datetime import UTC, datetime

import typer

from common.errors import OperationError, UserError
from emitter.emitter import DeliveryFailed, Emitter
from emitter.simulate import simulate_sessions
from pf_metering.commands.common import QUIET_OPTION, check_tenant, parse_period, settings_of
from pf_metering.progress import progress_bar
from schemas.codec import COUNTERS
from schemas.periods import Period


def simulate_usage(
    ctx: typer.Context,
    tenant_id: str = typer.Argument(..., help="tenant identifier, e.g. acme-corp"),
    sessions: int = typer.Argument(..., help="number of sessions to simulate"),
    period: str = typer.Option(None, "--period", help="YYYY-MM (default: this month)"),
    seed: int = typer.Option(None, "--seed", help="random seed: same seed, same events"),
    quiet: bool = QUIET_OPTION,
) -> None:
    """Produce realistic usage events for SESSIONS sessions of TENANT_ID to Kafka."""
    check_tenant(tenant_id)
    if sessions < 0:
        raise UserError("SESSIONS must be zero or more")
    target = parse_period(period) if period else Period.of(datetime.now(UTC))
    if target.start > datetime.now(UTC):
        raise UserError(f"period {target} lies in the future; events may not")
    cfg = settings_of(ctx)
    totals: Counter[str] = Counter()
    events = 0
    emitter = Emitter(cfg.kafka_bootstrap_servers, cfg.metering_topic, config=cfg.kafka_common())
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"simulating {tenant_id}", total=sessions)
        last_session = None
        for event in simulate_sessions(tenant_id, sessions, target, seed):
            emitter.emit(event)
            events += 1
            totals.update({k: event[k] for k in COUNTERS})
            if event["session_id"] != last_session:
                last_session = event["session_id"]
                bar.advance(task)
        try:
            emitter.flush()
        except DeliveryFailed as exc:
            if exc.refused:
                raise OperationError(
                    f"Kafka at KAFKA_BOOTSTRAP_SERVERS {cfg.kafka_bootstrap_servers} refused "
                    "the client (see KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*, KAFKA_SSL_*): "
                    f"{exc.refused}"
                ) from exc
            raise OperationError(str(exc)) from exc
    summary = ", ".join(f"{k}={totals[k]}" for k in COUNTERS)
    print(
        f"sent {events} events for {sessions} sessions of {tenant_id} in {target} "
        f"to {cfg.metering_topic}: {summary}",
        file=sys.stderr,
    )


def register(app: typer.Typer) -> None:
    app.command("simulate-usage")(simulate_usage)
