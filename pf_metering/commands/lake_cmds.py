"""``lake maintain``: cluster mode's DuckLake kept small (``aggregator.lake_maintenance``)."""

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


def register(app: typer.Typer) -> None:
    app.add_typer(lake_app, name="lake")
