"""Errors the pooler's modules share without depending on each other: a configuration error is
raised by the settings' loader (config.py) and by the files it reads through others (hba.py),
which must not import the loader back."""

from __future__ import annotations

from typing import Any


class ConfigError(Exception):
    """An invalid configuration: ``str(err) == "FILE:LINE: reason"``.

    ``line`` is None when the problem is not tied to one line (e.g. a missing file), and
    ``path`` is None for text given without a file name (shown as ``<string>``).
    """

    path: str | None
    line: int | None
    reason: str

    def __init__(self, reason: str, path: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.path if self.path is not None else "<string>"
        if self.line is not None:
            return f"{where}:{self.line}: {self.reason}"
        if self.path is not None:
            return f"{where}: {self.reason}"
        return self.reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.path, self.line))
