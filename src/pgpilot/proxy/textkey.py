"""The key a statement text is remembered by up to its literal values: per-query statistics
(stats.py) and N+1 at the wire (wire_nplusone.py) look a text's fingerprint up by it instead of
parsing every statement again."""

from __future__ import annotations

import re

try:
    from pgpilot.proxy._fastpath import text_key as _text_key  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - built without a C compiler
    _text_key = None

_LITERALS = re.compile(rb"'(?:[^']|'')*'|(?<![\w$])\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")


def text_key(text: bytes) -> object:
    """The same for statement texts that differ only in their literal values (the compiled
    engine's key where it is built: engine/querystats.c, qs_text_key; a regex's otherwise)."""
    if _text_key is not None:
        return _text_key(text)[0]
    return _LITERALS.sub(b"?", text)
