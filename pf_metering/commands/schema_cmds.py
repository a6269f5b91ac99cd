"""``schemas add`` and ``schemas list``: writer versions of the usage event published at run
time (stored in the data dir, read by every worker; ``schemas.registry``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from common.errors import UserError
from common.settings import Settings
from pf_metering.commands.common import (
    FORMAT_OPTION,
    OUTPUT_OPTION,
    output_path,
    settings_of,
    shared_documents,
)
from pf_metering.output import Format, render_rows
from schemas.registry import IncompatibleSchema, Registry, Version

schemas_app = typer.Typer(
    help="Writer versions of pf.metering.UsageEvent (built in, and published at run time).",
    no_args_is_help=True,
)


def _registry(cfg: Settings) -> Registry:
    return Registry(cfg.metering_data_dir, documents=shared_documents(cfg, "schemas"))


def _row(version: Version) -> dict[str, Any]:
    return {
        "version": version.schema.version,
        "fingerprint": version.schema.fingerprint.hex(),
        "published_at": version.published_at,
        "built_in": version.built_in,
        "fields": len(version.schema.raw["fields"]),
        "reader": False,
    }


@schemas_app.command("add")
def schemas_add(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="an Avro schema file (.avsc) of pf.metering.UsageEvent"),
) -> None:
    """Publish a new writer version to every worker (they pick it up without a restart)."""
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise UserError(f"{path} is not JSON: {exc}") from exc
    try:
        version, new = _registry(settings_of(ctx)).publish(raw)
    except IncompatibleSchema as exc:
        raise UserError(f"{path} refused: {exc}") from exc
    fp = version.schema.fingerprint.hex()
    if new:
        print(f"published {path} as version {version.schema.version} (fingerprint {fp})")
    else:
        print(f"{path} is already version {version.schema.version} (fingerprint {fp})")


@schemas_app.command("list")
def schemas_list(
    ctx: typer.Context, fmt: Format = FORMAT_OPTION, output: Path = OUTPUT_OPTION
) -> None:
    """Every version with its fingerprint and when it was published (the reader schema,
    which every version is decoded into, is the newest built-in one)."""
    registry = _registry(settings_of(ctx))
    rows = [_row(v) for v in registry.versions()]
    for row in rows:
        row["reader"] = row["version"] == registry.reader.version
    print(f"{len(rows)} version(s)", file=sys.stderr)
    render_rows(fmt, output_path(output), rows)


def register(app: typer.Typer) -> None:
    app.add_typer(schemas_app, name="schemas")
