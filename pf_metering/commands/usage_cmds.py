"""``usage`` (one tenant's totals in a period, with quota utilisation), ``usage correct``
(one correction event, signed deltas, to Kafka) and ``export-metrics`` (every tenant's
usage as Prometheus text)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from billing import invoicing
from billing.rating import quota_report
from billing.render.invoice_json import quota_json
from billing.tiers import get_tier
from common.errors import UserError
from pf_metering.commands.books import billing, quotas_table, read_usage, right, tenant_period
from pf_metering.commands.common import (
    FORMAT_OPTION,
    NUMBERS_AS_ARGUMENTS,
    OUTPUT_OPTION,
    PERIOD_ARGUMENT,
    TENANT_ARGUMENT,
    check_tenant,
    output_path,
    parse_period,
    settings_of,
)
from pf_metering.output import Format, printable, readable, render, write
from schemas.codec import COUNTERS
from schemas.periods import oldest_billable_start
from schemas.validation import CORRECTION, MAX_ID_LEN, MAX_REASON_LEN


class UsageGroup(TyperGroup):
    """``usage T P`` shows totals (the command ``show``, implied); ``usage correct ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["show", *args]
        return super().parse_args(ctx, args)


usage_app = typer.Typer(
    cls=UsageGroup,
    help="A tenant's totals in a period (`usage T P`, i.e. `usage show T P`); `usage correct` "
    "produces a correction.",
)


def usage_cmd(
    ctx: typer.Context,
    tenant_id: str = TENANT_ARGUMENT,
    period: str = PERIOD_ARGUMENT,
    fmt: Format = FORMAT_OPTION,
    output: Path = OUTPUT_OPTION,
) -> None:
    """Usage totals of a tenant in a period, with quota utilisation for its tier."""
    cfg = settings_of(ctx)
    asked = tenant_period(cfg, tenant_id, period)
    usage, target = asked.usage, asked.period
    with billing(cfg) as con:
        tenant = invoicing.known_tenant(con, usage, tenant_id)
    tier = get_tier(asked.rules.tiers, tenant.tier_for(target))
    row = usage.row(tenant_id, target) or {}
    quotas = quota_report(tier, usage.usage(tenant_id, target))
    data: dict[str, Any] = {"tenant_id": tenant_id, "period": str(target), "tier": tier.name}
    for key in ("events", "sessions", *COUNTERS):
        data[key] = int(row.get(key) or 0)
    data["risk_score_avg"] = row.get("risk_score_avg")
    data["risk_score_max"] = row.get("risk_score_max")
    data["quotas"] = [quota_json(q) for q in quotas]

    def csv_rows() -> list[dict[str, Any]]:
        flat = {k: v for k, v in data.items() if k != "quotas"}
        for q in data["quotas"]:
            flat[f"quota_{q['quota']}_pct"] = q["utilisation_pct"]
            flat[f"quota_{q['quota']}_exceeded"] = q["exceeded"]
        return [flat]

    def table() -> Table:
        grid = Table.grid(padding=(1, 0))
        facts = Table(title="Usage")
        facts.add_column("metric")
        right(facts, "value")
        for key, value in data.items():
            if key in ("tenant_id", "period", "tier"):
                facts.add_row(key, value)
            elif key != "quotas":
                facts.add_row(key, "-" if value is None else readable(value))
        grid.add_row(facts)
        grid.add_row(quotas_table(quotas, "Quotas"))
        return grid

    render(fmt, output_path(output), json_data=data, csv_rows=csv_rows, table=table)


def export_metrics(
    ctx: typer.Context,
    output: Path = OUTPUT_OPTION,
    base_units: bool = typer.Option(
        False, "--base-units", help="CPU only in seconds (leaves out pf_usage_cpu_ms_total)"
    ),
) -> None:
    """Per-tenant, per-period usage in Prometheus text exposition format."""
    from billing.render.prometheus_export import exposition  # only this command needs the library

    out = output_path(output)
    usage = read_usage(settings_of(ctx))
    write(exposition(usage.rows.values(), base_units=base_units), out)


MIB = 1_048_576  # network is priced and shown per MiB
_COUNTER_OPTIONS = {name: "--" + name.replace("_", "-") for name in COUNTERS}
_AVRO_LONG = (-(2**63), 2**63 - 1)


def _delta(option: str, value: int | None) -> int:
    if value is None:
        return 0
    if not _AVRO_LONG[0] <= value <= _AVRO_LONG[1]:
        raise UserError(f"{option} {value} is out of range: -2^63 to 2^63-1")
    return value


def _network_bytes(mb: str | None, raw: int | None) -> int:
    """The network delta in bytes, from ``--network-mb`` (MiB, decimal) or ``--network-bytes``."""
    if mb is None:
        return _delta("--network-bytes", raw)
    if raw is not None:
        raise UserError("give --network-mb or --network-bytes, not both")
    try:
        value = Decimal(mb) * MIB
    except InvalidOperation as exc:
        raise UserError(f"--network-mb {mb[:40]!r} is not a number of MiB") from exc
    if not value.is_finite() or value != value.to_integral_value():
        raise UserError(f"--network-mb {mb[:40]!r} is not a whole number of bytes ({MIB} a MiB)")
    return _delta("--network-mb", int(value))


def _text(option: str, value: str | None, most: int, required: bool) -> str | None:
    if value is None and not required:
        return None
    if value is None or not value.strip() or len(value) > most:
        raise UserError(f"{option} must be 1-{most} characters, not blank")
    return value


def usage_correct(
    ctx: typer.Context,
    tenant_id: str = TENANT_ARGUMENT,
    period: str = PERIOD_ARGUMENT,
    cpu_ms: int = typer.Option(None, "--cpu-ms", help="signed delta of cpu_ms"),
    network_mb: str = typer.Option(None, "--network-mb", help="signed delta in MiB (1,048,576 B)"),
    network_bytes: int = typer.Option(None, "--network-bytes", help="signed delta in bytes"),
    api_calls: int = typer.Option(None, "--api-calls", help="signed delta"),
    tool_executions: int = typer.Option(None, "--tool-executions", help="signed delta"),
    data_retrievals: int = typer.Option(None, "--data-retrievals", help="signed delta"),
    egress_scans: int = typer.Option(None, "--egress-scans", help="signed delta"),
    policy_checks: int = typer.Option(None, "--policy-checks", help="signed delta"),
    violations: int = typer.Option(None, "--violations", help="signed delta"),
    corrects: str = typer.Option(None, "--corrects", help="event_id of the event it corrects"),
    reason: str = typer.Option(None, "--reason", help="why (required, at most 1000 characters)"),
    event_id: str = typer.Option(
        None, "--event-id", help="the correction's own id (default: a new UUID; reuse to retry)"
    ),
) -> None:
    """Produce one correction event for TENANT_ID in PERIOD: signed deltas of its counters.

    The workers apply it whole, or dead-letter it (`negative_total`) if it would take any
    of the tenant's totals for the period below zero. It is not an event for `events`,
    `sessions` or the risk score.
    """
    check_tenant(tenant_id)
    target = parse_period(period)
    cfg = settings_of(ctx)
    now = datetime.now(UTC)
    oldest = oldest_billable_start(int(now.timestamp() * 1_000_000), cfg.metering_late_usage_months)
    start = int(target.start.timestamp()) * 1_000_000
    if oldest is not None and start < oldest:
        raise UserError(
            f"period {target} can no longer be billed (METERING_LATE_USAGE_MONTHS="
            f"{cfg.metering_late_usage_months}): a correction of it would be dead-lettered"
        )
    given = {
        "cpu_ms": cpu_ms, "api_calls": api_calls, "tool_executions": tool_executions,
        "data_retrievals": data_retrievals, "egress_scans": egress_scans,
        "policy_checks": policy_checks, "violations": violations,
    }  # fmt: skip
    deltas = {name: _delta(_COUNTER_OPTIONS[name], value) for name, value in given.items()}
    deltas["network_bytes"] = _network_bytes(network_mb, network_bytes)
    if not any(deltas.values()):
        raise UserError(
            "no counter to correct: give at least one non-zero delta (--cpu-ms, --network-mb, "
            "--network-bytes, --api-calls, --tool-executions, --data-retrievals, "
            "--egress-scans, --policy-checks, --violations)"
        )
    why = _text("--reason", reason, MAX_REASON_LEN, required=True)
    target_id = _text("--corrects", corrects, MAX_ID_LEN, required=False)
    own_id = _text("--event-id", event_id, MAX_ID_LEN, required=False) or str(uuid.uuid4())
    usage = read_usage(cfg, tenant_id)
    with billing(cfg) as con:
        invoicing.known_tenant(con, usage, tenant_id)
    from pf_metering.commands.produce import emitter_for, flush  # the Kafka client: only here

    emitter = emitter_for(cfg)
    emitter.emit(
        {
            "event_id": own_id, "tenant_id": tenant_id, "session_id": "correction",
            "source": "pf-metering", "occurred_at": start, **deltas, "risk_score": None,
            "kind": CORRECTION, "corrects_event_id": target_id, "reason": why,
        }
    )  # fmt: skip
    flush(emitter, cfg)
    changed = ", ".join(f"{name} {value:+d}" for name, value in deltas.items() if value)
    print(
        f"correction {printable(own_id)} sent for {tenant_id} in {target} to "
        f"{cfg.metering_topic}: {changed} (applied by the workers unless a total would go "
        "below zero: then it is a negative_total dead letter)"
    )


def register(app: typer.Typer) -> None:
    usage_app.command("show")(usage_cmd)
    usage_app.command("correct", context_settings=NUMBERS_AS_ARGUMENTS)(usage_correct)
    app.add_typer(usage_app, name="usage")
    app.command("export-metrics")(export_metrics)
