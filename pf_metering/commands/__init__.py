"""CLI command groups, one module per area; each exposes ``register(app)``."""

from __future__ import annotations

import typer

from pf_metering.commands import billing_cmds, consume_cmds, produce, report_cmds, stripe_cmds


def register_all(app: typer.Typer) -> None:
    produce.register(app)
    consume_cmds.register(app)
    stripe_cmds.register(app)
    billing_cmds.register(app)
    report_cmds.register(app)
