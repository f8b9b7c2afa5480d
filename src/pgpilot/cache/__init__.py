"""Query-result cache: Redis (shared) or in-process, that never serves a reader its own stale write.

- :class:`Cache`: ``@cache.cached(ttl=300, tags=["customers"])`` on sync and async functions;
  ``f.invalidate(*args)``, ``cache.invalidate_tags(...)``, ``cache.invalidate_tables(...)``,
  ``cache.clear()``; ``cache.stats()`` and ``cache.metrics_collector()`` (Prometheus).
- :class:`RedisBackend` (sync and ``redis.asyncio``, Redis Cluster) and :class:`MemoryBackend`
  (an LRU in this process). A backend that is down or slow degrades to calling the function.
- SQLAlchemy: ``session.execute(stmt.options(cache.from_cache(ttl=60)))``; every session's
  writes invalidate the tables' entries when its transaction commits
  (:mod:`pgpilot.cache.sqla`).
- Raw drivers: ``with cache.transaction(conn):`` (psycopg 3, asyncpg) invalidates what the
  transaction wrote once it commits (:mod:`pgpilot.cache.drivers`).
- Values: :class:`MsgpackSerializer` (default, no code runs on load) or
  :class:`SignedPickleSerializer` (HMAC-signed). Keys: :mod:`pgpilot.cache.keys`.
"""

from pgpilot.cache.backends import Backend, BackendError, MemoryBackend, RedisBackend
from pgpilot.cache.core import Cache, CachedFunction
from pgpilot.cache.drivers import CacheTransaction
from pgpilot.cache.keys import table_tag
from pgpilot.cache.serialize import (
    MsgpackSerializer,
    SerializationError,
    Serializer,
    SignedPickleSerializer,
)
from pgpilot.cache.stats import CacheStats

__all__ = [
    "Backend",
    "BackendError",
    "Cache",
    "CacheStats",
    "CacheTransaction",
    "CachedFunction",
    "MemoryBackend",
    "MsgpackSerializer",
    "RedisBackend",
    "SerializationError",
    "Serializer",
    "SignedPickleSerializer",
    "table_tag",
]
