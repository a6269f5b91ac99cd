"""``lake maintain``: cluster mode's DuckLake kept small (``aggregator.lake_maintenance``);
``lake migrate``: an embedded installation's usage moved into it (``aggregator.lake_migration``)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from billing import nightly
from common.errors import UserError
from common.settings import Settings
from pf_metering.commands.books import utc_now
from pf_metering.commands.common import (
    FORMAT_OPTION,
    OUTPUT_OPTION,
    QUIET_OPTION,
    output_path,
    settings_of,
)
from pf_metering.output import Format, render_rows
from pf_metering.progress import status

lake_app = typer.Typer(help="Cluster mode's DuckLake (METERING_CATALOG).", no_args_is_help=True)


def require_cluster(cfg: Settings, command: str) -> None:
    if not cfg.cluster_mode:
        raise UserError(
            f"{command} needs cluster mode: set METERING_CATALOG (a PostgreSQL URI) and "
            "METERING_LAKE_PATH"
        )


@lake_app.command("maintain")
def lake_maintain(
    ctx: typer.Context,
    fmt: Format = FORMAT_OPTION,
    output: Path = OUTPUT_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Merge small data files, expire snapshots older than METERING_LAKE_RETENTION (kept
    ones excepted) and delete files unneeded for METERING_LAKE_FILE_GRACE; totals do not
    change and running workers go on. The nightly ``bill`` runs it too in cluster mode."""
    cfg = settings_of(ctx)
    require_cluster(cfg, "lake maintain")
    path = output_path(output)
    with status("maintaining the lake", quiet):
        report = nightly.maintain_lake(cfg, utc_now())
    if not quiet:
        print(report.summary(), file=sys.stderr)
    render_rows(fmt, path, [report.as_row()])


@lake_app.command("migrate")
def lake_migrate(
    ctx: typer.Context,
    source: Path = typer.Option(
        ..., "--from", help="the embedded installation's METERING_DATA_DIR (workers stopped)"
    ),
    fmt: Format = FORMAT_OPTION,
    output: Path = OUTPUT_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Copy an embedded installation's usage of METERING_TOPIC (offsets, dedup ids,
    aggregates, sessions, duplicates, dead letters, corrections) into the lake, one
    transaction a partition, so cluster workers resume where the embedded ones stopped;
    then its billing file (tenants, invoices, billed usage, credit, Stripe sync, alerts)
    into the catalog's pf_billing, in one transaction.
    Safe to run again: migrated partitions are skipped; a partition the cluster has already
    counted into is refused, unchanged."""
    cfg = settings_of(ctx)
    require_cluster(cfg, "lake migrate")
    path = output_path(output)
    ledger_dir = cfg.model_copy(update={"metering_data_dir": source}).ledger_dir
    if not source.is_dir():
        raise UserError(f"--from {source}: no such directory (the embedded METERING_DATA_DIR)")
    from aggregator.lake import open_lake  # (cluster mode only: the extensions load)
    from aggregator.lake_migration import migrate_usage

    con = open_lake(cfg)
    try:
        with status("migrating usage into the lake", quiet):
            done = migrate_usage(con, ledger_dir, cfg.metering_topic)
    finally:
        con.close()
    from billing.catalog_db import migrate_billing  # (cluster mode only)

    source_billing = cfg.model_copy(update={"metering_data_dir": source}).billing_db
    with status("migrating billing into the catalog", quiet):
        billing = migrate_billing(cfg, source_billing)
    if not quiet:
        print(billing.summary(), file=sys.stderr)
    if not quiet:
        moved = [m for m in done if m.outcome == "migrated"]
        print(
            f"lake migrate: {len(moved)} partition(s) migrated "
            f"({sum(m.rows for m in moved)} rows), {len(done) - len(moved)} skipped",
            file=sys.stderr,
        )
    render_rows(fmt, path, [m.as_row() for m in done])


def register(app: typer.Typer) -> None:
    app.add_typer(lake_app, name="lake")
