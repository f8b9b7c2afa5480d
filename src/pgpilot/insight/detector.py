"""N+1 and duplicate detection over a stream of query events.

Both faces of pgpilot feed this module: the in-app detector (``pgpilot.nplusone``) sends one
event per statement a SQLAlchemy engine or a watched driver connection runs, the pooler sends
one per statement a client runs. Neither side's machinery leaks in here: an event carries a
fingerprint already computed, a hashable key for its parameters and a scope id (a ``detect()``
block, a client transaction ...). This module imports nothing else of pgpilot.

Rules (per scope):

* ``n_plus_one``: one fingerprint executed with at least ``threshold`` *distinct* parameter
  sets: a loop issuing one query per item where one query for all items would do.
* ``duplicate``: one read executed with the *same* parameters at least ``duplicate_threshold``
  times with no write in between: the second round trip returns what the first did.
  A group that is an N+1 is reported as that alone: batching it removes the repeats too.

``DEFAULT_THRESHOLD`` is 3. Two executions of one shape with different values are common
without any loop (load the author, then the reviewer); the third is where a loop begins to be
the likelier story, and test fixtures, where the pytest plugin runs, seldom create more than
three rows, so a higher threshold would let the loop pass the suite and meet production data.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

__all__ = [
    "DEFAULT_DUPLICATE_THRESHOLD",
    "DEFAULT_THRESHOLD",
    "Allowlist",
    "Detector",
    "EventFields",
    "Finding",
    "FindingKind",
    "QueryEvent",
    "ScopeDetector",
    "check_thresholds",
]

DEFAULT_THRESHOLD = 3
DEFAULT_DUPLICATE_THRESHOLD = 2

# Bounds on what one scope remembers, so a long-lived scope (a pooler session, a batch job)
# stays small: distinct parameter sets per fingerprint, and call sites per fingerprint.
MAX_DISTINCT_PARAMS = 10_000
MAX_CALLSITES = 8

# The command classes the detector tells apart (same strings as insight.fingerprint).
READ = "read"
WRITE = "write"
OTHER = "other"

FindingKind = Literal["n_plus_one", "duplicate", "unused_eager_load"]


class QueryEvent(NamedTuple):
    """One statement executed, as seen by whichever side ran it.

    A named tuple rather than a frozen dataclass: one is built per statement on the hot path,
    and a tuple is built several times faster while being just as immutable.
    """

    fingerprint: str
    """The statement's fingerprint (``insight.fingerprint.fingerprint``)."""
    sql: str
    """The statement text as sent."""
    params_key: Hashable
    """Equal for executions with the same text and parameter values, different otherwise."""
    scope_id: Hashable = None
    """The unit of work the statement belongs to (a request, a test, a client transaction)."""
    callsite: str = ""
    """``"path/to/file.py:LINE"`` of the application code that ran it, when known."""
    timestamp: float = 0.0
    """When it ran (any monotonic clock; only used to order and to expire scopes)."""
    command: str = READ
    """``"read"``, ``"write"`` or ``"other"`` (``insight.fingerprint.Statement.command``)."""
    relationship: str | None = None
    """``"Customer.orders"`` when an ORM lazy load of that relationship issued the statement."""
    loader_option: str | None = None
    """The ORM loader option that would have loaded it up front, e.g.
    ``"selectinload(Customer.orders).selectinload(Order.items)"``."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing worth fixing, with where it happens and how to fix it."""

    kind: FindingKind
    count: int
    """Executions in the group (for a duplicate: executions with the repeated parameters)."""
    sql: str
    """One example statement."""
    fingerprint: str
    callsite: str
    """Where the first execution of the group came from (``""`` when unknown)."""
    suggestion: str
    """The fix, e.g. ``"selectinload(Customer.orders)"`` or a batch query."""
    relationship: str | None = None
    distinct_params: int = 0
    """How many different parameter sets the group ran with."""
    callsites: tuple[str, ...] = ()
    """The call sites of the group's first executions (bounded), the first one first."""

    def describe(self) -> str:
        """One line for a log, a warning or an assertion message."""
        where = f" at {self.callsite}" if self.callsite else ""
        what = {
            "n_plus_one": f"N+1: {self.count} executions with {self.distinct_params} "
            "different parameter sets",
            "duplicate": f"duplicate: {self.count} executions with the same parameters",
            "unused_eager_load": f"unused eager load of {self.relationship} "
            f"({self.count} queries loaded it, nothing read it)",
        }[self.kind]
        sql = " ".join(self.sql.split())
        if len(sql) > 160:
            sql = sql[:157] + "..."
        fix = f"; fix: {self.suggestion}" if self.suggestion else ""
        return f"{what}{where}: {sql}{fix}"


@dataclass(frozen=True, slots=True)
class Allowlist:
    """Findings a team has decided to live with.

    ``callsites`` are globs on ``"path:LINE"`` (``"app/reports/*.py:*"``), ``fingerprints`` exact
    fingerprints, ``relationships`` globs on ``"Class.attribute"`` (``"Customer.*"``).
    """

    callsites: tuple[str, ...] = ()
    fingerprints: frozenset[str] = frozenset()
    relationships: tuple[str, ...] = ()

    def allows(self, finding: Finding) -> bool:
        if finding.fingerprint in self.fingerprints:
            return True
        if finding.relationship is not None and any(
            fnmatch.fnmatchcase(finding.relationship, pattern) for pattern in self.relationships
        ):
            return True
        return bool(finding.callsite) and any(
            fnmatch.fnmatchcase(finding.callsite, pattern) for pattern in self.callsites
        )

    def __bool__(self) -> bool:
        return bool(self.callsites or self.fingerprints or self.relationships)


def check_thresholds(threshold: int, duplicate_threshold: int) -> None:
    """Refuse thresholds that would report every statement."""
    if threshold < 2:
        raise ValueError(f"threshold must be at least 2, not {threshold}")
    if duplicate_threshold < 2:
        raise ValueError(f"duplicate_threshold must be at least 2, not {duplicate_threshold}")


Suggest = Callable[[FindingKind, QueryEvent], str]
"""Turns a finding's kind and its example event into the fix to print."""


# Field positions in a QueryEvent (and in a plain tuple standing for one).
_FINGERPRINT, _SQL, _PARAMS_KEY, _SCOPE_ID, _CALLSITE, _TIMESTAMP, _COMMAND = range(7)

EventFields = QueryEvent | tuple[Any, ...]
"""A QueryEvent, or a plain tuple of its nine fields in the same order (what a feed on a hot
path passes to avoid building the named tuple for every statement)."""


def _as_event(fields: EventFields) -> QueryEvent:
    return fields if isinstance(fields, QueryEvent) else QueryEvent(*fields)


class _Group:
    """Everything remembered about one fingerprint in one scope."""

    __slots__ = ("callsites", "count", "first", "params", "repeat_event", "repeats")

    def __init__(self, first: EventFields) -> None:
        self.first = first
        self.count = 0
        # params_key -> [write epoch when last seen, executions since that write]
        self.params: dict[Hashable, list[int]] = {}
        self.callsites: dict[str, int] = {}
        self.repeats = 0  # the most executions of one parameter set with no write between
        self.repeat_event = first


class ScopeDetector:
    """Detection within one scope. Fed by one task or thread at a time; not thread-safe."""

    __slots__ = (
        "_groups",
        "_suggest",
        "_write_epoch",
        "allowlist",
        "duplicate_threshold",
        "queries",
        "threshold",
    )

    def __init__(
        self,
        threshold: int = DEFAULT_THRESHOLD,
        duplicate_threshold: int = DEFAULT_DUPLICATE_THRESHOLD,
        allowlist: Allowlist | None = None,
        suggest: Suggest | None = None,
    ) -> None:
        check_thresholds(threshold, duplicate_threshold)
        self.threshold = threshold
        self.duplicate_threshold = duplicate_threshold
        self.allowlist = allowlist if allowlist is not None else Allowlist()
        self.queries = 0
        self._suggest = suggest
        self._groups: dict[str, _Group] = {}
        self._write_epoch = 0

    def add(self, event: EventFields) -> bool:
        """Count one statement. True when it makes its group an N+1 (the threshold just met)."""
        fields: tuple[Any, ...] = event
        self.queries += 1
        command = fields[_COMMAND]
        if command == OTHER:
            return False
        if command == WRITE:
            # A write may change what any read returns: a read repeated after it is not
            # redundant, so duplicate counting starts again.
            self._write_epoch += 1
        group = self._groups.get(fields[_FINGERPRINT])
        if group is None:
            group = self._groups[fields[_FINGERPRINT]] = _Group(event)
        group.count += 1
        callsite = fields[_CALLSITE]
        if callsite:
            seen = group.callsites.get(callsite)
            if seen is not None:
                group.callsites[callsite] = seen + 1
            elif len(group.callsites) < MAX_CALLSITES:
                group.callsites[callsite] = 1
        params = group.params
        key = fields[_PARAMS_KEY]
        try:
            entry = params.get(key)
        except TypeError:  # an unhashable parameter (a list, a dict): equal values print equally
            key = repr(key)
            entry = params.get(key)
        if entry is None:
            if len(params) < MAX_DISTINCT_PARAMS:
                params[key] = [self._write_epoch, 1]
            return len(params) == self.threshold
        if command == READ:
            if entry[0] == self._write_epoch:
                entry[1] += 1
                if entry[1] > group.repeats:
                    group.repeats = entry[1]
                    group.repeat_event = event
            else:
                entry[0] = self._write_epoch
                entry[1] = 1
        return False

    def findings(self) -> list[Finding]:
        """The N+1s and duplicates so far, most executions first, allowlisted ones left out."""
        found: list[Finding] = []
        allowlist = self.allowlist if self.allowlist else None
        for group in self._groups.values():
            finding = self._finding_for(group)
            if finding is not None and (allowlist is None or not allowlist.allows(finding)):
                found.append(finding)
        found.sort(key=lambda finding: -finding.count)
        return found

    def finding(self, fingerprint: str) -> Finding | None:
        """The finding for one fingerprint, if its group is one (allowlist not applied)."""
        group = self._groups.get(fingerprint)
        return None if group is None else self._finding_for(group)

    def _finding_for(self, group: _Group) -> Finding | None:
        distinct = len(group.params)
        if distinct >= self.threshold:
            return self._make("n_plus_one", group.first, group.count, distinct, group)
        if group.repeats >= self.duplicate_threshold:
            return self._make("duplicate", group.repeat_event, group.repeats, distinct, group)
        return None

    def _make(
        self, kind: FindingKind, fields: EventFields, count: int, distinct: int, group: _Group
    ) -> Finding:
        example = _as_event(fields)
        first: tuple[Any, ...] = group.first
        suggestion = self._suggest(kind, example) if self._suggest is not None else ""
        return Finding(
            kind=kind,
            count=count,
            sql=example.sql,
            fingerprint=example.fingerprint,
            callsite=first[_CALLSITE] or next(iter(group.callsites), ""),
            suggestion=suggestion,
            relationship=example.relationship,
            distinct_params=distinct,
            callsites=tuple(group.callsites),
        )


@dataclass
class _OpenScope:
    detector: ScopeDetector
    last_seen: float
    reported: set[str] = field(default_factory=set)


class Detector:
    """Detection over many interleaved scopes, keyed by ``QueryEvent.scope_id``.

    The shape the pooler needs: events of many clients arrive on one stream; :meth:`feed`
    reports an N+1 the moment its threshold is met (so it can be logged while the burst is
    still going on), :meth:`close` ends a scope and returns everything it found, and
    :meth:`expire` closes scopes that have been quiet, for sources that never say "done".
    """

    def __init__(
        self,
        threshold: int = DEFAULT_THRESHOLD,
        duplicate_threshold: int = DEFAULT_DUPLICATE_THRESHOLD,
        allowlist: Allowlist | None = None,
        suggest: Suggest | None = None,
    ) -> None:
        self.threshold = threshold
        self.duplicate_threshold = duplicate_threshold
        self.allowlist = allowlist if allowlist is not None else Allowlist()
        self._suggest = suggest
        self._scopes: dict[Hashable, _OpenScope] = {}
        check_thresholds(threshold, duplicate_threshold)  # now, not at the first event

    def feed(self, event: QueryEvent) -> Finding | None:
        """Count one event; return an ``n_plus_one`` finding when it just crossed the threshold."""
        scope = self._scopes.get(event.scope_id)
        if scope is None:
            detector = ScopeDetector(
                self.threshold, self.duplicate_threshold, self.allowlist, self._suggest
            )
            scope = self._scopes[event.scope_id] = _OpenScope(detector, event.timestamp)
        scope.last_seen = event.timestamp
        if not scope.detector.add(event) or event.fingerprint in scope.reported:
            return None
        finding = scope.detector.finding(event.fingerprint)
        if finding is None or self.allowlist.allows(finding):
            return None
        scope.reported.add(event.fingerprint)
        return finding

    def findings(self, scope_id: Hashable) -> list[Finding]:
        """Findings of an open scope so far (empty for an unknown scope)."""
        scope = self._scopes.get(scope_id)
        return [] if scope is None else scope.detector.findings()

    def close(self, scope_id: Hashable) -> list[Finding]:
        """End a scope: its findings, and the memory it held released."""
        scope = self._scopes.pop(scope_id, None)
        return [] if scope is None else scope.detector.findings()

    def expire(self, older_than: float) -> dict[Hashable, list[Finding]]:
        """Close every scope whose last event is older than ``older_than``; their findings."""
        stale = [key for key, scope in self._scopes.items() if scope.last_seen < older_than]
        return {key: self.close(key) for key in stale}

    def open_scopes(self) -> Iterable[Hashable]:
        return tuple(self._scopes)
