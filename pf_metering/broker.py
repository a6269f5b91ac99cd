"""The pre-flight check of commands that need the broker (``simulate-usage``,
``consume --drain``): fail fast, in one line naming the setting, instead of retrying."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from common.errors import OperationError
from common.settings import Settings

_QUIET = logging.getLogger("rdkafka.preflight")  # its lines are summed up in the error
_QUIET.propagate = False
_QUIET.addHandler(logging.NullHandler())


def require_broker(settings: Settings) -> None:
    """Return once the cluster answers a metadata request; else OperationError naming
    ``KAFKA_BOOTSTRAP_SERVERS`` and librdkafka's reason (a refused connection, a failed
    SASL handshake), within ``KAFKA_CONNECT_TIMEOUT`` seconds."""
    seen: list[KafkaError] = []
    conf: dict[str, Any] = {
        **settings.kafka_common(),
        "logger": _QUIET,
        "error_cb": seen.append,
    }
    timeout = settings.kafka_connect_timeout
    admin = AdminClient(conf)
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        admin.poll(0.2)  # serves the error callbacks: they hold the reason
        causes = [e for e in seen if e.code() != KafkaError._ALL_BROKERS_DOWN]
        err = causes[-1] if causes else exc.args[0] if exc.args else None
        reason = f"{err.name()}: {_short(err.str())}" if isinstance(err, KafkaError) else str(exc)
        raise OperationError(
            f"cannot reach the Kafka broker at {settings.kafka_bootstrap_servers} "
            f"(KAFKA_BOOTSTRAP_SERVERS) within {timeout:g} s (KAFKA_CONNECT_TIMEOUT): {reason}"
        ) from exc


def _short(reason: str) -> str:
    """librdkafka's reason without its ``broker/bootstrap:`` prefix and timing suffix."""
    text = reason.split("/bootstrap: ", 1)[-1]
    return text.split(" (after ")[0].strip()
