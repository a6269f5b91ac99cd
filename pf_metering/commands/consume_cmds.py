"""``consume``, ``dead-letters`` and ``sql``: the worker and its read-only companions."""

from __future__ import annotations

import logging
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

from aggregator.adhoc import QueryLimits, lock_down, read_only_statement, run_query, spill_folder
from aggregator.fold import FOLD_REASONS
from aggregator.ledger import ledger_path
from aggregator.views import usage_reader
from billing.db import copy_queryable_tables
from common.errors import OperationError, UserError
from common.settings import Settings
from consumer.config import WorkerConfig
from consumer.metrics import WorkerMetrics
from consumer.replay import post_request, read_results
from consumer.types import WorkerStats
from consumer.worker import Worker
from pf_metering.broker import require_broker
from pf_metering.commands.common import (
    FORMAT_OPTION,
    OUTPUT_OPTION,
    QUIET_OPTION,
    output_path,
    settings_of,
    shared_documents,
)
from pf_metering.output import Format, printable, render, render_rows, rows_table
from pf_metering.progress import DrainProgress, progress_bar
from schemas.validation import REASONS

if TYPE_CHECKING:
    from aggregator.lake_ledger import LakeLedgerSet

log = logging.getLogger(__name__)


def consume(
    ctx: typer.Context,
    drain: bool = typer.Option(False, "--drain", help="exit 0 once every partition is at its end"),
    metrics_port: int = typer.Option(None, "--metrics-port", help="serve Prometheus /metrics"),
    strategy: str = typer.Option(
        "cooperative-sticky",
        "--assignment-strategy",
        help="cooperative-sticky, range or roundrobin",
    ),
    quiet: bool = QUIET_OPTION,
) -> None:
    """Run a consumer worker: fold usage events into the DuckDB ledger, exactly once."""
    if strategy not in ("cooperative-sticky", "range", "roundrobin"):
        raise UserError(f"unknown assignment strategy {strategy!r}")
    cfg = settings_of(ctx)
    if drain:
        require_broker(cfg)  # a service keeps retrying; a drain fails fast
    metrics = WorkerMetrics(cluster=cfg.cluster_mode)
    if metrics_port is not None:
        try:
            metrics.serve(metrics_port)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on port {metrics_port}: {exc.strerror}") from exc
    lake = lake_ledgers(cfg, metrics)
    with progress_bar(quiet or not drain) as bar:
        show = DrainProgress(bar)
        config = worker_config(cfg)
        worker = Worker(
            config,
            drain=drain,
            metrics=metrics,
            strategy=strategy,
            progress=show,
            ledgers=lake,
            schema_documents=shared_documents(cfg, "schemas", lake.con if lake else None),
            replay_board=shared_documents(cfg, "replay", lake.con if lake else None),
        )
        worker.install_signal_handlers()
        stats = worker.run()
    if not quiet:
        print(
            f"consumed {stats.consumed} records: {stats.counted} counted, "
            f"{stats.duplicates} duplicates, {stats.dead} dead-lettered, "
            f"{stats.forwarded} forwarded "
            f"in {time.monotonic() - stats.started:.2f} s{commit_summary(stats)}",
            file=sys.stderr,
        )
    exit_without_teardown()


def commit_summary(stats: WorkerStats) -> str:
    """``; commits p50 X ms, p99 Y ms`` of the drain's summary line (empty if none)."""
    percentiles = stats.commit_percentiles_ms()
    if percentiles is None:
        return ""
    return f"; commits p50 {percentiles[0]:.1f} ms, p99 {percentiles[1]:.1f} ms"


def worker_config(cfg: Settings) -> WorkerConfig:
    """What the worker needs of the settings."""
    return WorkerConfig(
        topic=cfg.metering_topic,
        group=cfg.metering_group,
        kafka=cfg.kafka_common(),
        data_dir=cfg.metering_data_dir,
        ledger_dir=cfg.ledger_dir,
        snapshot_dir=cfg.snapshot_dir,
        batch_size=cfg.batch_size,
        late_usage_months=cfg.metering_late_usage_months,
        snapshot_seconds=cfg.metering_snapshot_seconds,
        lock_timeout=cfg.metering_lock_timeout,
        shutdown_seconds=cfg.metering_shutdown_seconds,
        drain_timeout=cfg.metering_drain_timeout,
        replay_check_seconds=REPLAY_CHECK_CLUSTER_S if cfg.cluster_mode else 1.0,
        native_fetch=cfg.metering_native_fetch,
    )


REPLAY_CHECK_CLUSTER_S = 5.0
"""Cluster mode's replay requests are a lake query away: looked for every 5 s, not every
second (a request is still applied well within ``dead-letters replay``'s default --wait)."""


def lake_ledgers(cfg: Settings, metrics: WorkerMetrics) -> LakeLedgerSet | None:
    """Cluster mode's ledgers in the lake (None in embedded mode: the worker's own files),
    waiting out catalog outages as ``pf_catalog_connected`` shows."""
    if not cfg.cluster_mode:
        return None
    from aggregator.lake import CatalogWatch, open_lake  # (cluster mode only)
    from aggregator.lake_ledger import LakeLedgerSet

    gauge = metrics.catalog_connected
    watch = CatalogWatch(cfg.catalog_shown(), gauge.set if gauge is not None else None)
    return LakeLedgerSet(partial(open_lake, cfg), cfg.metering_topic, watch=watch)


def exit_without_teardown() -> NoReturn:
    """Exit 0 at once, without unwinding the interpreter: call it only after the worker has
    closed Kafka and DuckDB and said what it did (nothing is left to save)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


dead_letters_app = typer.Typer(
    help="Invalid events with their reasons and replay states; `replay` re-processes them."
)


@dead_letters_app.callback(invoke_without_command=True)
def dead_letters(
    ctx: typer.Context, fmt: Format = FORMAT_OPTION, output: Path = OUTPUT_OPTION
) -> None:
    """List invalid events with their reasons and replay states (open, replayed_counted,
    replayed_duplicate, replayed_forwarded, still_failing)."""
    if ctx.invoked_subcommand is not None:
        return
    cfg = settings_of(ctx)
    reader = usage_reader(cfg)
    print(reader.freshness.describe(), file=sys.stderr)
    rel = reader.con.sql(
        'SELECT topic, partition, "offset", key, value, reason_code, reason, dead_lettered_at, '
        'state, replayed_at FROM dead_letters ORDER BY partition, "offset"'
    )
    cols = rel.columns
    rows = [dict(zip(cols, r, strict=True)) for r in rel.fetchall()]
    for row in rows:
        row["key"] = row["key"].decode("utf-8", "replace") if row["key"] is not None else None
        row["value"] = row["value"].hex() if row["value"] is not None else None
        row["state"] = row["state"] or "open"
    reader.close()
    shown = [{k: printable(v) for k, v in r.items()} for r in rows]  # keys come from anyone
    render(
        fmt,
        output_path(output),
        json_data=rows,
        csv_rows=lambda: shown,
        table=lambda: rows_table(
            [{k: v for k, v in r.items() if k not in ("value", "replayed_at")} for r in shown],
            title=f"{len(rows)} dead letters",
        ),
    )


@dead_letters_app.command("replay")
def dead_letters_replay(
    ctx: typer.Context,
    reason: str = typer.Option(None, "--reason", help="only dead letters of this reason code"),
    partition: int = typer.Option(None, "--partition", min=0, help="only this partition"),
    wait: float = typer.Option(60.0, "--wait", min=0, help="seconds to wait for the workers"),
) -> None:
    """Re-process open and still-failing dead letters through the same decode, validation
    and dedup as live events, exactly once, by the workers holding their partitions."""
    known = (*REASONS, *FOLD_REASONS)
    if reason is not None and reason not in known:
        raise UserError(f"unknown --reason {reason[:64]!r}: one of {', '.join(known)}")
    cfg = settings_of(ctx)
    wanted = [p for p in stored_partitions(cfg) if partition in (None, p)]
    board = shared_documents(cfg, "replay")
    request = post_request(board, reason, partition)
    print(f"replay {request.request_id} requested for {len(wanted)} partition(s)", file=sys.stderr)
    deadline = time.monotonic() + wait
    results = read_results(board, request.request_id)
    while any(p not in results for p in wanted) and time.monotonic() < deadline:
        time.sleep(0.2)
        results = read_results(board, request.request_id)
    totals = {k: sum(int(r[k]) for r in results.values()) for k in _REPLAY_COUNTS}
    print(
        f"replayed on {len(results)} partition(s): {totals['counted']} counted, "
        f"{totals['duplicates']} duplicates, {totals['forwarded']} forwarded, "
        f"{totals['dead']} still failing"
    )
    missing = [p for p in wanted if p not in results]
    if missing:
        raise OperationError(
            f"partition(s) {', '.join(map(str, missing))} not replayed within --wait {wait:g} s "
            f"(no worker holds them?); request {request.request_id} stays pending and is "
            "applied when a worker takes them"
        )


_REPLAY_COUNTS = ("counted", "duplicates", "forwarded", "dead")


def stored_partitions(cfg: Settings) -> list[int]:
    """The partitions of ``METERING_TOPIC`` that have a ledger (files, or the lake's)."""
    if not cfg.cluster_mode:
        folder = ledger_path(cfg.ledger_dir, cfg.metering_topic, 0).parent
        return sorted(int(p.stem.split("-")[1]) for p in folder.glob("p-*.duckdb"))
    from aggregator.lake import open_lake
    from aggregator.lake_ledger import partition_schemas

    con = open_lake(cfg)
    try:
        return list(partition_schemas(con, cfg.metering_topic))
    finally:
        con.close()


def sql(
    ctx: typer.Context,
    query: str = typer.Argument(..., help="a SELECT over the documented views"),
    fmt: Format = FORMAT_OPTION,
    output: Path = OUTPUT_OPTION,
) -> None:
    """Read-only ad-hoc query over usage, dead_letters, corrections, tenants, tenant_tiers,
    invoices, billed_usage, credit_movements, tenant_alerts and alert_outbox (bounded by
    METERING_SQL_TIMEOUT and METERING_SQL_MEMORY_LIMIT)."""
    cfg = settings_of(ctx)
    limits = QueryLimits(
        cfg.metering_sql_timeout,
        cfg.metering_sql_memory_limit,
        cfg.metering_sql_spill_limit,
        cfg.metering_sql_max_rows,
    )
    reader = usage_reader(cfg)
    try:
        statement = read_only_statement(reader.con, query)
        con = reader.con
        copy_queryable_tables(con, cfg)
        print(reader.freshness.describe(), file=sys.stderr)
        with spill_folder(cfg.metering_data_dir) as spill:
            lock_down(con, spill, limits)
            cols, found = run_query(con, statement, limits)
    finally:
        reader.close()
    rows = [dict(zip(cols, r, strict=True)) for r in found]
    shown = [{k: printable(v) for k, v in r.items()} for r in rows]
    data = [{k: v.hex() if isinstance(v, bytes) else v for k, v in r.items()} for r in rows]
    render_rows(fmt, output_path(output), data, shown)


def register(app: typer.Typer) -> None:
    app.command("consume")(consume)
    app.add_typer(dead_letters_app, name="dead-letters")
    app.command("sql")(sql)
