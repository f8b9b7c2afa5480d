"""SQLAlchemy helpers for the fixes the query doctor suggests, where SQLAlchemy or a well-kept
library does not already make the fix one line.

* :func:`bulk_load`: COPY rows into a model's table (psycopg's ``copy``, asyncpg's
  ``copy_records_to_table``) inside the caller's transaction; the fix for an ``insert_loop``
  too big for ``session.execute(insert(Model), rows)``.
* :func:`refresh_materialized_view` / :func:`refresh_materialized_view_async`: ``REFRESH
  MATERIALIZED VIEW [CONCURRENTLY]`` that refuses CONCURRENTLY without a unique index (saying
  which view), and takes an advisory lock so that two schedulers never refresh one view at once.
* :class:`RoutingSession` / :class:`AsyncRoutingSession`: reads to replicas, writes to the
  primary, and read-your-writes by LSN (a session never reads older than its own commits; its
  ``lsn_token`` carries that to the next request); :class:`ReplicaRouter` polls replica health.
* :func:`pool_settings`: ``create_engine`` pool arguments from the cores, the time a request
  waits outside the database and the time it spends inside, capped by ``max_connections``.

* :func:`paginate` / :func:`paginate_async`: keyset pagination (the fix for ``deep_offset``)
  over several columns, mixed directions and NULLs, with opaque cursors. sqlakeyset's
  ``select_page`` serves the rest but refuses ordering columns that may be NULL.
"""

from pgpilot.orm.bulk import bulk_load, bulk_load_async
from pgpilot.orm.keyset import Page, paginate, paginate_async
from pgpilot.orm.matview import (
    RefreshResult,
    refresh_materialized_view,
    refresh_materialized_view_async,
)
from pgpilot.orm.pool import PoolSettings, pool_settings
from pgpilot.orm.routing import AsyncRoutingSession, ReplicaRouter, RoutingSession

__all__ = [
    "AsyncRoutingSession",
    "Page",
    "PoolSettings",
    "RefreshResult",
    "ReplicaRouter",
    "RoutingSession",
    "bulk_load",
    "bulk_load_async",
    "paginate",
    "paginate_async",
    "pool_settings",
    "refresh_materialized_view",
    "refresh_materialized_view_async",
]
