"""The partition contract: murmur2 of the UTF-8 tenant_id, as Kafka's Java client computes it
(vectors from its own ``UtilsTest``) and as librdkafka's ``murmur2_random`` does."""

from __future__ import annotations

import random

import confluent_kafka
import pytest

from schemas.partitioning import murmur2, partition_for

# org.apache.kafka.common.utils.UtilsTest#testMurmur2
JAVA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("data", "expected"), JAVA_VECTORS.items())
def test_murmur2_matches_the_java_client(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


def test_partition_for_matches_librdkafka_for_any_tenant_and_partition_count() -> None:
    rng = random.Random(4)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789._:-é日"
    for _ in range(3000):
        tenant = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        partitions = rng.randrange(1, 200)
        assert partition_for(tenant, partitions) == confluent_kafka.murmur2(
            tenant.encode(), partitions
        )


def test_partition_for_refuses_an_empty_topic() -> None:
    with pytest.raises(ValueError, match="at least one partition"):
        partition_for("acme", 0)
