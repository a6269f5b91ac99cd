"""Flat Avro schemas: records whose fields are primitives, ["null", primitive] unions or
enums (decoded as their symbol's index).

``FlatSchema.of`` says whether a schema is one the columnar paths (``schemas.native_decoder``
and ``schemas.bulk_encoder``) handle; it returns None for anything else, and callers fall
back to the per-record codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "string", "bytes"})


@dataclass(frozen=True)
class FlatField:
    """One field: its primitive type (or ``enum``, with its symbols), and where "null" sits
    if it is a union."""

    name: str
    kind: str
    null_branch: int | None  # None: not a union; else the union index of "null" (0 or 1)
    symbols: tuple[str, ...] | None = None  # an enum's symbols, in index order

    @property
    def nullable(self) -> bool:
        return self.null_branch is not None

    @classmethod
    def of(cls, spec: Any) -> FlatField | None:
        """The flat view of one field spec, or None when it is not flat."""
        return _flat_field(spec)


@dataclass(frozen=True)
class FlatSchema:
    """A record schema made only of primitives, ["null", primitive] unions and enums."""

    name: str
    fields: tuple[FlatField, ...]
    raw: dict[str, Any]

    @classmethod
    def of(cls, raw: dict[str, Any]) -> FlatSchema | None:
        """The flat view of ``raw``, or None when the fast path cannot handle it."""
        if raw.get("type") != "record" or not isinstance(raw.get("fields"), list):
            return None
        fields = []
        for f in raw["fields"]:
            field = _flat_field(f)
            if field is None:
                return None
            fields.append(field)
        return cls(str(raw["name"]), tuple(fields), raw)

    def field(self, name: str) -> FlatField | None:
        return next((f for f in self.fields if f.name == name), None)


def _flat_field(spec: Any) -> FlatField | None:
    if not isinstance(spec, dict) or "name" not in spec:
        return None
    kind = _primitive(spec.get("type"))
    if kind is not None:
        return FlatField(spec["name"], kind, None)
    symbols = _enum_symbols(spec.get("type"))
    if symbols is not None:
        return FlatField(spec["name"], "enum", None, symbols)
    branches = spec.get("type")
    if isinstance(branches, list) and len(branches) == 2:
        kinds = [_primitive(b) for b in branches]
        if "null" in kinds and None not in kinds and kinds[0] != kinds[1]:
            null_branch = kinds.index("null")
            other = kinds[1 - null_branch]
            assert other is not None
            return FlatField(spec["name"], other, null_branch)
    return None


def _primitive(node: Any) -> str | None:
    if isinstance(node, str):
        return node if node in PRIMITIVES else None
    if isinstance(node, dict) and set(node) <= {"type", "logicalType"}:
        return _primitive(node.get("type"))
    return None


def _enum_symbols(node: Any) -> tuple[str, ...] | None:
    if not isinstance(node, dict) or node.get("type") != "enum":
        return None
    symbols = node.get("symbols")
    if not isinstance(symbols, list) or not symbols or not all(isinstance(x, str) for x in symbols):
        return None
    return tuple(symbols)
