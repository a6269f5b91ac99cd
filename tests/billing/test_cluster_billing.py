"""Billing in cluster mode: the state lives in the catalog's PostgreSQL (schema pf_billing),
shared by every host. Two ``bill`` runs on two hosts at once (network namespaces, each host
its own METERING_DATA_DIR, sharing only PostgreSQL and the lake folder; on a machine without
namespaces, two processes on loopback with separate data dirs) make exactly one invoice per
tenant and period, equal to an independent run of the same usage in embedded mode (its own
DuckDB file and snapshot, no lake); readers on the other host see those invoices."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest

from bench.ledger_load import publish_usage
from common.settings import load_settings
from tests.fixtures.seeds import SEED, event
from tests.support.cli_runner import BIN, assert_user_error, run_cli
from tests.support.netns import Host, namespaces_available, network, postgres_on
from tests.support.postgres import create_database, drop_database, running_postgres
from tests.support.waiting import free_port

WHY_NOT = namespaces_available()
TENANTS, PERIODS = 120, ("2025-01", "2025-02", "2025-03")
AS_OF = "2025-04-01T02:00:00Z"
LATE_USAGE_ANY_AGE = {"METERING_LATE_USAGE_MONTHS": "0"}  # (the suite's periods are in 2025)
Invoices = dict[tuple[str, str], tuple[Decimal, Decimal, str]]


class LoopbackHost(Host):
    """A host that is just this machine (no namespace): its own data folder only."""

    def command(self, argv: Sequence[str]) -> list[str]:
        return list(argv)


@dataclass(frozen=True)
class Site:
    """Two billing hosts and the PostgreSQL server (a superuser's URI) they share."""

    hosts: list[Host]
    server: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("hosts")
    if WHY_NOT is None:
        with network(2, root) as net, postgres_on(net, free_port()) as server:
            yield Site(net.hosts, server)
        return
    hosts: list[Host] = []
    for i in (1, 2):
        (root / f"host-{i}").mkdir()
        hosts.append(LoopbackHost(f"loopback-{i}", "127.0.0.1", root / f"host-{i}"))
    with running_postgres() as server:
        yield Site(hosts, server)


def usage_events() -> list[dict[str, Any]]:
    return [
        event(f"t{i:04d}", period, **{k: v * (i % 7 + 1) for k, v in SEED.items()})
        for i in range(TENANTS)
        for period in PERIODS
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Invoices:
    """The same usage billed once in embedded mode, read from its billing file."""
    data = tmp_path_factory.mktemp("embedded") / "data"
    publish_usage(load_settings(metering_data_dir=data), usage_events())
    env = {"METERING_DATA_DIR": str(data), "METERING_CATALOG": "", "METERING_LAKE_PATH": ""}
    env |= LATE_USAGE_ANY_AGE
    run_cli("bill", "--as-of", AS_OF, "--quiet", env=env, check=True)
    con = duckdb.connect(str(data / "billing.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT tenant_id, period, total, subtotal, lines FROM invoices")
        return {(t, p): (total, sub, lines) for t, p, total, sub, lines in rows.fetchall()}
    finally:
        con.close()


@dataclass(frozen=True)
class Cluster:
    """One test's catalog database and lake folder on ``site``."""

    site: Site
    catalog: str
    lake: Path

    def env(self, host: Host, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            **LATE_USAGE_ANY_AGE,
            "METERING_CATALOG": self.catalog,
            "METERING_LAKE_PATH": str(self.lake),
            "METERING_DATA_DIR": str(host.data_dir / self.lake.parent.name),
            **extra,
        }

    def publish(self, events: list[dict[str, Any]]) -> None:
        """Commit ``events`` to the lake from this process (a host of its own)."""
        settings = load_settings(
            metering_catalog=self.catalog,
            metering_lake_path=str(self.lake),
            metering_data_dir=self.lake.parent / "loader",
        )
        publish_usage(settings, events)

    def start(self, host: Host, *args: str) -> subprocess.Popen[str]:
        return host.popen(
            [str(BIN), *args],
            env=self.env(host),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def cli(self, host: Host, *args: str, **extra: str) -> str:
        proc = host.run([str(BIN), *args], env=self.env(host, **extra))
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def stored(self, sql: str) -> list[tuple[Any, ...]]:
        """``sql`` run on the catalog database itself (PostgreSQL, schema pf_billing)."""
        with psycopg.connect(self.catalog) as conn:
            return conn.execute(sql).fetchall()

    def invoices(self) -> Invoices:
        rows = self.stored(
            "SELECT tenant_id, period, total, subtotal, lines FROM pf_billing.invoices"
        )
        out = {(t, p): (total, sub, lines) for t, p, total, sub, lines in rows}
        assert len(out) == len(rows), "more than one invoice for a tenant and period"
        return out


@pytest.fixture
def cluster(site: Site, tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(site, create_database(site.server), tmp_path / "lake")
    made.publish(usage_events())
    yield made
    drop_database(made.catalog)


def finalized(stderr: str) -> int:
    """The invoices a ``bill`` run says it finalized."""
    for line in stderr.splitlines():
        if line.startswith("billed through "):
            return int(line.split(": ", 1)[1].split(" invoice")[0])
    return 0


def test_two_bill_runs_on_two_hosts_at_once(cluster: Cluster, reference: Invoices) -> None:
    one, two = cluster.site.hosts
    runs = [cluster.start(host, "bill", "--as-of", AS_OF) for host in (one, two)]
    errs = []
    for proc in runs:
        _out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        errs.append(err)
    assert cluster.invoices() == reference
    assert len(reference) == TENANTS * len(PERIODS)
    assert sum(finalized(err) for err in errs) == len(reference)  # each made once
    assert cluster.stored("SELECT count(*) FROM pf_billing.billed_usage") == [(len(reference),)]
    assert not (one.data_dir / cluster.lake.parent.name / "billing.duckdb").exists()
    assert not (two.data_dir / cluster.lake.parent.name / "billing.duckdb").exists()

    third = cluster.start(two, "bill", "--as-of", AS_OF)
    _out, err = third.communicate(timeout=600)
    assert third.returncode == 0 and finalized(err) == 0, err
    assert cluster.invoices() == reference


def test_readers_on_another_host_see_the_invoices(cluster: Cluster) -> None:
    one, two = cluster.site.hosts
    cluster.cli(one, "bill", "--as-of", AS_OF, "--quiet")
    ids = dict(
        cluster.stored(
            "SELECT period, invoice_id FROM pf_billing.invoices WHERE tenant_id = 't0003'"
        )
    )
    listed = json.loads(cluster.cli(two, "invoices", "t0003", "-f", "json"))
    assert {i["period"]: i["invoice_id"] for i in listed} == ids
    shown = json.loads(cluster.cli(two, "generate-invoice", "t0003", "2025-02", "-f", "json"))
    assert shown["invoice_id"] == ids["2025-02"] and shown["status"] != "draft"
    total = cluster.stored(
        "SELECT total FROM pf_billing.invoices WHERE tenant_id = 't0003' AND period = '2025-02'"
    )
    assert Decimal(shown["total"]) == total[0][0]
    page = cluster.cli(two, "report", "t0003", "--from", "2025-01", "--to", "2025-03")
    assert all(invoice_id in page for invoice_id in ids.values())
    found = json.loads(cluster.cli(two, "sql", "-f", "json", "SELECT count(*) AS n FROM invoices"))
    assert found == [{"n": TENANTS * len(PERIODS)}]


def test_the_catalog_refuses_a_second_live_invoice(cluster: Cluster) -> None:
    """The backstop under the lock: PostgreSQL's own UNIQUE on live_key."""
    one, _ = cluster.site.hosts
    cluster.cli(one, "bill", "--as-of", AS_OF, "--quiet")
    with pytest.raises(psycopg.errors.UniqueViolation), psycopg.connect(cluster.catalog) as conn:
        conn.execute(
            "INSERT INTO pf_billing.invoices SELECT 'INV-copy', tenant_id, period, period_start, "
            "period_end, tier, currency, status, subtotal, total, due_date, created_at, "
            "finalized_at, stripe_invoice_id, lines, quotas, computed_from, credit_balance, "
            "void_reason, voided_at, voided_by, replaces, replaced_by, live_key "
            "FROM pf_billing.invoices LIMIT 1"
        )


def explained(cluster: Cluster, host: Host, tenant: str, period: str) -> dict[str, Any]:
    shown = cluster.cli(host, "generate-invoice", tenant, period, "--explain", "-f", "json")
    data: dict[str, Any] = json.loads(shown)
    return data


def test_explain_recomputes_each_line_at_the_invoice_snapshot(cluster: Cluster) -> None:
    one, two = cluster.site.hosts
    cluster.cli(one, "bill", "--as-of", AS_OF, "--quiet")
    invoice = json.loads(cluster.cli(two, "generate-invoice", "t0003", "2025-02", "-f", "json"))
    [(snapshot,)] = cluster.stored(
        "SELECT lake_snapshot FROM pf_billing.invoices "
        "WHERE tenant_id = 't0003' AND period = '2025-02'"
    )
    assert invoice["lake_snapshot"] == snapshot is not None

    cluster.publish([event("t0003", "2025-02", **{k: v * 5 for k, v in SEED.items()})])  # late
    proof = explained(cluster, two, "t0003", "2025-02")
    assert proof["lake_snapshot"] == snapshot and proof["total"] == invoice["total"]
    assert [(x["code"], x["quantity"]) for x in proof["lines"]] == [
        (x["code"], x["quantity"]) for x in invoice["lines"]
    ]
    assert all(x["same"] is True for x in proof["lines"])  # every line comes from usage
    now = json.loads(
        cluster.cli(
            two,
            "sql",
            "-f",
            "json",
            "SELECT events FROM usage WHERE tenant_id = 't0003' AND period = '2025-02'",
        )
    )
    assert now[0]["events"] > invoice["computed_from"]["usage"]["events"]  # the lake moved on

    # the late usage is charged on the next invoice, at a later snapshot; more lands after it
    cluster.cli(one, "bill", "--as-of", "2025-05-01T02:00:00Z", "--quiet")
    later = json.loads(cluster.cli(two, "generate-invoice", "t0003", "2025-04", "-f", "json"))
    assert later["lake_snapshot"] > snapshot
    cluster.publish([event("t0003", "2025-02", **{k: v * 9 for k, v in SEED.items()})])
    proof = explained(cluster, two, "t0003", "2025-04")
    [late] = [x for x in proof["lines"] if x["code"] == "late_usage"]
    assert late["period"] == "2025-02" and late["same"] is True
    stored = [x for x in later["lines"] if x["code"] == "late_usage"]
    assert late["amount_at_snapshot"] == stored[0]["amount"]
    assert all(x["same"] is True for x in proof["lines"])
    table = cluster.cli(two, "generate-invoice", "t0003", "2025-04", "--explain")
    assert f"at lake snapshot {later['lake_snapshot']}" in table and "NO" not in table

    # maintenance expiring every snapshot it may keeps those of invoices: the proof stands
    no_history = {"METERING_LAKE_RETENTION": "0s", "METERING_LAKE_FILE_GRACE": "0s"}
    [done] = json.loads(cluster.cli(one, "lake", "maintain", "-f", "json", **no_history))
    assert done["snapshots_expired"] > 0 and done["snapshots_kept"] >= 2
    assert explained(cluster, two, "t0003", "2025-04") == proof
    assert explained(cluster, two, "t0003", "2025-02")["lake_snapshot"] == snapshot


def test_explain_refuses_bad_input_and_changes_nothing(cluster: Cluster) -> None:
    one, _ = cluster.site.hosts
    cluster.cli(one, "bill", "--as-of", "2025-02-01T02:00:00Z", "--quiet")
    before = cluster.stored("SELECT count(*) FROM pf_billing.invoices")
    argv = ["generate-invoice", "t0003", "2025-02", "--explain", "-f", "html"]
    proc = one.run([str(BIN), *argv], env=cluster.env(one))
    assert_user_error(proc, "--explain shows a table or JSON")
    assert cluster.stored("SELECT count(*) FROM pf_billing.invoices") == before


def test_embedded_invoices_record_no_lake_snapshot(data_env: dict[str, str]) -> None:
    publish_usage(load_settings(), [event("t0001", "2025-01", **SEED)])
    invoice = json.loads(
        run_cli("generate-invoice", "t0001", "2025-01", "-f", "json", check=True).stdout
    )
    assert invoice["lake_snapshot"] is None
    proc = run_cli("generate-invoice", "t0001", "2025-01", "--explain")
    assert_user_error(proc, "--explain needs cluster mode (METERING_CATALOG)")


def test_lake_migrate_moves_the_billing_file_once(site: Site, tmp_path: Path) -> None:
    embedded = {
        "METERING_DATA_DIR": str(tmp_path / "embedded"),
        "METERING_CATALOG": "",
        "METERING_LAKE_PATH": "",
        **LATE_USAGE_ANY_AGE,
    }
    events = [event(f"t{i:04d}", p, **SEED) for i in range(4) for p in PERIODS[:2]]
    publish_usage(load_settings(metering_data_dir=tmp_path / "embedded"), events)
    run_cli("tenants", "add", "t0009", "--tier", "professional", env=embedded, check=True)
    run_cli("tenants", "set-alert", "t0001", "--amount", "10", env=embedded, check=True)
    run_cli("bill", "--as-of", "2025-03-01T02:00:00Z", "-q", env=embedded, check=True)
    catalog = create_database(site.server)
    cluster = {
        "METERING_CATALOG": catalog,
        "METERING_LAKE_PATH": str(tmp_path / "lake"),
        "METERING_DATA_DIR": str(tmp_path / "host"),
        **LATE_USAGE_ANY_AGE,
    }
    try:
        argv = ["lake", "migrate", "--from", str(tmp_path / "embedded")]
        moved = run_cli(*argv, env=cluster, check=True)
        assert "lake migrate: billing migrated: " in moved.stderr, moved.stderr
        for tenant in ("t0001", "t0009"):
            shown = [run_cli("invoices", tenant, "-f", "json", env=env, check=True).stdout
                     for env in (embedded, cluster)]  # fmt: skip
            assert json.loads(shown[0]) == json.loads(shown[1])
        again = run_cli("bill", "--as-of", "2025-03-01T02:00:00Z", env=cluster, check=True)
        assert finalized(again.stderr) == 0
        thresholds = run_cli("alerts", "thresholds", "-f", "json", env=cluster, check=True)
        assert "t0001" in thresholds.stdout  # (its own threshold, set in embedded mode)
        assert "already migrated" in run_cli(*argv, env=cluster, check=True).stderr

        run_cli("bill", "--as-of", "2025-04-01T02:00:00Z", "-q", env=embedded, check=True)
        before = run_cli("sql", "-f", "json", "SELECT count(*) AS n FROM invoices", env=cluster)
        assert_user_error(run_cli(*argv, env=cluster), "refusing to merge two sets of books")
        after = run_cli("sql", "-f", "json", "SELECT count(*) AS n FROM invoices", env=cluster)
        assert json.loads(after.stdout) == json.loads(before.stdout) == [{"n": 8}]
    finally:
        drop_database(catalog)
