"""The nightly ``bill`` run twice at once, and SIGKILLed midway then rerun: one invoice per
tenant and period, every total equal to a clean single run's, and (with ``--stripe``) exactly
one Stripe invoice per local invoice, equal to it to the cent.

Usage for 500 tenants over four closed periods (2,000 invoices) is published once; each test
bills its own copy. Kill points are drawn inside the billing work itself: after the process
has opened the billing file (seen in ``/proc``), at a random moment of the time a clean run
keeps it open; with ``--stripe``, after a random number of Stripe calls.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest

from bench.ledger_load import publish_usage
from common.settings import load_settings
from tests.fixtures.seeds import SEED, correction, event
from tests.fixtures.stripe import API_KEY
from tests.support.cli_runner import BIN, run_cli
from tests.support.stripe_server import FakeStripe
from tests.support.waiting import wait_for

SOAK = os.environ.get("PF_SOAK") == "1"
TENANTS, PERIODS = 500, ("2025-01", "2025-02", "2025-03", "2025-04")
AS_OF = "2025-05-01T02:00:00Z"
KILLS = 12 if SOAK else 4
STRIPE_KILLS = 12 if SOAK else 3
Invoices = dict[tuple[str, str], tuple[str, str, str]]


@pytest.fixture(scope="module")
def unbilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with usage of TENANTS tenants in every period of PERIODS, not billed."""
    data = tmp_path_factory.mktemp("unbilled") / "data"
    events = [
        event(f"t{i:04d}", period, **{k: v * (i % 7 + 1) for k, v in SEED.items()})
        for i in range(TENANTS)
        for period in PERIODS
    ]
    publish_usage(load_settings(metering_data_dir=data), events)
    return data


def copy_of(unbilled: Path, target: Path) -> dict[str, str]:
    shutil.copytree(unbilled, target / "data")
    return {"METERING_DATA_DIR": str(target / "data"), "METERING_GROUP": f"g-{target.name}"}


def start_bill(env: dict[str, str], *args: str, as_of: str = AS_OF) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN), "bill", "--as-of", as_of, "--quiet", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def invoices(env: dict[str, str]) -> Invoices:
    """(tenant, period) -> (total, subtotal, lines) of every invoice; one row each, checked."""
    con = duckdb.connect(str(Path(env["METERING_DATA_DIR"]) / "billing.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT tenant_id, period, total::VARCHAR, subtotal::VARCHAR, lines FROM invoices"
        ).fetchall()
        billed = con.execute("SELECT count(*) FROM billed_usage").fetchone()
    finally:
        con.close()
    out = {(t, p): (total, subtotal, lines) for t, p, total, subtotal, lines in rows}
    assert len(out) == len(rows), "more than one invoice for a tenant and period"
    assert billed == (len(rows),)
    return out


@pytest.fixture(scope="module")
def reference(unbilled: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Invoices, float]:
    """What one clean run produces, and how long it keeps the billing file open."""
    env = copy_of(unbilled, tmp_path_factory.mktemp("reference"))
    proc = start_bill(env)
    opened = wait_until_open(proc)
    assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    held = time.monotonic() - opened
    found = invoices(env)
    assert len(found) == TENANTS * len(PERIODS)
    return found, held


def holds_billing_file(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").endswith("billing.duckdb") for fd in fds)
    except OSError:
        return False


def wait_until_open(proc: subprocess.Popen[str]) -> float:
    """The moment ``proc`` opened the billing file."""
    deadline = time.monotonic() + 120
    while not holds_billing_file(proc.pid):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.002)
    return time.monotonic()


def kill_while_open(proc: subprocess.Popen[str], rnd: random.Random, held: float) -> None:
    """SIGKILL ``proc`` at a random moment of the ``held`` seconds a clean run keeps the
    billing file open, counted from when it opened it."""
    try:
        opened = wait_until_open(proc)
        time.sleep(max(0.0, opened + rnd.uniform(0, held) - time.monotonic()))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)


def test_two_bill_runs_at_once(
    unbilled: Path, reference: tuple[Invoices, float], tmp_path: Path
) -> None:
    env = copy_of(unbilled, tmp_path)
    runs = [start_bill(env) for _ in range(2)]
    for proc in runs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert invoices(env) == reference[0]
    assert run_cli("bill", "--as-of", AS_OF, "--quiet", env=env, check=True)  # a third: no-op
    assert invoices(env) == reference[0]


@pytest.mark.soak
def test_bill_killed_midway_then_rerun(
    unbilled: Path, reference: tuple[Invoices, float], tmp_path: Path
) -> None:
    expected, held = reference
    rnd = random.Random(61)
    landed = {"before the commit": 0, "after the commit": 0}
    env = copy_of(unbilled, tmp_path / "run")
    for n in range(KILLS):
        kill_while_open(start_bill(env), rnd, held)
        found = invoices(env)
        assert found in ({}, expected)  # all or nothing, never a part
        landed["after the commit" if found else "before the commit"] += 1
        if found or n == KILLS - 1:  # the rerun completes what the killed run left
            run_cli("bill", "--as-of", AS_OF, "--quiet", env=env, check=True)
            assert invoices(env) == expected
            env = copy_of(unbilled, tmp_path / f"run{n}")  # and the next kill starts afresh
    print(f"\nbill SIGKILLed {KILLS} times while holding the billing file: {landed}")


# --- corrections and credit balances -------------------------------------------------------

CREDIT_AS_OF = "2025-08-01T02:00:00Z"
Ledger = list[tuple[str, str, str, str]]


@pytest.fixture(scope="module")
def corrected(unbilled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every tenant billed through 2025-04 with 1,000 more violations in 2025-01, which a
    correction event each then takes back: the next ``bill`` (through 2025-07) credits 1,000
    usd each, carries most of it and applies it to the invoices after."""
    base = tmp_path_factory.mktemp("corrected")
    env = copy_of(unbilled, base)
    cfg = load_settings(metering_data_dir=Path(env["METERING_DATA_DIR"]))
    publish_usage(cfg, [event(f"t{i:04d}", "2025-01", violations=1000) for i in range(TENANTS)])
    run_cli("bill", "--as-of", AS_OF, "--quiet", env=env, check=True)
    publish_usage(
        cfg, [correction(f"t{i:04d}", "2025-01", violations=-1000) for i in range(TENANTS)]
    )
    return base / "data"


def credit_ledger(env: dict[str, str]) -> Ledger:
    con = duckdb.connect(str(Path(env["METERING_DATA_DIR"]) / "billing.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT m.tenant_id, i.period, s.period, m.amount::VARCHAR FROM credit_movements m "
            "JOIN invoices i ON i.invoice_id = m.invoice_id "
            "JOIN invoices s ON s.invoice_id = m.source_invoice_id ORDER BY ALL"
        ).fetchall()
    finally:
        con.close()
    return [(t, p, s, a) for t, p, s, a in rows]


@pytest.fixture(scope="module")
def credit_reference(
    corrected: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Invoices, Ledger, float]:
    """What one clean corrected run produces, and how long it keeps the billing file open."""
    env = copy_of(corrected, tmp_path_factory.mktemp("credit-reference"))
    proc = start_bill(env, as_of=CREDIT_AS_OF)
    opened = wait_until_open(proc)
    assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    held = time.monotonic() - opened
    found, ledger = invoices(env), credit_ledger(env)
    assert len(found) == TENANTS * 7
    per_tenant = 1 + 2  # carried on 2025-05, applied on 2025-06 and 2025-07
    assert len(ledger) == TENANTS * per_tenant
    assert {a for t, p, s, a in ledger if p == "2025-05"} == {"950.00"}  # 50 - 1,000
    assert found[("t0000", "2025-07")][0] == "0.00"
    return found, ledger, held


def test_two_bill_runs_at_once_move_each_credit_balance_once(
    corrected: Path, credit_reference: tuple[Invoices, Ledger, float], tmp_path: Path
) -> None:
    env = copy_of(corrected, tmp_path)
    runs = [start_bill(env, as_of=CREDIT_AS_OF) for _ in range(2)]
    for proc in runs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert (invoices(env), credit_ledger(env)) == credit_reference[:2]
    run_cli("bill", "--as-of", CREDIT_AS_OF, "--quiet", env=env, check=True)  # a third: no-op
    assert (invoices(env), credit_ledger(env)) == credit_reference[:2]


@pytest.mark.soak
def test_bill_with_credits_killed_midway_then_rerun(
    corrected: Path, credit_reference: tuple[Invoices, Ledger, float], tmp_path: Path
) -> None:
    expected, ledger, held = credit_reference
    rnd = random.Random(63)
    before = copy_of(corrected, tmp_path / "before")
    start = (invoices(before), credit_ledger(before))
    for n in range(KILLS):
        env = copy_of(corrected, tmp_path / f"run{n}")
        kill_while_open(start_bill(env, as_of=CREDIT_AS_OF), rnd, held)
        found = (invoices(env), credit_ledger(env))
        assert found in (start, (expected, ledger))  # all or nothing, never a part
        run_cli("bill", "--as-of", CREDIT_AS_OF, "--quiet", env=env, check=True)
        assert (invoices(env), credit_ledger(env)) == (expected, ledger)


def stripe_env(env: dict[str, str], fake: FakeStripe) -> dict[str, str]:
    return {**env, "STRIPE_SECRET_KEY": API_KEY, "STRIPE_API_BASE": fake.url}


def assert_one_stripe_invoice_each(env: dict[str, str], fake: FakeStripe) -> None:
    con = duckdb.connect(str(Path(env["METERING_DATA_DIR"]) / "billing.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT invoice_id, total, stripe_invoice_id, status FROM invoices"
        ).fetchall()
    finally:
        con.close()
    assert rows
    for invoice_id, total, stripe_id, status in rows:
        (remote,) = fake.invoices_for(invoice_id)  # exactly one
        assert remote["id"] == stripe_id and status == "sent" and remote["status"] == "open"
        assert sum(item["amount"] for item in fake.items_of(stripe_id)) == int(total * 100)
    assert fake.pending_items() == []  # no item left dangling outside an invoice
    assert len(fake.state.invoices) == len(rows)


@pytest.fixture
def small(tmp_path: Path) -> dict[str, str]:
    """5 tenants, one closed period: a push of ~80 Stripe calls."""
    data = tmp_path / "data"
    publish_usage(
        load_settings(metering_data_dir=data),
        [event(f"s{i:02d}", "2025-04", **SEED) for i in range(5)],
    )
    return {"METERING_DATA_DIR": str(data), "METERING_GROUP": f"g-{tmp_path.name}"}


def test_two_bill_stripe_runs_at_once_push_each_invoice_once(
    small: dict[str, str], fake_stripe: FakeStripe
) -> None:
    env = stripe_env(small, fake_stripe)
    runs = [start_bill(env, "--stripe") for _ in range(2)]
    for proc in runs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert_one_stripe_invoice_each(env, fake_stripe)


@pytest.mark.soak
def test_bill_stripe_killed_midway_then_rerun(
    small: dict[str, str], fake_stripe: FakeStripe
) -> None:
    env = stripe_env(small, fake_stripe)
    rnd = random.Random(62)
    kills = 0
    for _ in range(STRIPE_KILLS):
        proc = start_bill(env, "--stripe")
        try:
            wait_for(
                stripe_calls_or_exit(fake_stripe, rnd.randint(1, 15), proc),
                "Stripe calls",
                every=0.001,
            )
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.communicate(timeout=60)
    assert kills >= STRIPE_KILLS // 2
    run_cli("bill", "--as-of", AS_OF, "--quiet", "--stripe", env=env, check=True)
    assert_one_stripe_invoice_each(env, fake_stripe)
    print(f"\nbill --stripe SIGKILLed {kills} times mid-push; {len(fake_stripe.calls)} calls")


def stripe_calls_or_exit(
    fake: FakeStripe, more: int, proc: subprocess.Popen[str]
) -> Callable[[], bool]:
    """True once Stripe got ``more`` calls than it has now, or ``proc`` ended."""
    target = len(fake.calls) + more
    return lambda: len(fake.calls) >= target or proc.poll() is not None
