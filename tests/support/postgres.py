"""``deploy/local-postgres`` driven from tests: start, stop and status on a given port, and
fresh databases on a running server."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from tests.support import REPO
from tests.support.waiting import free_port

LOCAL_POSTGRES = REPO / "deploy" / "local-postgres"


def local_postgres(
    action: str, port: int, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``deploy/local-postgres ACTION --port PORT``; never raises on its exit code."""
    return subprocess.run(
        [str(LOCAL_POSTGRES), action, "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def state_dir(port: int) -> str:
    return str(REPO / ".cache" / "postgres" / str(port))


@contextmanager
def running_postgres(port: int | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """A server on ``port`` (a free one if None): yields its URI; stops it and removes its
    folder afterwards if this started it (``PF_KEEP_POSTGRES=1`` keeps it)."""
    port = port or free_port()
    started = local_postgres("status", port).returncode != 0
    out = local_postgres("start", port, env)
    assert out.returncode == 0, out.stderr
    try:
        yield out.stdout.strip().splitlines()[-1]
    finally:
        if started and not os.environ.get("PF_KEEP_POSTGRES"):
            local_postgres("stop", port)
            shutil.rmtree(state_dir(port), ignore_errors=True)


def with_database(uri: str, name: str) -> str:
    """``uri`` naming database ``name`` instead."""
    return uri.rsplit("/", 1)[0] + "/" + name


def create_database(uri: str) -> str:
    """A new, empty database on the server at ``uri``; returns its URI."""
    name = f"pf_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(uri, name)


def drop_database(uri: str) -> None:
    server, name = uri.rsplit("/", 1)
    with psycopg.connect(server + "/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
