"""The README says what people need on the first day (issue 17, point 10)."""

from __future__ import annotations

from pathlib import Path

from billing.stripe.webhook_server import WEBHOOK_PATHS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_readme_names_the_webhook_path() -> None:
    for path in WEBHOOK_PATHS - {"/"}:
        assert f"POST {path}" in README, path
