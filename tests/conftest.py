"""Shared fixtures: a real broker, a unique topic per test, isolated settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.broker import TopicFactory, create_topic, real_broker


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    with real_broker() as address:
        yield address


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> TopicFactory:
    def make(partitions: int = 6) -> str:
        return create_topic(kafka_bootstrap, partitions)

    return make


@pytest.fixture
def topic(topic_factory: TopicFactory) -> str:
    return topic_factory()


@pytest.fixture
def data_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Settings isolated to this test's own data dir (no broker needed)."""
    values = {"METERING_DATA_DIR": str(tmp_path / "data"), "METERING_GROUP": f"g-{tmp_path.name}"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    yield values


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, data_env: dict[str, str], kafka_bootstrap: str
) -> dict[str, str]:
    """``data_env`` plus the real broker and a fresh 6-partition topic."""
    values = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "METERING_TOPIC": create_topic(kafka_bootstrap, 6),
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return {**data_env, **values}
