"""asyncpg feed: watched connections report each statement they run.

asyncpg's ``Connection`` has ``__slots__``, so one instance's methods cannot be replaced; the
class's query entry points are wrapped once instead (``_execute`` behind ``fetch*`` and
``execute`` with arguments, ``_executemany``, and ``execute`` without arguments, which goes
straight to the protocol), and each wrapper reports only for connections in the watched set.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from pgpilot.nplusone.core import _current_scope, record_query

__all__ = ["is_asyncpg_connection", "unwatch_asyncpg", "watch_asyncpg"]

_watched: weakref.WeakSet[Any] = weakref.WeakSet()
_patch_lock = threading.Lock()
_patched = False

AsyncMethod = Callable[..., Coroutine[Any, Any, Any]]


def is_asyncpg_connection(conn: object) -> bool:
    try:
        from asyncpg.connection import Connection
        from asyncpg.pool import PoolConnectionProxy
    except ImportError:  # pragma: no cover - asyncpg is a dependency
        return False
    return isinstance(conn, Connection | PoolConnectionProxy)


def _underlying(conn: Any) -> Any:
    # A pool hands out proxies; the statements run on the connection behind them.
    inner = getattr(conn, "_con", None)
    return inner if inner is not None else conn


def _wrap_execute(original: AsyncMethod) -> AsyncMethod:
    @functools.wraps(original)
    async def execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        # With arguments, execute() goes through _execute, which reports.
        if not args and self in _watched and _current_scope.get() is not None:
            record_query(query)
        return await original(self, query, *args, **kwargs)

    return execute


def _wrap_single(original: AsyncMethod) -> AsyncMethod:
    @functools.wraps(original)
    async def _execute(self: Any, query: Any, args: Any, *rest: Any, **kwargs: Any) -> Any:
        if self in _watched and _current_scope.get() is not None:
            record_query(query if isinstance(query, str) else str(query), args)
        return await original(self, query, args, *rest, **kwargs)

    return _execute


def _wrap_many(original: AsyncMethod) -> AsyncMethod:
    @functools.wraps(original)
    async def _executemany(self: Any, query: Any, args: Any, *rest: Any, **kwargs: Any) -> Any:
        if self in _watched and _current_scope.get() is not None:
            if not isinstance(args, list | tuple):
                args = list(args)  # asyncpg accepts any iterable; keep what we look at
            record_query(query if isinstance(query, str) else str(query), args, executemany=True)
        return await original(self, query, args, *rest, **kwargs)

    return _executemany


def _patch_connection_class() -> None:
    global _patched
    with _patch_lock:
        if _patched:
            return
        from asyncpg.connection import Connection

        Connection.execute = _wrap_execute(Connection.execute)  # type: ignore[method-assign]
        Connection._execute = _wrap_single(Connection._execute)  # type: ignore[method-assign]
        Connection._executemany = _wrap_many(Connection._executemany)  # type: ignore[method-assign]
        _patched = True


def watch_asyncpg(conn: Any) -> Any:
    """Make an asyncpg connection (or pool connection proxy) report its statements."""
    _patch_connection_class()
    _watched.add(_underlying(conn))
    return conn


def unwatch_asyncpg(conn: Any) -> Any:
    _watched.discard(_underlying(conn))
    return conn
