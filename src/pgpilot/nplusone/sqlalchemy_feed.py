"""SQLAlchemy feed: every statement of every engine, sync and async, while a scope is open.

Listeners on the dialect execution events (``do_execute``, ``do_executemany``,
``do_execute_no_params``), registered through the ``Engine`` class, see all engines, including
the sync engine inside each ``AsyncEngine``, without being handed any of them. Dialect events
rather than the connection's ``before_cursor_execute``: a connection-level listener switches
every engine onto SQLAlchemy's event path (``before_execute``, ``after_execute``, ... on each
statement), which measured at ~5% of an ORM workload by itself; the dialect hooks cost one call.
They return None, so SQLAlchemy then runs the statement itself as usual.

For ORM statements the listener also reads what the ORM already knows:

* a relationship lazy load carries the state it loads for (``_lazy_loaded_from``) and that
  state's ``load_path``, the chain of relationships it was reached through; the loader option
  that would have avoided it is spelled from that chain: ``selectinload`` for collections,
  ``joinedload`` for many-to-one, chained for nested loops.
* a top-level ORM select carries its loader options; each eager one is noted, and the
  relationship attribute it loads starts counting reads, so an eager load nothing reads is
  reported (``unused_eager_load``).

Nothing runs per loaded row. Which top-level SELECT loaded an object (for ``overfetch``,
``existence_load``, ``unlocked_read_modify_write``) is looked up when the object is first
read, from the run id SQLAlchemy stamps on every instance state it creates
(``InstanceState.runid``): ``sqlalchemy.orm.loading._new_runid``, called once per ORM result,
is wrapped to bind the new id to the SELECT just sent. Row counts come from the cursor's
``rowcount``; only the related rows of a ``joinedload`` are counted one by one, by a ``load``
listener on those mappers alone.

These are SQLAlchemy 2.x internals read defensively (``getattr`` with defaults): if a future
version moves them, the feed degrades to plain SQL detection instead of failing.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Hashable, Iterator
from functools import lru_cache
from typing import Any, NamedTuple

from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import ColumnProperty, RelationshipProperty, Session
from sqlalchemy.orm import loading as orm_loading
from sqlalchemy.orm.attributes import InstrumentedAttribute

from pgpilot.insight.detector import Finding
from pgpilot.insight.fingerprint import describe
from pgpilot.insight.shape import shape
from pgpilot.nplusone.callsite import stack_info
from pgpilot.nplusone.core import (
    _USED,
    _WRITTEN,
    _bound_value,
    _current_scope,
    _has_bounds,
    current_flush,
    is_joined,
    last_commit,
    loaded_by,
    note_commit,
    note_eager_load,
    note_finding,
    note_join,
    note_loaded,
    note_orm_other,
    note_orm_refresh,
    note_orm_run,
    note_orm_select,
    note_read,
    note_relationship_read,
    reads_of,
    record_in,
)

__all__ = ["install", "loader_option_for_path", "uninstall"]

# SQLAlchemy's strategy names -> the loader option function that requests them.
_LOADER_FUNCTIONS = {
    "selectin": "selectinload",
    "joined": "joinedload",
    "subquery": "subqueryload",
    "immediate": "immediateload",
    "select": "lazyload",
    "raise": "raiseload",
    "raise_on_sql": "raiseload",
    "noload": "noload",
}
_EAGER = frozenset({"selectinload", "joinedload", "subqueryload", "immediateload"})


_EVENTS = ("do_execute", "do_executemany", "do_execute_no_params")


def install() -> None:
    global _original_new_runid
    for name, listener in zip(_EVENTS, _LISTENERS, strict=True):
        if not event.contains(Engine, name, listener):
            event.listen(Engine, name, listener)
    for target, name, listener in _ORM_LISTENERS:
        if not event.contains(target, name, listener):
            event.listen(target, name, listener)
    current = getattr(orm_loading, "_new_runid", None)
    if callable(current) and current is not _next_runid:
        _original_new_runid = current
        orm_loading._new_runid = _next_runid
    # What was tracked before a detach() is tracked again now, at install time, rather than
    # inside the first scope that meets it again (switching a class's attributes is set-up,
    # not per-request work), unless its mapper was disposed of since (registry.dispose(),
    # clear_mappers(): a load listener cannot go on it)
    for mapper in _retrack_columns:
        if _maps_its_class(mapper):
            _track_column_reads(mapper)
    for prop in _retrack_relationships:
        if _maps_its_class(prop.parent):
            _track_reads(prop)
    for mapper in _retrack_loads:
        if _maps_its_class(mapper):
            _count_loads(mapper)
    _retrack_columns.clear()
    _retrack_relationships.clear()
    _retrack_loads.clear()


def uninstall() -> None:
    """Remove the listeners and give tracked relationship attributes their class back."""
    for name, listener in zip(_EVENTS, _LISTENERS, strict=True):
        if event.contains(Engine, name, listener):
            event.remove(Engine, name, listener)
    for target, name, listener in _ORM_LISTENERS:
        if event.contains(target, name, listener):
            event.remove(target, name, listener)
    if _original_new_runid is not None and orm_loading._new_runid is _next_runid:
        orm_loading._new_runid = _original_new_runid
    for mapper in list(_load_counted):
        if event.contains(mapper, "load", _on_joined_load):
            event.remove(mapper, "load", _on_joined_load)
    _retrack_loads.update(_load_counted)
    _load_counted.clear()
    for prop in list(_tracked):
        for mapper in prop.parent.self_and_descendants:
            attribute = mapper.class_manager.get(prop.key)
            if type(attribute) is _ReadTrackingAttribute:
                attribute.__class__ = InstrumentedAttribute  # type: ignore[assignment]
    _retrack_relationships.update(_tracked)
    _tracked.clear()
    for mapper in list(_column_tracked):
        for prop in mapper.column_attrs:
            attribute = mapper.class_manager.get(prop.key)
            if type(attribute) is _ColumnReadAttribute:
                attribute.__class__ = InstrumentedAttribute  # type: ignore[assignment]
    _retrack_columns.update(_column_tracked)
    _column_tracked.clear()


def _maps_its_class(mapper: Any) -> bool:
    """Whether ``mapper`` still maps its class (not disposed of, nor replaced)."""
    return inspect(mapper.class_, raiseerr=False) is mapper


# What uninstall() untracked, for the next install() to track again
_retrack_columns: set[Any] = set()
_retrack_relationships: set[Any] = set()
_retrack_loads: set[Any] = set()


def _on_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool | None:
    if _current_scope.get() is None:
        return None
    return _observe(cursor, statement, parameters, context, 0)


def _on_executemany(cursor: Any, statement: str, parameters: Any, context: Any) -> bool | None:
    if _current_scope.get() is None:
        return None
    return _observe(cursor, statement, parameters, context, 1)


def _on_execute_no_params(cursor: Any, statement: str, context: Any) -> bool | None:
    if _current_scope.get() is None:
        return None
    return _observe(cursor, statement, None, context, 2)


_LISTENERS: tuple[Callable[..., bool | None], ...] = (
    _on_execute,
    _on_executemany,
    _on_execute_no_params,
)


def _runs_last(context: Any, which: int) -> bool:
    """Whether this feed's listener is the last one for its event on the context's dialect
    that would act on this statement: then it may run the statement itself (and return True,
    as the event allows) without keeping any other listener from seeing it. A listener marked
    ``pgpilot_option = NAME`` (pgpilot.cache's) declines every statement without that
    execution option, so it does not count then."""
    dispatch = getattr(getattr(context, "dialect", None), "dispatch", None)
    if dispatch is None:
        return False
    collection = getattr(dispatch, _EVENTS[which])
    # the class-level listeners, then the dialect's own, as the collection iterates them
    # (its __iter__ and __len__ are Python calls: the deques are read directly)
    parents = getattr(collection, "parent_listeners", None)
    if parents and parents[-1] is _LISTENERS[which] and not collection.listeners:
        # the usual case, read from the live deques (no cache to fall out of date): this
        # feed's listener was added last to the Engine class and the dialect has none of
        # its own
        return True
    if parents is None:
        listeners = tuple(collection)
    else:
        listeners = (*parents, *getattr(collection, "listeners", ()))
    mine = _LISTENERS[which]
    if mine not in listeners:
        return False
    options = getattr(context, "execution_options", None) or {}
    for later in listeners[listeners.index(mine) + 1:]:
        option = getattr(later, "pgpilot_option", None)
        if option is None or option in options:
            return False
    return True


class _Compiled(NamedTuple):
    """What an ORM statement's compiled form says, the same for every execution of it: its
    relationship path, mapper, eager loader options and joins all go into SQLAlchemy's cache
    key, so they are read once per compiled statement (kept on it) instead of per
    execution."""

    loaded: Any
    """The last element of a relationship load's path (a lazy load's, a follow-up's)."""
    relationship_load: bool
    loads: Any
    """The mapper a relationship load loads, when the path ends at a relationship."""
    entity_mapper: Any
    """A top-level SELECT's first entity's mapper."""
    eager: tuple[tuple[Hashable, str, str, str, Any, bool], ...]
    """Each eager load: (key, relationship, option, step, target mapper, by joinedload)."""
    joins: tuple[Any, ...]
    """Relationships and tables the statement joins."""


_NOT_ORM = _Compiled(None, False, None, None, (), ())
# (id of the path an object was loaded along, the relationship lazily loaded) -> (that path,
# relationship name, loader option): the objects of one query share their path object (held
# here so that its id stays its own)
_lazy_names: dict[tuple[int, Any], tuple[Any, str | None, str | None]] = {}
_FACTS_ATTRIBUTE = "_pgpilot_doctor_facts"


def _compiled_facts(invoked: Any, compiled: Any) -> _Compiled:
    facts: _Compiled | None = getattr(compiled, _FACTS_ATTRIBUTE, None)
    if facts is not None:
        return facts
    current_path = getattr(getattr(invoked, "_compile_options", None), "_current_path", None)
    # the path's tuple, not the PathRegistry (whose __len__ is a Python call)
    load_path: tuple[Any, ...] = getattr(current_path, "path", None) or ()
    if load_path:
        loaded = load_path[-1]
        loads = loaded.mapper if isinstance(loaded, RelationshipProperty) else None
        facts = _Compiled(loaded, True, loads, None, (), ())
    else:
        entity_mapper = (
            _entity_mapper(invoked) if getattr(invoked, "is_select", False) else None
        )
        eager = tuple(
            (key, name, option, step, getattr(key, "mapper", None), step.startswith("joinedload("))
            for key, name, option, step in _eager_loads(getattr(invoked, "_with_options", ()))
        )
        facts = _Compiled(
            None, False, None, entity_mapper, eager,
            _join_targets(getattr(invoked, "_setup_joins", ())),
        )
    if compiled is not None:
        # a compiled form that takes no attributes is read each time
        with contextlib.suppress(AttributeError):
            setattr(compiled, _FACTS_ATTRIBUTE, facts)
    return facts


def _observe(cursor: Any, statement: str, parameters: Any, context: Any, which: int) -> bool:
    # Plain attribute reads, not getattr(): the interpreter specializes them for the one class
    # it meets here each time (the dialect's execution context, InstanceState), skipping the
    # type's attribute look-up; DefaultExecutionContext declares each of them.
    relationship = loader_option = tag = None
    scope = _current_scope.get()
    assert scope is not None  # the listener's first line checked it
    invoked = context.invoked_statement
    entity_mapper = refreshed = loads = None
    facts = _NOT_ORM
    if invoked is not None:
        compiled = context.compiled
        try:
            facts = compiled._pgpilot_doctor_facts
        except AttributeError:
            facts = _compiled_facts(invoked, compiled)
        load_options = context.execution_options.get("_sa_orm_load_options")
        if facts.relationship_load:
            # A relationship load. Lazy loads name the state they load for; the second query
            # of a selectinload does not, and is not the application's doing: it folds into
            # the query that asked for it.
            lazy_state = getattr(load_options, "_lazy_loaded_from", None)
            loads = facts.loads
            if lazy_state is not None and loads is not None:
                loaded = facts.loaded
                if scope.follows_use or scope.parent is not None:
                    note_read(lazy_state, _USED)  # the object is used: a relationship of it read
                # The state's load_path is how the parent object itself was reached, so a
                # loop inside a loop gets the whole chain of loader options.
                parent_path = lazy_state.load_path
                named = _lazy_names.get((id(parent_path), loaded))
                if named is None or named[0] is not parent_path:
                    path = (*getattr(parent_path, "path", ()), loaded)
                    named = (parent_path, *loader_option_for_path(path))
                    if len(_lazy_names) < 4_096:
                        _lazy_names[(id(parent_path), loaded)] = named
                relationship, loader_option = named[1], named[2]
                if lazy_state.load_options or scope.joined:
                    # loaded with options, or after a join: maybe expired, maybe joined
                    tag, loader_option = _why_lazy(lazy_state, loaded, relationship, loader_option)
            else:
                tag = "follow_up"
        else:
            refreshed = getattr(load_options, "_refresh_state", None)
            if refreshed is not None:
                # An expired object loaded again on its first attribute read.
                tag, loader_option = "expired", _expired_refresh(refreshed)
            else:
                entity_mapper = loads = facts.entity_mapper
            for target in facts.joins:
                note_join(target)
    outermost = scope.reached[-1]
    info = stack_info(2, statement, outermost.anchor, outermost.above, outermost.stack_memo)
    rows = -1
    handled = False
    if which != 1:
        # _runs_last's usual case inline: this feed's listener last on the Engine class, none
        # on the dialect (read from the live deques: no cache to fall out of date)
        dialect = context.dialect
        if which == 0:
            collection = dialect.dispatch.do_execute
        else:
            collection = dialect.dispatch.do_execute_no_params
        parents = getattr(collection, "parent_listeners", None)
        if (
            parents and parents[-1] is _LISTENERS[which] and not collection.listeners
        ) or _runs_last(context, which):
            if which == 0:
                dialect.do_execute(cursor, statement, parameters, context)
            else:
                dialect.do_execute_no_params(cursor, statement, context)
            handled = True
            if loads is None:
                rows = _rows_returned(cursor, False)
            else:  # an ORM load: its rows are the driver's count
                rows = cursor.rowcount
                if type(rows) is not int or rows < 0:
                    rows = -1
    record_in(
        scope, statement, parameters, which == 1, relationship, loader_option, rows, tag, info
    )
    if invoked is not None:
        # the ORM load run next (sqlalchemy.orm.loading) is this statement's
        if entity_mapper is not None:
            if entity_mapper not in _column_tracked:
                _track_column_reads(entity_mapper)
            single = info.in_get or _one_row(statement, parameters)
            note_orm_select(
                statement, info.callsite, info.outer, entity_mapper, rows, single, parameters
            )
        elif refreshed is not None:
            note_orm_refresh(refreshed)
        elif scope.last_select is not None:
            note_orm_other()  # (set and cleared in all the scopes it reaches at once)
        if loads is not None and rows > 0:
            for each in scope.reached:  # note_loaded, inline
                loaded_count = each.loaded
                loaded_count[loads] = loaded_count.get(loads, 0) + rows
    for key, name, option, step, target, joined in facts.eager:
        if key not in _tracked:
            _track_reads(key)
        if joined and target is not None:
            # its rows come in the parent's rows: counted as the ORM makes them
            _count_loads(target)
        note_eager_load(key, name, option, step, statement, info.callsite, target)
    return handled


def _rows_returned(cursor: Any, returns_rows: bool) -> int:
    """Rows the statement just run returned, as the driver counts them; -1 if it returned
    none (a write: its count is of rows changed) or does not say. ``returns_rows``: known to
    be a SELECT (an ORM load): the cursor's description (which psycopg builds anew on each
    read, a column object per column) is not looked at."""
    rowcount = getattr(cursor, "rowcount", -1)
    if not isinstance(rowcount, int) or rowcount < 0:
        return -1
    if returns_rows or (rowcount > 0 and cursor.description is not None):
        return rowcount
    return -1 if rowcount else 0


def _entity_mapper(statement: Any) -> Any:
    """The mapper of the first entity a SELECT loads (``select(User)``, ``aliased(User)``),
    None for a SELECT of columns or of no ORM entity."""
    columns = getattr(statement, "_raw_columns", None)
    if not columns:
        return None
    first = columns[0]
    if not getattr(first, "is_selectable", False):
        return None
    entity = getattr(first, "_annotations", {}).get("parententity")
    return getattr(entity, "mapper", None)


def _next_runid() -> int:
    """Stands in for ``sqlalchemy.orm.loading._new_runid``, which SQLAlchemy calls once per
    ORM result before it turns rows into objects, and whose number it stamps on every
    instance state it creates (``InstanceState.runid``): which SELECT loaded an object is
    read from that when the object is read, instead of being noted for each loaded row."""
    runid: int = _original_new_runid()  # type: ignore[misc]
    scope = _current_scope.get()
    if scope is not None and scope.last_select is not None:
        note_orm_run(runid, scope)
    return runid


_original_new_runid: Callable[[], int] | None = None


def _one_row(statement: str, parameters: Any) -> bool:
    """Whether the statement has ``LIMIT 1`` (``Query.first()`` binds it as a parameter)."""
    if not _has_bounds(statement):
        return False
    limit = shape(statement).limit
    return _bound_value(statement, limit, parameters) == 1


def _why_lazy(
    state: Any, prop: RelationshipProperty[Any], relationship: str | None, option: str | None
) -> tuple[str | None, str | None]:
    """``(tag, suggestion)`` for a lazy load the plain loader option would not explain."""
    load_options = getattr(state, "load_options", None)
    if not load_options:
        # loaded without options (the usual N+1): only a join can explain more
        if is_joined(prop):
            return "contains_eager", f"contains_eager({relationship})"
        return None, option
    for key, _, written, _ in _eager_loads(tuple(load_options)):
        if key is prop:
            # The query that loaded the object had the option: the attribute was expired
            # (by commit(), or expire()) and is now loaded again, one object at a time.
            where = last_commit(getattr(state, "session_id", None) or 0)
            by = f"expired by commit() at {where}" if where else "expired (commit() or expire())"
            return "expired", (
                f"{relationship} was loaded by {written}, then {by}: read it before "
                "committing, or create the session with expire_on_commit=False"
            )
    if is_joined(prop):
        return "contains_eager", f"contains_eager({relationship})"
    return None, option


def _expired_refresh(state: Any) -> str:
    where = last_commit(getattr(state, "session_id", None) or 0)
    by = f"expired by commit() at {where}" if where else "expired (commit() or expire())"
    name = type(state.obj()).__name__ if state.obj() is not None else "the"
    return (
        f"{name} objects {by} are loaded again one query per object on their first read: "
        "read what you need before committing, or create the session with "
        "expire_on_commit=False"
    )


def _join_targets(joins: tuple[Any, ...]) -> tuple[Any, ...]:
    """The relationships and tables an ORM statement's joins name."""
    targets: list[Any] = []
    for join in joins:
        for part in join[:2]:
            prop = getattr(part, "property", None)
            if isinstance(prop, RelationshipProperty):
                targets.append(prop)
            elif part is not None and hasattr(part, "c") and hasattr(part, "name"):
                targets.append(part)  # a table, or a mapped class coerced to its table
    return tuple(targets)


def _on_joined_load(state: Any, context: Any) -> None:
    # a raw listener (handed the InstanceState), put only on the mappers some joinedload
    # loads: their rows come inside the parent's, so they are counted one by one
    if _current_scope.get() is not None:
        note_loaded(state.manager.mapper)


_load_counted: set[Any] = set()


def _count_loads(mapper: Any) -> None:
    if mapper in _load_counted:
        return
    _load_counted.add(mapper)
    event.listen(mapper, "load", _on_joined_load, raw=True, propagate=True)


def _on_before_flush(session: Any, flush_context: Any, instances: Any) -> None:
    """Changed and deleted objects are used (no ``existence_load``); a changed column that
    was read first, in the transaction that loaded it without a lock, is an
    ``unlocked_read_modify_write``."""
    if _current_scope.get() is None:
        return
    for obj in session.deleted:
        note_read(obj._sa_instance_state, _WRITTEN)
    flush_site = ""
    for obj in session.dirty:
        state = obj._sa_instance_state
        batch = loaded_by(state)
        if batch is None:
            continue
        read = reads_of(state)
        note_read(state, _WRITTEN)
        if batch.locked or batch.transaction != current_flush.get():
            continue
        mapper = state.mapper
        if getattr(mapper, "version_id_col", None) is not None:
            continue  # a concurrent change makes the UPDATE match no row: StaleDataError
        changed = sorted(key for key in state.committed_state if key in read)
        if not changed or _isolated(session):
            continue
        if not flush_site:
            flush_site = stack_info(1).callsite
        entity = batch.entity
        columns = ", ".join(f"{entity}.{key}" for key in changed)
        first = changed[0]
        note_finding(
            Finding(
                kind="unlocked_read_modify_write",
                count=1,
                sql=batch.sql,
                fingerprint=describe(batch.sql).fingerprint,
                callsite=batch.callsite,
                suggestion=(
                    f"lock the row when reading it: .with_for_update() on the query at "
                    f"{batch.callsite} (session.get({entity}, key, with_for_update=True)); "
                    f"or a version column (__mapper_args__ = {{'version_id_col': ...}}) so "
                    "that a concurrent change raises StaleDataError instead of being lost; "
                    f"or let the database compute it: update({entity}).where(...)"
                    f".values({first}={entity}.{first} + ...)"
                ),
                callsites=(batch.callsite,) if batch.callsite else (),
                callers=batch.callers,
                detail=f"{columns} read, changed and written back (flushed at "
                f"{flush_site or 'a flush'}) in one transaction, the row not locked: "
                "a concurrent transaction's change in between is lost",
            )
        )


_STRICT_LEVELS = frozenset({"REPEATABLE READ", "SERIALIZABLE"})


def _isolated(session: Any) -> bool:
    """Whether the session's transaction runs at REPEATABLE READ or SERIALIZABLE (PostgreSQL
    then refuses to update a row changed since the snapshot), as far as the settings say."""
    try:
        conn = session.connection()
    except Exception:  # no bind, or a bind that cannot give a connection here
        return False
    levels = (
        conn.get_execution_options().get("isolation_level"),
        conn.engine.get_execution_options().get("isolation_level"),
        getattr(conn.dialect, "_on_connect_isolation_level", None),
    )
    return any(str(level).upper() in _STRICT_LEVELS for level in levels if level)


def _on_after_begin(session: Any, transaction: Any, connection: Any) -> None:
    current_flush.set(next(_flush_ids))


def _on_after_commit(session: Any) -> None:
    if _current_scope.get() is not None:
        # keyed as InstanceState.session_id is
        note_commit(getattr(session, "hash_key", id(session)), stack_info(1).callsite)


_flush_ids = itertools.count(1)
_ORM_LISTENERS: tuple[tuple[Any, str, Callable[..., None]], ...] = (
    (Session, "after_begin", _on_after_begin),
    (Session, "after_commit", _on_after_commit),
    (Session, "before_flush", _on_before_flush),
)


def _relationships(path: tuple[Any, ...]) -> list[tuple[Any, RelationshipProperty[Any]]]:
    """``(entity, relationship)`` pairs along an ORM path (entities, properties, alternating)."""
    pairs: list[tuple[Any, RelationshipProperty[Any]]] = []
    entity: Any = None
    for element in path:
        if isinstance(element, RelationshipProperty):
            pairs.append((entity if entity is not None else element.parent, element))
            entity = None
        else:
            entity = element
    return pairs


def _attribute_name(entity: Any, prop: RelationshipProperty[Any]) -> str:
    class_ = getattr(entity, "class_", None) or prop.parent.class_
    return f"{class_.__name__}.{prop.key}"


@lru_cache(maxsize=1024)
def loader_option_for_path(path: tuple[Any, ...]) -> tuple[str | None, str | None]:
    """``(relationship, option)`` for a lazy load reached along ``path``.

    ``(Customer, Customer.orders, Order, Order.items)`` gives ``("Order.items",
    "selectinload(Customer.orders).selectinload(Order.items)")``.
    """
    pairs = _relationships(path)
    if not pairs:
        return None, None
    steps = [
        f"{'selectinload' if prop.uselist else 'joinedload'}({_attribute_name(entity, prop)})"
        for entity, prop in pairs
    ]
    return _attribute_name(*pairs[-1]), ".".join(steps)


def _eager_loads(options: tuple[Any, ...]) -> Iterator[tuple[Hashable, str, str, str]]:
    """``(key, relationship, whole option, its step)`` for each eager load in ``options``."""
    for option in options:
        elements = getattr(option, "context", None)
        if not elements:
            continue
        functions: dict[tuple[Any, ...], str] = {}
        chains: list[tuple[tuple[Any, ...], str]] = []
        for element in elements:
            path = tuple(getattr(getattr(element, "path", None), "path", ()))
            pairs = tuple(_relationships(path))
            if not pairs:
                continue
            function = _loader_function(getattr(element, "strategy", None))
            if path and isinstance(path[-1], str | ColumnProperty):
                # A column option on the related class (``.load_only(B.c)`` after
                # ``joinedload(A.b)``): it says nothing about how A.b itself is loaded.
                functions.setdefault(pairs, "defaultload")
                continue
            if function != "defaultload" or pairs not in functions:
                functions[pairs] = function
            chains.append((pairs, function))
        for pairs, function in chains:
            if function not in _EAGER:
                continue
            steps = [
                f"{functions.get(pairs[: i + 1], 'defaultload')}({_attribute_name(*pair)})"
                for i, pair in enumerate(pairs)
            ]
            entity, prop = pairs[-1]
            yield prop, _attribute_name(entity, prop), ".".join(steps), steps[-1]


def _loader_function(strategy: Any) -> str:
    # strategy looks like (("lazy", "selectin"),); None for a defaultload step
    if not strategy:
        return "defaultload"
    for name, value in strategy:
        if name == "lazy":
            return _LOADER_FUNCTIONS.get(str(value), "defaultload")
    return "defaultload"


class _ReadTrackingAttribute(InstrumentedAttribute[Any]):
    """A relationship attribute that tells the open scope when the application reads it.

    Only relationships some query loaded eagerly are switched to this class, so other
    attribute reads pay nothing.
    """

    __slots__ = ()
    inherit_cache = True

    def __get__(self, instance: object | None, owner: Any) -> Any:  # type: ignore[override]
        if instance is not None:
            scope = _current_scope.get()
            if scope is not None:
                # what is noted once in the innermost scope is noted in every scope it
                # reaches (they are noted together): a second read notes nothing
                prop = self.property
                if prop not in scope.relationship_reads:
                    note_relationship_read(prop)
                state = getattr(instance, "_sa_instance_state", None)
                if state is not None and (scope.follows_use or scope.parent is not None):
                    reads = scope.state_reads.get(state)
                    if reads is None or _USED not in reads:
                        note_read(state, _USED)
        return InstrumentedAttribute.__get__(self, instance, owner)


class _ColumnReadAttribute(InstrumentedAttribute[Any]):
    """A column attribute that tells the open scope when the application reads it (before
    changing it): what ``overfetch``, ``existence_load`` and ``unlocked_read_modify_write``
    look at. Mapped classes are switched to it when a scope first loads one of their rows."""

    __slots__ = ()
    inherit_cache = True

    def __get__(self, instance: object | None, owner: Any) -> Any:  # type: ignore[override]
        if instance is not None:
            scope = _current_scope.get()
            if scope is not None:
                state = getattr(instance, "_sa_instance_state", None)
                key = self.key
                if state is not None and key not in state.committed_state:
                    # a column read again (a template's second look) is noted already: in
                    # the one scope open, nothing more to do
                    reads = scope.state_reads.get(state)
                    if reads is None or key not in reads or scope.parent is not None:
                        note_read(state, key)
        return InstrumentedAttribute.__get__(self, instance, owner)


_column_tracked: set[Any] = set()


def _track_column_reads(mapper: Any) -> None:
    for each in getattr(mapper, "self_and_descendants", (mapper,)):
        if each in _column_tracked:
            continue
        _column_tracked.add(each)
        for prop in each.column_attrs:
            attribute = each.class_manager.get(prop.key)
            if type(attribute) is InstrumentedAttribute:
                attribute.__class__ = _ColumnReadAttribute


_tracked: set[RelationshipProperty[Any]] = set()


def _track_reads(prop: Hashable) -> None:
    if prop in _tracked or not isinstance(prop, RelationshipProperty):
        return
    _tracked.add(prop)
    for mapper in prop.parent.self_and_descendants:
        attribute = mapper.class_manager.get(prop.key)
        # Same object, same slots: switching its class changes only what reading it does.
        if type(attribute) is InstrumentedAttribute:
            attribute.__class__ = _ReadTrackingAttribute
