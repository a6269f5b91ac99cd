"""What a data folder stores, to prove a refused command changed nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb


def stored(data_dir: Path) -> dict[str, str]:
    """What is stored: every file's bytes, and the billing file's tables row by row (opening
    it rewrites headers, so its bytes are not a fair measure)."""
    out: dict[str, str] = {}
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and not path.name.startswith("billing.duckdb"):
            out[str(path.relative_to(data_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    con = duckdb.connect(str(data_dir / "billing.duckdb"), read_only=True)
    try:
        for (table,) in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall():
            rows = con.execute(f'SELECT * FROM "{table}" ORDER BY ALL').fetchall()
            out[f"billing.duckdb:{table}"] = hashlib.sha256(repr(rows).encode()).hexdigest()
    finally:
        con.close()
    return out
