"""Plain helpers for tests (no fixtures): running the CLI and workers, building events, our
stateful Stripe test server, the reference fold."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
