"""Bad input and configuration: one ``error:`` line naming the option or variable and what
it accepts; one period rule for every command (issue 17, points 4 and 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.cli import Cli
from tests.fixtures.seeds import SEED, event


def test_bill_checks_its_metrics_file_before_billing(pfm: Cli, tmp_path: Path) -> None:
    pfm.publish(event("acme_corp", "2025-01", **SEED))
    pfm("bill", "--metrics-file", "/proc/x.prom").error("--metrics-file /proc/x.prom")
    assert pfm("invoices", "acme_corp", "-f", "json").json() == []  # nothing billed


def test_an_unusable_data_dir_names_the_variable(pfm: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_DATA_DIR", "/proc/x")
    pfm("tenants", "add", "zz").error("METERING_DATA_DIR /proc/x")


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("KAFKA_SECURITY_PROTOCOL", "bogus", "sasl_ssl"),
        ("KAFKA_SASL_MECHANISM", "bogus", "SCRAM-SHA-512"),
        ("METERING_GRACE", "-1h", "must not be negative: expected a duration such as 90s"),
        ("METERING_GRACE", "abc", "90s, 30m, 2h, 1d"),
    ],
)
def test_bad_settings_name_the_variable_and_the_accepted_forms(
    pfm: Cli, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    run = pfm("usage", "acme_corp", "2025-01")
    run.error(f"invalid {variable}: ")
    run.error(named)
    assert value not in run.err.replace(f"invalid {variable}", "")  # never echoes the value


@pytest.mark.parametrize("value", ["2h", "90", "PT1H", "P1D"])
def test_accepted_grace_forms(pfm: Cli, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("METERING_GRACE", value)
    assert pfm("usage", "acme_corp", "2025-01").code in (0, 2)  # (unknown tenant: 2)
    assert "METERING_GRACE" not in pfm("usage", "acme_corp", "2025-01").err


def test_a_sql_syntax_error_is_named_as_one(pfm: Cli) -> None:
    pfm("sql", "SELEC 1").error('syntax error at or near "SELEC"')
    pfm("sql", "INSERT INTO usage VALUES (1)").error("read-only")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("simulate-usage", "acme_corp", "5", "--period", ""), "invalid period '' for --period"),
        (("report", "acme_corp", "--from", ""), "invalid period '' for --from"),
        (("report", "acme_corp", "--to", "2025-1"), "invalid period '2025-1' for --to"),
        (("usage", "acme_corp", " 2025-01"), "invalid period ' 2025-01'"),
        (("usage", "acme_corp", "2025-01 "), "invalid period '2025-01 '"),
        (("generate-invoice", "acme_corp", "1969-12"), "from 1970-01 on"),
        (("usage", "acme_corp", "9999-12"), "period 9999-12 has not started yet"),
        (("generate-invoice", "acme_corp", "9999-12"), "period 9999-12 has not started yet"),
        (("simulate-usage", "acme_corp", "5", "--period", "9999-12"), "has not started yet"),
        (("report", "acme_corp", "--to", "9999-12"), "period 9999-12 for --to has not started yet"),
        (("simulate-usage", "acme_corp", "-5"), "SESSIONS must be zero or more"),
    ],
)
def test_one_period_rule_for_every_command(pfm: Cli, args: tuple[str, ...], named: str) -> None:
    pfm.publish(event("acme_corp", "2025-01", **SEED))
    pfm(*args).error(named)


def test_set_tier_may_schedule_a_later_period(pfm: Cli) -> None:
    pfm.publish(event("acme_corp", "2025-01", **SEED))
    assert pfm("tenants", "set-tier", "acme_corp", "enterprise", "--from", "9999-12").code == 0
    pfm("tenants", "set-tier", "acme_corp", "enterprise", "--from", " 2025-01").error(
        "invalid period ' 2025-01' for --from"
    )


def test_adding_a_tenant_known_from_its_usage_says_so(pfm: Cli) -> None:
    pfm.publish(event("acme_corp", "2025-01", **SEED))
    run = pfm("tenants", "add", "acme_corp")
    assert run.code == 0 and "known from its usage since 2025-01" in run.err, run.err
    assert "already registered" in pfm("tenants", "add", "acme_corp").err
    assert pfm("tenants", "add", "newco").err.startswith("added tenant newco")
