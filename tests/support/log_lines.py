"""The log lines tests wait on or parse, each named once. The text is the product's own (never
changed for tests); tests/common/test_logger_names.py pins the logger names in it."""

from __future__ import annotations

import re

WORKER = "consumer.worker"
ASSIGNED = f"{WORKER}: assigned"  # INFO, partitions given to this worker
BATCH = f"{WORKER}: batch:"  # DEBUG, a poll's records handed to decoding
BATCH_DONE = f"{WORKER}: batch done"  # DEBUG, every partition of that poll committed
COMMITTED = f"{WORKER}: committed p"  # DEBUG, one partition's ledger commit
# DEBUG, one partition's ledger transaction begun / committed: step, partition, [from, to)
SPAN = re.compile(r"(committing|committed) p(\d+) \[(\d+), (\d+)\)")
# WARNING, a commit refused by cluster mode's fence (the partition was taken over)
REFUSED = re.compile(r"p(\d+): batch \[(\d+), (\d+)\) dropped, not counted")
# INFO, cluster mode: a partition claimed with a new owner epoch (logger aggregator.lake_ledger)
CLAIMED = re.compile(r"aggregator\.lake_ledger: p(\d+): claimed with epoch (\d+)")
DRAIN_WAITING = "drain: end offsets unknown for now"  # WARNING, a drain waiting for the broker
# WARNING, once a minute while a worker cannot reach the cluster (logger consumer.worker)
UNREACHABLE = "cannot reach the Kafka broker at"
# the start of a text-format log line: "2026-12-01 22:14:54,577 WARNING "
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
# WARNING, cluster mode: a worker lost its catalog (then once a minute while it waits), and
# found it again (logger aggregator.lake)
CATALOG_LOST = "cannot reach the catalog (METERING_CATALOG"
CATALOG_BACK = re.compile(r"the catalog \(METERING_CATALOG [^)]*\) answers again after")
# WARNING, cluster mode: how a COMMIT cut off by a catalog outage was settled
COMMIT_SETTLED = re.compile(r"p(\d+): the catalog went away during the COMMIT .* was (stored|not)")
# INFO, the group took this worker's partitions away after its session was lost
LOST = f"{WORKER}: lost"
