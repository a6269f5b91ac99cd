"""Whether a worker can reach the Kafka cluster, said plainly: one log line a minute while
it cannot (not librdkafka's stream), ``pf_broker_connected`` on /metrics, and how long it
has been so (``consume --drain`` gives up after ``METERING_DRAIN_TIMEOUT``).

Signals: librdkafka's error callback reports ``_ALL_BROKERS_DOWN`` (or a resolve or
transport failure while every broker is down); a request the broker answers (a metadata
probe, end offsets) says it is back. Records arriving are no proof: they may have been
fetched before the connection went.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import KafkaError
from prometheus_client import Gauge

log = logging.getLogger("consumer.worker")
LOG_EVERY_SECONDS = 60.0
PROBE_EVERY_SECONDS = 5.0
_DOWN = frozenset({KafkaError._ALL_BROKERS_DOWN})


class BrokerWatch:
    """The worker's view of the cluster: connected until an error says otherwise."""

    def __init__(
        self, bootstrap: str, gauge: Gauge, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.bootstrap = bootstrap
        self.gauge = gauge
        self.clock = clock
        self.down_since: float | None = None
        self.reason = ""
        self._logged = -1e18
        self._probed = -1e18
        gauge.set(1)

    @property
    def connected(self) -> bool:
        return self.down_since is None

    def down_for(self) -> float:
        """Seconds since the cluster was last known reachable (0 while it is)."""
        return 0.0 if self.down_since is None else self.clock() - self.down_since

    def on_error(self, err: KafkaError) -> bool:
        """librdkafka's error callback; True if the error means the cluster is out of reach
        (other errors are the caller's to report)."""
        if err.code() not in _DOWN:
            return False
        self.lost(err.str())
        return True

    def lost(self, reason: str) -> None:
        self.reason = reason
        if self.down_since is None:
            self.down_since = self.clock()
            self.gauge.set(0)
        self.tick()

    def reached(self) -> None:
        if self.down_since is not None:
            log.warning(
                "Kafka broker at %s reachable again after %.0f s", self.bootstrap, self.down_for()
            )
            self.down_since = None
            self._logged = -1e18
            self.gauge.set(1)

    def tick(self) -> None:
        """Log the one line a minute while the cluster is out of reach."""
        now = self.clock()
        if self.down_since is not None and now - self._logged >= LOG_EVERY_SECONDS:
            self._logged = now
            log.warning(
                "cannot reach the Kafka broker at %s (KAFKA_BOOTSTRAP_SERVERS) for %.0f s: %s; "
                "retrying",
                self.bootstrap,
                self.down_for(),
                self.reason,
            )

    def probe_due(self) -> bool:
        """True every PROBE_EVERY_SECONDS while the cluster is out of reach: time to ask it
        something cheap (then ``reached`` or ``lost``)."""
        now = self.clock()
        if self.down_since is None or now - self._probed < PROBE_EVERY_SECONDS:
            return False
        self._probed = now
        return True
