"""CLI command groups, one module per area; each exposes ``register(app)``.

A command line that names a command imports only the area defining it (``AREAS``: a worker
start does not pay for billing, Stripe and HTML imports); anything else (no command,
``--help``, a typo) imports all of them, so help and "no such command" errors are the same.
A test checks the table against what each area really registers.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import typer

AREAS: dict[str, tuple[str, ...]] = {
    "produce": ("simulate-usage",),
    "consume_cmds": ("consume", "dead-letters", "sql"),
    "stripe_cmds": ("webhooks",),
    "tiers_cmds": ("tiers",),
    "tenants_cmds": ("tenants",),
    "usage_cmds": ("usage", "export-metrics"),
    "invoice_cmds": ("generate-invoice", "invoices"),
    "bill_cmds": ("bill",),
    "report_cmds": ("report",),
    "schema_cmds": ("schemas",),
    "lake_cmds": ("lake",),
    "alerts_cmds": ("alerts",),
}


def register(app: typer.Typer, args: Sequence[str] | None = None) -> None:
    """Register the area of the command ``args`` name, or every area."""
    command = args[0] if args and not args[0].startswith("-") else None
    areas = [area for area, names in AREAS.items() if command in names] or list(AREAS)
    for area in areas:
        importlib.import_module(f"{__name__}.{area}").register(app)
