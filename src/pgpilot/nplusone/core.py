"""Detection scopes: ``detect()``, the report it fills, and the one entry point every feed calls.

A scope lives in a context variable, so each asyncio task and each thread sees only the scope
it opened: concurrent requests never mix. Scopes nest (a test inside a suite-wide scope, a
request inside a test): a query counts in the innermost scope and every scope around it.

The feeds (SQLAlchemy, psycopg, asyncpg) call :func:`record_query`; when no scope is open in the
calling context it returns at once, so an application can leave the feeds installed.

Recording is split in two to keep the cost inside the application's query path small: while
the query runs, only what cannot wait is taken (the parameters' key, the call site, the time)
and appended to the scope's buffer; parsing, fingerprinting and grouping happen when the
buffer is flushed (at the end of the scope, when the report is read, or every
``FLUSH_EVERY`` statements), in one tight loop.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from pgpilot.insight.detector import (
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_THRESHOLD,
    Allowlist,
    Finding,
    ScopeDetector,
    check_thresholds,
)
from pgpilot.insight.fingerprint import describe
from pgpilot.insight.suggest import suggest_fix
from pgpilot.nplusone.callsite import find_callsite, split_callsite

__all__ = [
    "DEFAULT_THRESHOLD",
    "Detection",
    "Mode",
    "NPlusOneError",
    "NPlusOneWarning",
    "Report",
    "detach",
    "detect",
    "record_query",
]

Mode = Literal["collect", "warn", "raise"]
MODES: tuple[Mode, ...] = ("collect", "warn", "raise")


class NPlusOneError(Exception):
    """Raised at the end of a ``detect(mode="raise")`` scope that found something."""

    def __init__(self, findings: Iterable[Finding]) -> None:
        self.findings = list(findings)
        lines = "\n".join(f"  - {finding.describe()}" for finding in self.findings)
        super().__init__(f"{len(self.findings)} query problem(s) found:\n{lines}")


class NPlusOneWarning(UserWarning):
    """Emitted once per finding, at the finding's call site, by ``detect(mode="warn")``."""


# Statements buffered before they are grouped (bounds a long scope's buffer).
FLUSH_EVERY = 512
# Call sites are looked for in the first executions of a statement text only: finding one
# walks the stack, the costliest part of recording, and the hundredth iteration of a loop is
# at the same line as the first.
CALLSITE_SAMPLES = 4
MAX_TEXTS_SEEN = 10_000

# A statement waiting in a scope's buffer:
# (sql, params key, call site, time, relationship, loader option)
_Pending = tuple[str, Hashable, str, float, "str | None", "str | None"]


@dataclass
class _EagerLoad:
    """An eager loader option seen in a scope, and how many queries asked for it."""

    relationship: str
    option: str
    step: str
    sql: str
    callsite: str
    count: int = 0


class _Scope:
    """One open ``detect()`` block."""

    __slots__ = (
        "allowlist",
        "detector",
        "eager_loads",
        "parent",
        "pending",
        "relationship_reads",
        "texts_seen",
    )

    def __init__(self, detector: ScopeDetector, allowlist: Allowlist, parent: _Scope | None):
        self.detector = detector
        self.allowlist = allowlist
        self.parent = parent
        self.pending: list[_Pending] = []
        self.texts_seen: dict[str, int] = {}  # statement text -> executions, for sampling
        # keyed by the relationship property object (hashable, one per mapped attribute)
        self.eager_loads: dict[Hashable, _EagerLoad] = {}
        self.relationship_reads: set[Hashable] = set()

    def flush(self) -> None:
        """Fingerprint and group the buffered statements."""
        pending, self.pending = self.pending, []
        add = self.detector.add
        scope_id = id(self)
        for sql, key, callsite, at, relationship, loader_option in pending:
            statement = describe(sql)
            # QueryEvent's fields as a plain tuple: the detector makes the named tuple only
            # for the few executions a finding will show
            add(
                (
                    statement.fingerprint,
                    sql,
                    key,
                    scope_id,
                    callsite,
                    at,
                    statement.command,
                    relationship,
                    loader_option,
                )
            )

    def findings(self) -> list[Finding]:
        self.flush()
        found = self.detector.findings()
        for key, eager in self.eager_loads.items():
            if key in self.relationship_reads:
                continue
            finding = Finding(
                kind="unused_eager_load",
                count=eager.count,
                sql=eager.sql,
                fingerprint=describe(eager.sql).fingerprint,
                callsite=eager.callsite,
                suggestion=f"drop {eager.step} from {eager.option}: "
                f"nothing in this scope reads {eager.relationship}",
                relationship=eager.relationship,
                callsites=(eager.callsite,) if eager.callsite else (),
            )
            if not self.allowlist.allows(finding):
                found.append(finding)
        return found


_NO_ALLOWLIST = Allowlist()

_current_scope: ContextVar[_Scope | None] = ContextVar("pgpilot_nplusone_scope", default=None)

# The SQLAlchemy listeners are put on the Engine class by the first scope and then stay:
# adding and removing class-level listeners costs ~100 us, which a scope per request would
# pay twice; left in place, they return at their first line when no scope is open.
_feeds_lock = threading.Lock()
_feeds_installed = False


def current_scope() -> _Scope | None:
    """The innermost open scope of the calling task or thread, if any."""
    return _current_scope.get()


def _params_key(sql: str, params: Any, executemany: bool) -> Hashable:
    """Equal for equal (text, values); cheap for the common shapes drivers pass. Unhashable
    values (lists, dicts) are left as they are: the detector falls back to their repr."""
    if params is None:
        return sql
    if executemany:
        if isinstance(params, list | tuple):
            return (sql, "many", len(params), _values(params[0]) if params else None)
        return (sql, "many", id(params))
    return (sql, _values(params))


def _values(params: Any) -> Any:
    # a copy: the caller may reuse and change its parameters object after the query
    if isinstance(params, dict):
        return tuple(params.values())
    if isinstance(params, list | tuple):
        return tuple(params)
    return params


def record_query(
    sql: str,
    params: Any = None,
    *,
    executemany: bool = False,
    relationship: str | None = None,
    loader_option: str | None = None,
) -> str | None:
    """Count one statement in the calling context's scopes.

    Returns the statement's call site (``""`` when not looked for), None when no scope is open.
    """
    scope = _current_scope.get()
    if scope is None:
        return None
    texts_seen = scope.texts_seen
    seen = texts_seen.get(sql, 0)
    if seen == 0 and len(texts_seen) >= MAX_TEXTS_SEEN:
        texts_seen.clear()  # statements with their values inlined: bound the memory
    texts_seen[sql] = seen + 1
    callsite = find_callsite() if seen < CALLSITE_SAMPLES else ""
    entry = (
        sql,
        _params_key(sql, params, executemany),
        callsite,
        time.monotonic(),
        relationship,
        loader_option,
    )
    while scope is not None:
        scope.pending.append(entry)
        if len(scope.pending) >= FLUSH_EVERY:
            scope.flush()
        scope = scope.parent
    return callsite


def note_eager_load(
    key: Hashable, relationship: str, option: str, step: str, sql: str, callsite: str
) -> None:
    """An executed query asked for ``relationship`` to be loaded eagerly by ``option``."""
    scope = _current_scope.get()
    while scope is not None:
        eager = scope.eager_loads.get(key)
        if eager is None:
            eager = scope.eager_loads[key] = _EagerLoad(relationship, option, step, sql, callsite)
        eager.count += 1
        scope = scope.parent


def note_relationship_read(key: Hashable) -> None:
    """The application read an eagerly loadable relationship attribute."""
    scope = _current_scope.get()
    while scope is not None:
        scope.relationship_reads.add(key)
        scope = scope.parent


def _install_feeds() -> None:
    global _feeds_installed
    if _feeds_installed:
        return
    with _feeds_lock:
        if not _feeds_installed:
            from pgpilot.nplusone import sqlalchemy_feed

            sqlalchemy_feed.install()
            _feeds_installed = True


def detach() -> None:
    """Take the SQLAlchemy listeners off the ``Engine`` class and give relationship attributes
    their own class back (the next ``detect()`` installs them again). For applications that
    open a scope once, at start-up, and want no trace after."""
    global _feeds_installed
    with _feeds_lock:
        from pgpilot.nplusone import sqlalchemy_feed

        sqlalchemy_feed.uninstall()
        _feeds_installed = False


class Report:
    """What a ``detect()`` scope found. Final once the scope has exited; live before."""

    def __init__(self, scope: _Scope) -> None:
        self._scope = scope
        self._final: list[Finding] | None = None

    @property
    def findings(self) -> list[Finding]:
        """N+1s and duplicates (most executions first), then unused eager loads."""
        if self._final is not None:
            return list(self._final)
        return self._scope.findings()

    @property
    def queries(self) -> int:
        """Statements counted in the scope."""
        return self._scope.detector.queries + len(self._scope.pending)

    def of_kind(self, kind: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.kind == kind]

    def summary(self) -> str:
        findings = self.findings
        if not findings:
            return f"no query problems in {self.queries} queries"
        lines = [f"{len(findings)} query problem(s) in {self.queries} queries:"]
        lines.extend(f"  - {finding.describe()}" for finding in findings)
        return "\n".join(lines)

    def _finish(self) -> list[Finding]:
        self._final = self._scope.findings()
        return self._final

    def __repr__(self) -> str:
        return f"<Report queries={self.queries} findings={len(self.findings)}>"


class Detection:
    """The context manager ``detect()`` returns: ``with`` (or ``async with``) it."""

    def __init__(
        self,
        threshold: int | None,
        mode: Mode,
        duplicate_threshold: int,
        allowlist: Allowlist,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self.mode = mode
        self.duplicate_threshold = duplicate_threshold
        self.allowlist = allowlist
        check_thresholds(self.threshold, duplicate_threshold)  # at detect(), not at a query
        self._token: Token[_Scope | None] | None = None
        self._scope: _Scope | None = None
        self.report: Report | None = None
        self._finished = False

    def start(self) -> Report:
        """Open the scope without entering it (see :meth:`activated`); ``with`` does both."""
        if self._scope is not None:
            raise RuntimeError("a detect() scope cannot be entered twice; call detect() again")
        detector = ScopeDetector(
            self.threshold, self.duplicate_threshold, self.allowlist, suggest_fix
        )
        self._scope = _Scope(detector, self.allowlist, _current_scope.get())
        self.report = Report(self._scope)
        _install_feeds()
        return self.report

    @contextmanager
    def activated(self) -> Iterator[Report]:
        """Count the queries run in this block in the (started) scope.

        For work done in pieces, in other contexts: a WSGI response body iterated after the
        application returned, a callback.
        """
        assert self._scope is not None and self.report is not None, "start() first"
        token = _current_scope.set(self._scope)
        try:
            yield self.report
        finally:
            _current_scope.reset(token)

    def finish(self, exc_type: type[BaseException] | None = None) -> list[Finding]:
        """Close the scope: final findings, then the mode's warning or error."""
        assert self._scope is not None and self.report is not None, "start() first"
        if self._finished:
            return self.report.findings
        self._finished = True
        findings = self.report._finish()
        if not findings or exc_type is not None:
            return findings  # never hide the exception already on its way out
        if self.mode == "warn":
            for finding in findings:
                emit_warning(finding)
        elif self.mode == "raise":
            raise NPlusOneError(findings)
        return findings

    def __enter__(self) -> Report:
        report = self.start()
        self._token = _current_scope.set(self._scope)
        return report

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._scope is not None and self._token is not None
        try:
            _current_scope.reset(self._token)
        except ValueError:
            # Exited in another context than entered (a generator resumed elsewhere):
            # restore what was around this scope by hand.
            _current_scope.set(self._scope.parent)
        self.finish(exc_type)

    async def __aenter__(self) -> Report:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, traceback)


def emit_warning(finding: Finding) -> None:
    """One ``NPlusOneWarning`` pointing at the finding's call site."""
    filename, lineno = split_callsite(finding.callsite)
    warnings.warn_explicit(
        finding.describe(), NPlusOneWarning, filename, lineno, module="pgpilot.nplusone"
    )


def detect(
    threshold: int | None = None,
    mode: Mode = "collect",
    *,
    duplicate_threshold: int = DEFAULT_DUPLICATE_THRESHOLD,
    allow_callsites: Iterable[str] = (),
    allow_fingerprints: Iterable[str] = (),
    allow_relationships: Iterable[str] = (),
) -> Detection:
    """Watch the queries run inside the ``with`` block and report N+1s, duplicates and unused
    eager loads.

    ``threshold``: distinct parameter sets of one statement that make an N+1 (default
    ``DEFAULT_THRESHOLD`` = 3). ``mode``: ``"collect"`` only fills the report, ``"warn"`` emits
    one ``NPlusOneWarning`` per finding at its call site, ``"raise"`` raises
    ``NPlusOneError`` at the end of the block. The allowlists take call site globs
    (``"app/reports.py:*"``), fingerprints, and relationship globs (``"Customer.orders"``).
    """
    callsites, fingerprints, relationships = (
        tuple(allow_callsites),
        frozenset(allow_fingerprints),
        tuple(allow_relationships),
    )
    if callsites or fingerprints or relationships:
        allowlist = Allowlist(callsites, fingerprints, relationships)
    else:
        allowlist = _NO_ALLOWLIST  # the common case: no allowlist object built per scope
    return Detection(threshold, mode, duplicate_threshold, allowlist)
