"""``pf-metering webhooks serve`` in cluster mode: two hosts (each its own METERING_DATA_DIR,
given only METERING_CATALOG and METERING_LAKE_PATH, two processes on loopback) serve Stripe's
webhooks against the billing state in the catalog's ``pf_billing`` on a real PostgreSQL. A
delivery's status change is seen by a third host's ``invoices show``; its replay to either
host (one of them while the other applies it) is acknowledged as a duplicate and applied
once; deliveries with a bad signature get 400 and store nothing; no host writes a billing
file. While another host holds the billing lock past METERING_LOCK_TIMEOUT, or PostgreSQL is
stopped, a delivery gets 500 (Stripe redelivers); the redelivery once the lock is free, or
the server started again on its port, is applied by the same serving process."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from billing.catalog_db import BILLING_LOCK, catalog_billing_db
from common.settings import load_settings
from tests.fixtures.stripe import WEBHOOK_SECRET, stripe_signature
from tests.fixtures.webhooks import NOT_DUE, PAST_DUE, event, post, store_sent_invoices
from tests.support.cli_runner import run_cli
from tests.support.postgres import create_database, local_postgres, running_postgres
from tests.support.waiting import free_port, wait_for
from tests.support.webhook_process import ServeProcess, webhooks_serve

Reply = tuple[int, dict[str, str]]


def host_env(cluster_env: dict[str, str], folder: Path) -> dict[str, str]:
    """A host's settings: the cluster's two, and a data folder of its own."""
    return {
        "METERING_CATALOG": cluster_env["METERING_CATALOG"],
        "METERING_LAKE_PATH": cluster_env["METERING_LAKE_PATH"],
        "METERING_DATA_DIR": str(folder),
    }


def deliver(server: ServeProcess, payload: bytes, secret: str = WEBHOOK_SECRET) -> Reply:
    return post(server.url, payload, stripe_signature(payload, secret, int(time.time())))


def at_once(*deliveries: tuple[ServeProcess, bytes]) -> list[Reply]:
    """The deliveries sent together (each from its own thread), their replies sorted."""
    start = threading.Barrier(len(deliveries))
    replies: list[Reply] = []

    def send(server: ServeProcess, payload: bytes) -> None:
        start.wait(timeout=60)
        replies.append(deliver(server, payload))

    threads = [threading.Thread(target=send, args=d) for d in deliveries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(replies) == len(deliveries), replies
    return sorted(replies, key=lambda r: json.dumps(r[1]))


def shown(env: dict[str, str], invoice_id: str) -> dict[str, Any]:
    """``invoices show ID -f json`` run on a host of ``env``."""
    proc = run_cli("invoices", "show", invoice_id, "-f", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def webhook_events(catalog: str) -> list[tuple[str, str, str | None]]:
    """``pf_billing.webhook_events`` as PostgreSQL holds it."""
    with psycopg.connect(catalog) as conn:
        rows = conn.execute(
            "SELECT event_id, outcome, invoice_id FROM pf_billing.webhook_events ORDER BY 1"
        ).fetchall()
    return [(str(a), str(b), c) for a, b, c in rows]


def test_webhooks_serve_on_two_hosts_moves_invoices_in_the_catalog_once(
    cluster_env: dict[str, str], tmp_path: Path
) -> None:
    with catalog_billing_db(load_settings()) as con:
        store_sent_invoices(con)
    catalog = cluster_env["METERING_CATALOG"]
    hosts = {name: host_env(cluster_env, tmp_path / name) for name in ("a", "b", "reader")}
    secret = {"STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET}
    reader = hosts["reader"]
    assert shown(reader, PAST_DUE)["status"] == "overdue"  # sent, past its due date

    paid = event("evt_1", "invoice.paid", "in_acme01", PAST_DUE)
    voided = event("evt_2", "invoice.voided", "in_acme02")  # matched by its Stripe id
    with (
        webhooks_serve({**hosts["a"], **secret}) as a,
        webhooks_serve({**hosts["b"], **secret}) as b,
    ):
        stale = stripe_signature(paid, WEBHOOK_SECRET, int(time.time()) - 301)
        for header in (None, "t=1,v1=00", stale):
            assert post(a.url, paid, header)[0] == 400, header
        assert deliver(b, paid, "whsec_guess")[0] == 400
        tampered = paid.replace(b"invoice.paid", b"invoice.voided")
        signed_for_paid = stripe_signature(paid, WEBHOOK_SECRET, int(time.time()))
        assert post(a.url, tampered, signed_for_paid)[0] == 400
        assert webhook_events(catalog) == []
        assert shown(reader, PAST_DUE)["status"] == "overdue"

        assert deliver(a, paid) == (200, {"status": "sent -> paid"})
        assert deliver(b, paid) == (200, {"status": "duplicate"})  # a replay, on the other host
        assert deliver(a, paid) == (200, {"status": "duplicate"})
        assert at_once((a, voided), (b, voided)) == [
            (200, {"status": "duplicate"}),
            (200, {"status": "sent -> void"}),
        ]
        assert deliver(b, voided) == (200, {"status": "duplicate"})

    for server in (a, b):
        assert server.returncode == 0, server.stderr
        assert WEBHOOK_SECRET not in server.stderr
    assert webhook_events(catalog) == [
        ("evt_1", "sent -> paid", PAST_DUE),
        ("evt_2", "sent -> void", NOT_DUE),
    ]
    assert shown(reader, PAST_DUE)["status"] == "paid"
    void = shown(reader, NOT_DUE)
    assert (void["status"], void["voided_by"], void["void_reason"]) == (
        "void",
        "stripe",
        "voided in Stripe",
    )
    written = [p for env in hosts.values() for p in Path(env["METERING_DATA_DIR"]).rglob("*")]
    assert not [p for p in written if p.name.startswith("billing.duckdb")], written


def test_a_held_lock_or_a_stopped_catalog_gets_500_and_the_redelivery_is_applied(
    tmp_path: Path,
) -> None:
    port = free_port()  # a server of this test's own: it is stopped and started again
    with running_postgres(port) as server:
        catalog = create_database(server)
        env = host_env(
            {"METERING_CATALOG": catalog, "METERING_LAKE_PATH": str(tmp_path / "lake")},
            tmp_path / "a",
        )
        with catalog_billing_db(load_settings(**{k.lower(): v for k, v in env.items()})) as con:
            store_sent_invoices(con)
        paid = event("evt_1", "invoice.paid", "in_acme01", PAST_DUE)
        voided = event("evt_2", "invoice.voided", "in_acme02")
        serving = {**env, "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET, "METERING_LOCK_TIMEOUT": "1"}
        with webhooks_serve(serving) as a:
            with psycopg.connect(catalog, autocommit=True) as other_host:
                other_host.execute("SELECT pg_advisory_lock(%s)", [BILLING_LOCK])
                assert deliver(a, paid)[0] == 500
            assert deliver(a, paid) == (200, {"status": "sent -> paid"})

            assert local_postgres("stop", port).returncode == 0
            assert deliver(a, voided)[0] == 500
            assert local_postgres("start", port).returncode == 0
            replies: list[Reply] = []

            def redelivered() -> bool:  # as Stripe does, until an answer is not a 500
                replies.append(deliver(a, voided))
                return replies[-1][0] != 500

            wait_for(redelivered, "a redelivery after the catalog's restart", 60, every=0.5)
            assert replies[-1] == (200, {"status": "sent -> void"}), replies
        assert a.returncode == 0, a.stderr
        assert webhook_events(catalog) == [
            ("evt_1", "sent -> paid", PAST_DUE),
            ("evt_2", "sent -> void", NOT_DUE),
        ]
