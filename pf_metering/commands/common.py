"""What commands share: the settings the CLI read, and one set of rules for their
arguments: a period is strict ``YYYY-MM`` (nothing around it) from 1970-01 on and must have
started (only ``tenants set-tier --from`` may name a later one); a tenant id follows the
event contract; an output file must be writable before any work is done; ``-q``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from billing.db import Connect, billing_db
from common.documents import Documents, FolderDocuments
from common.errors import UserError
from common.settings import Settings, load_settings
from pf_metering.output import Format
from schemas.periods import FORM, Period
from schemas.validation import TENANT_RE

if TYPE_CHECKING:
    import duckdb


def _quiet(value: bool) -> bool:
    """``-q``: no progress and no INFO logs (warnings and errors still show; LOG_LEVEL=DEBUG,
    asked for explicitly, still logs everything)."""
    root = logging.getLogger()
    if value and root.level == logging.INFO:
        root.setLevel(logging.WARNING)
    return value


FORMAT_OPTION = typer.Option(Format.table, "-f", "--format", help="table, json or csv")
OUTPUT_OPTION = typer.Option(None, "-o", "--output", help="write to this file")
QUIET_OPTION = typer.Option(
    False, "--quiet", "-q", help="no progress output, no INFO logs", callback=_quiet
)
TENANT_ARGUMENT = typer.Argument(..., help="tenant identifier")
PERIOD_ARGUMENT = typer.Argument(..., help="billing period, YYYY-MM")
# Lets a negative number reach the command (and its own message) instead of click's
# "No such option: -5".
NUMBERS_AS_ARGUMENTS = {"ignore_unknown_options": True}


def settings_of(ctx: typer.Context) -> Settings:
    """The settings the CLI read once at start (the click context's object)."""
    cfg = ctx.find_object(Settings)
    if cfg is None:  # a command invoked on its own: read them once, for the whole run
        cfg = ctx.find_root().obj = load_settings()
    return cfg


def billing_connect(cfg: Settings) -> Connect:
    """Opens the billing database of ``cfg`` for one unit of work: the billing file, or in
    cluster mode the catalog's billing schema."""
    if cfg.cluster_mode:
        from billing.catalog_db import catalog_billing_db  # (cluster mode only)

        return partial(catalog_billing_db, cfg)
    return partial(billing_db, cfg.billing_db, cfg.metering_lock_timeout)


def shared_documents(
    cfg: Settings, area: str, lake: duckdb.DuckDBPyConnection | None = None
) -> Documents:
    """The documents every process shares (``schemas``: published versions; ``replay``:
    replay requests): a folder of ``METERING_DATA_DIR``, or the lake's in cluster mode (on
    a cursor of ``lake``, a connection the process has open already: another would load
    the extensions and attach the lake again, docs/performance.md)."""
    if not cfg.cluster_mode:
        return FolderDocuments(cfg.metering_data_dir / area)
    from aggregator.lake import open_lake  # (cluster mode only: the extensions load)
    from aggregator.lake_documents import LakeDocuments

    con = lake.cursor() if lake is not None else open_lake(cfg)
    return LakeDocuments(con, area, reconnect=partial(open_lake, cfg))


def parse_period(
    text: str, name: str = "period", *, future: bool = False, now: datetime | None = None
) -> Period:
    """``text`` as a period, by the rules every command shares; ``name`` is the argument or
    option as the user wrote it (``period``, ``--from``)."""
    label = "" if name == "period" else f" for {name}"
    try:
        period = Period.parse(text)
    except ValueError as exc:
        raise UserError(f"invalid period {text[:40]!r}{label}: {FORM}") from exc
    current = Period.of(now or datetime.now(UTC))
    if not future and period > current:
        raise UserError(f"period {period}{label} has not started yet (this month is {current})")
    return period


def check_tenant(tenant_id: str) -> str:
    if not TENANT_RE.match(tenant_id):
        raise UserError(
            f"invalid tenant id {tenant_id[:64]!r}: letters, digits and . _ : - only, "
            "starting with a letter or digit, at most 128 characters"
        )
    return tenant_id


def output_path(path: Path | None, name: str = "--output") -> Path | None:
    """``path`` if a file can be written there: checked before any work is done, by
    opening it for appending (a file that did not exist is removed again)."""
    if path is None:
        return None
    if path.parent and not path.parent.is_dir():
        raise UserError(f"cannot write {name} {path}: folder {path.parent} does not exist")
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write {name} {path}: {exc.strerror}") from exc
    if not existed:
        path.unlink(missing_ok=True)
    return path
