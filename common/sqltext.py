"""SQL text built from values that cannot be bound as parameters (file paths in ATTACH, COPY
and ``read_parquet``)."""

from __future__ import annotations

from pathlib import Path


def sql_string(value: str | Path) -> str:
    """``value`` as a SQL string literal, quotes doubled: ``it's`` -> ``'it''s'``."""
    return "'" + str(value).replace("'", "''") + "'"
