"""Errors raised to the loads of a batch that could not be completed.

A per-key failure is whatever Exception instance the batch function returned for that key
(the ready-made SQL batch functions return a :class:`BatchKeyError` for a key that cannot stand
for a value of the key column's type). :class:`BatchLoadError` and :class:`BatchResultError` are
for failures of the whole batch, and always name the loader so that a traceback from deep inside
a resolver says which batch function misbehaved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class BatchLoadError(Exception):
    """The batch function raised: every load waiting on that batch fails with this error.

    The original exception is the ``__cause__``.
    """

    def __init__(self, message: str, *, loader: str, keys: Sequence[Any]) -> None:
        super().__init__(message)
        self.loader = loader
        self.keys = list(keys)


class BatchResultError(BatchLoadError, TypeError):
    """The batch function returned something that cannot be matched to its keys.

    A sequence of the wrong length, or neither a sequence nor a mapping.
    """


class BatchKeyError(ValueError):
    """A key cannot stand for a value of the key column's type: only that key's load fails.

    Raised by the load of ``"abc"`` on an integer column, for instance; ``"1"`` is converted
    (see :mod:`pgpilot.batch.keys`).
    """

    def __init__(self, key: Any, *, column: str, column_type: str, expected: str) -> None:
        super().__init__(f"key {key!r} does not fit {column} ({column_type}): {expected}")
        self.key = key
        self.column = column
        self.column_type = column_type
