"""Configuration: defaults of docs/spec.md, "Configuration"; one-line errors naming the variable."""

from __future__ import annotations

from datetime import timedelta

import pytest

from common.errors import UserError
from common.settings import (
    CLUSTER_BATCH_SIZE,
    EMBEDDED_BATCH_SIZE,
    Settings,
    load_settings,
)
from tests.support.cli_runner import assert_user_error, run_cli


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KAFKA_BOOTSTRAP_SERVERS", "METERING_TOPIC", "METERING_GROUP", "METERING_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert s.metering_topic == "pf.usage.events"
    assert s.metering_group == "pf-metering"
    assert str(s.metering_data_dir) == "data"
    assert s.metering_grace == timedelta(hours=1)
    assert s.stripe_enabled is False


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("30m", 1800), ("2h", 7200), ("PT1H", 3600)]
)
def test_grace_formats(monkeypatch: pytest.MonkeyPatch, text: str, seconds: int) -> None:
    monkeypatch.setenv("METERING_GRACE", text)
    assert load_settings().metering_grace == timedelta(seconds=seconds)


def test_bad_value_names_variable_not_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_LATE_USAGE_MONTHS", "-1")
    with pytest.raises(UserError) as err:
        load_settings()
    assert "METERING_LATE_USAGE_MONTHS" in str(err.value)


def test_cli_reports_bad_config_in_one_line() -> None:
    proc = run_cli("tiers", env={"STRIPE_ENABLED": "perhaps"})
    assert_user_error(proc, "STRIPE_ENABLED")


def test_kafka_security_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("KAFKA_SSL_CA_LOCATION", "/etc/ca.pem")
    s = load_settings()
    conf = s.kafka_common()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "svc"
    assert conf["sasl.password"] == "hunter2-secret"
    assert conf["ssl.ca.location"] == "/etc/ca.pem"
    assert "hunter2-secret" not in repr(s)


def test_embedded_mode_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("METERING_CATALOG", "METERING_LAKE_PATH"):
        monkeypatch.delenv(var, raising=False)
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.cluster_mode is False
    assert s.metering_lake_retention == timedelta(days=7)
    monkeypatch.setenv("METERING_CATALOG", " ")  # blank is unset
    assert load_settings().cluster_mode is False


def test_cluster_settings_keep_their_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_CATALOG", "postgresql://pf:s3cr%40t-pw@db.internal:6432/meter")
    monkeypatch.setenv("METERING_LAKE_PATH", "s3://pf-lake/prod")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-very-secret")
    monkeypatch.setenv("METERING_LAKE_RETENTION", "30d")
    s = load_settings()
    assert s.cluster_mode is True
    assert s.catalog_shown() == "postgresql://pf@db.internal:6432/meter"
    assert s.catalog_password() == "s3cr@t-pw"
    assert s.metering_lake_retention == timedelta(days=30)
    for secret in ("s3cr", "aws-very-secret"):
        assert secret not in repr(s) and secret not in str(s)


_CAT, _LAKE, _PG = "METERING_CATALOG", "METERING_LAKE_PATH", "postgresql://h/d"


@pytest.mark.parametrize(
    ("env", "variable", "accepted"),
    [
        ({_CAT: "mysql://u:pw-secret@h/db"}, _CAT, "postgresql://"),
        ({_CAT: "host=h password=pw-secret"}, _CAT, "postgresql://"),
        ({_CAT: "postgresql://u:pw-secret@h:99999/db"}, _CAT, "PORT"),
        ({_CAT: "postgresql://u:pw-secret@h"}, _CAT, "database"),
        ({_CAT: "postgresql://u:pw-secret@h/db"}, _LAKE, "must be set"),
        ({_LAKE: "/lake"}, _CAT, "not"),
        ({_LAKE: "gs://b/p", _CAT: _PG}, _LAKE, "s3://"),
        ({_LAKE: "s3:///p", _CAT: _PG}, _LAKE, "bucket"),
        ({"METERING_S3_ENDPOINT": "minio:9000/x y"}, "METERING_S3_ENDPOINT", "HOST[:PORT]"),
        ({"METERING_S3_URL_STYLE": "both"}, "METERING_S3_URL_STYLE", "path"),
        ({"METERING_LAKE_RETENTION": "forever"}, "METERING_LAKE_RETENTION", "duration"),
    ],
)  # fmt: skip
def test_bad_cluster_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], variable: str, accepted: str
) -> None:
    for var in ("METERING_CATALOG", "METERING_LAKE_PATH"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError) as err:
        load_settings()
    message = str(err.value)
    assert variable in message and accepted in message, message
    assert "pw-secret" not in message and "\n" not in message


def test_the_batch_size_defaults_by_mode_and_an_explicit_one_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("METERING_CATALOG", "METERING_LAKE_PATH", "METERING_BATCH_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert load_settings().batch_size == EMBEDDED_BATCH_SIZE
    monkeypatch.setenv("METERING_CATALOG", "postgresql://pf@127.0.0.1:5432/meter")
    monkeypatch.setenv("METERING_LAKE_PATH", "/srv/lake")
    assert load_settings().batch_size == CLUSTER_BATCH_SIZE > EMBEDDED_BATCH_SIZE
    monkeypatch.setenv("METERING_BATCH_SIZE", "5000")
    assert load_settings().batch_size == 5000
    for var in ("METERING_CATALOG", "METERING_LAKE_PATH"):
        monkeypatch.delenv(var)
    assert load_settings().batch_size == 5000
