"""``pf-metering webhooks serve`` run as users run it: the real console script in a
subprocess on 127.0.0.1 (any free port), handed over once it says where it listens, stopped
by SIGTERM when the block ends."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.support.cli_runner import BIN
from tests.support.waiting import wait_for

LISTENING = "listening on http://127.0.0.1:"


@dataclass
class ServeProcess:
    """A running ``webhooks serve``: its URL, and its stderr lines as they come."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    url: str = ""

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)


@contextmanager
def webhooks_serve(env: dict[str, str], timeout: float = 120) -> Iterator[ServeProcess]:
    """``webhooks serve --port 0`` with ``env`` over this process's environment; yields once
    its first line names the URL (waited for up to ``timeout`` s). Afterwards ``returncode``
    and ``stderr`` hold how it stopped and all it said."""
    proc = subprocess.Popen(
        [str(BIN), "webhooks", "serve", "--host", "127.0.0.1", "--port", "0"],
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
    )
    served = ServeProcess(proc)
    reader = threading.Thread(target=served._read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: served.lines or proc.poll() is not None, "webhooks serve", timeout)
        if proc.poll() is not None:
            reader.join(30)
        first = served.lines[0] if served.lines else ""
        assert first.startswith(LISTENING), served.stderr
        served.url = first.split()[-1]
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        reader.join(30)
