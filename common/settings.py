"""Configuration (docs/spec.md, "Configuration"), read from the environment and a ``.env``
file; the CLI reads it once and passes it down."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.errors import ConfigError

_DURATION_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SIZE = r"^\d{1,6}(\.\d{1,3})?\s?(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$"
"""A size as DuckDB reads one: ``512MB``, ``1GB``, ``1.5GiB``."""
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
DURATION_FORMS = "a duration such as 90s, 30m, 2h, 1d (a plain number is seconds) or ISO 8601 PT1H"
SECURITY_PROTOCOLS = ("plaintext", "ssl", "sasl_plaintext", "sasl_ssl")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER")
CATALOG_FORM = "a PostgreSQL URI postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?OPTIONS]"
LAKE_PATH_FORMS = "a directory or s3://BUCKET/PREFIX"
EMBEDDED_BATCH_SIZE = 100_000  # METERING_BATCH_SIZE unset, embedded mode
CLUSTER_BATCH_SIZE = 300_000  # ... and in cluster mode (Settings.batch_size)


def parse_duration(value: Any) -> Any:
    """Accepts ``90``, ``90s``, ``30m``, ``1h``, ``2d`` and ISO 8601 (``PT1H``, via pydantic);
    any other text is a ValueError listing those forms."""
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2)])
        if not re.fullmatch(r"\s*-?P[0-9TWDHMS.,]+\s*", value.upper()):
            raise ValueError(f"expected {DURATION_FORMS}")
    return value


def catalog_parts(uri: str) -> tuple[str, str | None]:
    """``uri`` (a PostgreSQL URI) shown without its password, and the password (or None).
    Raises ValueError naming the accepted form (never echoing ``uri``) if it is not one."""
    try:
        parts = urlsplit(uri.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"expected {CATALOG_FORM}") from exc
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise ValueError(f"expected {CATALOG_FORM}")
    if not parts.path.strip("/"):
        raise ValueError(f"expected {CATALOG_FORM} (the database is missing)")
    user = f"{unquote(parts.username)}@" if parts.username else ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    shown = f"postgresql://{user}{host}{f':{port}' if port else ''}{parts.path}"
    password = unquote(parts.password) if parts.password else None
    return shown, password


def _one_of(value: str | None, accepted: tuple[str, ...]) -> str | None:
    """``value`` if it is one of ``accepted`` (any case), else a ValueError listing them."""
    if value is not None and value.lower() not in {a.lower() for a in accepted}:
        raise ValueError(f"expected one of {', '.join(accepted)}")
    return value


def check_webhook_url(value: str | None) -> str | None:
    """``value`` if it is an absolute http(s) URL with a host and no credentials in it (they
    would show wherever the URL does), else a ValueError saying what is accepted."""
    if value is None or value == "":
        return None
    accepted = "expected an http:// or https:// URL with a host, e.g. https://alerts.example.com/pf"
    try:
        parts = urlsplit(value)
        port_ok = parts.port is None or parts.port > 0
    except ValueError as exc:
        raise ValueError(accepted) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ValueError(accepted)
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry a user or password (sign with METERING_ALERT_SECRET)")
    if any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise ValueError(accepted)
    return value


class Settings(BaseSettings):
    """Every setting pf-metering reads; field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    metering_topic: str = "pf.usage.events"
    metering_group: str = "pf-metering"
    metering_data_dir: Path = Path("./data")
    metering_tiers_file: Path | None = None
    metering_grace: timedelta = timedelta(hours=1)
    metering_due_days: int = Field(default=30, ge=0, le=3650)
    metering_late_usage_months: int = Field(default=3, ge=0, le=1200)
    metering_shutdown_seconds: float = Field(default=10.0, gt=0, le=3600)
    metering_snapshot_seconds: float = Field(default=5.0, gt=0, le=3600)
    metering_batch_size: int | None = Field(default=None, ge=1, le=1_000_000)
    metering_lock_timeout: float = Field(default=60.0, ge=0)
    metering_sql_timeout: float = Field(default=30.0, gt=0, le=86_400)
    metering_sql_memory_limit: str = Field(default="1GB", pattern=_SIZE)
    metering_sql_spill_limit: str = Field(default="2GB", pattern=_SIZE)
    metering_sql_max_rows: int = Field(default=1_000_000, ge=1, le=100_000_000)
    metering_drain_timeout: float = Field(default=120.0, gt=0)
    metering_native_fetch: bool = True
    kafka_connect_timeout: float = Field(default=8.0, gt=0, le=300)

    kafka_security_protocol: str | None = None
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: str | None = None
    kafka_ssl_certificate_location: str | None = None
    kafka_ssl_key_location: str | None = None
    kafka_ssl_key_password: SecretStr | None = None

    stripe_enabled: bool = False
    stripe_secret_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None
    stripe_api_base: str | None = None

    # Cluster mode: the DuckLake's catalog (PostgreSQL) and where its data files go.
    metering_catalog: SecretStr | None = None
    metering_lake_path: str | None = None
    metering_s3_endpoint: str | None = None
    metering_s3_url_style: Literal["path", "vhost"] | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    aws_region: str | None = None
    metering_lake_retention: timedelta = timedelta(days=7)
    metering_lake_file_grace: timedelta = timedelta(hours=1)

    metering_alert_url: str | None = None
    metering_alert_secret: SecretStr | None = None
    metering_alert_timeout: float = Field(default=10.0, gt=0, le=300)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"] = (
        "INFO"
    )
    log_format: Literal["text", "json"] = "text"

    @field_validator(
        "metering_grace", "metering_lake_retention", "metering_lake_file_grace", mode="before"
    )
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator("metering_grace", "metering_lake_retention", "metering_lake_file_grace")
    @classmethod
    def _non_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError(f"must not be negative: expected {DURATION_FORMS}")
        return value

    @field_validator(
        "metering_catalog", "metering_lake_path", "metering_s3_endpoint", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        """An empty or blank value means the setting is not set (cluster mode stays off)."""
        return value.strip() or None if isinstance(value, str) else value

    @field_validator("metering_catalog")
    @classmethod
    def _catalog(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            catalog_parts(value.get_secret_value())
        return value

    @field_validator("metering_lake_path")
    @classmethod
    def _lake_path(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("s3://"):
            if not value.removeprefix("s3://").split("/", 1)[0]:
                raise ValueError(f"expected {LAKE_PATH_FORMS} (the bucket is missing)")
        elif value is not None and "://" in value:
            raise ValueError(f"expected {LAKE_PATH_FORMS}")
        return value

    @field_validator("metering_s3_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        rest = (value or "").removeprefix("http://").removeprefix("https://").rstrip("/")
        if value is not None and not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", rest):
            raise ValueError(
                "expected HOST[:PORT] or http(s)://HOST[:PORT] of an S3-compatible store"
            )
        return value

    @model_validator(mode="after")
    def _cluster_pair(self) -> Settings:
        if self.metering_catalog is not None and self.metering_lake_path is None:
            raise ValueError("METERING_LAKE_PATH must be set when METERING_CATALOG is")
        if self.metering_lake_path is not None and self.metering_catalog is None:
            raise ValueError(
                "METERING_LAKE_PATH is set but METERING_CATALOG is not (cluster mode needs both)"
            )
        return self

    @field_validator("metering_alert_url")
    @classmethod
    def _alert_url(cls, value: str | None) -> str | None:
        return check_webhook_url(value)

    @field_validator("kafka_security_protocol")
    @classmethod
    def _protocol(cls, value: str | None) -> str | None:
        return _one_of(value, SECURITY_PROTOCOLS)

    @field_validator("kafka_sasl_mechanism")
    @classmethod
    def _mechanism(cls, value: str | None) -> str | None:
        return _one_of(value, SASL_MECHANISMS)

    def kafka_common(self) -> dict[str, Any]:
        """librdkafka settings shared by producers and consumers (security passes through)."""
        conf: dict[str, Any] = {"bootstrap.servers": self.kafka_bootstrap_servers}
        plain = {
            "security.protocol": self.kafka_security_protocol,
            "sasl.mechanism": self.kafka_sasl_mechanism,
            "sasl.username": self.kafka_sasl_username,
            "ssl.ca.location": self.kafka_ssl_ca_location,
            "ssl.certificate.location": self.kafka_ssl_certificate_location,
            "ssl.key.location": self.kafka_ssl_key_location,
        }
        conf.update({k: v for k, v in plain.items() if v is not None})
        for key, secret in (
            ("sasl.password", self.kafka_sasl_password),
            ("ssl.key.password", self.kafka_ssl_key_password),
        ):
            if secret is not None:
                conf[key] = secret.get_secret_value()
        return conf

    @property
    def batch_size(self) -> int:
        """``METERING_BATCH_SIZE``, else the mode's default: 100,000 embedded, 300,000 in
        cluster mode, where each commit also pays catalog round trips per table touched and
        leaves a file per table (docs/performance.md, "On the quiet machine, and cluster
        mode's batch size")."""
        if self.metering_batch_size is not None:
            return self.metering_batch_size
        return CLUSTER_BATCH_SIZE if self.cluster_mode else EMBEDDED_BATCH_SIZE

    @property
    def cluster_mode(self) -> bool:
        """True when ``METERING_CATALOG`` is set: the truth lives in the DuckLake."""
        return self.metering_catalog is not None

    def catalog_shown(self) -> str:
        """``METERING_CATALOG`` without its password, fit for errors and logs."""
        if self.metering_catalog is None:
            return "(not set)"
        return catalog_parts(self.metering_catalog.get_secret_value())[0]

    def catalog_password(self) -> str | None:
        if self.metering_catalog is None:
            return None
        return catalog_parts(self.metering_catalog.get_secret_value())[1]

    @property
    def ledger_dir(self) -> Path:
        return self.metering_data_dir / "ledger"

    @property
    def snapshot_dir(self) -> Path:
        return self.metering_data_dir / "snapshot"

    @property
    def billing_db(self) -> Path:
        return self.metering_data_dir / "billing.duckdb"


def load_settings(**overrides: Any) -> Settings:
    """Read settings; a bad value is a ConfigError naming the variable (never its value)."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        var = str(err["loc"][0]).upper() if err["loc"] else "configuration"
        raise ConfigError(f"invalid {var}: {err['msg'].removeprefix('Value error, ')}") from exc
