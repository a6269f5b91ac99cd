"""Avro single-object encoding of usage events (docs/spec.md, "The usage event").

A value is ``C3 01`` + the 8-byte little-endian CRC-64-AVRO fingerprint of the writer
schema's Parsing Canonical Form + the Avro binary body. The codec knows every version in
this folder (the built-in ones) by fingerprint and resolves any of them into the newest
(reader) schema; ``schemas.registry`` adds the versions published at run time.

Timestamps stay raw integers (microseconds since the epoch): the logicalType is dropped
from the schemas used for (de)serialisation. It does not change the binary encoding nor
the canonical form, and skipping datetime conversion keeps the hot path fast.
"""

from __future__ import annotations

import copy
import io
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
HEADER_LEN = 10
# A usage event is ~100 bytes; anything this large is refused before decoding.
MAX_VALUE_BYTES = 64 * 1024
SCHEMA_DIR = Path(__file__).resolve().parent
COUNTERS: tuple[str, ...] = (
    "cpu_ms",
    "network_bytes",
    "api_calls",
    "tool_executions",
    "data_retrievals",
    "egress_scans",
    "policy_checks",
    "violations",
)

_VERSION_RE = re.compile(r"^usage_event(?:\.v(\d+))?\.avsc$")


class DecodeError(ValueError):
    """A value that is not a decodable usage event; ``reason`` is a dead-letter reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _strip_logical_types(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_strip_logical_types(v) for v in node]
    return node


@dataclass(frozen=True)
class PublishedSchema:
    """One published version of the usage-event schema."""

    version: int
    path: Path
    raw: dict[str, Any]
    parsed: Any  # fastavro's parsed schema, logical types stripped
    fingerprint: bytes

    @property
    def header(self) -> bytes:
        return SINGLE_OBJECT_MAGIC + self.fingerprint

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f["name"] for f in self.raw["fields"])


def load_schema(path: Path, version: int) -> PublishedSchema:
    return schema_of_raw(json.loads(path.read_text()), version, path)


def schema_of_raw(raw: dict[str, Any], version: int, path: Path) -> PublishedSchema:
    """A version from its JSON (``path``: where it is kept). Raises on an invalid schema."""
    canonical = to_parsing_canonical_form(fastavro.parse_schema(copy.deepcopy(raw)))
    fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    parsed = fastavro.parse_schema(_strip_logical_types(raw))
    return PublishedSchema(version=version, path=path, raw=raw, parsed=parsed, fingerprint=fp)


def discover(directory: Path = SCHEMA_DIR) -> list[PublishedSchema]:
    """Every published version in ``directory``: usage_event.avsc is v1, usage_event.vN.avsc vN."""
    found = []
    for path in sorted(directory.glob("usage_event*.avsc")):
        m = _VERSION_RE.match(path.name)
        if m:
            found.append(load_schema(path, int(m.group(1) or 1)))
    if not found:
        raise RuntimeError(f"no usage_event*.avsc schema in {directory}")
    return sorted(found, key=lambda s: s.version)


class Codec:
    """Encodes with any published version; decodes any of them into the reader schema
    (default: the newest version)."""

    def __init__(self, schemas: list[PublishedSchema], reader: PublishedSchema | None = None):
        self.versions: dict[int, PublishedSchema] = {}
        for s in schemas:  # a number taken twice (published before it was built in): the first
            self.versions.setdefault(s.version, s)
        self.by_fingerprint = {s.fingerprint: s for s in schemas}
        self.reader = reader or max(schemas, key=lambda s: s.version)

    def writer(self, version: int | None = None) -> PublishedSchema:
        return self.reader if version is None else self.versions[version]

    def encode(self, record: dict[str, Any], version: int | None = None) -> bytes:
        schema = self.writer(version)
        buf = io.BytesIO()
        buf.write(schema.header)
        fastavro.schemaless_writer(buf, schema.parsed, record)
        return buf.getvalue()

    def schema_of(self, value: bytes | None) -> PublishedSchema:
        """The writer schema named by a value's header, or DecodeError."""
        if value is None or len(value) < HEADER_LEN or value[:2] != SINGLE_OBJECT_MAGIC:
            raise DecodeError("not_single_object", "value lacks the C3 01 single-object header")
        if len(value) > MAX_VALUE_BYTES:
            raise DecodeError("oversized", f"{len(value)} bytes exceeds {MAX_VALUE_BYTES}")
        schema = self.by_fingerprint.get(value[2:HEADER_LEN])
        if schema is None:
            raise DecodeError("unknown_fingerprint", f"writer fingerprint {value[2:10].hex()}")
        return schema

    def decode(self, value: bytes | None) -> dict[str, Any]:
        """Decode one value into a dict shaped by the reader schema."""
        writer = self.schema_of(value)
        assert value is not None
        body = io.BytesIO(value)
        body.seek(HEADER_LEN)
        reader = None if writer is self.reader else self.reader.parsed
        try:
            record = fastavro.schemaless_reader(body, writer.parsed, reader)
        except Exception as exc:  # fastavro raises many types on garbage
            raise DecodeError("undecodable_body", f"{type(exc).__name__}: {exc}"[:200]) from exc
        if not isinstance(record, dict):
            raise DecodeError("undecodable_body", "body is not a record")
        if body.tell() != len(value):
            raise DecodeError("undecodable_body", f"{len(value) - body.tell()} trailing bytes")
        return record


@cache
def default_codec() -> Codec:
    """The codec over this package's published schemas (parsed once per process)."""
    return Codec(discover())
