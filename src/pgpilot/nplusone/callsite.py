"""Which line of the application ran a query, and which loop it ran in.

This runs for every query while detection is on, so it walks ``sys._getframe()`` (no
``inspect.stack()``, which reads source files) and remembers per file name whether it is
application code and how to print it.

A frame is *application code* unless its file is

* in pgpilot, SQLAlchemy, a database driver or greenlet (the packages in
  ``LIBRARY_PACKAGES``),
* a pseudo-file (``<string>``: SQLAlchemy's generated wrappers, so that every statement of a
  commit would otherwise be "at ``<string>:2``"; ``<frozen ...>``),
* in the standard library (``typing.py``) or an installed package (site-packages: pydantic,
  sqlmodel, alembic, Flask-SQLAlchemy ...).

When no frame qualifies (an application installed into site-packages) the first frame outside
the first two groups is used instead, so there is still a line to show.

The *loop key* of a statement is a hash of the code and line of every frame on its stack (up to
``MAX_LOOP_FRAMES``), through the greenlets SQLAlchemy's asyncio layer runs in. Two executions
share it when they come from the same loop (every iteration runs the same lines) and differ
when they come from separate calls that happen to run the same query (a helper called from two
lines of a test).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import sysconfig
from collections.abc import Hashable
from types import CodeType, FrameType
from typing import NamedTuple

__all__ = ["Above", "StackInfo", "anchor_frame", "find_callsite", "split_callsite", "stack_info"]

# Packages whose frames are never "the application": the detector itself, the ORM and the
# drivers (and greenlet, through which SQLAlchemy's asyncio layer runs sync code).
LIBRARY_PACKAGES = (
    "pgpilot",
    "sqlalchemy",
    "psycopg",
    "psycopg_pool",
    "psycopg_binary",
    "psycopg_c",
    "psycopg2",
    "asyncpg",
    "greenlet",
)
MAX_LOOP_FRAMES = 64
MAX_OUTER_CALLSITES = 3

# A frame's file: how to print it, and its class.
_APP = 0  # application code
_INSTALLED = 1  # standard library, site-packages, pseudo-files: shown only if nothing else
_LIBRARY = 2  # pgpilot, the ORM, the drivers: never shown

# file name -> (class, how to print it). Grows to the number of source files that ever run a
# query, which is small.
_files: dict[str, tuple[int, str]] = {}
_library_dirs: tuple[str, ...] | None = None
_installed_dirs: tuple[str, ...] | None = None
# ids of code objects (hashing a code object hashes its constants, nested code objects
# included: far too slow for every frame of every statement)
_flush_codes: frozenset[int] = frozenset()
_commit_codes: frozenset[int] = frozenset()
_get_codes: frozenset[int] = frozenset()


class StackInfo(NamedTuple):
    """What the stack says about one statement."""

    callsite: str
    """``"path/to/file.py:LINE"`` of the innermost application frame (``""`` if none)."""
    loop_key: int
    """Equal for executions from the same lines all the way up (one loop)."""
    outer: tuple[str, ...]
    """The next application frames outward (the callers of ``callsite``), innermost first."""
    in_flush: bool
    """True when the statement runs inside ``Session.flush()`` (the ORM's unit of work)."""
    in_commit: bool
    """True when it runs inside ``Session.commit()`` (the flush a commit starts)."""
    in_get: bool = False
    """True when it runs inside ``Session.get()`` / ``Query.get()``: a primary-key lookup the
    identity map could not answer (the row is not in the session: missing, or expired)."""


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


def _find_installed_dirs() -> tuple[str, ...]:
    dirs: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(os.path.join(os.path.realpath(path), ""))
    for path in sys.path:
        if path.endswith(("site-packages", "dist-packages")):
            dirs.add(os.path.join(os.path.realpath(path), ""))
    return tuple(sorted(dirs))


def _classify(filename: str) -> tuple[int, str]:
    global _library_dirs, _installed_dirs
    if _library_dirs is None or _installed_dirs is None:
        _library_dirs = _find_library_dirs()
        _installed_dirs = _find_installed_dirs()
    if filename.startswith("<"):
        return _INSTALLED, filename
    real = os.path.realpath(filename)
    if real.startswith(_library_dirs):
        return _LIBRARY, real
    try:
        relative = os.path.relpath(real)
    except ValueError:  # another drive (Windows)
        relative = real
    shown = real if relative.startswith("..") else relative
    if (
        real.startswith(_installed_dirs)
        or f"{os.sep}site-packages{os.sep}" in real
        or f"{os.sep}dist-packages{os.sep}" in real
    ):
        return _INSTALLED, shown
    return _APP, shown


def _codes_of(owner: object, names: tuple[str, ...]) -> frozenset[int]:
    codes: set[int] = set()
    for name in names:
        function = getattr(owner, name, None)
        while function is not None:
            code = getattr(function, "__code__", None)
            if code is not None:
                codes.add(id(code))
            function = getattr(function, "__wrapped__", None)
    return frozenset(codes)


def _session_code_objects() -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    """The ids of the code of ``Session.flush`` / ``_flush``, of ``Session.commit`` (any
    wrapper), and of ``Session._get_impl`` (what ``Session.get()`` and ``Query.get()`` run)."""
    global _flush_codes, _commit_codes, _get_codes
    if not _flush_codes:
        try:
            from sqlalchemy.orm.session import Session
        except ImportError:  # pragma: no cover - SQLAlchemy is a dependency
            return _flush_codes, _commit_codes, _get_codes
        _flush_codes = _codes_of(Session, ("flush", "_flush"))
        _commit_codes = _codes_of(Session, ("commit",))
        _get_codes = _codes_of(Session, ("_get_impl",))
    return _flush_codes, _commit_codes, _get_codes


def _greenlet_parents() -> list[FrameType]:
    # SQLAlchemy's asyncio layer runs the sync ORM in a child greenlet whose stack ends at
    # the greenlet's start; the coroutine that awaited it is suspended in the parent.
    greenlet_module = sys.modules.get("greenlet")
    if greenlet_module is None:
        return []
    frames: list[FrameType] = []
    parent = greenlet_module.getcurrent().parent
    while parent is not None:
        frame = parent.gr_frame
        if frame is not None:
            frames.append(frame)
        parent = parent.parent
    return frames


_FLUSH, _COMMIT, _GET = 1, 2, 3
# id(code) -> (the code object, its file's class, how to print the file, its role: 0, or
# inside Session.flush / commit / get). Checked with ``is`` against the frame's code, so an id
# reused by a new code object after the old one was freed is classified afresh.
_codes: dict[int, tuple[CodeType, int, str, int]] = {}


def _code_entry(code: CodeType) -> tuple[CodeType, int, str, int]:
    filename = code.co_filename
    try:
        kind, shown = _files[filename]
    except KeyError:
        kind, shown = _files[filename] = _classify(filename)
    code_id = id(code)
    role = (
        _FLUSH
        if code_id in _flush_codes
        else _COMMIT
        if code_id in _commit_codes
        else _GET
        if code_id in _get_codes
        else 0
    )
    entry = (code, kind, shown, role)
    if len(_codes) < 100_000:
        _codes[code_id] = entry
    return entry


# (id(code), instruction offset) -> (the code object, "file:line"): an application frame's
# printed place, made once per call instruction rather than once per statement
_places: dict[tuple[int, int], tuple[CodeType, str]] = {}


def _where(frame: FrameType, code: CodeType, code_id: int, lasti: int, shown: str) -> str:
    place = _places.get((code_id, lasti))
    if place is not None and place[0] is code:
        return place[1]
    where = f"{shown}:{frame.f_lineno}"
    if len(_places) < 100_000:
        _places[(code_id, lasti)] = (code, where)
    return where


# shortcut key (the statement's text) -> what the library frames at the bottom of its stack
# were the last time: how many, the code of the first frame above them and of the last of
# them, their loop-key parts and roles. The same statement sent again from the same place
# goes through the same library frames: two frame lookups (sys._getframe walks in C) confirm
# it, instead of a Python walk over each of them.
_Bottom = tuple[int, CodeType, CodeType, tuple[int, ...], bool, bool, bool]
_bottoms: dict[Hashable, _Bottom] = {}


class Above(NamedTuple):
    """What the frames above a scope's anchor frame say, the same for every statement run
    while the anchor runs its ``with`` block."""

    places: tuple[str, ...]
    """Application frames, innermost first (at most ``MAX_OUTER_CALLSITES``)."""
    in_flush: bool
    in_commit: bool
    in_get: bool


def anchor_frame(depth: int) -> FrameType | None:
    """The frame ``depth`` levels above the caller, if it can anchor a scope: one that runs
    the whole ``with`` block (not a generator's, which is suspended and resumed from
    elsewhere while the block is open)."""
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:
        return None
    if frame.f_code.co_flags & (inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR):
        return None
    return frame


def _above(anchor: FrameType) -> Above:
    places: list[str] = []
    in_flush = in_commit = in_get = False
    frame = anchor.f_back
    while frame is not None:
        code = frame.f_code
        entry = _codes.get(id(code))
        if entry is None or entry[0] is not code:
            entry = _code_entry(code)
        kind, shown, role = entry[1], entry[2], entry[3]
        if kind == _APP and len(places) < MAX_OUTER_CALLSITES:
            place = _where(frame, code, id(code), frame.f_lasti, shown)
            if place not in places:
                places.append(place)
        in_flush = in_flush or role == _FLUSH
        in_commit = in_commit or role == _COMMIT
        in_get = in_get or role == _GET
        frame = frame.f_back
    return Above(tuple(places), in_flush, in_commit, in_get)


# (what the frames below a scope's anchor said, what those above it said) -> the two joined:
# the same request handler's stacks are joined once per process, not once per request
_joined: dict[tuple[StackInfo, Above], StackInfo] = {}


def _join_above(below: StackInfo, above: list[Above], anchor: FrameType) -> StackInfo:
    """``below`` (a walk that stopped at ``anchor``) with what the frames above ``anchor``
    say (read once into ``above``): their application frames as further callers, their
    flush, commit and get flags."""
    if not above:
        above.append(_above(anchor))
    joined = _joined.get((below, above[0]))
    if joined is not None:
        return joined
    places, flush_above, commit_above, get_above = above[0]
    outer = list(below.outer)
    for place in places:
        if len(outer) >= MAX_OUTER_CALLSITES:
            break
        if place != below.callsite and place not in outer:
            outer.append(place)
    joined = StackInfo(
        below.callsite,
        below.loop_key,
        tuple(outer),
        below.in_flush or flush_above,
        below.in_commit or commit_above,
        below.in_get or get_above,
    )
    if len(_joined) < MAX_MEMO:
        _joined[(below, above[0])] = joined
    return joined


def _py_frames_key(frame: FrameType, anchor: FrameType, limit: int) -> int | None:
    """A hash of each frame's code and instruction from ``frame`` out to ``anchor``, None if
    ``anchor`` is not within ``limit`` frames (``_stackwalk.frames_key`` without a compiler)."""
    parts: list[int] = []
    current: FrameType | None = frame
    while current is not None and len(parts) < 2 * limit:
        parts.append(id(current.f_code))
        parts.append(current.f_lasti)
        if current is anchor:
            return hash(tuple(parts))
        current = current.f_back
    return None


def _py_frame_codes(frame: FrameType, anchor: FrameType, limit: int) -> tuple[CodeType, ...]:
    """The code objects ``_py_frames_key`` reads."""
    codes: list[CodeType] = []
    current: FrameType | None = frame
    while current is not None and len(codes) < limit:
        codes.append(current.f_code)
        if current is anchor:
            break
        current = current.f_back
    return tuple(codes)


def _py_memo_key(
    depth: int, shortcut: Hashable, bottom: _Bottom, anchor: FrameType, limit: int
) -> tuple[Hashable, int, int] | None:
    """``(shortcut, count, frames key)`` when the frames ``depth`` levels above the caller
    are the library frames ``bottom`` records (``_stackwalk.memo_key`` without a compiler)."""
    count = bottom[0]
    try:
        frame = sys._getframe(depth + 1 + count)
        if frame.f_code is not bottom[1] or (
            count and sys._getframe(depth + count).f_code is not bottom[2]
        ):
            return None
    except ValueError:  # a shallower stack
        return None
    frames = _py_frames_key(frame, anchor, limit)
    return None if frames is None else (shortcut, count, frames)


try:
    from pgpilot.nplusone._stackwalk import (  # type: ignore[import-not-found]
        frame_codes as _frame_codes,
    )
    from pgpilot.nplusone._stackwalk import (
        memo_key as _memo_key,
    )
except ImportError:  # built without a compiler
    _memo_key = _py_memo_key
    _frame_codes = _py_frame_codes

StackMemo = dict[tuple[Hashable, int, int], StackInfo]
"""A scope's answers for the stacks seen in it (see :func:`stack_info`)."""

# (statement text, library frames at the bottom, frames key) -> what the frames from the
# first one above the library frames out to a scope's anchor say, and their code objects
# (held so that the ids the key was made of stay theirs). Shared by all scopes: a request
# handler's stacks are walked once per process, not once per request.
_below: dict[tuple[Hashable, int, int], tuple[StackInfo, tuple[CodeType, ...]]] = {}
MAX_MEMO = 10_000


def stack_info(
    depth: int = 1,
    shortcut: Hashable = None,
    anchor: FrameType | None = None,
    above: list[Above] | None = None,
    memo: StackMemo | None = None,
) -> StackInfo:
    """The call site, loop key, callers and flush flag of the statement being run.

    ``depth`` frames (the caller's own, by default) are skipped before looking. ``shortcut``
    (the statement's text) lets a statement sent again through the same library frames skip
    walking them one by one. ``anchor``: the frame that opened the outermost scope the
    statement counts in, if it runs that scope's whole block; the frames above it are the same
    for every statement of the scope, so the walk stops there (when the call site is found
    below it) and they are left out of the loop key; what they say (callers, flush flags) is
    read once into ``above``, a one-item cache the scope keeps. ``memo`` (the scope's): the
    answer for a stack seen before in the scope, found from the statement's library frames
    (two frame lookups) and a key of the code and instruction of each frame from there to the
    anchor (``_stackwalk.frames_key``); a stack seen before in another scope is answered from
    the process-wide ``_below`` and the scope's ``above``.
    """
    if memo is not None and anchor is not None and shortcut is not None:
        bottom = _bottoms.get(shortcut)
        if bottom is not None:
            key = _memo_key(depth + 1, shortcut, bottom, anchor, MAX_LOOP_FRAMES)
            if key is not None:
                known = memo.get(key)
                if known is not None:
                    return known
                below = _below.get(key)
                if below is not None:
                    info = _join_above(below[0], above if above is not None else [], anchor)
                else:
                    info, stopped = _walk(depth + 1, shortcut, anchor)
                    if stopped:
                        if len(_below) < MAX_MEMO:
                            first = sys._getframe(depth + 1 + bottom[0])
                            _below[key] = (info, _frame_codes(first, anchor, MAX_LOOP_FRAMES))
                        info = _join_above(info, above if above is not None else [], anchor)
                if len(memo) < MAX_MEMO:
                    memo[key] = info
                return info
    info, stopped = _walk(depth + 1, shortcut, anchor)
    if stopped and anchor is not None:
        info = _join_above(info, above if above is not None else [], anchor)
    return info


def _walk(depth: int, shortcut: Hashable, anchor: FrameType | None) -> tuple[StackInfo, bool]:
    """What the frames say, and whether the walk stopped at ``anchor`` (the call site found
    below it: then the frames above it are left for :func:`_join_above`)."""
    codes = _codes
    if not _flush_codes:
        _session_code_objects()
    callsite = fallback = ""
    outer: list[str] = []
    # library frames: the id of the code object (a code object's id names it as well as the
    # object while its function exists, and hashes in no time); others: (id, instruction)
    key_parts: list[tuple[int, int] | int] = []
    in_flush = in_commit = in_get = False
    first: FrameType | None = None
    bottom = _bottoms.get(shortcut) if shortcut is not None else None
    if bottom is not None:
        count, above_code, last_code, parts, in_flush, in_commit, in_get = bottom
        try:
            first = sys._getframe(depth + 1 + count)
            if first.f_code is not above_code or (
                count and sys._getframe(depth + count).f_code is not last_code
            ):
                first = None
        except ValueError:  # a shallower stack
            first = None
        if first is not None:
            key_parts.extend(parts)
        else:
            in_flush = in_commit = in_get = False
    starts: list[FrameType | None] = [first or sys._getframe(depth + 1)]
    walked = 0  # library frames at the bottom of the stack, before any other
    full = stopped = False
    bottom_done = first is not None or shortcut is None
    for start in starts:
        frame = start
        while frame is not None:
            code = frame.f_code
            code_id = id(code)
            entry = codes.get(code_id)
            if entry is None or entry[0] is not code:
                entry = _code_entry(code)
            kind = entry[1]
            if kind == _LIBRARY:
                # pgpilot, the ORM, a driver: which of their lines runs follows from the
                # application's lines, so the frame's code alone goes into the loop key (a
                # frame's line number is decoded from its code's line table: not free)
                if len(key_parts) < MAX_LOOP_FRAMES:
                    key_parts.append(code_id)
                role = entry[3]
                if role:
                    if role == _FLUSH:
                        in_flush = True
                    elif role == _COMMIT:
                        in_commit = True
                    else:
                        in_get = True
                walked += 1
                last = code
                if frame is anchor and callsite:
                    full = stopped = True
                    break
                frame = frame.f_back
                continue
            if not bottom_done:
                bottom_done = True
                if walked and len(_bottoms) < 10_000 and walked < MAX_LOOP_FRAMES:
                    _bottoms[shortcut] = (
                        walked,
                        code,
                        last,
                        tuple(part for part in key_parts if isinstance(part, int)),
                        in_flush,
                        in_commit,
                        in_get,
                    )
            # the instruction, not the line: f_lasti is a plain read, f_lineno decodes the
            # code's line table; the printed line is looked up once per instruction
            lasti = frame.f_lasti
            if len(key_parts) < MAX_LOOP_FRAMES:
                key_parts.append((code_id, lasti))
            elif callsite:
                full = True  # the loop key is full and the call site known: the rest is far
                break
            if kind == _APP:
                if not callsite:
                    callsite = _where(frame, code, code_id, lasti, entry[2])
                elif len(outer) < MAX_OUTER_CALLSITES:
                    caller = _where(frame, code, code_id, lasti, entry[2])
                    if caller != callsite and caller not in outer:  # a comprehension's frame
                        outer.append(caller)
            elif kind == _INSTALLED and not fallback and not entry[2].startswith("<"):
                fallback = _where(frame, code, code_id, lasti, entry[2])
            if frame is anchor and callsite:
                full = stopped = True
                break
            frame = frame.f_back
        bottom_done = True  # a stack of library frames only (a greenlet's): nothing cached
        if full:
            break
        if start is starts[0]:
            starts.extend(_greenlet_parents())
    info = StackInfo(
        callsite or fallback, hash(tuple(key_parts)), tuple(outer), in_flush, in_commit, in_get
    )
    return info, stopped


def find_callsite(depth: int = 1) -> str:
    """``"path/to/file.py:LINE"`` of the innermost application frame above the caller.

    ``depth`` frames (the caller's own, by default) are skipped before looking. Paths under the
    current directory are printed relative to it. ``""`` when only library code is on the stack.
    """
    return stack_info(depth + 1).callsite


def split_callsite(callsite: str) -> tuple[str, int]:
    """``("path/to/file.py", LINE)`` from a callsite string (line 0 when there is none)."""
    path, _, line = callsite.rpartition(":")
    if not path or not line.isdigit():
        return callsite or "<unknown>", 0
    return path, int(line)
