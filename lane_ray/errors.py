"""User-facing errors: each renders as one line naming the file, row and field at fault."""

from __future__ import annotations

from pathlib import Path


class LaneError(Exception):
    """An error caused by the user's input or environment, shown as one line without a traceback."""

    def __str__(self) -> str:  # one line, always
        return " ".join(super().__str__().split())


class ConfigError(LaneError):
    """A configuration value is missing, unknown or invalid."""


class DataError(LaneError):
    """An input file is missing, unreadable or malformed.

    The message is built as ``<file>: row <n>: field '<field>': <problem>`` with the parts that are known.
    ``row`` is 1-based and counts lines of the file as a text editor shows them (header included).
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | Path | None = None,
        field: str | None = None,
        row: int | None = None,
    ) -> None:
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.field = field
        self.row = row
        parts = []
        if self.file is not None:
            parts.append(self.file)
        if row is not None:
            parts.append(f"row {row}")
        if field is not None:
            parts.append(f"field '{field}'")
        parts.append(problem)
        super().__init__(": ".join(parts))


class DownloadError(LaneError):
    """A dataset could not be fetched or failed its checksum."""
