"""Small named JSON documents every process of an installation shares: the published schema
versions (``schemas.registry``) and the dead-letter replay requests with their outcomes
(``consumer.replay``).

Embedded mode keeps them as files in a folder of ``METERING_DATA_DIR``
(``FolderDocuments``); cluster mode in the lake, so every host sees the same ones
(``aggregator.lake_documents``). A name is a relative path (``v0003.json``,
``<request>/p-0003.json``); ``create`` never replaces, ``put`` does, and both make a
document appear whole.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Protocol


class Documents(Protocol):
    def names(self, pattern: str) -> list[str]:
        """The names matching the glob ``pattern`` (``*`` stays within one level), sorted."""
        ...

    def read(self, name: str) -> str | None:
        """The document's text; None if there is none (or it cannot be read now)."""
        ...

    def create(self, name: str, text: str) -> bool:
        """Store a new document; False (nothing changed) if ``name`` exists already."""
        ...

    def put(self, name: str, text: str) -> None:
        """Store the document, replacing one of that name."""
        ...


class FolderDocuments:
    """Documents as files under ``folder`` (made on the first write)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def names(self, pattern: str) -> list[str]:
        try:
            found = [p for p in self.folder.glob(pattern) if not p.name.startswith(".")]
        except OSError:
            return []
        return sorted(p.relative_to(self.folder).as_posix() for p in found)

    def read(self, name: str) -> str | None:
        try:
            return (self.folder / name).read_text()
        except OSError:
            return None

    def _aside(self, name: str, text: str) -> tuple[Path, Path]:
        final = self.folder / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(text)
        return tmp, final

    def create(self, name: str, text: str) -> bool:
        """Written aside, then hard-linked to its name: of two racing, the second fails."""
        tmp, final = self._aside(name, text)
        try:
            os.link(tmp, final)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def put(self, name: str, text: str) -> None:
        tmp, final = self._aside(name, text)
        os.replace(tmp, final)


__all__ = ["Documents", "FolderDocuments"]
