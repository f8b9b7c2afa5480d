"""Which line of the application ran a query: the first frame outside pgpilot, SQLAlchemy and
the database drivers.

This runs for every query while detection is on, so it walks ``sys._getframe()`` (no
``inspect.stack()``, which reads source files) and remembers per file name whether it is
library code and how to print it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import FrameType

__all__ = ["find_callsite", "split_callsite"]

# Packages whose frames are never "the application": the detector itself, the ORM and the
# drivers (and greenlet, through which SQLAlchemy's asyncio layer runs sync code).
LIBRARY_PACKAGES = (
    "pgpilot",
    "sqlalchemy",
    "psycopg",
    "psycopg_pool",
    "psycopg_binary",
    "psycopg_c",
    "asyncpg",
    "greenlet",
)

# file name -> how to print it, or None for library code. Grows to the number of source files
# that ever run a query, which is small.
_display_names: dict[str, str | None] = {}
_library_dirs: tuple[str, ...] | None = None


def _find_library_dirs() -> tuple[str, ...]:
    dirs: list[str] = []
    for name in LIBRARY_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        for location in spec.submodule_search_locations or ():
            dirs.append(os.path.join(os.path.realpath(location), ""))
        if spec.origin and not spec.submodule_search_locations:
            dirs.append(os.path.realpath(spec.origin))  # a single-module distribution
    return tuple(dirs)


def _display_name(filename: str) -> str | None:
    global _library_dirs
    if _library_dirs is None:
        _library_dirs = _find_library_dirs()
    real = os.path.realpath(filename) if not filename.startswith("<") else filename
    if real.startswith(_library_dirs):
        return None
    if real.startswith("<"):
        return real
    try:
        relative = os.path.relpath(real)
    except ValueError:  # another drive (Windows)
        return real
    return real if relative.startswith("..") else relative


def _app_frame_callsite(frame: FrameType | None) -> str:
    names = _display_names
    while frame is not None:
        filename = frame.f_code.co_filename
        try:
            shown = names[filename]
        except KeyError:
            shown = names[filename] = _display_name(filename)
        if shown is not None:
            return f"{shown}:{frame.f_lineno}"
        frame = frame.f_back
    return ""


def find_callsite(depth: int = 1) -> str:
    """``"path/to/file.py:LINE"`` of the innermost application frame above the caller.

    ``depth`` frames (the caller's own, by default) are skipped before looking. Paths under the
    current directory are printed relative to it. ``""`` when only library code is on the stack.
    """
    found = _app_frame_callsite(sys._getframe(depth + 1))
    if found:
        return found
    # SQLAlchemy's asyncio layer runs the sync ORM in a child greenlet whose stack ends at
    # the greenlet's start; the coroutine that awaited it is suspended in the parent.
    greenlet_module = sys.modules.get("greenlet")
    if greenlet_module is None:
        return ""
    parent = greenlet_module.getcurrent().parent
    while parent is not None:
        found = _app_frame_callsite(parent.gr_frame)
        if found:
            return found
        parent = parent.parent
    return ""


def split_callsite(callsite: str) -> tuple[str, int]:
    """``("path/to/file.py", LINE)`` from a callsite string (line 0 when there is none)."""
    path, _, line = callsite.rpartition(":")
    if not path or not line.isdigit():
        return callsite or "<unknown>", 0
    return path, int(line)
