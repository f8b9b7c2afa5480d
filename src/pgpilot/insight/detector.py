"""N+1 and duplicate detection over a stream of query events.

Both faces of pgpilot feed this module: the in-app detector (``pgpilot.nplusone``) sends one
event per statement a SQLAlchemy engine or a watched driver connection runs, the pooler sends
one per statement a client runs. Neither side's machinery leaks in here: an event carries a
fingerprint already computed, a hashable key for its parameters and a scope id (a ``detect()``
block, a client transaction ...). This module imports nothing else of pgpilot.

Rules (per scope):

* ``n_plus_one``: one read fingerprint executed with at least ``threshold`` *distinct*
  parameter sets *from one loop* (reads of pages, ``LIMIT`` above 1, not counted): a loop
  issuing one query per item where one query for all items would do. "One loop" is the
  event's ``loop_key`` (the in-app feed hashes the call stack, so separate calls that happen
  to repeat a query are not a loop); events without one (the pooler's) all count as one
  loop. ``missing_contains_eager`` when the feed saw that the query that loaded the objects
  had joined the relationship's table already.
* ``insert_loop`` / ``update_loop`` / ``delete_loop``: the same for a write, one row per
  statement. ORM flush writes carry their transaction's id as their parameter key (tag
  ``"flush"`` or ``"commit_loop"``): the rows of one transaction are one "execution", so
  only a loop of transactions (a ``commit()`` per row) is reported.
* ``duplicate``: one read executed with the *same* parameters at least ``duplicate_threshold``
  times with no write in between: the second round trip returns what the first did.
  A group that is an N+1 is reported as that alone: batching it removes the repeats too.
  ``duplicate_get`` when the repeated read is a ``Session.get()`` (tag ``"get"``): the identity
  map already answers a key whose row was found, so what repeats is a lookup of a row that
  was not there (or of an object expired since): one index probe, advisory.
* ``large_result``: a read that returned at least ``large_result`` rows (when the source
  knows the count) into memory.
* ``deep_offset``: an ``OFFSET`` of at least ``deep_offset``, or growing across
  ``threshold`` executions of one loop (paging through a table).
* ``wrong_type_comparison``, ``correlated_subquery``: read from the statement's text
  (``insight.shape``).

``DEFAULT_THRESHOLD`` is 3. Two executions of one shape with different values are common
without any loop (load the author, then the reviewer); the third is where a loop begins to be
the likelier story, and test fixtures, where the pytest plugin runs, seldom create more than
three rows, so a higher threshold would let the loop pass the suite and meet production data.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any, Literal, NamedTuple, get_args

from pgpilot.insight.shape import shape

__all__ = [
    "ADVISORY_KINDS",
    "DEFAULT_DEEP_OFFSET",
    "DEFAULT_DUPLICATE_THRESHOLD",
    "DEFAULT_LARGE_RESULT",
    "DEFAULT_THRESHOLD",
    "FINDING_KINDS",
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
DEFAULT_LARGE_RESULT = 10_000
DEFAULT_DEEP_OFFSET = 1_000

# Bounds on what one scope remembers, so a long-lived scope (a pooler session, a batch job)
# stays small: distinct parameter sets per fingerprint, and call sites per fingerprint.
MAX_DISTINCT_PARAMS = 10_000
MAX_CALLSITES = 8

# The command classes the detector tells apart (same strings as insight.fingerprint).
READ = "read"
WRITE = "write"
OTHER = "other"

FindingKind = Literal[
    "n_plus_one",
    "duplicate",
    "duplicate_get",
    "unused_eager_load",
    "insert_loop",
    "update_loop",
    "delete_loop",
    "missing_contains_eager",
    "large_result",
    "deep_offset",
    "wrong_type_comparison",
    "correlated_subquery",
    "overfetch",
    "existence_load",
    "unlocked_read_modify_write",
]
FINDING_KINDS: tuple[FindingKind, ...] = get_args(FindingKind)

ADVISORY_KINDS: frozenset[FindingKind] = frozenset(
    {
        "unused_eager_load",
        "correlated_subquery",
        "duplicate_get",
        "overfetch",
        "existence_load",
        "unlocked_read_modify_write",
    }
)
"""Kinds that are advice rather than a defect: what the data of a test leaves unread, what
might be slow, a risk that depends on what runs concurrently, a repeat that costs one index
probe. The pytest plugin's raise mode lists them instead of failing the test, unless asked
to."""

_LOOP_KINDS: dict[str, FindingKind] = {
    "select": "n_plus_one",
    "insert": "insert_loop",
    "update": "update_loop",
    "delete": "delete_loop",
}


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
    loop_key: Hashable = None
    """Equal for executions from one loop (the in-app feed hashes the call stack); None when
    unknown, and then every execution of a statement counts as one loop."""
    rows: int = -1
    """Rows the statement returned, when the source knows (-1 otherwise)."""
    tag: str | None = None
    """What the source knows about why the statement ran: ``"flush"`` (an ORM unit-of-work
    write; ``params_key`` is then its transaction's id), ``"commit_loop"`` (a flush write of a
    loop that calls ``commit()``), ``"contains_eager"`` (a lazy load of a relationship whose
    table the loading query had joined), ``"expired"`` (a lazy load of a relationship the
    loading query had an eager option for: expired since)."""
    offset: int | None = None
    """The statement's OFFSET value, when it has one and the source could read it."""
    callers: tuple[str, ...] = ()
    """The application frames outward of ``callsite`` (its callers), innermost first."""
    limit: int | None = None
    """The statement's LIMIT value, when it has one and the source could read it."""


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
    callers: tuple[str, ...] = ()
    """The application frames that called ``callsite``, innermost first (when known)."""
    detail: str = ""
    """What was measured, in words (rows returned, the offset, the columns read ...)."""
    first_stack: tuple[str, ...] = ()
    """For a ``duplicate``: the call site and callers of the first execution of the repeated
    parameters (``callsite`` and ``callers`` are those of the repeat), when known."""

    def describe(self) -> str:
        """One line for a log, a warning or an assertion message."""
        where = f" at {self.callsite}" if self.callsite else ""
        if self.callers:
            where += f" (called from {', '.join(self.callers)})"
        loop = f"{self.count} executions with {self.distinct_params} different parameter sets"
        what = {
            "n_plus_one": f"N+1: {loop}",
            "missing_contains_eager": f"missing contains_eager: {loop}",
            "insert_loop": f"insert loop: {loop}",
            "update_loop": f"update loop: {loop}",
            "delete_loop": f"delete loop: {loop}",
            "duplicate": f"duplicate: {self.count} executions with the same parameters",
            "duplicate_get": f"duplicate get(): {self.count} lookups of the same key",
            "unused_eager_load": f"unused eager load of {self.relationship} "
            f"({self.count} queries loaded it, nothing read it)",
        }.get(self.kind, self.kind.replace("_", " "))
        if self.detail:
            what = f"{what} ({self.detail})"
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
(
    _FINGERPRINT,
    _SQL,
    _PARAMS_KEY,
    _SCOPE_ID,
    _CALLSITE,
    _TIMESTAMP,
    _COMMAND,
    _RELATIONSHIP,
    _LOADER_OPTION,
    _LOOP_KEY,
    _ROWS,
    _TAG,
    _OFFSET,
    _CALLERS,
    _LIMIT,
) = range(15)
_FIELDS = len(QueryEvent._fields)

EventFields = QueryEvent | tuple[Any, ...]
"""A QueryEvent, or a plain tuple of its fields in the same order (what a feed on a hot path
passes to avoid building the named tuple for every statement); a tuple may stop after any
field, the rest take their defaults."""


def _as_event(fields: EventFields) -> QueryEvent:
    return fields if isinstance(fields, QueryEvent) else QueryEvent(*fields)


def _field(fields: tuple[Any, ...], index: int) -> Any:
    return fields[index] if len(fields) > index else QueryEvent._field_defaults[
        QueryEvent._fields[index]
    ]


class _Group:
    """Everything remembered about one fingerprint in one scope."""

    __slots__ = (
        "biggest",
        "callsites",
        "count",
        "first",
        "first_loop",
        "labelled",
        "loop_params",
        "offsets",
        "pages",
        "params",
        "repeat_event",
        "repeat_first",
        "repeats",
        "tagged",
    )

    def __init__(self, first: EventFields) -> None:
        self.first = first
        self.labelled: EventFields | None = None  # the first event naming a relationship
        self.tagged: EventFields | None = None  # the first event carrying a tag
        self.count = 0
        # params_key -> [write epoch when last seen, executions since that write, the first
        # of those executions]
        self.params: dict[Hashable, list[Any]] = {}
        # The loop key of the first execution; loop_key -> the distinct params_keys seen from
        # that loop, made only when a second loop runs the statement (until then the one
        # loop's distinct keys are the params' keys: no second set kept per execution)
        self.first_loop: Hashable = first[_LOOP_KEY] if len(first) > _LOOP_KEY else None
        self.loop_params: dict[Hashable, set[Hashable]] | None = None
        self.callsites: dict[str, int] = {}
        self.repeats = 0  # the most executions of one parameter set with no write between
        self.repeat_event = first
        self.repeat_first = first  # the first execution of the parameters repeat_event repeats
        self.biggest: EventFields | None = None  # the execution that returned most rows
        # loop_key -> offsets in execution order (bounded), for paging loops
        self.offsets: dict[Hashable, list[int]] = {}
        self.pages = False  # a LIMIT above 1: each execution reads a page, not one item

    def loop_distinct(self) -> int:
        """Distinct parameter sets of the loop that ran the most of them."""
        if self.loop_params is None:
            return len(self.params)
        return max((len(keys) for keys in self.loop_params.values()), default=0)


class ScopeDetector:
    """Detection within one scope. Fed by one task or thread at a time; not thread-safe."""

    __slots__ = (
        "_groups",
        "_suggest",
        "_write_epoch",
        "allowlist",
        "deep_offset",
        "duplicate_threshold",
        "large_result",
        "queries",
        "threshold",
    )

    def __init__(
        self,
        threshold: int = DEFAULT_THRESHOLD,
        duplicate_threshold: int = DEFAULT_DUPLICATE_THRESHOLD,
        allowlist: Allowlist | None = None,
        suggest: Suggest | None = None,
        *,
        large_result: int = DEFAULT_LARGE_RESULT,
        deep_offset: int = DEFAULT_DEEP_OFFSET,
    ) -> None:
        check_thresholds(threshold, duplicate_threshold)
        self.threshold = threshold
        self.duplicate_threshold = duplicate_threshold
        self.large_result = large_result
        self.deep_offset = deep_offset
        self.allowlist = allowlist if allowlist is not None else Allowlist()
        self.queries = 0
        self._suggest = suggest
        self._groups: dict[str, _Group] = {}
        self._write_epoch = 0

    def note_write(self) -> None:
        """A write this scope does not count happened (in a request scope isolated inside it):
        a read repeated after it is not a duplicate."""
        self._write_epoch += 1

    def add(self, event: EventFields) -> bool:
        """Count one statement. True when it makes its group a loop (the threshold just met)."""
        # (runs once per statement of every open scope: written for few bytecodes, the
        # common branches first)
        fields: tuple[Any, ...] = event
        self.queries += 1
        command = fields[_COMMAND]
        if command == OTHER:
            return False
        if command == WRITE:
            # A write may change what any read returns: a read repeated after it is not
            # redundant, so duplicate counting starts again.
            self._write_epoch += 1
        fingerprint = fields[_FINGERPRINT]
        groups = self._groups
        group = groups.get(fingerprint)
        if group is None:
            group = groups[fingerprint] = _Group(event)
        group.count += 1
        callsite = fields[_CALLSITE]
        if callsite:
            callsites = group.callsites
            seen = callsites.get(callsite)
            if seen is not None:
                callsites[callsite] = seen + 1
            elif len(callsites) < MAX_CALLSITES:
                callsites[callsite] = 1
        if len(fields) > _LOOP_KEY:
            if len(fields) < _FIELDS:  # a short tuple: the rest take their defaults
                fields = _as_event(fields)
            loop_key = fields[_LOOP_KEY]
            if group.labelled is None and fields[_RELATIONSHIP] is not None:
                group.labelled = event
            if group.tagged is None and fields[_TAG] is not None:
                group.tagged = event
            rows = fields[_ROWS]
            if rows > 0 and (group.biggest is None or rows > group.biggest[_ROWS]):
                group.biggest = event
            limit = fields[_LIMIT]
            if limit is not None and limit > 1:
                group.pages = True
            offset = fields[_OFFSET]
            if offset is not None:
                offsets = group.offsets.setdefault(loop_key, [])
                if len(offsets) < MAX_CALLSITES * 4:
                    offsets.append(offset)
        else:
            loop_key = None
        params = group.params
        key = fields[_PARAMS_KEY]
        try:
            entry = params.get(key)
        except TypeError:  # an unhashable parameter (a list, a dict): equal values print equally
            key = repr(key)
            entry = params.get(key)
        loops = group.loop_params
        if loops is None:
            if loop_key == group.first_loop:
                # one loop so far: its distinct keys are the params' (added just below)
                new_in_loop = entry is None and len(params) < MAX_DISTINCT_PARAMS
                in_loop = len(params) + new_in_loop
            else:
                loops = group.loop_params = {group.first_loop: set(params)}
        if loops is not None:
            loop = loops.get(loop_key)
            if loop is None:
                loop = loops[loop_key] = set()
            new_in_loop = key not in loop and len(loop) < MAX_DISTINCT_PARAMS
            if new_in_loop:
                loop.add(key)
            in_loop = len(loop)
        if entry is None:
            if len(params) < MAX_DISTINCT_PARAMS:
                # [write epoch, executions since, the first of them]
                params[key] = [self._write_epoch, 1, event]
        elif command == READ:
            if entry[0] == self._write_epoch:
                entry[1] += 1
                if entry[1] > group.repeats:
                    group.repeats = entry[1]
                    group.repeat_event = event
                    group.repeat_first = entry[2]
            else:
                entry[0] = self._write_epoch
                entry[1] = 1
                entry[2] = event
        return (
            new_in_loop
            and in_loop == self.threshold
            and (loops is None or group.loop_distinct() == in_loop)
        )

    def findings(self) -> list[Finding]:
        """Everything found so far, most executions first, allowlisted ones left out."""
        found: list[Finding] = []
        allowlist = self.allowlist if self.allowlist else None
        for group in self._groups.values():
            for finding in self._findings_for(group):
                if allowlist is None or not allowlist.allows(finding):
                    found.append(finding)
        found.sort(key=lambda finding: -finding.count)
        return found

    def finding(self, fingerprint: str) -> Finding | None:
        """The loop or duplicate finding for one fingerprint, if its group is one (allowlist
        not applied)."""
        group = self._groups.get(fingerprint)
        if group is None:
            return None
        return next(iter(self._findings_for(group)), None)

    def _findings_for(self, group: _Group) -> list[Finding]:
        found: list[Finding] = []
        first: tuple[Any, ...] = group.first
        if (
            group.count < self.threshold
            and group.repeats < self.duplicate_threshold
            and not group.offsets
            and (group.biggest is None or group.biggest[_ROWS] < self.large_result)
        ):
            # too few runs for a loop or a duplicate, no OFFSET, no large result: only what
            # the statement's own text shows can be found (most groups of a scope)
            text = shape(first[_SQL])
            if text.wrong_type is None and text.correlated_subquery is None:
                return found
        distinct = group.loop_distinct()
        example = group.labelled if group.labelled is not None else group.first
        statement = shape(first[_SQL])
        tagged: tuple[Any, ...] | None = group.tagged
        tag = tagged[_TAG] if tagged is not None else None
        growing = max(
            (
                len(values)
                for values in group.offsets.values()
                if len(values) >= self.threshold
                and all(a < b for a, b in pairwise(values))
            ),
            default=0,
        )
        # A loop reading pages (LIMIT n, keyset or OFFSET) walks a result, it does not load
        # one item per query: a deep or growing OFFSET is reported as such, keyset is fine.
        if distinct >= self.threshold and not growing and not group.pages:
            kind = _LOOP_KINDS.get(statement.verb, "n_plus_one")
            if tag == "contains_eager" and kind == "n_plus_one":
                kind = "missing_contains_eager"
            if tag in ("contains_eager", "expired", "flush", "commit_loop"):
                example = tagged if tagged is not None else example
            found.append(self._make(kind, example, group.count, len(group.params), group))
        elif group.repeats >= self.duplicate_threshold and tag not in ("flush", "commit_loop"):
            repeated: tuple[Any, ...] = group.repeat_event
            kind = "duplicate_get" if _field(repeated, _TAG) == "get" else "duplicate"
            duplicate = self._make(kind, repeated, group.repeats, len(group.params), group)
            first_run: tuple[Any, ...] = group.repeat_first
            if first_run is not repeated and len(first_run) > _CALLERS:
                callers: tuple[str, ...] = first_run[_CALLERS] or ()
                duplicate = replace(duplicate, first_stack=(first_run[_CALLSITE], *callers))
            found.append(duplicate)
        if group.biggest is not None and group.biggest[_ROWS] >= self.large_result:
            rows = group.biggest[_ROWS]
            found.append(
                self._make(
                    "large_result", group.biggest, group.count, len(group.params), group,
                    detail=f"{rows:,} rows in one result",
                )
            )
        deepest = max((max(values) for values in group.offsets.values() if values), default=0)
        if deepest >= self.deep_offset or growing:
            detail = f"OFFSET up to {deepest:,}"
            if growing:
                detail += f", growing over {growing} pages of one loop"
            found.append(
                self._make("deep_offset", group.first, group.count, len(group.params), group,
                           detail=detail)
            )
        if statement.wrong_type is not None:
            column, literal = statement.wrong_type
            found.append(
                self._make("wrong_type_comparison", group.first, group.count,
                           len(group.params), group, detail=f"{column} = '{literal}'")
            )
        if statement.correlated_subquery is not None:
            found.append(
                self._make("correlated_subquery", group.first, group.count, len(group.params),
                           group, detail=f"a subquery per row of {statement.correlated_subquery}")
            )
        return found

    def _make(
        self,
        kind: FindingKind,
        fields: EventFields,
        count: int,
        distinct: int,
        group: _Group,
        detail: str = "",
    ) -> Finding:
        example = _as_event(fields)
        first: tuple[Any, ...] = group.first
        suggestion = self._suggest(kind, example) if self._suggest is not None else ""
        callers = example.callers if len(first) > _LOOP_KEY else ()
        return Finding(
            kind=kind,
            count=count,
            sql=example.sql,
            fingerprint=example.fingerprint,
            callsite=example.callsite or first[_CALLSITE] or next(iter(group.callsites), ""),
            suggestion=suggestion,
            relationship=example.relationship,
            distinct_params=distinct,
            callsites=tuple(group.callsites),
            callers=tuple(callers),
            detail=detail,
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
