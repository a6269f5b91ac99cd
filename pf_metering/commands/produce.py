"""``simulate-usage``: realistic events for one tenant, sent through the Emitter; and the
emitter set-up and flush every command that produces events shares."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from datetime import UTC, datetime

import typer

from common.errors import OperationError, UserError
from common.settings import Settings
from emitter.emitter import DeliveryFailed, Emitter
from emitter.simulate import simulate_sessions
from pf_metering.broker import require_broker
from pf_metering.commands.common import (
    NUMBERS_AS_ARGUMENTS,
    QUIET_OPTION,
    check_tenant,
    parse_period,
    settings_of,
)
from pf_metering.progress import progress_bar
from schemas.codec import COUNTERS
from schemas.periods import Period


def emitter_for(cfg: Settings) -> Emitter:
    """An emitter to the usage topic, once the broker answers (``require_broker``)."""
    require_broker(cfg)
    config = {**cfg.kafka_common(), "logger": logging.getLogger("rdkafka")}  # (repeats dropped)
    return Emitter(cfg.kafka_bootstrap_servers, cfg.metering_topic, config=config)


def flush(emitter: Emitter, cfg: Settings) -> None:
    """Wait for every event ``emitter`` queued; a broker that did not take them all is one
    OperationError (naming the settings when it refused the client)."""
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
    now = datetime.now(UTC)
    target = parse_period(period, "--period", now=now) if period is not None else Period.of(now)
    cfg = settings_of(ctx)
    emitter = emitter_for(cfg)
    totals: Counter[str] = Counter()
    events = 0
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
        flush(emitter, cfg)
    summary = ", ".join(f"{k}={totals[k]}" for k in COUNTERS)
    print(
        f"sent {events} events for {sessions} sessions of {tenant_id} in {target} "
        f"to {cfg.metering_topic}: {summary}",
        file=sys.stderr,
    )


def register(app: typer.Typer) -> None:
    app.command("simulate-usage", context_settings=NUMBERS_AS_ARGUMENTS)(simulate_usage)
