"""SQL shows what the CLI shows (issue 17, point 7): ``invoices`` carries the status people
see (``overdue`` once unpaid past due), and the README's plain-DuckDB query runs as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from aggregator.views import write_query_db
from common.settings import load_settings
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import SEED, event

README = Path(__file__).resolve().parents[2] / "README.md"
DUCKDB = Path(sys.executable).parent / "duckdb"


def test_sql_sees_overdue_as_the_cli_does(pfm: Cli) -> None:
    pfm.publish(event("acme", "2025-01", **SEED))
    assert pfm("bill", "--as-of", "2025-02-01T02:00:00Z", "-q").code == 0
    (shown,) = pfm("invoices", "acme", "-f", "json").json()
    assert shown["status"] == "overdue"  # due 2025-03-03, long past
    rows = pfm(
        "sql",
        "SELECT invoice_id, status, stored_status FROM invoices WHERE status = 'overdue'",
        "-f",
        "json",
    ).json()
    assert rows == [
        {"invoice_id": shown["invoice_id"], "status": "overdue", "stored_status": "finalized"}
    ]


def readme_duckdb_session() -> list[str]:
    """The statements of the README's plain-DuckDB example (the ``D `` lines)."""
    text = README.read_text()
    block = text.split("<!-- duckdb-cli -->", 2)[1]
    lines = (line.strip() for line in block.splitlines())
    return [line[2:] for line in lines if line.startswith("D ")]


def test_the_readme_query_runs_in_the_plain_duckdb_cli(pfm: Cli) -> None:
    pfm.publish(event("acme", "2025-01", **SEED))
    assert pfm("bill", "--as-of", "2025-02-01T02:00:00Z", "-q").code == 0
    cfg = load_settings()
    write_query_db(cfg.metering_data_dir, cfg.snapshot_dir, cfg.metering_topic)  # as a worker
    statements = readme_duckdb_session()
    assert statements, "the README lost its duckdb CLI example"
    data = cfg.metering_data_dir
    script = "\n".join(s.replace("data/", f"{data}/") for s in statements)
    run = subprocess.run(
        [str(DUCKDB), "-readonly", "-csv", str(data / "query.duckdb")],
        input=script, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0 and "Error" not in run.stderr + run.stdout, run.stderr
    assert "acme,2025-01,overdue,53.66,1" in run.stdout, run.stdout
