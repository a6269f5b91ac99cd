"""How long ``bill`` takes to finalize invoices for many tenants (no Stripe).

    .venv/bin/python -m bench.bill_bench [--tenants 10000] [--events 3]

Builds a throw-away data dir, folds ``--events`` usage events per tenant (all in 2025-01) into a
real ledger and snapshot, then times the real ``pf-metering bill --as-of 2025-02-01T02:00:00Z``
(interpreter start included), a second run (nothing left to do), and the same job in-process
split into reading the snapshot and rating + writing. Target: 10,000 tenants in under 30 s.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import settings as config

AS_OF = "2025-02-01T02:00:00Z"
JAN_15 = int(datetime(2025, 1, 15, tzinfo=UTC).timestamp() * 1_000_000)
BIN = Path(sys.executable).parent / "pf-metering"


def events(tenants: int, per_tenant: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for t in range(tenants):
        for e in range(per_tenant):
            out.append(
                {
                    "event_id": f"bench-{t}-{e}",
                    "tenant_id": f"tenant_{t:05d}",
                    "session_id": f"s-{e}",
                    "occurred_at": JAN_15 + rng.randrange(10**9),
                    "source": "gateway",
                    "cpu_ms": rng.randint(100, 10_099),
                    "network_bytes": rng.randint(1_024, 1_049_599),
                    "api_calls": rng.randint(1, 50),
                    "tool_executions": rng.randint(1, 20),
                    "data_retrievals": rng.randint(1, 10),
                    "egress_scans": rng.randint(1, 5),
                    "policy_checks": rng.randint(10, 109),
                    "violations": rng.randint(0, 2),
                    "risk_score": rng.uniform(0.1, 0.4),
                }
            )
    return out


def timed_cli(*args: str) -> float:
    """Wall time of one real ``pf-metering`` run; its stderr is echoed, indented."""
    start = time.perf_counter()
    proc = subprocess.run(
        [str(BIN), *args], check=True, env=os.environ.copy(), capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    for line in proc.stderr.splitlines():
        print(f"    | {line}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=3, help="events per tenant")
    args = parser.parse_args()

    from aggregator.views import usage_reader
    from bench.ledger_load import publish_usage
    from billing import invoicing
    from billing.db import billing_db

    with tempfile.TemporaryDirectory(prefix="pf-bill-bench-") as tmp:
        os.environ["METERING_DATA_DIR"] = str(Path(tmp) / "data")
        os.environ.pop("STRIPE_ENABLED", None)
        cfg = config.load_settings()

        start = time.perf_counter()
        publish_usage(cfg, events(args.tenants, args.events))
        print(
            f"setup: {args.tenants} tenants x {args.events} events folded and published "
            f"in {time.perf_counter() - start:.1f} s"
        )

        first = timed_cli("bill", "--as-of", AS_OF)
        second = timed_cli("bill", "--as-of", AS_OF, "--quiet")
        with billing_db(cfg.billing_db, 10) as con:
            row = con.execute("SELECT count(*), sum(total) FROM invoices").fetchone()
            assert row is not None
            count, total = row
            con.execute("DELETE FROM invoices; DELETE FROM billed_usage")
        assert count == args.tenants, count

        start = time.perf_counter()
        reader = usage_reader(cfg)
        usage = invoicing.UsageData.read(reader)
        reader.close()
        read = time.perf_counter() - start
        start = time.perf_counter()
        with billing_db(cfg.billing_db, 10) as con:
            result = invoicing.bill(
                con, usage, invoicing.Rules.from_settings(cfg),
                as_of=datetime.fromisoformat(AS_OF),
            )  # fmt: skip
        rate_write = time.perf_counter() - start
        assert len(result.invoices) == args.tenants

    print(
        f"bill (CLI, process start included): {count} invoices in {first:.2f} s "
        f"({'PASS' if first < 30 else 'FAIL'}: target < 30 s); invoices total {total} usd"
    )
    print(f"bill again (nothing to do): {second:.2f} s")
    print(
        f"in-process: read snapshot {read:.2f} s, rate + write {rate_write:.2f} s "
        f"({args.tenants / max(rate_write, 1e-9):,.0f} invoices/s)"
    )


if __name__ == "__main__":
    main()
