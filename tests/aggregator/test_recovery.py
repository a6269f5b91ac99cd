"""Torn ledger files (cut short at creation, as a full disk leaves them) are set aside; every
other file is left alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb

from aggregator.recovery import empty_file_bytes, set_aside_torn_ledger

_LOCK_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


def test_only_a_torn_unlocked_ledger_file_is_set_aside(tmp_path: Path) -> None:
    torn = tmp_path / "p-0000.duckdb"
    torn.write_bytes(empty_file_bytes()[:1])  # a new file's first byte: nothing else got there
    with_wal = tmp_path / "p-0001.duckdb"
    with_wal.write_bytes(empty_file_bytes()[:1])
    (tmp_path / "p-0001.duckdb.wal").write_bytes(b"wal")
    valid = tmp_path / "p-0002.duckdb"
    duckdb.connect(str(valid)).close()
    locked = tmp_path / "p-0003.duckdb"
    locked.write_bytes(b"")
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(locked)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert [set_aside_torn_ledger(p) for p in (torn, with_wal, valid, locked)] == [
            True,
            False,
            False,
            False,
        ]
    finally:
        holder.communicate("\n", timeout=30)
    assert not torn.exists() and len(list(tmp_path.glob("p-0000.duckdb.torn-*"))) == 1
    assert with_wal.exists() and valid.exists() and locked.exists()
    assert not set_aside_torn_ledger(tmp_path / "p-0009.duckdb")  # no file: nothing to do
    unwritable = tmp_path / "p-0004.duckdb"
    unwritable.mkdir()  # cannot be opened for writing (as on a read-only disk): left alone
    assert not set_aside_torn_ledger(unwritable) and unwritable.is_dir()
