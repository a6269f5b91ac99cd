"""Rendering command results as table, JSON or CSV, to stdout or a file (``-o``)."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Sequence
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from common.errors import UserError
from common.jsonfmt import json_default


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def to_json(data: Any) -> str:
    return json.dumps(data, default=json_default, indent=2) + "\n"


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """RFC 4180 CSV (csv module, CRLF line ends, quoting where needed)."""
    buf = io.StringIO()
    cols = list(columns or (rows[0].keys() if rows else []))
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in cols})
    return buf.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, default=json_default)
    if isinstance(value, Decimal | datetime | date):
        return json_default(value)
    return "" if value is None else value


def table_text(table: Table, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)
    console.print(table)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return str(out)


def rows_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False)
    cols = list(rows[0].keys()) if rows else []
    for col in cols:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(str(_cell(row.get(c))) for c in cols))
    return table


def write(text: str, output: Path | None) -> None:
    """Print to stdout, or write to ``output`` (stdout then only names the file)."""
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror}") from exc
    print(f"wrote {output}", file=sys.stderr)


def render(
    fmt: Format,
    output: Path | None,
    *,
    json_data: Any,
    csv_rows: Callable[[], Sequence[dict[str, Any]]] | None = None,
    table: Callable[[], Table] | None = None,
) -> None:
    """Render one result in the requested format."""
    if fmt is Format.json:
        text = to_json(json_data)
    elif fmt is Format.csv:
        if csv_rows is None:
            raise UserError("this command has no csv format; use table or json")
        text = to_csv(csv_rows())
    else:
        text = table_text(table()) if table else to_json(json_data)
    write(text, output)
