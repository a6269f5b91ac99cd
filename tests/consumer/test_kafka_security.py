"""Kafka TLS and SASL settings reach librdkafka, for the worker and the emitter alike (no
broker: librdkafka refuses a missing CA file when the client is made)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.settings import load_settings
from consumer.kafka import consumer_config
from consumer.worker import Worker
from emitter import Emitter
from pf_metering.commands.consume_cmds import worker_config

SASL_PASSWORD = "kafka-sasl-pw-0123456789SECRET"


def secure_settings(**extra: Any) -> Any:
    return load_settings(
        kafka_bootstrap_servers="127.0.0.1:9",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc",
        kafka_sasl_password=SASL_PASSWORD,
        kafka_ssl_ca_location="/nonexistent/pf-ca.pem",
        metering_data_dir=Path("/nonexistent-data"),
        **extra,
    )


def test_worker_and_emitter_hand_tls_and_sasl_settings_to_librdkafka() -> None:
    from confluent_kafka import KafkaException

    settings = secure_settings()
    conf = consumer_config(settings.kafka_common(), "g", "cooperative-sticky")
    assert {k: conf[k] for k in ("security.protocol", "sasl.mechanism", "sasl.username",
                                 "sasl.password", "ssl.ca.location")} == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc", "sasl.password": SASL_PASSWORD,
        "ssl.ca.location": "/nonexistent/pf-ca.pem",
    }  # fmt: skip
    # librdkafka itself refuses the missing CA file: the setting got all the way there
    with pytest.raises(KafkaException, match=r"ssl\.ca\.location"):
        Worker(worker_config(settings))
    with pytest.raises(KafkaException, match=r"ssl\.ca\.location"):
        Emitter("127.0.0.1:9", "t", config=settings.kafka_common())
