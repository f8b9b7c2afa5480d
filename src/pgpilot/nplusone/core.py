"""Detection scopes: ``detect()``, the report it fills, and the one entry point every feed calls.

A scope lives in a context variable, so each asyncio task and each thread sees only the scope
it opened: concurrent requests never mix. Scopes nest (a test inside a suite-wide scope, a
request inside a test): a query counts in the innermost scope and every scope around it.

The feeds (SQLAlchemy, psycopg, asyncpg) call :func:`record_query`; when no scope is open in the
calling context it returns at once, so an application can leave the feeds installed.

Each statement is grouped as it is recorded (the scope's ``insight.ScopeDetector``): what a
statement's text says (fingerprint, command, LIMIT/OFFSET, write verb) is read once per text
and kept, so a statement seen before costs a dictionary lookup and the group update. (An
earlier version buffered statements and grouped them at the end of the scope: the same work,
plus building and unpacking each entry twice.)
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field, replace
from types import FrameType, TracebackType
from typing import Any, Literal

from pgpilot.insight.detector import (
    DEFAULT_DEEP_OFFSET,
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_LARGE_RESULT,
    DEFAULT_THRESHOLD,
    Allowlist,
    Finding,
    ScopeDetector,
    check_thresholds,
)
from pgpilot.insight.fingerprint import COMMAND_OTHER, describe
from pgpilot.insight.shape import Bound, param_names, shape
from pgpilot.insight.suggest import suggest_fix
from pgpilot.nplusone.callsite import (
    Above,
    StackInfo,
    StackMemo,
    anchor_frame,
    split_callsite,
    stack_info,
)

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


MAX_CHILD_FINDINGS = 1_000

# The id of the ORM transaction running in this context (set by the SQLAlchemy feed's
# after_begin listener): the flush writes of one transaction share it, so only a loop that
# commits (a new transaction per row) makes them a write loop.
current_flush: ContextVar[int] = ContextVar("pgpilot_nplusone_flush", default=0)


@dataclass
class _EagerLoad:
    """An eager loader option seen in a scope, and how many queries asked for it."""

    relationship: str
    option: str
    step: str
    sql: str
    callsite: str
    target: Hashable = None
    """The related class's mapper: an eager load under which none was loaded is not unused."""
    count: int = 0


class _Scope:
    """One open ``detect()`` block."""

    __slots__ = (
        "above",
        "allowlist",
        "anchor",
        "batches",
        "child_findings",
        "commits",
        "detector",
        "eager_loads",
        "follows_loads",
        "follows_use",
        "isolated",
        "joined",
        "last_select",
        "loaded",
        "overfetch_columns",
        "parent",
        "pending_singles",
        "reached",
        "relationship_reads",
        "rmw",
        "stack_memo",
        "state_reads",
    )

    def __init__(
        self,
        detector: ScopeDetector,
        allowlist: Allowlist,
        parent: _Scope | None,
        isolated: bool = False,
    ):
        self.detector = detector
        self.allowlist = allowlist
        self.parent = parent
        self.isolated = isolated
        # this scope and those around it up to the first isolated one: where what happens in
        # this one counts too (fixed for the scope's life: read once per note, not walked)
        self.reached: tuple[_Scope, ...] = (
            (self,) if isolated or parent is None else (self, *parent.reached)
        )
        # The frame running this scope's ``with`` block (None: opened otherwise, or by a
        # generator), and what the frames above it say, read once (see callsite.stack_info).
        self.anchor: FrameType | None = None
        self.above: list[Above] = []
        self.stack_memo: StackMemo = {}
        # keyed by the relationship property object (hashable, one per mapped attribute)
        self.eager_loads: dict[Hashable, _EagerLoad] = {}
        self.relationship_reads: set[Hashable] = set()
        self.loaded: dict[Hashable, int] = {}  # mapper -> instances (rows) the ORM loaded
        self.joined: set[Hashable] = set()  # relationships and tables ORM queries joined
        self.commits: dict[int, str] = {}  # id(session) -> where it last committed
        self.child_findings: list[Finding] = []  # of isolated scopes opened inside this one
        self.overfetch_columns = DEFAULT_OVERFETCH_COLUMNS
        # What the ORM loaded and what the application read of it (overfetch, existence_load,
        # unlocked_read_modify_write): the top-level ORM SELECT just sent (its rows not yet
        # turned into objects), each such execution keyed by the run id SQLAlchemy gives its
        # load (and stamps on every instance state it creates: ``InstanceState.runid``), and
        # the column attributes read on each state of one of them before any change. Nothing
        # is noted per loaded row: a state is looked up by its run id when it is first read.
        self.last_select: _LoadBatch | None = None
        # one-row loads (get(), first()) whose row may be an object the session already
        # held (see note_read)
        self.pending_singles: list[_LoadBatch] = []
        self.batches: dict[int, _LoadBatch] = {}
        # whether any of them is followed (_LoadBatch.followed), and whether any is a one-row
        # lookup: until one is, the use of an object (a relationship read, a change) is not
        # noted at all (only an existence_load looks at it)
        self.follows_loads = False
        self.follows_use = False
        self.state_reads: dict[Any, set[str]] = {}
        self.rmw: dict[tuple[str, str], Finding] = {}

    def findings(self) -> list[Finding]:
        found = self.detector.findings()
        for key, eager in self.eager_loads.items():
            if key in self.relationship_reads:
                continue
            if eager.target is not None and not self.loaded.get(eager.target):
                continue  # nothing was there to load: following the advice would add an N+1
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
        for finding in (*self._load_findings(), *self.rmw.values()):
            if not self.allowlist.allows(finding):
                found.append(finding)
        found.extend(self.child_findings)
        return found

    def _load_findings(self) -> list[Finding]:
        """``existence_load`` and ``overfetch`` over the ORM loads of the scope, one finding
        per query (call site and statement), however many times it ran."""
        if not self.follows_loads:
            return []  # no load of the scope was one either could come of
        by_query: dict[tuple[str, str], list[_LoadBatch]] = {}
        # one execution can be reached under several run ids (an expired row loaded again).
        # A run that is not followed (narrow, many rows) has no reads noted, but its rows
        # keep its query from being an existence_load (the same statement, from the same
        # call site, run with LIMIT 1 once): it is grouped with the others.
        for batch in {id(batch): batch for batch in self.batches.values()}.values():
            if batch.rows > 0 or batch.used:
                by_query.setdefault((batch.callsite, batch.sql), []).append(batch)
        found: list[Finding] = []
        for (callsite, sql), batches in by_query.items():
            first = batches[0]
            used = [state for batch in batches for state in batch.used]
            # rows each execution returned (the driver's count), as many as were read if a
            # count is missing
            rows = sum(max(batch.rows, len(batch.used)) for batch in batches)
            if not used and all(
                batch.single and batch.rows > 0 and not batch.unseen for batch in batches
            ):
                # a one-row lookup (.get(), .first()) whose row nothing reads: a truth test;
                # a result of many rows nothing reads is more likely thrown away
                found.append(
                    replace(
                        _load_finding(sql, callsite, batches),
                        detail=f"{rows} {first.entity} row(s) loaded, no attribute of "
                        "them read or changed",
                    )
                )
                continue
            if not used:
                continue
            loaded = next((batch.loaded for batch in batches if batch.loaded), ())
            if len(loaded) < self.overfetch_columns or len(used) < OVERFETCH_MIN_ROWS:
                continue  # too narrow, or too few rows, for an overfetch: reads not gathered
            read: set[str] = set()
            for state in used:
                read |= self.state_reads[state]
            read.discard(_WRITTEN)
            read.discard(_USED)
            if (
                read
                and len(loaded) >= self.overfetch_columns
                and len(read) * OVERFETCH_READ_FRACTION <= len(loaded)
                and len(used) >= OVERFETCH_MIN_ROWS
            ):
                unread = [key for key in loaded if key not in read]
                found.append(
                    replace(
                        _load_finding(sql, callsite, batches),
                        kind="overfetch",
                        count=rows,
                        suggestion=_overfetch_fix(first.mapper, loaded, read),
                        detail=f"{len(read)} of {len(loaded)} {first.entity} columns read "
                        f"({', '.join(sorted(read))}); never read: {', '.join(unread)}",
                    )
                )
        return found


def _join_keys(mapper: Any) -> set[str]:
    """Column attributes of ``mapper`` its relationships join on (a many-to-one's foreign
    key; the primary key, which load_only() keeps anyway, for the others)."""
    keys: set[str] = set()
    for prop in getattr(mapper, "relationships", ()):
        for column in prop.local_columns:
            try:
                keys.add(mapper.get_property_by_column(column).key)
            except Exception:  # a column of another table in an inheritance chain
                continue
    return keys


def _load_finding(sql: str, callsite: str, batches: list[_LoadBatch]) -> Finding:
    """An ``existence_load`` of the query run as ``batches`` (the base of an overfetch)."""
    return Finding(
        kind="existence_load",
        count=len(batches),
        sql=sql,
        fingerprint=describe(sql).fingerprint,
        callsite=callsite,
        suggestion=_existence_fix(batches[0].entity),
        callsites=(callsite,) if callsite else (),
        callers=batches[0].callers,
        distinct_params=len(batches),
    )


DEFAULT_OVERFETCH_COLUMNS = 6
"""Loaded columns an entity needs before ``overfetch`` looks at it: loading all of a narrow
row costs next to nothing more than loading part of it."""
OVERFETCH_READ_FRACTION = 3
"""``overfetch`` when the columns read are at most one in this many of the loaded ones."""
OVERFETCH_MIN_ROWS = 3
"""Rows (read) of one query in a scope before ``overfetch`` speaks: the threshold of a loop."""
MAX_TRACKED_STATES = 10_000
MAX_PENDING_SINGLES = 64
_WRITTEN = "<written>"  # in state_reads: the application changed or deleted the object
_USED = "<used>"  # in state_reads: the application read a relationship of the object


@dataclass(slots=True)
class _LoadBatch:
    """One execution of a top-level ORM SELECT of entities, and what was read of its rows."""

    sql: str
    callsite: str
    callers: tuple[str, ...]
    mapper: Any
    """The first entity's mapper: only its instances are followed (not what a joinedload
    adds to the same rows)."""
    rows: int
    """Rows the driver said it returned (-1: it did not say)."""
    transaction: int
    single: bool = False
    """A one-row lookup: ``Session.get()``, or ``LIMIT 1`` (``Query.first()``)."""
    parameters: Any = None
    """A one-row lookup's bound parameters (what its row's primary key may be among)."""
    loaded: tuple[str, ...] | None = None
    """Column attributes the query loaded (in mapper order; deferred ones left out), as the
    first of its instances to be read had them."""
    used: list[Any] = field(default_factory=list)
    """Its instance states the application read, changed or deleted."""
    unseen: bool = False
    """Its row may have been an object the session already held, whose reads are not seen
    as this load's (see :func:`note_read`): not an ``existence_load``."""
    followed: bool = True
    """Whether what is read of its objects can make a finding: a one-row lookup (an
    ``existence_load`` if nothing reads or uses it), or an entity of at least the scope's
    ``overfetch_columns`` columns (an ``overfetch``: its objects whose columns are read). A
    narrower load of many rows is neither: only the column reads
    ``unlocked_read_modify_write`` needs are noted for its objects."""

    @property
    def entity(self) -> str:
        return str(self.mapper.class_.__name__)

    @property
    def locked(self) -> bool:
        """The SELECT had FOR UPDATE / FOR SHARE (or a variant)."""
        return shape(self.sql).for_update


def _existence_fix(entity: str) -> str:
    return (
        f"ask the database whether the row exists instead of loading it: "
        f"session.scalar(select(exists().where(<the same criteria>))) (or "
        f"select({entity}.id).where(...).limit(1)); for a count, "
        f"session.scalar(select(func.count()).select_from({entity}).where(...)) "
        "rather than loading the rows"
    )


def _overfetch_fix(mapper: Any, loaded: tuple[str, ...], read: set[str]) -> str:
    entity = mapper.class_.__name__
    primary_key = _primary_key(mapper)
    # The columns the relationships join on stay: a many-to-one read through the identity
    # map runs no SQL the detector could see, and load_only() without its foreign key would
    # cost a SELECT per row to fetch it.
    joins = _join_keys(mapper)
    named = [key for key in loaded if (key in read or key in joins) and key not in primary_key]
    columns = ", ".join(f"{entity}.{key}" for key in named)
    big = [
        f"{entity}.{key}"
        for key in loaded
        if key not in read and key not in joins and _is_big(mapper, key)
    ]
    fix = f".options(load_only({columns})): load only the columns the code reads"
    kept = [f"{entity}.{key}" for key in named if key not in read]
    if kept:
        fix += f" (and {', '.join(kept)}, which its relationships join on)"
    if big:
        fix += f"; at least defer({', '.join(big)}), the large columns never read"
    return fix


def _is_big(mapper: Any, key: str) -> bool:
    prop = mapper.attrs.get(key) if mapper is not None else None
    columns = getattr(prop, "columns", ())
    if not columns:
        return False
    type_name = type(columns[0].type).__name__.upper()
    length = getattr(columns[0].type, "length", None)
    return type_name in {"TEXT", "LARGEBINARY", "JSON", "JSONB", "BYTEA", "ARRAY"} or (
        type_name in {"STRING", "VARCHAR", "UNICODE"} and (length is None or length > 255)
    )


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


def _bounds(sql: str, params: Any) -> tuple[int | None, int | None]:
    """``(offset, limit)`` a statement ran with, read from its text or its parameters."""
    statement = shape(sql)
    return _bound_value(sql, statement.offset, params), _bound_value(sql, statement.limit, params)


def _bound_value(sql: str, bound: Bound | None, params: Any) -> int | None:
    if bound is None:
        return None
    if bound.value is not None:
        return bound.value
    index = (bound.param or 0) - 1
    value: Any = None
    if isinstance(params, dict):
        names = param_names(sql)
        if 0 <= index < len(names):
            value = params.get(names[index])
    elif isinstance(params, list | tuple) and 0 <= index < len(params):
        value = params[index]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_WRITE_VERBS = ("INSERT", "UPDATE", "DELETE")


# sql -> (fingerprint, command, has LIMIT or OFFSET, is an INSERT/UPDATE/DELETE): read once
# per statement text (an ORM's compiled statements are the same string objects each time,
# their hash cached)
_sql_facts: dict[str, tuple[str, str, bool, bool]] = {}
MAX_SQL_FACTS = 10_000


def _facts(sql: str) -> tuple[str, str, bool, bool]:
    facts = _sql_facts.get(sql)
    if facts is None:
        statement = describe(sql)
        upper = sql.upper()
        facts = (
            statement.fingerprint,
            statement.command,
            "LIMIT" in upper or "OFFSET" in upper,
            upper.lstrip()[:6] in _WRITE_VERBS,
        )
        if len(_sql_facts) < MAX_SQL_FACTS:
            _sql_facts[sql] = facts
    return facts


def _has_bounds(sql: str) -> bool:
    return _facts(sql)[2]


def record_query(
    sql: str,
    params: Any = None,
    *,
    executemany: bool = False,
    relationship: str | None = None,
    loader_option: str | None = None,
    rows: int = -1,
    tag: str | None = None,
    stack: StackInfo | None = None,
) -> StackInfo | None:
    """Count one statement in the calling context's scopes.

    Returns what the stack said about it (call site, loop key ...), None when no scope is open.
    ``rows`` is how many rows it returned, when the caller knows; ``tag`` what the caller
    knows of why it ran (see ``insight.QueryEvent.tag``).
    """
    scope = _current_scope.get()
    if scope is None:
        return None
    info = stack if stack is not None else stack_info(2)
    record_in(scope, sql, params, executemany, relationship, loader_option, rows, tag, info)
    return info


def record_in(
    scope: _Scope,
    sql: str,
    params: Any,
    executemany: bool,
    relationship: str | None,
    loader_option: str | None,
    rows: int,
    tag: str | None,
    info: StackInfo,
) -> None:
    """:func:`record_query` for a feed that has the calling context's scope and the stack's
    answer in hand (the SQLAlchemy feed, once per statement: positional, no second look-up)."""
    if type(params) is dict and not executemany:  # the common case, inline
        key: Hashable = (sql, tuple(params.values()))
    else:
        key = _params_key(sql, params, executemany)
    fingerprint, command, bounded, writes = _sql_facts.get(sql) or _facts(sql)
    if tag is None:
        if info.in_flush:
            if writes:
                # A flush writes its rows as it must (one statement per row on some drivers,
                # and versioning extensions flush more than once): the writes of one
                # transaction count as one execution, a loop of transactions (a commit per
                # row) as a loop.
                tag = "commit_loop" if info.in_commit else "flush"
                key = ("flush", current_flush.get())
            elif info.in_get:
                tag = "get"
        elif info.in_get:
            # Session.get() / Query.get() reaches the database only when the identity map has
            # no answer: a repeat of it is a key that was not there (or an object since
            # expired).
            tag = "get"
    elif tag == "follow_up":
        command = COMMAND_OTHER  # a selectinload's second query: its parent's doing
    offset = limit = None
    if bounded and params is not None and not executemany:
        offset, limit = _bounds(sql, params)
    # QueryEvent's fields as a plain tuple: the detector makes the named tuple only for the
    # few executions a finding will show. Its scope id and time are for the pooler's
    # many-scope Detector; a scope's own detector reads neither.
    event = (
        fingerprint,
        sql,
        key,
        None,
        info.callsite,
        0.0,
        command,
        relationship,
        loader_option,
        info.loop_key,
        rows,
        tag,
        offset,
        info.outer,
        limit,
    )
    reached = scope.reached
    for each in reached:
        each.detector.add(event)
    if writes:
        last = reached[-1]
        if last.isolated:
            # a write in an isolated scope (a request a test sent): what the scopes around
            # it read again afterwards is no duplicate
            outer = last.parent
            while outer is not None:
                outer.detector.note_write()
                outer = outer.parent


def _reached() -> tuple[_Scope, ...]:
    """The calling context's scope and those around it, up to the first isolated one."""
    scope = _current_scope.get()
    return () if scope is None else scope.reached


def note_loaded(mapper: Hashable, count: int = 1) -> None:
    """The ORM loaded ``count`` instances of ``mapper``'s class (what an eager load found)."""
    for scope in _reached():
        scope.loaded[mapper] = scope.loaded.get(mapper, 0) + count


def note_orm_select(
    sql: str,
    callsite: str,
    callers: tuple[str, ...],
    mapper: Any,
    rows: int,
    single: bool,
    parameters: Any = None,
) -> None:
    """A top-level ORM SELECT of ``mapper``'s entities was sent; it returned ``rows`` rows
    (-1: unknown). The next ORM load run (:func:`note_orm_run`) is its. ``single``: a
    ``Session.get()`` or a ``LIMIT 1`` (``Query.first()``), whose ``parameters`` are kept."""
    transaction = current_flush.get()
    kept = parameters if single else None
    columns = _column_count(mapper)
    for scope in _reached():
        followed = single or columns >= scope.overfetch_columns
        scope.last_select = _LoadBatch(
            sql, callsite, callers, mapper, rows, transaction, single, kept, followed=followed
        )
        if followed:
            scope.follows_loads = True
        if single:
            scope.follows_use = True


# mapper -> its column attributes: how wide its rows can be (held as long as the mapper)
_column_counts: dict[Any, int] = {}


def _column_count(mapper: Any) -> int:
    count = _column_counts.get(mapper)
    if count is None:
        count = len(getattr(mapper, "column_attrs", ()))
        if len(_column_counts) < 4_096:
            _column_counts[mapper] = count
    return count


def note_orm_refresh(state: Any) -> None:
    """An ORM load of ``state``'s expired attributes was sent: the states it loads (that
    one) stay counted under the SELECT that first loaded it."""
    runid = getattr(state, "runid", None)
    for scope in _reached():
        scope.last_select = scope.batches.get(runid) if runid is not None else None


def note_orm_other() -> None:
    """Another ORM load was sent (a lazy load, an eager load's follow-up, a SELECT of
    columns): what it loads is not followed."""
    for scope in _reached():
        scope.last_select = None


def note_orm_run(runid: int, scope: _Scope | None) -> None:
    """SQLAlchemy started turning the rows of the ORM statement just sent into objects, under
    ``runid`` (stamped on each instance state it creates). ``scope``: the calling context's
    innermost scope. Once per ORM statement, not per row."""
    if scope is None:
        return
    for each in scope.reached:
        batch = each.last_select
        if batch is not None:
            each.last_select = None
            if len(each.batches) < MAX_TRACKED_STATES:
                each.batches[runid] = batch
            if batch.single and len(each.pending_singles) < MAX_PENDING_SINGLES:
                each.pending_singles.append(batch)


def _primary_key(mapper: Any) -> tuple[str, ...]:
    keys: list[str] = []
    for column in getattr(mapper, "primary_key", ()):
        try:
            keys.append(mapper.get_property_by_column(column).key)
        except Exception:  # a column of another table in an inheritance chain
            continue
    return tuple(keys)


def note_read(state: Any, key: str) -> None:
    """The application read column attribute ``key`` of ``state`` (an ``InstanceState``), or
    used the object some other way (``_USED``: read a relationship of it; ``_WRITTEN``: changed
    or deleted it)."""
    scope = _current_scope.get()
    if scope is None:
        return
    # a use, not a column read: it matters only for a one-row lookup's object (which is then
    # no existence test); an overfetch counts the objects whose columns are read
    usage = key is _USED or key is _WRITTEN
    for each in scope.reached:
        reads = each.state_reads.get(state)
        if reads is not None:
            reads.add(key)
            continue
        if usage and not each.follows_use:
            continue
        batches = each.batches
        if not batches:
            continue
        # _batch_of, inline (once per loaded object and scope)
        batch = batches.get(state.runid)
        if batch is None:
            # SQLAlchemy stamps a load's run id only on the objects it creates: a row that
            # matches an object the session already holds (loaded before the scope, or a
            # get("1") that missed the identity map keyed by 1) gives back that object as
            # it was, so reading it is not seen as reading the load's row.
            if each.pending_singles:
                _note_held_object_read(each, state)
            continue
        if len(each.state_reads) >= MAX_TRACKED_STATES:
            continue
        cls = state.class_
        wanted = batch.mapper.class_
        if cls is not wanted and not (isinstance(cls, type) and issubclass(cls, wanted)):
            continue
        if usage and not batch.single:
            continue
        # a column read (what unlocked_read_modify_write looks at), or the use of a one-row
        # lookup's object
        each.state_reads[state] = {key}
        if not batch.followed:
            continue
        batch.used.append(state)
        if batch.loaded is None:
            batch.loaded = _loaded_columns(batch.mapper, state)


def _note_held_object_read(scope: _Scope, state: Any) -> None:
    """``state``, an object no SELECT of ``scope`` created, was read: each one-row load of
    the scope whose row it may be (its entity, and its primary key among the load's
    parameters) is ``unseen``, not an ``existence_load``."""
    identity = getattr(state, "key", None)
    if not identity:
        return
    cls = getattr(state, "class_", None)
    key_values = {str(value) for value in identity[1]}
    for single in scope.pending_singles:
        wanted = single.mapper.class_
        if not (cls is wanted or (isinstance(cls, type) and issubclass(cls, wanted))):
            continue
        parameters = single.parameters
        values = parameters.values() if isinstance(parameters, dict) else parameters or ()
        if any(str(value) in key_values for value in values):
            single.unseen = True
    scope.pending_singles = [single for single in scope.pending_singles if not single.unseen]


def _batch_of(scope: _Scope, state: Any) -> _LoadBatch | None:
    """The SELECT of ``scope`` that loaded ``state``, if one did (its run id, and its class
    that of the SELECT's first entity)."""
    batch = scope.batches.get(getattr(state, "runid", None))  # type: ignore[arg-type]
    if batch is None:
        return None
    cls = getattr(state, "class_", None)
    wanted = batch.mapper.class_
    if cls is wanted or (isinstance(cls, type) and issubclass(cls, wanted)):
        return batch
    return None


def _loaded_columns(mapper: Any, state: Any) -> tuple[str, ...] | None:
    """Column attributes ``state`` holds, in mapper order (None if it holds none: expired,
    to be looked at again at the next read)."""
    held = state.dict
    loaded = tuple(prop.key for prop in mapper.column_attrs if prop.key in held)
    return loaded or None


def loaded_by(state: Any) -> _LoadBatch | None:
    """The ORM SELECT of the innermost scope that loaded ``state``, if one did."""
    scope = _current_scope.get()
    return None if scope is None else _batch_of(scope, state)


def reads_of(state: Any) -> set[str]:
    """Column attributes of ``state`` read (before any change) in the innermost scope."""
    scope = _current_scope.get()
    return set() if scope is None else scope.state_reads.get(state, set())


def note_finding(finding: Finding) -> None:
    """A finding a feed made itself (``unlocked_read_modify_write``), once per call site."""
    for scope in _reached():
        scope.rmw.setdefault((finding.callsite, finding.detail), finding)


def note_join(target: Hashable) -> None:
    """An ORM query joined ``target`` (a relationship property, or a table)."""
    for scope in _reached():
        if len(scope.joined) < MAX_CHILD_FINDINGS:
            scope.joined.add(target)


def is_joined(prop: Any) -> bool:
    """Whether an ORM query of the innermost scope joined relationship ``prop`` or its table."""
    scope = _current_scope.get()
    if scope is None or not scope.joined:
        return False
    if prop in scope.joined:
        return True
    target = getattr(prop, "target", None)
    return target is not None and target in scope.joined


def note_commit(session_id: int, callsite: str) -> None:
    """A session committed at ``callsite`` (what expired its objects' attributes)."""
    for scope in _reached():
        scope.commits[session_id] = callsite


def last_commit(session_id: int) -> str | None:
    """Where ``session_id`` last committed in the innermost scope, if it did."""
    scope = _current_scope.get()
    return None if scope is None else scope.commits.get(session_id)


def note_eager_load(
    key: Hashable,
    relationship: str,
    option: str,
    step: str,
    sql: str,
    callsite: str,
    target: Hashable = None,
) -> None:
    """An executed query asked for ``relationship`` to be loaded eagerly by ``option``."""
    for scope in _reached():
        eager = scope.eager_loads.get(key)
        if eager is None:
            eager = scope.eager_loads[key] = _EagerLoad(
                relationship, option, step, sql, callsite, target
            )
        eager.count += 1


def note_relationship_read(key: Hashable) -> None:
    """The application read an eagerly loadable relationship attribute."""
    for scope in _reached():
        scope.relationship_reads.add(key)


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
        """Statements counted in the scope (not those of isolated scopes inside it)."""
        return self._scope.detector.queries

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
        *,
        isolate: bool = False,
        large_result: int = DEFAULT_LARGE_RESULT,
        deep_offset: int = DEFAULT_DEEP_OFFSET,
        overfetch_columns: int = DEFAULT_OVERFETCH_COLUMNS,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self.mode = mode
        self.duplicate_threshold = duplicate_threshold
        self.allowlist = allowlist
        self.isolate = isolate
        self.large_result = large_result
        self.deep_offset = deep_offset
        self.overfetch_columns = overfetch_columns
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
            self.threshold,
            self.duplicate_threshold,
            self.allowlist,
            suggest_fix,
            large_result=self.large_result,
            deep_offset=self.deep_offset,
        )
        self._scope = _Scope(detector, self.allowlist, _current_scope.get(), self.isolate)
        self._scope.overfetch_columns = self.overfetch_columns
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
        self._scope.anchor = None  # no frame held past the block
        self._scope.above.clear()
        self._scope.stack_memo.clear()
        findings = self.report._finish()
        parent = self._scope.parent
        if self.isolate and parent is not None:
            # An isolated scope's queries stayed in it; what it found goes up.
            room = MAX_CHILD_FINDINGS - len(parent.child_findings)
            parent.child_findings.extend(findings[: max(room, 0)])
        if not findings or exc_type is not None:
            return findings  # never hide the exception already on its way out
        if self.mode == "warn":
            for finding in findings:
                emit_warning(finding)
        elif self.mode == "raise":
            raise NPlusOneError(findings)
        return findings

    def __enter__(self) -> Report:
        return self._enter(anchor_frame(1))

    def _enter(self, anchor: FrameType | None) -> Report:
        report = self.start()
        assert self._scope is not None
        self._scope.anchor = anchor
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
        return self._enter(anchor_frame(1))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, traceback)


def child_detection(scope: _Scope) -> Detection:
    """An isolated scope with ``scope``'s settings: one request inside a test."""
    detector = scope.detector
    return Detection(
        detector.threshold,
        "collect",
        detector.duplicate_threshold,
        scope.allowlist,
        isolate=True,
        large_result=detector.large_result,
        deep_offset=detector.deep_offset,
        overfetch_columns=scope.overfetch_columns,
    )


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
    isolate: bool = False,
    large_result: int = DEFAULT_LARGE_RESULT,
    deep_offset: int = DEFAULT_DEEP_OFFSET,
    overfetch_columns: int = DEFAULT_OVERFETCH_COLUMNS,
) -> Detection:
    """Watch the queries run inside the ``with`` block and report N+1s, write loops,
    duplicates, large results, deep offsets and the other kinds of ``insight.FindingKind``.

    ``threshold``: distinct parameter sets of one statement, from one loop, that make an N+1
    or a write loop (default ``DEFAULT_THRESHOLD`` = 3). ``mode``: ``"collect"`` only fills the
    report, ``"warn"`` emits one ``NPlusOneWarning`` per finding at its call site, ``"raise"``
    raises ``NPlusOneError`` at the end of the block. The allowlists take call site globs
    (``"app/reports.py:*"``), fingerprints, and relationship globs (``"Customer.orders"``).
    ``isolate``: this scope's queries count in it alone (not in the scopes around it), and its
    findings are added to the enclosing scope's report when it ends: one request of several
    in a test. ``large_result``: rows in one result that make a ``large_result`` (10,000);
    ``deep_offset``: the OFFSET that makes a ``deep_offset`` (1,000); ``overfetch_columns``:
    the loaded columns an entity needs before an ``overfetch`` is reported (6).
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
    return Detection(
        threshold,
        mode,
        duplicate_threshold,
        allowlist,
        isolate=isolate,
        large_result=large_result,
        deep_offset=deep_offset,
        overfetch_columns=overfetch_columns,
    )
