"""CLI command groups, one module per area; each exposes ``register(app)``."""

from __future__ import annotations

import typer

from pf_metering.commands import produce


def register_all(app: typer.Typer) -> None:
    produce.register(app)
