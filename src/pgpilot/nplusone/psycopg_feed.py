"""psycopg 3 feed: a watched connection's cursors report each statement they execute.

psycopg has no global execute hook, but every connection builds its cursors from its
``cursor_factory`` / ``server_cursor_factory``; :func:`watch_psycopg` swaps in a subclass of
each whose ``execute`` / ``executemany`` report first and then do exactly what they did. That
covers ``conn.execute()`` too, which runs through ``conn.cursor()``.
"""

from __future__ import annotations

from typing import Any

from pgpilot.nplusone.core import record_query

__all__ = ["is_psycopg_connection", "unwatch_psycopg", "watch_psycopg"]

# original cursor class -> its reporting subclass, built once per class
_reporting_classes: dict[type, type] = {}


def is_psycopg_connection(conn: object) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(conn, psycopg.Connection | psycopg.AsyncConnection)


def _query_text(query: Any, cursor: Any) -> str:
    if isinstance(query, str):
        return query
    if isinstance(query, bytes | bytearray | memoryview):
        return bytes(query).decode("utf-8", "replace")
    as_string = getattr(query, "as_string", None)  # psycopg.sql.Composable
    if as_string is not None:
        return str(as_string(cursor))
    return str(query)


def _reporting_class(base: type) -> type:
    reporting = _reporting_classes.get(base)
    if reporting is not None:
        return reporting
    if getattr(base, "_pgpilot_reporting", False):
        return base
    import inspect

    namespace: dict[str, Any]
    if inspect.iscoroutinefunction(base.execute):  # type: ignore[attr-defined]

        async def execute_async(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
            record_query(_query_text(query, self), params)
            return await base.execute(self, query, params, **kwargs)  # type: ignore[attr-defined]

        async def executemany_async(self: Any, query: Any, params_seq: Any, **kwargs: Any) -> Any:
            record_query(_query_text(query, self), params_seq, executemany=True)
            return await base.executemany(self, query, params_seq, **kwargs)  # type: ignore[attr-defined]

        namespace = {"execute": execute_async, "executemany": executemany_async}
    else:

        def execute(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
            record_query(_query_text(query, self), params)
            return base.execute(self, query, params, **kwargs)  # type: ignore[attr-defined]

        def executemany(self: Any, query: Any, params_seq: Any, **kwargs: Any) -> Any:
            record_query(_query_text(query, self), params_seq, executemany=True)
            return base.executemany(self, query, params_seq, **kwargs)  # type: ignore[attr-defined]

        namespace = {"execute": execute, "executemany": executemany}
    namespace["_pgpilot_reporting"] = True
    namespace["__module__"] = __name__
    reporting = type(f"Reporting{base.__name__}", (base,), namespace)
    _reporting_classes[base] = reporting
    return reporting


def watch_psycopg(conn: Any) -> Any:
    """Make ``conn`` (a psycopg ``Connection`` or ``AsyncConnection``) report its statements."""
    conn.cursor_factory = _reporting_class(conn.cursor_factory)
    conn.server_cursor_factory = _reporting_class(conn.server_cursor_factory)
    return conn


def unwatch_psycopg(conn: Any) -> Any:
    """Give ``conn`` its original cursor classes back."""
    for attribute in ("cursor_factory", "server_cursor_factory"):
        factory = getattr(conn, attribute)
        if getattr(factory, "_pgpilot_reporting", False):
            setattr(conn, attribute, factory.__mro__[1])
    return conn
