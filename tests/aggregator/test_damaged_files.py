"""Damaged files never pass for empty ones: a ledger is set aside only when it was provably
created empty (anything else is refused with one error line and left byte for byte as it
was), and a snapshot manifest that is not what a worker writes is skipped by every reader
instead of breaking it. (A damaged ledger under a real worker:
tests/broker/aggregator/test_damaged_ledger.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from aggregator.ledger import ledger_path
from aggregator.recovery import empty_file_bytes, set_aside_torn_ledger
from aggregator.snapshot import freshness, manifest_path, read_manifest
from bench.ledger_load import publish_usage
from common.settings import load_settings
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import SEED, event

TOPIC = "pf.usage.events"


def data_ledger(folder: Path) -> bytes:
    """The bytes of a ledger that holds counted events (checkpointed, no WAL)."""
    settings = load_settings(metering_data_dir=folder)
    publish_usage(settings, [event("acme", "2025-01", **SEED)])
    path = ledger_path(settings.ledger_dir, TOPIC, 0)
    assert not path.with_name(path.name + ".wal").exists()
    return path.read_bytes()


def shapes(tmp_path: Path) -> dict[str, tuple[bytes, bool]]:
    """File contents, and whether each may be set aside (no manifest beside it)."""
    full = data_ledger(tmp_path / "source")
    fresh = empty_file_bytes()
    rng = random.Random(7)
    return {
        "empty": (b"", True),
        "first byte of a new file": (fresh[:1], True),
        "new file cut inside its first header": (fresh[:5000], True),
        "new file cut inside its second header": (fresh[:12_000], True),
        "4 KiB of random bytes": (rng.randbytes(4096), False),
        "100 random bytes": (rng.randbytes(100), False),
        "4 KiB of zeros": (bytes(4096), False),
        "a data ledger cut to 8 KiB": (full[:8192], False),
        "a data ledger cut to 5000 bytes": (full[:5000], False),
        "a data ledger with its first byte flipped": (bytes([full[0] ^ 1]) + full[1:], False),
        "a whole new file": (fresh, False),
    }


def test_only_a_file_provably_created_empty_is_set_aside(tmp_path: Path) -> None:
    for name, (content, aside) in shapes(tmp_path).items():
        folder = tmp_path / hashlib.sha1(name.encode()).hexdigest()[:8]
        folder.mkdir()
        path = folder / "p-0000.duckdb"
        path.write_bytes(content)
        assert set_aside_torn_ledger(path) is aside, name
        assert path.exists() is not aside, name
        if not aside:
            assert path.read_bytes() == content, name  # left byte for byte as it was


def test_a_snapshot_that_saw_data_keeps_even_a_header_sized_ledger(tmp_path: Path) -> None:
    """A data ledger cut back to its main header (which every file of a DuckDB version
    shares) is told apart by its partition's manifest; a damaged manifest proves nothing."""
    full = data_ledger(tmp_path / "source")
    path = tmp_path / "p-0000.duckdb"
    manifest = tmp_path / "p-0000.manifest.json"
    for text, aside in (
        ('{"topic": "t", "partition": 0, "next_offset": 1, "published_at": 1}', False),
        ("[1, 2]", False),
        ("{}", False),
        ('{"topic": "t", "partition": 0, "next_offset": 0, "published_at": 1}', True),
    ):
        path.write_bytes(full[:4096])
        manifest.write_text(text)
        assert set_aside_torn_ledger(path, manifest) is aside, text


MANIFESTS = {
    "a JSON list": b"[1, 2, 3]",
    "a JSON string": b'"published"',
    "null": b"null",
    "published_at as text": b'{"topic": "t", "partition": 0, "next_offset": 0, '
                            b'"published_at": "yesterday"}',
    "published_at NaN": b'{"topic": "t", "partition": 0, "next_offset": 0, '
                        b'"published_at": NaN}',
    "published_at true": b'{"topic": "t", "partition": 0, "next_offset": 0, '
                         b'"published_at": true}',
    "a negative offset": b'{"topic": "t", "partition": 0, "next_offset": -1, '
                         b'"published_at": 1}',
    "fields missing": b"{}",
    "100k nested lists": b"[" * 100_000 + b"]" * 100_000,
    "not UTF-8": b"\xff\xfe\x00garbage",
    "oversized": b'{"x": "' + b"a" * 100_000 + b'"}',
    "empty": b"",
}  # fmt: skip


def test_a_damaged_manifest_is_skipped_by_every_reader(pfm: Cli, data_env: dict[str, str]) -> None:
    pfm.publish(event("acme", "2025-01", **SEED))
    settings = load_settings(metering_data_dir=data_env["METERING_DATA_DIR"])
    good = manifest_path(settings.snapshot_dir, TOPIC, 0)
    assert read_manifest(good) is not None
    bad = manifest_path(settings.snapshot_dir, TOPIC, 1)
    for name, content in MANIFESTS.items():
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="manifest p-0001"):
            read_manifest(bad)
        assert freshness(settings.snapshot_dir, TOPIC).partitions == 1, name
        for args in (
            ["usage", "acme", "2025-01", "-f", "json"],
            ["dead-letters", "-f", "json"],
            ["sql", "SELECT sum(events) AS n FROM usage", "-f", "json"],
            ["export-metrics"],
            ["bill", "--as-of", "2025-02-01T02:00:00Z"],
        ):
            run = pfm(*args)
            assert run.code == 0, (name, args, run.err)
    assert pfm("usage", "acme", "2025-01", "-f", "json").json()["events"] == 1


def test_every_manifest_a_worker_writes_reads_back(tmp_path: Path) -> None:
    settings = load_settings(metering_data_dir=tmp_path)
    publish_usage(settings, [event("acme", "2025-01", **SEED)], partition=3)
    manifest = read_manifest(manifest_path(settings.snapshot_dir, TOPIC, 3))
    assert manifest is not None and (manifest.partition, manifest.next_offset) == (3, 1)
    doc = json.loads(manifest_path(settings.snapshot_dir, TOPIC, 3).read_text())
    assert doc["writer_pid"] == os.getpid()
