"""Result files written record by record: complete under their own name, or kept as ``<name>.partial``.

    with RecordFile("out.jsonl", expected=len(prompts)) as out:   # refuses an existing out.jsonl
        for record in records:
            out.write(json.dumps(record))

Records go to ``out.jsonl.partial`` (flushed one by one); a clean end renames it to ``out.jsonl``. Anything that
ends the block early (Ctrl-C, SIGTERM, an error) leaves ``out.jsonl.partial`` with the finished records and adds a
note saying so to the exception, which the command line prints in its one-line message. An existing file is never
replaced unless the caller passes ``overwrite=True`` (``--overwrite`` on the command line).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from parcae.errors import UsageError

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def check_writable_output(path: str | Path, overwrite: bool = False, flag: str = "--output") -> None:
    """Refuse (one line, before any work) an output file that exists, unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; name a file")
    if path.exists() and not overwrite:
        raise UsageError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another name")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {path.parent} does not exist")


class RecordFile:
    """A text file of one record per line, under ``<name>.partial`` until the block ends cleanly."""

    def __init__(self, path: str | Path, *, expected: Optional[int] = None, overwrite: bool = False) -> None:
        self.path, self.partial = Path(path), partial_path(path)
        self.expected, self.overwrite, self.count = expected, overwrite, 0
        self._file = None

    def __enter__(self) -> "RecordFile":
        check_writable_output(self.path, self.overwrite)
        self._file = open(self.partial, "w", encoding="utf-8")
        return self

    def write(self, record: str) -> None:
        """One finished record (a line without its newline); on disk when this returns."""
        self._file.write(record + "\n")
        self._file.flush()
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._file.close()
        if exc is None:
            os.replace(self.partial, self.path)
            return False
        of = f" of {self.expected}" if self.expected is not None else ""
        exc.add_note(f"{self.partial} keeps the {self.count}{of} finished records")
        return False
