"""Raw drivers: a transaction that invalidates the tables it wrote once it has committed.

``with cache.transaction(conn):`` (psycopg 3) or ``async with cache.transaction(conn):``
(psycopg 3 async, asyncpg) opens the driver's own transaction. When the block ends without an
exception, it asks PostgreSQL which tables the transaction changed
(``pg_stat_xact_user_tables``: every insert, update and delete, by the application's statements,
its functions and its triggers alike), commits, and only then invalidates those tables' tags in
the cache (and any named with ``tables=`` or ``tx.add_tables(...)``). A rollback invalidates
nothing. ``TRUNCATE`` leaves no trace in those statistics: name a truncated table yourself.

The block must open the transaction (no transaction in progress on the connection): inside an
outer one it would only be a savepoint, and its "commit" not yet visible to anybody.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgpilot.cache.core import Cache

__all__ = ["CacheTransaction", "transaction"]

CHANGED_TABLES_SQL = (
    "SELECT relname FROM pg_catalog.pg_stat_xact_user_tables "
    "WHERE n_tup_ins + n_tup_upd + n_tup_del > 0"
)


class CacheTransaction:
    """The object ``cache.transaction(conn)`` returns; use it with ``with`` / ``async with``."""

    def __init__(self, cache: Cache, conn: Any, tables: tuple[str, ...]) -> None:
        self.cache = cache
        self.conn = conn
        self.tables: set[str] = set(tables)
        self.invalidated: frozenset[str] = frozenset()
        self._inner: Any = None
        kind = type(conn).__module__.split(".")[0]
        if kind not in ("psycopg", "asyncpg"):
            raise TypeError(f"cache.transaction() takes a psycopg or asyncpg connection, "
                            f"not {type(conn).__qualname__}")
        self._kind = kind

    def add_tables(self, *tables: str) -> None:
        """Also invalidate these tables on commit (a TRUNCATE, a table only a view shows)."""
        self.tables.update(tables)

    # -- psycopg (sync) --

    def __enter__(self) -> CacheTransaction:
        from psycopg import pq

        if self.conn.info.transaction_status != pq.TransactionStatus.IDLE:
            raise RuntimeError("cache.transaction(conn) must open the transaction: this "
                               "connection is already in one (commit it first)")
        self._inner = self.conn.transaction()
        self._inner.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        if exc_type is None:
            try:
                rows = self.conn.execute(CHANGED_TABLES_SQL).fetchall()
                self.tables.update(str(row[0]) for row in rows)
            except Exception as error:
                self._inner.__exit__(type(error), error, error.__traceback__)
                raise
        result = self._inner.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.invalidated = frozenset(self.tables)
            self.cache.invalidate_tables(*self.tables)
        return bool(result)

    # -- psycopg async, asyncpg --

    async def __aenter__(self) -> CacheTransaction:
        if self._kind == "asyncpg":
            if self.conn.is_in_transaction():
                raise RuntimeError("cache.transaction(conn) must open the transaction: this "
                                   "connection is already in one")
        else:
            from psycopg import pq

            if self.conn.info.transaction_status != pq.TransactionStatus.IDLE:
                raise RuntimeError("cache.transaction(conn) must open the transaction: this "
                                   "connection is already in one (commit it first)")
        self._inner = self.conn.transaction()
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        if exc_type is None:
            try:
                if self._kind == "asyncpg":
                    rows = await self.conn.fetch(CHANGED_TABLES_SQL)
                else:
                    rows = await (await self.conn.execute(CHANGED_TABLES_SQL)).fetchall()
                self.tables.update(str(row[0]) for row in rows)
            except Exception as error:
                await self._inner.__aexit__(type(error), error, error.__traceback__)
                raise
        result = await self._inner.__aexit__(exc_type, exc, tb)
        if exc_type is None:
            self.invalidated = frozenset(self.tables)
            await self.cache.ainvalidate_tables(*self.tables)
        return bool(result)


def transaction(cache: Cache, conn: Any, *, tables: tuple[str, ...] = ()) -> CacheTransaction:
    return CacheTransaction(cache, conn, tables)
