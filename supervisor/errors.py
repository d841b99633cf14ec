"""Errors in a user's file that say where: file, line and key."""

from __future__ import annotations


class SourceError(ValueError):
    """Something wrong at a place in a file: `file:line: key: message`."""

    def __init__(self, file: str, line: int | None, key: str, message: str) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
