"""Avro schemas of the usage event (every published version) and the single-object codec."""

from schemas.codec import (
    COUNTERS,
    SINGLE_OBJECT_MAGIC,
    Codec,
    DecodeError,
    PublishedSchema,
    default_codec,
)

__all__ = [
    "COUNTERS",
    "SINGLE_OBJECT_MAGIC",
    "Codec",
    "DecodeError",
    "PublishedSchema",
    "default_codec",
]
