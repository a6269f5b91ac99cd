"""Prometheus metrics of a worker (all prefixed ``pf_``), served on ``--metrics-port``."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from aggregator.fold import FOLD_REASONS
from schemas.validation import REASONS


@dataclass
class WorkerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    cluster: bool = False  # cluster mode: the catalog's gauge too

    def __post_init__(self) -> None:
        r = self.registry
        self.consumed = Counter(
            "pf_events_consumed", "Kafka records read by the worker", ["partition"], registry=r
        )
        self.counted = Counter(
            "pf_events_counted", "Events folded into the aggregates (first sighting)", registry=r
        )
        self.duplicates = Counter(
            "pf_events_duplicate", "Events recognised as already counted", registry=r
        )
        self.dead = Counter(
            "pf_events_dead_lettered",
            "Invalid records stored as dead letters",
            ["reason"],
            registry=r,
        )
        for reason in (*REASONS, *FOLD_REASONS):  # validation's reasons, then the fold's
            self.dead.labels(reason=reason)
        self.forwarded = Counter(
            "pf_events_forwarded",
            "Valid events that arrived on another partition than their tenant's (or with no "
            "key), forwarded there, by the partition they arrived on",
            ["partition"],
            registry=r,
        )
        self.open_dead_letters = Gauge(
            "pf_dead_letters_open",
            "Dead letters not (successfully) replayed yet, in the partitions this worker holds",
            ["reason"],
            registry=r,
        )
        for reason in REASONS:
            self.open_dead_letters.labels(reason=reason)
        self.known_open_reasons: set[str] = set(REASONS)
        self.batch_seconds = Histogram(
            "pf_batch_duration_seconds",
            "Time to decode, validate and commit one partition batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.lag = Gauge(
            "pf_consumer_lag",
            "Records between the ledger offset and the end of the partition",
            ["partition"],
            registry=r,
        )
        self.last_commit = Gauge(
            "pf_last_commit_timestamp_seconds", "Unix time of the last ledger commit", registry=r
        )
        self.partitions_held = Gauge(
            "pf_partitions_assigned", "Partitions this worker currently owns", registry=r
        )
        self.broker_connected = Gauge(
            "pf_broker_connected",
            "1 while the worker reaches the Kafka cluster, 0 while it cannot",
            registry=r,
        )
        self.catalog_connected: Gauge | None = None
        if self.cluster:
            self.catalog_connected = Gauge(
                "pf_catalog_connected",
                "Cluster mode: 1 while the worker reaches the DuckLake catalog "
                "(METERING_CATALOG), 0 while it waits for it (commits wait, none is lost)",
                registry=r,
            )
        self.commits_refused = Counter(
            "pf_commits_refused",
            "Batches whose ledger commit was refused because another worker had taken the "
            "partition over (cluster mode's fence): dropped, never counted",
            ["partition"],
            registry=r,
        )
        self.rebalances = Counter(
            "pf_rebalances", "Partition assignments and revocations seen", ["kind"], registry=r
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
