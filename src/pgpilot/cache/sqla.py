"""SQLAlchemy: statements answered from the cache, and invalidation that follows the session.

``session.execute(stmt.options(cache.from_cache(ttl=60)))`` marks a statement; when it reaches
the driver, the cache answers with the rows it holds for that SQL and those parameters (the
DBAPI's own rows, so the ORM builds its objects from them as from the database: identity map,
eager loads and all), or runs it and keeps the rows. Each entry is tagged ``table:<name>`` for
every table the SQL reads (pglast's parser on the text).

Writes are followed per session transaction, at the driver too, so flushes, Core
``insert``/``update``/``delete``, ORM bulk operations and ``text()`` all count: a written table's
tag is invalidated in every :class:`~pgpilot.cache.Cache` of the process right after the
transaction **commits** (once; a rollback invalidates nothing). Just before the commit, a
transaction that wrote asks PostgreSQL which tables it changed
(``pg_stat_xact_user_tables``), so rows that triggers or functions wrote are followed too.
Once a transaction has written, its cached reads go to the database and store nothing: it sees
its own writes, and no other session is ever served a row it has not committed (a trigger may
have written a table the statement does not name).

The listeners are installed once per process on the ``Session`` class (every session, sync or
the one inside an ``AsyncSession``) and on each engine a session uses.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction
from sqlalchemy.orm.interfaces import UserDefinedOption
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.util.concurrency import in_greenlet

from pgpilot.cache.keys import table_tag
from pgpilot.cache.serialize import canonical_bytes
from pgpilot.cache.sqltables import statement_tables

if TYPE_CHECKING:
    from pgpilot.cache.core import Cache

__all__ = ["FromCache", "follow_session_writes", "written_tables"]

OPTION = "pgpilot_cache"
_INFO = "pgpilot.cache.writes"
_STAT_QUERY = (
    "SELECT relname FROM pg_catalog.pg_stat_xact_user_tables "
    "WHERE n_tup_ins + n_tup_upd + n_tup_del > 0"
)

try:  # SQLAlchemy 2.1 / 2.0
    from sqlalchemy.util.concurrency import await_ as _await
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util.concurrency import await_only as _await  # type: ignore[attr-defined,no-redef]


class FromCache(UserDefinedOption):  # type: ignore[misc]
    """The option ``cache.from_cache()`` returns (one statement's cache settings)."""

    propagate_to_loaders = False

    def __init__(self, cache: Cache, *, ttl: float | None = None, tags: Sequence[str] = (),
                 name: str = "sql") -> None:
        super().__init__((cache, ttl, tuple(tags)))
        self.cache = cache
        self.ttl = ttl
        self.tags = tuple(tags)
        self.name = name


class _Writes:
    """What one session transaction has written: table tags, and whether to ask PostgreSQL."""

    __slots__ = ("ask_database", "tables")

    def __init__(self) -> None:
        self.tables: set[str] = set()
        self.ask_database = False


_by_connection: weakref.WeakKeyDictionary[Connection, _Writes] = weakref.WeakKeyDictionary()
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_install_lock = threading.Lock()
_installed = False
_following: Iterable[Cache] = ()  # the live caches (core.py's registry), set at install


def written_tables(session: Session) -> frozenset[str]:
    """The tables (bare names) the session's current transaction has written so far."""
    writes = session.info.get(_INFO)
    return frozenset(t.removeprefix("table:") for t in writes.tables) if writes else frozenset()


def follow_session_writes(caches: Iterable[Cache]) -> None:
    """Install the listeners (once per process; every ``Cache`` calls this with the live
    caches, core.py's registry, which a commit's writes invalidate)."""
    global _installed, _following
    with _install_lock:
        _following = caches
        if _installed:
            return
        event.listen(Session, "do_orm_execute", _do_orm_execute)
        event.listen(Session, "after_begin", _after_begin)
        event.listen(Session, "after_commit", _after_commit)
        event.listen(Session, "after_transaction_end", _after_transaction_end)
        _installed = True


# ------------------------------------------------------------------------------ session side


def _do_orm_execute(state: ORMExecuteState) -> None:
    for option in state.user_defined_options:
        if isinstance(option, FromCache):
            state.update_execution_options(**{OPTION: option})
            return


def _after_begin(session: Session, transaction: SessionTransaction,
                 connection: Connection) -> None:
    writes = session.info.get(_INFO)
    if writes is None:
        writes = session.info[_INFO] = _Writes()
    _by_connection[connection] = writes
    engine = connection.engine
    if engine not in _engines:
        with _install_lock:
            if engine not in _engines:
                event.listen(engine, "before_cursor_execute", _before_cursor_execute)
                event.listen(engine, "commit", _before_commit)
                event.listen(engine, "do_execute", _do_execute)
                event.listen(engine, "do_execute_no_params", _do_execute_no_params)
                _engines.add(engine)


def _after_commit(session: Session) -> None:
    writes: _Writes | None = session.info.get(_INFO)
    if writes is None or not writes.tables:
        return
    tags = sorted(writes.tables)
    writes.tables.clear()
    for cache in list(_following):
        if in_greenlet():
            _await(cache.ainvalidate_tags(*tags))
        else:
            cache.invalidate_tags(*tags)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        writes = session.info.pop(_INFO, None)
        if writes is not None:
            for connection in [c for c, w in list(_by_connection.items()) if w is writes]:
                _by_connection.pop(connection, None)


# ------------------------------------------------------------------------------ engine side


def _before_cursor_execute(conn: Connection, cursor: Any, statement: str, parameters: Any,
                           context: Any, executemany: bool) -> None:
    writes = _by_connection.get(conn)
    if writes is None:
        return
    compiled = getattr(context, "compiled", None)
    node = getattr(compiled, "statement", None)
    if node is not None and getattr(node, "is_select", False):
        return
    if isinstance(node, UpdateBase) and getattr(node, "table", None) is not None:
        name = getattr(node.table, "name", None)
        if name:
            writes.tables.add(table_tag(str(name)))
            writes.ask_database = True
            return
    if statement.startswith(_STAT_QUERY[:24]):
        return
    found = statement_tables(statement)
    if found.select:
        return
    writes.tables.update(table_tag(t) for t in found.writes)
    writes.ask_database = True


def _before_commit(conn: Connection) -> None:
    """Connection ``commit`` event (before the DBAPI commit): ask PostgreSQL what changed."""
    writes = _by_connection.get(conn)
    if writes is None or not writes.ask_database or conn.dialect.name != "postgresql":
        return
    writes.ask_database = False
    try:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(_STAT_QUERY)
            writes.tables.update(table_tag(str(row[0])) for row in cursor.fetchall())
        finally:
            cursor.close()
    except Exception:  # the commit itself will tell the application what is wrong
        return


class _CachedCursor:
    """A DBAPI cursor over rows the cache held (what SQLAlchemy reads a result from)."""

    def __init__(self, description: Any, rows: list[Any]) -> None:
        self.description = description
        self._rows = rows
        self._index = 0
        self.rowcount = len(rows)
        self.arraysize = 1
        self.lastrowid = None

    def fetchone(self) -> Any:
        if self._index >= len(self._rows):
            return None
        row = self._rows[self._index]
        self._index += 1
        return row

    def fetchmany(self, size: int | None = None) -> list[Any]:
        size = size or self.arraysize
        rows = self._rows[self._index:self._index + size]
        self._index += len(rows)
        return rows

    def fetchall(self) -> list[Any]:
        rows = self._rows[self._index:]
        self._index = len(self._rows)
        return rows

    def close(self) -> None:
        self._rows = []

    def __iter__(self) -> Any:
        return iter(self.fetchall())


def _do_execute_no_params(cursor: Any, statement: str, context: Any) -> bool:
    return _do_execute(cursor, statement, None, context)


def _do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    option: FromCache | None = context.execution_options.get(OPTION)
    if option is None:
        return False
    cache = option.cache
    counters = cache.counters(option.name)
    tables = statement_tables(statement)
    if not tables.select or not tables.known:
        return False
    tags = sorted({*option.tags, *(table_tag(t) for t in tables.reads)})
    writes = _by_connection.get(context.root_connection)
    store = writes is None or not (writes.tables or writes.ask_database)
    if not store:
        counters.bypasses += 1
    try:
        material = canonical_bytes([statement, parameters])
    except TypeError:
        counters.errors += 1
        return False
    spec = cache._spec(option.name, counters, cache.version, material, option.ttl, tags, None)
    dialect = context.dialect

    def compute() -> list[Any]:
        if parameters is None:
            dialect.do_execute_no_params(cursor, statement, context)
        else:
            dialect.do_execute(cursor, statement, parameters, context)
        description = cursor.description
        rows = [tuple(row) for row in cursor.fetchall()] if description else []
        shape = [[d[0], d[1]] for d in description] if description else None
        return [shape, rows]

    if not store:
        shape, rows = compute()
    elif in_greenlet():
        shape, rows = cache.get_in_greenlet(spec, compute, _await)
    else:
        shape, rows = cache.get_sync(spec, compute)
    description = ([(d[0], d[1], None, None, None, None, None) for d in shape]
                   if shape is not None else None)
    with contextlib.suppress(Exception):
        cursor.close()
    context.cursor = _CachedCursor(description, [tuple(r) for r in rows])
    return True


# Both execution listeners decline (return False) unless a statement carries OPTION: another
# listener that must run a statement last to watch it (the query doctor's feed, which reads
# the driver's row count) may treat them as absent for every other statement.
for _listener in (_do_execute, _do_execute_no_params):
    setattr(_listener, "pgpilot_option", OPTION)  # noqa: B010
