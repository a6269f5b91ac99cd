"""The worker's peers in ``make bench``: the same fold written in the stream processors a
team would pick instead, each in its own virtual environment.

Stdlib only: ``install`` (main venv) and the apps (peer venvs) both import this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = Path(__file__).resolve().parent / "requirements"
VENVS = ROOT / ".cache" / "peers"


@dataclass(frozen=True)
class Peer:
    """One peer: its venv ``.cache/peers/<name>``, pinned by ``requirements/<name>.txt``,
    runs ``python -m bench.peers.<name>_app``."""

    name: str
    library: str
    guarantee: str

    @property
    def requirements(self) -> Path:
        return REQUIREMENTS / f"{self.name}.txt"

    @property
    def venv(self) -> Path:
        return VENVS / self.name

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def module(self) -> str:
        return f"bench.peers.{self.name}_app"

    @property
    def installed_stamp(self) -> Path:
        """Holds the requirements text the venv was installed from."""
        return self.venv / ".installed"

    @property
    def failed_stamp(self) -> Path:
        """Holds why the last install failed."""
        return self.venv / ".failed"

    def unavailable(self) -> str | None:
        """None when the venv matches the requirements, else why the peer cannot run."""
        if self.failed_stamp.exists():
            return f"not installable: {self.failed_stamp.read_text().strip()}"
        stamp = self.installed_stamp
        if not stamp.exists() or stamp.read_text() != self.requirements.read_text():
            return "not installed (run `make bench-peers`)"
        return None


PEERS = (
    Peer("quix", "Quix Streams 3.28.1", "exactly-once (RocksDB state + changelog topics)"),
    Peer("arroyo", "sentry-arroyo 2.48.0", "at-least-once, offsets committed after DuckDB"),
    Peer("bytewax", "Bytewax 0.21.1", "recovery on (state snapshots per epoch)"),
)
