"""The logger names operators filter on and tests parse stay what they are, wherever the code
that logs moves: each module's ``log`` is pinned here, and so is the text line that puts the
name before the message (tests/support/log_lines.py reads it)."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.logs import RepeatFilter, configure
from common.settings import load_settings
from consumer.worker import Worker
from pf_metering.commands.consume_cmds import worker_config
from tests.support import log_lines

# module -> the name of its ``log`` (the worker's steps and torn-ledger recovery log as the worker)
LOGGERS = {
    "consumer.worker": "consumer.worker",
    "consumer.steps": "consumer.worker",
    "aggregator.recovery": "consumer.worker",
    "consumer.kafka": "consumer.kafka",
    "aggregator.ledger": "aggregator.ledger",
    "aggregator.lake_ledger": "aggregator.lake_ledger",
    "billing.stripe.push": "billing.stripe_push",
    "billing.stripe.gateway": "billing.stripe_gateway",
    "billing.stripe.webhook_server": "billing.webhook_server",
    "billing.alerts.watch": "billing.alerts",
    "schemas.batch_validation": "schemas.bulk_validation",
    "pf_metering.commands.consume_cmds": "pf_metering.commands.consume_cmds",
    "aggregator.lake_maintenance": "aggregator.lake_maintenance",
}


@pytest.mark.parametrize(("module", "name"), LOGGERS.items())
def test_each_module_logs_under_its_known_name(module: str, name: str) -> None:
    log = importlib.import_module(module).log
    assert isinstance(log, logging.Logger) and log.name == name


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    rdkafka_filters = logging.getLogger("rdkafka").filters[:]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("rdkafka").filters[:] = rdkafka_filters


def test_librdkafka_logs_under_rdkafka(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, restored_logging: None
) -> None:
    """The worker hands librdkafka the ``rdkafka`` logger (no broker needed: the client logs
    its configuration when it starts), and ``configure`` filters repeats on that logger."""
    settings = load_settings(
        metering_data_dir=tmp_path / "data", kafka_bootstrap_servers="127.0.0.1:9"
    )
    with caplog.at_level(logging.DEBUG, logger="rdkafka"):
        worker = Worker(worker_config(settings), extra_config={"debug": "conf"})
        try:
            worker.consumer.consume(1, 0.5)  # serves the client's queued log lines
        finally:
            worker.consumer.close()
    assert any(r.name == "rdkafka" and "Client configuration" in r.message for r in caplog.records)
    configure(settings)
    assert any(isinstance(f, RepeatFilter) for f in logging.getLogger("rdkafka").filters)


def test_text_lines_name_the_logger_before_the_message(
    capsys: pytest.CaptureFixture[str], restored_logging: None
) -> None:
    """The markers of tests/support/log_lines.py, as the worker's DEBUG trace writes them."""
    configure(load_settings(log_level="DEBUG", log_format="text"))
    log = logging.getLogger(log_lines.WORKER)
    log.info("assigned %s", [0, 1])
    log.debug("batch: %d records of %d partition(s)", 10, 2)
    log.debug("committing p%d [%d, %d)", 1, 100, 110)
    log.debug("committed p%d [%d, %d): %d counted, %d duplicates, %d dead", 1, 100, 110, 10, 0, 0)
    log.debug("batch done")
    log.warning("drain: end offsets unknown for now (%s); waiting for the broker", "timed out")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 6 and log_lines.ASSIGNED in lines[0] and log_lines.BATCH in lines[1]
    assert log_lines.COMMITTED in lines[3] and log_lines.BATCH_DONE in lines[4]
    assert log_lines.DRAIN_WAITING in lines[5]
    spans = [m.groups() for line in lines if (m := log_lines.SPAN.search(line))]
    assert spans == [("committing", "1", "100", "110"), ("committed", "1", "100", "110")]
