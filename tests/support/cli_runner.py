"""Running the real console script in a subprocess, as users do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent / "pf-metering"


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, check: bool = False
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [str(BIN), *args], env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pf-metering {' '.join(args)} failed: {proc.stderr}")
    return proc


def assert_user_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    """One line ``error: ...`` naming the problem, non-zero exit, no traceback."""
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert fragment.lower() in lines[-1].lower(), lines[-1]


# Runs argv with a file-size limit: SIG_IGN and rlimits survive exec (no preexec_fn needed,
# which is unsafe in a threaded parent).
FILE_SIZE_LIMITED = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.argv[2], sys.argv[2:])
"""
