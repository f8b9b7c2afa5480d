"""Errors raised to the loads of a batch that could not be completed.

A per-key failure is whatever Exception instance the batch function returned for that key; the
classes here are for failures of the whole batch, and always name the loader so that a traceback
from deep inside a resolver says which batch function misbehaved.
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
