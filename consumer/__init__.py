"""The Kafka consumer worker: poll loop, rebalance handling, dead letters, /metrics."""
