"""Writer versions of ``pf.metering.UsageEvent`` published at run time (``schemas add``).

Stored with the data, so they survive restarts and reach workers that start later: the
document ``v0003.json`` (``common.documents``: a file in ``<METERING_DATA_DIR>/schemas``, or
the lake's in cluster mode) holds ``version``, ``fingerprint`` (hex), ``published_at``
(ISO 8601 UTC) and ``schema``, one per version. A document appears whole, and two
publishers racing for one version number cannot both take it (``create`` fails for the
second, which takes the next). The
built-in versions (``schemas/*.avsc``) come first; the reader schema stays the newest
built-in one, since the ledger and the validation rules are written for its fields.

A version is refused (``IncompatibleSchema``) unless it is a record of the same full name,
every field it adds has a default, no field shared with the reader changes its type, and
data resolves both ways with fastavro (written with it, read with the reader schema;
written with the reader schema, read with it).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form

from common.documents import Documents, FolderDocuments
from schemas.codec import Codec, PublishedSchema, discover, schema_of_raw

log = logging.getLogger(__name__)
_FILE = "v{:04d}.json"


class IncompatibleSchema(ValueError):
    """The schema cannot be published; the message says why."""


@dataclass(frozen=True)
class Version:
    """A version as listed: built-in ones have no ``published_at``."""

    schema: PublishedSchema
    published_at: str | None

    @property
    def built_in(self) -> bool:
        return self.published_at is None


def registry_dir(data_dir: Path) -> Path:
    return data_dir / "schemas"


def full_name(raw: Any) -> str | None:
    if not isinstance(raw, dict) or raw.get("type") != "record" or "name" not in raw:
        return None
    name = str(raw["name"])
    namespace = raw.get("namespace")
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _canonical_type(node: Any) -> str:
    try:
        return str(to_parsing_canonical_form(fastavro.parse_schema(copy.deepcopy(node))))
    except Exception:
        return json.dumps(node, sort_keys=True)


def _sample(schema: Any) -> Any:
    """A value of ``schema`` (a field's type; logical types already stripped)."""
    if isinstance(schema, list):
        return _sample(schema[0])
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "record":
            return {
                f["name"]: f["default"] if "default" in f else _sample(f["type"])
                for f in schema["fields"]
            }
        if kind == "enum":
            return schema["symbols"][0]
        if kind == "array":
            return []
        if kind == "map":
            return {}
        if kind == "fixed":
            return b"\x00" * int(schema["size"])
        return _sample(kind)
    return {
        "null": None, "boolean": False, "int": 0, "long": 0, "float": 0.0, "double": 0.0,
        "bytes": b"", "string": "x",
    }.get(str(schema))  # fmt: skip


def _resolves(writer: PublishedSchema, reader: PublishedSchema) -> str | None:
    """None when a record written with ``writer`` reads with ``reader``, else why not."""
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, writer.parsed, _sample(writer.parsed))
        buf.seek(0)
        fastavro.schemaless_reader(buf, writer.parsed, reader.parsed)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return None


def check_compatible(raw: Any, reader: PublishedSchema, version: int) -> PublishedSchema:
    """The candidate as version ``version``, or ``IncompatibleSchema`` saying why not."""
    expected = full_name(reader.raw)
    name = full_name(raw)
    if name != expected:
        raise IncompatibleSchema(f"the schema must be the record {expected}, not {name}")
    try:
        candidate = schema_of_raw(raw, version, Path("-"))
    except Exception as exc:
        raise IncompatibleSchema(f"not a valid Avro schema: {exc}") from exc
    theirs = {f["name"]: f for f in reader.raw["fields"]}
    for spec in raw["fields"]:
        other = theirs.get(spec["name"])
        if other is None and "default" not in spec:
            raise IncompatibleSchema(f"field {spec['name']!r} is added without a default")
        if other is not None and _canonical_type(spec["type"]) != _canonical_type(other["type"]):
            raise IncompatibleSchema(
                f"field {spec['name']!r} changes type from {_canonical_type(other['type'])} "
                f"to {_canonical_type(spec['type'])}"
            )
    for writer, read, direction in ((candidate, reader, "to"), (reader, candidate, "from")):
        why = _resolves(writer, read)
        if why is not None:
            raise IncompatibleSchema(
                f"data cannot be resolved {direction} the reader schema (v{reader.version}): {why}"
            )
    return candidate


class Registry:
    """The built-in versions plus those published in ``data_dir`` (or ``documents``: the
    lake's in cluster mode); ``codec`` decodes all of them into the newest built-in one."""

    def __init__(
        self,
        data_dir: Path,
        built_in: list[PublishedSchema] | None = None,
        documents: Documents | None = None,
    ) -> None:
        self.documents = documents or FolderDocuments(registry_dir(data_dir))
        self.built_in = built_in or discover()
        self.reader = max(self.built_in, key=lambda s: s.version)
        self._listing: tuple[str, ...] | None = None
        self._published: list[Version] = []
        self._codec = Codec(self.built_in, self.reader)
        self.refresh()

    @property
    def codec(self) -> Codec:
        return self._codec

    def versions(self) -> list[Version]:
        return [Version(s, None) for s in self.built_in] + self._published

    def refresh(self) -> bool:
        """Re-read the versions if their listing changed; True when new versions appeared."""
        listing = tuple(self.documents.names("v*.json"))
        if listing == self._listing:
            return False
        self._listing = listing
        known = {v.schema.fingerprint for v in self.versions()}
        published = []
        for name in listing:
            found = self._read(name)
            if found is not None:
                published.append(found)
        self._published = sorted(published, key=lambda v: v.schema.version)
        schemas = [v.schema for v in self.versions()]
        self._codec = Codec(schemas, self.reader)
        return any(s.fingerprint not in known for s in schemas)

    def _read(self, name: str) -> Version | None:
        try:
            doc = json.loads(self.documents.read(name) or "")
            schema = schema_of_raw(doc["schema"], int(doc["version"]), Path(name))
            return Version(schema, str(doc["published_at"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("schema registry: %s is unreadable, skipped (%s)", name, exc)
            return None

    def publish(self, raw: Any) -> tuple[Version, bool]:
        """Publish ``raw`` as the next version; returns it and whether it is new (the same
        schema published before is returned as it was). Raises ``IncompatibleSchema``."""
        self.refresh()
        while True:
            version = max(v.schema.version for v in self.versions()) + 1
            candidate = check_compatible(raw, self.reader, version)
            for existing in self.versions():
                if existing.schema.fingerprint == candidate.fingerprint:
                    return existing, False
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            doc = {
                "version": version,
                "fingerprint": candidate.fingerprint.hex(),
                "published_at": stamp,
                "schema": raw,
            }
            name = _FILE.format(version)
            if not self.documents.create(name, json.dumps(doc, indent=2) + "\n"):
                self.refresh()  # someone published this number first: take the next
                continue
            self.refresh()
            return Version(schema_of_raw(raw, version, Path(name)), stamp), True


__all__ = ["IncompatibleSchema", "Registry", "Version", "check_compatible", "registry_dir"]
