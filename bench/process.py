"""Running one measured subprocess: wall time, CPU seconds and peak RSS of its tree."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class ProcessRun:
    """What one subprocess cost; ``output`` is its stdout and stderr."""

    code: int
    seconds: float  # start to exit
    cpu_seconds: float  # user + system of the process and the children it waited for
    # (safe to measure several at once: each from its own wait4)
    peak_rss_bytes: int  # largest sum over the process tree, polled every 50 ms
    output: str


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def run_measured(
    command: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path | None = None,
    timeout: float = 3600,
) -> ProcessRun:
    """Run ``command`` to its end (killed after ``timeout``), output to ``log_path``."""
    peak = [0]
    with log_path.open("w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        watched = psutil.Process(proc.pid)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], _tree_rss(watched))
                except psutil.Error:
                    return
                done.wait(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            # wait4: this child's own rusage, so runs measured side by side do not mix
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            elapsed = time.perf_counter() - started
            killer.cancel()
            done.set()
            poller.join()
            if proc.returncode is None:  # (interrupted before it was reaped)
                proc.kill()
                proc.wait()
    cpu = usage.ru_utime + usage.ru_stime
    return ProcessRun(proc.returncode, elapsed, cpu, peak[0], log_path.read_text())
