"""``make bench-peers``: create each peer's venv under ``.cache/peers/<name>`` from its
pinned requirements (PyPI, with the project's uv). Idempotent: a venv whose stamp matches
its requirements is kept. A peer that fails to install gets a ``.failed`` stamp holding
the reason, which the bench reports as "not installable: <reason>"; the others go on.

    .venv/bin/python -m bench.peers.install [--force]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from bench.peers import PEERS, Peer

UV = Path(sys.executable).parent / "uv"


def _reason(out: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (out.stderr + out.stdout).splitlines() if line.strip()]
    return " ".join(lines[-3:])[:500] or f"exit {out.returncode}"


def install(peer: Peer, force: bool = False) -> str | None:
    """Install ``peer``; None on success, else the reason it failed."""
    wanted = peer.requirements.read_text()
    if not force and peer.installed_stamp.exists() and peer.installed_stamp.read_text() == wanted:
        return None
    shutil.rmtree(peer.venv, ignore_errors=True)
    steps = [
        [str(UV), "venv", "-q", "--python", sys.executable, str(peer.venv)],
        [str(UV), "pip", "sync", "-q", "--python", str(peer.python), str(peer.requirements)],
    ]
    for step in steps:
        out = subprocess.run(step, capture_output=True, text=True)
        if out.returncode != 0:
            reason = _reason(out)
            peer.venv.mkdir(parents=True, exist_ok=True)
            peer.failed_stamp.write_text(reason + "\n")
            return reason
    # precompiled once, so no run pays for bytecode compilation (the worker's venv is too)
    subprocess.run(
        [str(peer.python), "-m", "compileall", "-q", "-j", "2", str(peer.venv / "lib")],
        capture_output=True,
    )
    peer.installed_stamp.write_text(wanted)
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="recreate every venv")
    args = parser.parse_args(argv)
    for peer in PEERS:
        reason = install(peer, args.force)
        print(f"peer {peer.name}: " + ("ready" if reason is None else f"not installable: {reason}"))


if __name__ == "__main__":
    main()
