"""JSON for what ``json`` cannot write itself: Decimals as fixed-point strings (never exponent
notation), dates and datetimes as ISO 8601, paths as text."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any


def json_default(value: Any) -> Any:
    """The ``default=`` of ``json.dumps``."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, date):  # datetime too
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
