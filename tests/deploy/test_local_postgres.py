"""``deploy/local-postgres``: a real PostgreSQL server, idempotent start and stop, returning
only once it accepts connections, its last line a URI whose user may create databases,
listening on loopback only, run by a user that is not root."""

from __future__ import annotations

import os
import shutil

import psycopg

from tests.support.postgres import local_postgres, state_dir
from tests.support.waiting import free_port


def test_start_is_idempotent_and_returns_a_uri_that_accepts_connections() -> None:
    port = free_port()
    try:
        first = local_postgres("start", port)
        assert first.returncode == 0, first.stderr
        uri = first.stdout.strip().splitlines()[-1]
        assert uri.startswith("postgresql://") and uri.endswith(f"@127.0.0.1:{port}/metering")
        with psycopg.connect(uri, autocommit=True, connect_timeout=5) as conn:
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()
            conn.execute("CREATE DATABASE created_by_the_uri_user")
            listen = conn.execute("SHOW listen_addresses").fetchone()
            postmaster = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
        assert listen == ("127.0.0.1",)
        assert pid is not None and os.stat(f"/proc/{pid[0]}").st_uid != 0

        again = local_postgres("start", port)
        assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == uri
        with psycopg.connect(uri, connect_timeout=5) as conn:
            assert conn.execute("SELECT pg_postmaster_start_time()").fetchone() == postmaster
        status = local_postgres("status", port)
        assert status.returncode == 0 and uri in status.stdout

        assert local_postgres("stop", port).returncode == 0
        assert local_postgres("status", port).returncode == 1
        assert local_postgres("stop", port).returncode == 0  # stopping twice is fine

        restarted = local_postgres("start", port)  # the data survives a restart
        assert restarted.stdout.strip().splitlines()[-1] == uri
        with psycopg.connect(uri, connect_timeout=5) as conn:
            names = conn.execute("SELECT datname FROM pg_database").fetchall()
        assert ("created_by_the_uri_user",) in names
    finally:
        local_postgres("stop", port)
        shutil.rmtree(state_dir(port), ignore_errors=True)


def test_a_bad_port_is_refused_in_one_line() -> None:
    out = local_postgres("start", 0)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --port must be a number from 1 to 65535, got '0'"
