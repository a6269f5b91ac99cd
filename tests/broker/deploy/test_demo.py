"""``make demo`` (deploy/demo.sh), scaled down: its data is readable afterwards with the
commands it prints (issue 17, point 10)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_demo_data_is_readable_with_the_commands_it_prints(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("METERING_", "KAFKA_"))}
    env = {
        **clean,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "METERING_DATA_DIR": str(tmp_path / "demo"),
        "DEMO_PERCENT": "2",
    }
    demo = subprocess.run(
        ["bash", "deploy/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-3000:]
    printed = demo.stdout.split("Look at it again", 1)[1].splitlines()[1:]
    exports = next(line.strip() for line in printed if line.strip().startswith("export "))
    usage = next(line.strip() for line in printed if " usage acme-corp " in line)
    again = subprocess.run(
        ["bash", "-c", f"{exports} && {usage} -f json"],
        cwd=ROOT, env={**clean, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["events"] > 0, again.stdout
