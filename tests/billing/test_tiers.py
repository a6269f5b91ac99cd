"""Tiers: the original tool's exact values, custom tiers from TOML validated strictly, and the
``tiers`` command."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from billing.tiers import BUILTIN_TIERS, load_tiers, parse_tiers_file
from common.errors import UserError
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import CUSTOM
from tests.support.cli_runner import assert_user_error, run_cli

ORIGINAL = {  # the original tool's tiers, column by column
    "basic": ("Basic", "50.00", "0.0000001", "0.05", "0.001", "0.01", "0.005", "0.002", "0.001",
              "1.00", "1.0", (3_600_000, 1_000, 10_000, 1_000, 500)),
    "professional": ("Professional", "200.00", "0.00000008", "0.04", "0.0008", "0.008", "0.004",
                     "0.0015", "0.0008", "0.80", "0.9", (7_200_000, 5_000, 50_000, 5_000, 2_500)),
    "enterprise": ("Enterprise", "500.00", "0.00000006", "0.03", "0.0005", "0.005", "0.003",
                   "0.001", "0.0005", "0.50", "0.8", (18_000_000, 20_000, 200_000, 20_000, 10_000)),
}  # fmt: skip
PRICES = (
    "base_price_usd",
    "cpu_price_per_ms",
    "network_price_per_mb",
    "api_call_price",
    "tool_execution_price",
    "data_retrieval_price",
    "egress_scan_price",
    "policy_check_price",
    "violation_price",
    "risk_multiplier",
)
QUOTAS = ("cpu_ms", "network_mb", "api_calls", "tool_executions", "data_retrievals")


@pytest.mark.parametrize("name", list(ORIGINAL))
def test_builtin_tiers_have_the_original_values(name: str) -> None:
    tier = BUILTIN_TIERS[name]
    display, *prices, quotas = ORIGINAL[name]
    assert tier.display_name == display
    for field, text in zip(PRICES, prices, strict=True):
        assert getattr(tier, field) == Decimal(str(text)), field
    assert tuple(tier.quota_of(q) for q in QUOTAS) == quotas
    assert tier.quota_mode == "reported"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tiers.toml"
    path.write_text(text)
    return path


def test_custom_tiers_load_exactly(tmp_path: Path) -> None:
    tiers = load_tiers(write(tmp_path, CUSTOM))
    assert list(tiers) == ["basic", "professional", "enterprise", "startup"]
    startup = tiers["startup"]
    assert startup.cpu_price_per_ms == Decimal("0.0000001")  # TOML float read as Decimal
    assert startup.risk_multiplier == Decimal("0.95") and startup.quota_mode == "included"
    assert startup.quota_of("cpu_ms") == 1_000_000 and startup.quota_of("api_calls") is None


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("violation_price = 1", "violation_price = -1"), "tiers.startup.violation_price"),
        (("api_call_price = 0.001", "api_call_prise = 0.001"), "tiers.startup.api_call_prise"),
        (("network_mb = 100", "network_gb = 100"), "tiers.startup.quotas.network_gb"),
        (("cpu_ms = 1_000_000", "cpu_ms = -5"), "tiers.startup.quotas.cpu_ms"),
        (('quota_mode = "included"', 'quota_mode = "free"'), "tiers.startup.quota_mode"),
        (("[tiers.startup]\n", "[tiers.startup]\nbogus = 1\n"), "tiers.startup.bogus"),
        (("violation_price = 1\n", ""), "tiers.startup.violation_price"),
        (("tiers.startup", "tiers.basic"), "tiers.basic: built-in tier"),
        (("network_mb = 100\n", "network_mb = 100\n[other]\nx = 1\n"), "other"),
    ],
)
def test_bad_tiers_file_names_file_and_key(tmp_path: Path, edit: tuple[str, str], key: str) -> None:
    old, new = edit
    assert old in CUSTOM
    path = write(tmp_path, CUSTOM.replace(old, new))  # every occurrence
    with pytest.raises(UserError) as err:
        parse_tiers_file(path)
    message = str(err.value)
    assert str(path) in message and key in message, message
    assert "\n" not in message


def test_unreadable_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read tiers file"):
        parse_tiers_file(tmp_path / "missing.toml")
    with pytest.raises(UserError, match=r"invalid tiers file .*tiers\.toml"):
        parse_tiers_file(write(tmp_path, "[tiers.x\n"))


def test_tiers_command_lists_every_price_and_quota(
    pfm: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERING_TIERS_FILE", str(write(tmp_path, CUSTOM)))
    out = tmp_path / "tiers.json"
    run = pfm("tiers", "-o", str(out))
    assert run.code == 0 and "wrote" in run.err
    by_name = {t["name"]: t for t in json.loads(out.read_text())}  # -o alone: JSON, as before
    assert list(by_name) == ["basic", "professional", "enterprise", "startup"]
    for name, (display, *prices, quotas) in ORIGINAL.items():
        tier = by_name[name]
        assert tier["display_name"] == display
        assert [Decimal(tier[f]) for f in PRICES] == [Decimal(p) for p in prices]
        assert tuple(tier["quotas"][q] for q in QUOTAS) == quotas
    assert by_name["basic"]["cpu_price_per_ms"] == "0.0000001"  # never 1E-7
    assert by_name["startup"]["quotas"] == {"cpu_ms": 1_000_000, "network_mb": 100}
    shown = pfm("tiers")
    assert shown.code == 0, shown.err
    table = shown.out
    assert "0.00000006" in table and "Professional" in table and "18,000,000" in table


def test_tiers_command_rejects_a_bad_file(tmp_path: Path) -> None:
    bad = write(tmp_path, CUSTOM.replace("egress_scan_price = 0.002", "egress_scan_price = -0.002"))
    proc = run_cli("tiers", env={"METERING_TIERS_FILE": str(bad)})
    assert_user_error(proc, f"{bad}: tiers.startup.egress_scan_price")
