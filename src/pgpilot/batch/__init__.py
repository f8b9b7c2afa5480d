"""Batch loaders: turn N+1 loops into one bulk query.

- :class:`DataLoader` (asyncio): ``await loader.load(key)`` from many tasks, one
  ``batch_fn(keys)`` call per tick (or per ``window``).
- :class:`SyncDataLoader` (threads, or enqueue-then-flush in one thread).
- :class:`BatchExecutor`: the same coalescing for any bulk backend (Redis MGET/MSET, an HTTP
  bulk endpoint), without caching or de-duplication.
- :func:`request_scope` / :func:`scoped`: one set of loaders per request.
- :mod:`pgpilot.batch.sql`: ready-made batch functions for asyncpg, psycopg 3 and SQLAlchemy.
"""

from pgpilot.batch.errors import BatchKeyError, BatchLoadError, BatchResultError
from pgpilot.batch.executor import BatchExecutor
from pgpilot.batch.loader import DataLoader
from pgpilot.batch.scope import RequestScope, current_scope, request_scope, scoped
from pgpilot.batch.stats import LoaderStats
from pgpilot.batch.sync import LoadHandle, ManyHandle, SyncDataLoader

__all__ = [
    "BatchExecutor",
    "BatchKeyError",
    "BatchLoadError",
    "BatchResultError",
    "DataLoader",
    "LoadHandle",
    "LoaderStats",
    "ManyHandle",
    "RequestScope",
    "SyncDataLoader",
    "current_scope",
    "request_scope",
    "scoped",
]
