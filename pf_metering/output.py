"""Rendering command results as table, JSON or CSV, to stdout or a file (``-o``)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import stat
import sys
from collections.abc import Callable, Sequence
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

from rich.console import Console, JustifyMethod, OverflowMethod
from rich.measure import Measurement
from rich.style import Style
from rich.table import Table
from rich.text import Text

from common.errors import UserError
from common.jsonfmt import json_default
from common.logs import escape_controls


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def to_json(data: Any) -> str:
    return json.dumps(data, default=json_default, indent=2) + "\n"


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """RFC 4180 CSV (csv module, CRLF line ends, quoting where needed). A text cell that a
    spreadsheet would take for a formula (starting with ``= + - @``, tab or CR) gets a
    leading ``'``; numbers are written as they are."""
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
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return "" if value is None else value


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What makes a spreadsheet read a CSV cell as a formula."""


def printable(value: Any) -> Any:
    """A value safe to print on a terminal: bytes as hex, and in text every control or
    format character (ANSI escape sequences, BEL, CR, bidi overrides) shown escaped."""
    if isinstance(value, bytes):
        return value.hex()
    return escape_controls(value) if isinstance(value, str) else value


class _TextConsole(Console):
    """Shows every string as the text it is: never rich markup (``[red]``), emoji codes
    or highlighting, control and format characters escaped. Table cells, titles and
    captions all come through here, and any of them may hold data."""

    def render_str(
        self,
        text: str,
        *,
        style: str | Style = "",
        justify: JustifyMethod | None = None,
        overflow: OverflowMethod | None = None,
        emoji: bool | None = None,
        markup: bool | None = None,
        highlight: bool | None = None,
        highlighter: Any = None,
    ) -> Text:
        return Text(printable(text), style=style, justify=justify, overflow=overflow)


def readable(value: float | Decimal | int) -> str:
    """A measured number for people (tables only; JSON and CSV keep exact values): whole
    numbers with thousands separators, 2 decimals from 1 on, 4 significant digits below."""
    number = Decimal(str(value))
    if not number.is_finite():
        return str(value)
    if number == number.to_integral_value():
        return f"{int(number):,}"
    if abs(number) >= 1:
        return f"{number:,.2f}"
    return format(Decimal(f"{number:.4g}"), "f")


def table_width() -> int:
    """``COLUMNS``, else the terminal's width, else 120 (output piped somewhere)."""
    return shutil.get_terminal_size((120, 24)).columns


def table_text(table: Table, width: int | None = None) -> str:
    """``table`` as text at most ``width`` columns wide (default ``table_width()``); a table
    of records too wide for it is shown one record at a time, a field per line."""
    width = width or table_width()
    console = _TextConsole(file=io.StringIO(), width=width, force_terminal=False, color_system=None)
    natural = Measurement.get(console, console.options.update_width(100_000), table).maximum
    if table.show_header and len(table.columns) > 2 and natural > width:
        table = vertical(table)
    console.print(table)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return str(out)


def vertical(table: Table) -> Table:
    """The records of ``table`` one below the other: a ``field  value`` line each."""
    out = Table.grid(padding=(0, 2))
    out.title = table.title
    out.add_column(style="bold", no_wrap=True)
    out.add_column(overflow="fold")
    headers = [str(c.header) for c in table.columns]
    cells = [list(c.cells) for c in table.columns]
    for i in range(table.row_count):
        if i:
            out.add_row("", "")
        for header, column in zip(headers, cells, strict=True):
            out.add_row(header, column[i] if i < len(column) else "")
    return out


def rows_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False)
    cols = list(rows[0].keys()) if rows else []
    for col in cols:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(_shown(row.get(c)) for c in cols))
    return table


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return readable(value)
    return str(_cell(value))


FOLLOW_SYMLINKS = {"on": False}
"""Set by the CLI's ``--follow-symlinks``: ``-o`` may then write through a symbolic link."""


def write(text: str, output: Path | None) -> None:
    """Print to stdout, or write to ``output`` (stdout then only names the file).

    A file is replaced whole or not at all: the text goes to a temporary file beside it,
    which is synced and renamed over it (an existing file keeps its permissions). A
    symbolic link is refused unless ``--follow-symlinks``; a device or FIFO (``/dev/stdout``)
    is written to directly, since it cannot be replaced."""
    if output is None:
        sys.stdout.write(text)
        return
    try:
        _write_file(output, text.encode())
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from exc
    print(f"wrote {output}", file=sys.stderr)


def _write_file(output: Path, data: bytes) -> None:
    target = output
    if output.is_symlink():
        if not FOLLOW_SYMLINKS["on"]:
            raise UserError(
                f"cannot write {output}: it is a symbolic link (to write to its target, "
                "give the target's path or pass --follow-symlinks before the command)"
            )
        target = output.resolve()
    try:
        mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
        if not stat.S_ISREG(os.stat(target).st_mode):
            with target.open("wb") as fh:  # a device or FIFO: nothing to replace
                fh.write(data)
            return
    except FileNotFoundError:
        mode = None
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # the umask applied at creation
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def render_rows(
    fmt: Format,
    output: Path | None,
    data: Sequence[dict[str, Any]],
    shown: Sequence[dict[str, Any]] | None = None,
) -> None:
    """Rows in the requested format: JSON from ``data``; a table or CSV from ``shown``
    (default ``data``), the rows as a terminal may show them."""
    visible = data if shown is None else shown
    render(fmt, output, json_data=data, csv_rows=lambda: visible, table=lambda: rows_table(visible))
