"""The DuckLake shell (cluster mode): a DuckDB connection with the lake ATTACHed as ``lake``.

The catalog is PostgreSQL (``METERING_CATALOG``), the data files go to ``METERING_LAKE_PATH``
(a directory, or ``s3://bucket/prefix`` through httpfs). The ducklake, postgres and httpfs
extensions are loaded from their PyPI wheels' files (``duckdb-extension-*``, installed into
``METERING_DATA_DIR/duckdb-extensions``); nothing is downloaded, autoinstall is off.

Secrets never reach SQL text that DuckDB shows back: the catalog's password goes into an
unnamed postgres secret (DuckDB prints secrets redacted), so ``duckdb_databases()`` shows the
conninfo without it; errors show ``METERING_CATALOG`` without its password.

Conflicting commits are DuckLake's to retry (``RETRY``): another host committing the next
snapshot first makes this one retry against it, up to ~45 s in all before it gives up.

A lost catalog (PostgreSQL restarted or out of reach: ``catalog_lost``) is an outage a worker
waits out with a ``CatalogWatch`` (bounded backoff, its log lines, ``pf_catalog_connected``);
what it retries, and how a cut-off COMMIT is settled, is ``aggregator.lake_ledger``'s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import duckdb
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from common import stopping as stop_signals
from common.errors import CatalogError
from common.settings import Settings
from common.sqltext import sql_string
from common.stopping import StopRequested

log = logging.getLogger(__name__)

LAKE = "lake"
"""The alias every cluster-mode connection ATTACHes the lake under."""
BILLING_SCHEMA = "pf_billing"
"""The schema of the catalog's PostgreSQL database that holds billing in cluster mode (beside
DuckLake's own tables; ``billing.catalog_db``)."""
# The postgres wheel's file is named after the extension's old name.
_FILE_NAMES = {"postgres": ("postgres", "postgres_scanner")}
RETRY = {
    "ducklake_max_retry_count": 15,
    "ducklake_retry_wait_ms": 50,
    "ducklake_retry_backoff": 1.5,
}
"""Commit retries on a snapshot conflict: 15 attempts from 50 ms, 1.5x apart (~44 s in all)."""
INIT_ATTEMPTS = 5
"""ATTACHes tried while another host is creating a new lake's catalog tables."""
CONNECT_TIMEOUT_S = 10
"""libpq's connect_timeout unless the URI sets one: an unreachable catalog fails, not hangs."""
_LIBPQ_REASON = re.compile(r"failed: (.+)")


def extension_file(name: str) -> Path:
    """The extension file inside its ``duckdb-extension-<name>`` wheel, for this DuckDB."""
    spec = importlib.util.find_spec(f"duckdb_extension_{name}")
    package = Path(spec.origin).parent if spec and spec.origin else Path("(not installed)")
    folder = package / "extensions" / f"v{duckdb.__version__}"
    for stem in _FILE_NAMES.get(name, (name,)):
        path = folder / f"{stem}.duckdb_extension"
        if path.is_file():
            return path
    raise CatalogError(
        f"the DuckDB extension {name} for DuckDB {duckdb.__version__} is not installed "
        f"(expected in {folder}); reinstall with make install"
    )


def load_extensions(con: duckdb.DuckDBPyConnection, names: Iterable[str]) -> None:
    """Install ``names`` from their wheel files into the connection's extension directory and
    load them."""
    for name in names:
        con.install_extension(str(extension_file(name)))
        con.load_extension(name)


def catalog_conninfo(uri: str) -> tuple[str, str | None]:
    """``uri`` as a libpq conninfo string without the password, and the password. Adds
    ``connect_timeout`` and ``application_name`` unless the URI sets them."""
    params = {k: v for k, v in conninfo_to_dict(uri).items() if v is not None}
    password = params.pop("password", None)
    params.setdefault("connect_timeout", str(CONNECT_TIMEOUT_S))
    params.setdefault("application_name", "pf-metering")
    return make_conninfo("", **params), (str(password) if password is not None else None)


def data_path(settings: Settings) -> str:
    """``METERING_LAKE_PATH`` as DuckLake's DATA_PATH: ``s3://...`` as given, a directory made
    absolute (every host must name the same one); both end in ``/``."""
    path = settings.metering_lake_path
    if path is None:
        raise CatalogError(
            "METERING_LAKE_PATH is not set; cluster mode needs it with METERING_CATALOG"
        )
    if path.startswith("s3://"):
        return path.rstrip("/") + "/"
    return str(Path(path).expanduser().absolute()) + "/"


def _scrub(text: str, settings: Settings) -> str:
    for secret in (settings.catalog_password(), *_s3_secrets(settings)):
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def _s3_secrets(settings: Settings) -> list[str]:
    return [
        s.get_secret_value()
        for s in (settings.aws_secret_access_key, settings.aws_session_token)
        if s is not None
    ]


def _s3_secret_sql(settings: Settings, path: str) -> str:
    """An httpfs S3 secret scoped to the lake's bucket, from the usual AWS settings and
    ``METERING_S3_ENDPOINT`` (an S3-compatible store such as MinIO)."""
    bucket = path.removeprefix("s3://").split("/", 1)[0]
    options = [("TYPE", "s3"), ("SCOPE", sql_string(f"s3://{bucket}"))]
    if settings.aws_access_key_id:
        options.append(("KEY_ID", sql_string(settings.aws_access_key_id)))
    if settings.aws_secret_access_key is not None:
        options.append(("SECRET", sql_string(settings.aws_secret_access_key.get_secret_value())))
    if settings.aws_session_token is not None:
        options.append(("SESSION_TOKEN", sql_string(settings.aws_session_token.get_secret_value())))
    options.append(("REGION", sql_string(settings.aws_region or "us-east-1")))
    endpoint = settings.metering_s3_endpoint
    style = settings.metering_s3_url_style
    if endpoint:
        host = endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")
        options.append(("ENDPOINT", sql_string(host)))
        options.append(("USE_SSL", "false" if endpoint.startswith("http://") else "true"))
        style = style or "path"
    options.append(("URL_STYLE", sql_string(style or "vhost")))
    return "CREATE OR REPLACE SECRET pf_lake_s3 (" + ", ".join(f"{k} {v}" for k, v in options) + ")"


def attach_lake(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    alias: str = LAKE,
    snapshot: int | None = None,
) -> None:
    """Load the extensions and ATTACH the lake as ``alias`` on ``con`` (read-only as of
    DuckLake snapshot ``snapshot``, if given: time travel for every schema and table); a
    CatalogError in one line (naming ``METERING_CATALOG`` or ``METERING_LAKE_PATH``, no
    password) if it cannot."""
    if settings.metering_catalog is None:
        raise CatalogError("METERING_CATALOG is not set: this is embedded mode, there is no lake")
    path = data_path(settings)
    s3 = path.startswith("s3://")
    load_extensions(con, ["postgres", "ducklake", *(["httpfs"] if s3 else [])])
    for name, value in RETRY.items():
        con.execute(f"SET {name} = {value}")
    conninfo = _catalog_secret(con, settings)
    try:
        if s3:
            con.execute(_s3_secret_sql(settings, path))
        else:
            Path(path).mkdir(parents=True, exist_ok=True)
    except (duckdb.Error, OSError) as exc:
        raise CatalogError(
            f"cannot prepare METERING_LAKE_PATH {path}: {_scrub(str(exc), settings)}"
        ) from type(exc)(_scrub(str(exc), settings))
    attach = (
        f"ATTACH {sql_string('ducklake:postgres:' + conninfo)} AS {alias} "
        f"(DATA_PATH {sql_string(path)}"
        + ("" if snapshot is None else f", SNAPSHOT_VERSION {int(snapshot)}")
        + ")"
    )
    try:
        for attempt in range(INIT_ATTEMPTS):
            try:
                con.execute(attach)
                break
            except duckdb.Error as exc:
                # two hosts attaching a new catalog at once both create DuckLake's tables:
                # the loser's CREATE fails (PostgreSQL's unique index, or the table already
                # there); the lake then exists
                lost_race = any(t in str(exc) for t in ("duplicate key value", "already exists"))
                if not lost_race or attempt == INIT_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except duckdb.Error as exc:
        text = _scrub(str(exc), settings)
        if snapshot is not None and "snapshot" in text.lower():
            raise CatalogError(
                f"the lake has no snapshot {snapshot} (expired by lake maintenance, or never "
                f"made): {text.splitlines()[0]}"
            ) from type(exc)(text)
        if "DATA_PATH" in text:
            raise CatalogError(
                f"METERING_LAKE_PATH {path} is not where this lake keeps its data "
                f"(METERING_CATALOG {settings.catalog_shown()} names another)"
            ) from type(exc)(text)
        raise catalog_error(exc, settings) from type(exc)(text)


def catalog_error(exc: BaseException, settings: Settings) -> CatalogError:
    """``exc`` (from libpq, through DuckDB or psycopg) as one line naming
    ``METERING_CATALOG`` without its password."""
    text = _scrub(str(exc), settings)
    reason = _LIBPQ_REASON.search(text)
    detail = (reason.group(1) if reason else text).strip().splitlines()[0].strip()
    unreachable = "Unable to connect" in text or isinstance(exc, psycopg.OperationalError)
    verb = "reach" if unreachable else "use"
    return CatalogError(f"cannot {verb} METERING_CATALOG ({settings.catalog_shown()}): {detail}")


def _catalog_secret(con: duckdb.DuckDBPyConnection, settings: Settings) -> str:
    """The catalog's conninfo without its password; the password (if any) goes into an
    unnamed postgres secret on ``con``, which DuckDB never shows back."""
    assert settings.metering_catalog is not None
    conninfo, password = catalog_conninfo(settings.metering_catalog.get_secret_value())
    if password is not None:
        con.execute(f"CREATE OR REPLACE SECRET (TYPE postgres, PASSWORD {sql_string(password)})")
    return conninfo


def attach_catalog_schema(
    con: duckdb.DuckDBPyConnection, settings: Settings, alias: str, schema: str
) -> None:
    """ATTACH schema ``schema`` of the catalog's PostgreSQL database itself (created if
    missing) as ``alias`` through the postgres extension, and make it the default for
    unqualified names: tables there are PostgreSQL's, with its constraints."""
    load_extensions(con, ["postgres"])
    conninfo = _catalog_secret(con, settings)
    try:
        con.execute(
            f"ATTACH {sql_string(conninfo)} AS {alias} (TYPE postgres, SCHEMA {sql_string(schema)})"
        )
        con.execute(
            f"CALL postgres_execute({sql_string(alias)}, 'CREATE SCHEMA IF NOT EXISTS {schema}')"
        )
        con.execute(f"USE {alias}.{schema}")
    except duckdb.Error as exc:
        raise catalog_error(exc, settings) from type(exc)(_scrub(str(exc), settings))


def catalog_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (from a statement on an open lake) means PostgreSQL could not be
    reached: worth waiting and retrying, since the connection reconnects by itself once the
    server answers again (a restart included)."""
    return isinstance(exc, duckdb.IOException) and "Unable to connect to Postgres" in str(exc)


# What DuckDB and libpq say when the catalog's connection is gone or the server is away
# (measured against deploy/local-postgres stopped and restarted under a committing loop).
_LOST = (
    "unable to connect to postgres",
    "server closed the connection",
    "terminating connection",
    "no connection to the server",
    "could not receive data from server",
    "could not send data to server",
    "the database system is",  # starting up, shutting down, in recovery mode
    'failed to execute query "rollback"',  # a COMMIT on a connection that was cut
    "attempting to fetch from an unsuccessful query result",
    "database has been invalidated",  # DuckDB gave up the instance: reconnect
    "connection refused",
    "connection timed out",
    "no route to host",
    "ssl syscall",
)


def catalog_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the catalog's connection was lost or the
    server cannot be reached: an outage to wait out, not an error in what was asked."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, duckdb.FatalException) or catalog_unreachable(seen):
            return True
        text = str(seen).lower()
        if any(fragment in text for fragment in _LOST):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class CatalogWatch:
    """A worker's view of its catalog: connected until an operation lost it. While it is
    lost: ``pause`` waits a bounded, growing time between attempts (``RETRY_FIRST_SECONDS``
    doubling up to ``RETRY_MAX_SECONDS``), one log line says so at once and then once a
    minute, ``state`` (the ``pf_catalog_connected`` gauge's ``set``) is given 0; one line
    and 1 once it answers again. A stop request (SIGTERM: ``common.stopping``) ends a wait
    with ``StopRequested``."""

    RETRY_FIRST_SECONDS = 0.1
    RETRY_MAX_SECONDS = 5.0
    LOG_EVERY_SECONDS = 60.0

    def __init__(
        self,
        shown: str = "",
        state: Callable[[int], None] | None = None,
        stopping: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # how the log names it: METERING_CATALOG's URI without its password, if given
        self.shown = f"METERING_CATALOG {shown}" if shown else "METERING_CATALOG"
        self.state = state or (lambda _: None)
        self.stopping = stopping or stop_signals.requested
        self.clock = clock
        self.down_since: float | None = None
        self.outages = 0
        self._wait = self.RETRY_FIRST_SECONDS
        self._logged = -1e18
        self.state(1)

    @property
    def connected(self) -> bool:
        return self.down_since is None

    def lost(self, reason: str) -> None:
        """An operation found the catalog gone (``reason``: its error's first line)."""
        now = self.clock()
        if self.down_since is None:
            self.down_since, self._wait = now, self.RETRY_FIRST_SECONDS
            self.outages += 1
            self.state(0)
        if now - self._logged >= self.LOG_EVERY_SECONDS:
            self._logged = now
            log.warning(
                "cannot reach the catalog (%s) for %.0f s: %s; waiting and "
                "retrying (every %g s at most), nothing is lost meanwhile",
                self.shown,
                now - self.down_since,
                reason,
                self.RETRY_MAX_SECONDS,
            )

    def pause(self) -> None:
        """Wait before the next attempt; ``StopRequested`` if a stop was asked for."""
        if self.stopping.wait(self._wait):
            raise StopRequested("stopped while waiting for the catalog (METERING_CATALOG)")
        self._wait = min(self._wait * 2, self.RETRY_MAX_SECONDS)

    def reached(self) -> None:
        if self.down_since is not None:
            log.warning(
                "the catalog (%s) answers again after %.0f s; resuming",
                self.shown,
                self.clock() - self.down_since,
            )
            self.down_since = None
            self._logged = -1e18
            self.state(1)


_INVALIDATED: list[duckdb.DuckDBPyConnection] = []  # never closed: see discard


def discard(con: duckdb.DuckDBPyConnection) -> None:
    """Close ``con``, unless DuckDB invalidated its database (a fatal error inside the
    postgres extension when the server went away mid-query, seen here about once in ten
    restarts under load): DuckDB 1.5.5 then throws from the database's destructor and aborts
    the process (measured: exit 134), so such a connection is kept, unused, until the
    process ends (a worker ends with ``os._exit``, running no destructor)."""
    try:
        con.execute("SELECT 1").fetchall()
    except duckdb.Error as exc:
        if isinstance(exc, duckdb.FatalException) or "invalidated" in str(exc):
            log.warning("a lake connection's DuckDB database was invalidated: replaced")
            _INVALIDATED.append(con)
            return
    with contextlib.suppress(duckdb.Error):
        con.close()


def open_lake(
    settings: Settings, alias: str = LAKE, snapshot: int | None = None
) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB connection with the lake ATTACHed as ``alias`` (as of
    ``snapshot``, if given)."""
    con = new_connection(settings)
    try:
        attach_lake(con, settings, alias, snapshot)
    except BaseException:
        con.close()
        raise
    return con


def new_connection(settings: Settings) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB connection that loads extensions only from the wheels' files
    (installed under ``METERING_DATA_DIR/duckdb-extensions``), never downloads any."""
    extensions = settings.metering_data_dir / "duckdb-extensions"
    try:
        extensions.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CatalogError(f"cannot create {extensions} under METERING_DATA_DIR: {exc}") from exc
    con = duckdb.connect(
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "extension_directory": str(extensions),
        }
    )
    con.execute("SET enable_progress_bar = false")  # (it would print into `sql -f json`)
    return con
