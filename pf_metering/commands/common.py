"""What commands share: the settings the CLI read, and the parsing of periods, tenant ids,
formats and output files."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from billing.db import Connect, billing_db
from common.errors import UserError
from common.settings import Settings, load_settings
from pf_metering.output import Format
from schemas.periods import Period
from schemas.validation import TENANT_RE

FORMAT_OPTION = typer.Option(Format.table, "-f", "--format", help="table, json or csv")
OUTPUT_OPTION = typer.Option(None, "-o", "--output", help="write to this file")
QUIET_OPTION = typer.Option(False, "--quiet", "-q", help="no progress output")
TENANT_ARGUMENT = typer.Argument(..., help="tenant identifier")
PERIOD_ARGUMENT = typer.Argument(..., help="billing period, YYYY-MM")


def settings_of(ctx: typer.Context) -> Settings:
    """The settings the CLI read once at start (the click context's object)."""
    cfg = ctx.find_object(Settings)
    if cfg is None:  # a command invoked on its own: read them once, for the whole run
        cfg = ctx.find_root().obj = load_settings()
    return cfg


def billing_connect(cfg: Settings) -> Connect:
    """Opens the billing file of ``cfg`` for one unit of work."""
    return partial(billing_db, cfg.billing_db, cfg.metering_lock_timeout)


def parse_period(text: str) -> Period:
    try:
        return Period.parse(text)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def check_tenant(tenant_id: str) -> str:
    if not TENANT_RE.match(tenant_id):
        raise UserError(
            f"invalid tenant id {tenant_id[:64]!r}: letters, digits and . _ : - only, "
            "starting with a letter or digit, at most 128 characters"
        )
    return tenant_id


def output_path(path: Path | None) -> Path | None:
    if path is not None and path.parent and not path.parent.exists():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    return path
