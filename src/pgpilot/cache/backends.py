"""Where entries are kept: Redis (shared by every process) or this process's memory (an LRU).

Both implement one small protocol, in a sync and an async (``a``-prefixed) flavour, and the same
semantics: an entry is stored only while the guards a fill read at its start are unchanged
(see :mod:`pgpilot.cache.keys`), tag invalidation drops every entry of the tag at once, and a
lock with a timeout elects one filler per key.

:class:`RedisBackend` runs each multi-key step as one Lua script on keys of one hash slot (so
it is atomic, and valid on Redis Cluster), with a timeout on every call and no retries: a Redis
that is down or slow raises :class:`BackendError` quickly, and the cache answers by calling the
function. It holds a sync client and one async client per event loop (``redis.asyncio``
connections belong to the loop that opened them).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = ["Backend", "BackendError", "MemoryBackend", "RedisBackend"]

Versions = list[bytes | None]
BeginResult = tuple[bytes | None, bool, Versions]


class BackendError(Exception):
    """The backend did not answer (down, slow, refused): the cache falls back to the function."""


class Backend(Protocol):
    """The operations a :class:`~pgpilot.cache.Cache` runs on its backend."""

    def get(self, key: str) -> bytes | None: ...
    def begin(self, entry: str, lock: str, guards: Sequence[str], token: str, lock_ms: int,
              check_entry: bool) -> BeginResult: ...
    def poll(self, entry: str, lock: str) -> tuple[bytes | None, bool]: ...
    def store(self, entry: str, lock: str, guards: Sequence[str], tag_sets: Sequence[str],
              token: str, payload: bytes, ttl_ms: int, versions: Versions) -> bool: ...
    def release(self, lock: str, token: str) -> None: ...
    def invalidate_tags(self, counter: str, guards: Sequence[str], tag_sets: Sequence[str],
                        guard_ms: int) -> int: ...
    def invalidate_entries(self, counter: str, entries: Sequence[tuple[str, str]],
                           guard_ms: int) -> int: ...
    def clear(self, prefix: str, counter: str, epoch: str) -> int: ...

    async def aget(self, key: str) -> bytes | None: ...
    async def abegin(self, entry: str, lock: str, guards: Sequence[str], token: str,
                     lock_ms: int, check_entry: bool) -> BeginResult: ...
    async def apoll(self, entry: str, lock: str) -> tuple[bytes | None, bool]: ...
    async def astore(self, entry: str, lock: str, guards: Sequence[str],
                     tag_sets: Sequence[str], token: str, payload: bytes, ttl_ms: int,
                     versions: Versions) -> bool: ...
    async def arelease(self, lock: str, token: str) -> None: ...
    async def ainvalidate_tags(self, counter: str, guards: Sequence[str],
                               tag_sets: Sequence[str], guard_ms: int) -> int: ...
    async def ainvalidate_entries(self, counter: str, entries: Sequence[tuple[str, str]],
                                  guard_ms: int) -> int: ...
    async def aclear(self, prefix: str, counter: str, epoch: str) -> int: ...


# ------------------------------------------------------------------------------------------
# In-process
# ------------------------------------------------------------------------------------------


def _now_ms() -> float:
    return time.monotonic() * 1000.0


class MemoryBackend:
    """This process's memory: an LRU of at most ``max_entries`` entries (and ``max_bytes`` of
    values, when given). Values are kept serialized, so every hit gets its own copy, as from
    Redis. Thread-safe; its async methods run inline (nothing in it waits)."""

    def __init__(self, max_entries: int = 10_000, *, max_bytes: int | None = None) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[bytes, float, tuple[str, ...]]] = OrderedDict()
        self._bytes = 0
        self._scalars: dict[str, tuple[bytes, float]] = {}  # locks, guards, counters
        self._sets: dict[str, tuple[set[str], float]] = {}
        self.on_evict: Callable[[str], None] | None = None
        self.evictions = 0

    # -- helpers (called with the lock held) --

    def _scalar(self, key: str, now: float) -> bytes | None:
        found = self._scalars.get(key)
        if found is None:
            return None
        if found[1] and found[1] <= now:
            del self._scalars[key]
            return None
        return found[0]

    def _entry(self, key: str, now: float) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[1] <= now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return found[0]

    def _drop(self, key: str) -> bool:
        found = self._entries.pop(key, None)
        if found is None:
            return False
        self._bytes -= len(found[0])
        for tag_set in found[2]:
            members = self._sets.get(tag_set)
            if members is not None:
                members[0].discard(key)
        return True

    def _incr(self, key: str) -> bytes:
        value = int(self._scalars.get(key, (b"0", 0.0))[0]) + 1
        self._scalars[key] = (str(value).encode(), 0.0)
        return str(value).encode()

    # -- the protocol --

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._entry(key, _now_ms())

    def begin(self, entry: str, lock: str, guards: Sequence[str], token: str, lock_ms: int,
              check_entry: bool) -> BeginResult:
        with self._lock:
            now = _now_ms()
            if check_entry:
                value = self._entry(entry, now)
                if value is not None:
                    return value, False, []
            acquired = self._scalar(lock, now) is None
            if acquired:
                self._scalars[lock] = (token.encode(), now + lock_ms)
            return None, acquired, [self._scalar(guard, now) for guard in guards]

    def poll(self, entry: str, lock: str) -> tuple[bytes | None, bool]:
        with self._lock:
            now = _now_ms()
            return self._entry(entry, now), self._scalar(lock, now) is not None

    def store(self, entry: str, lock: str, guards: Sequence[str], tag_sets: Sequence[str],
              token: str, payload: bytes, ttl_ms: int, versions: Versions) -> bool:
        with self._lock:
            now = _now_ms()
            if self._scalar(lock, now) == token.encode():
                del self._scalars[lock]
            if [self._scalar(guard, now) for guard in guards] != list(versions):
                return False
            self._drop(entry)
            self._entries[entry] = (payload, now + ttl_ms, tuple(tag_sets))
            self._bytes += len(payload)
            for tag_set in tag_sets:
                members, _ = self._sets.get(tag_set, (set(), 0.0))
                members.add(entry)
                self._sets[tag_set] = (members, 0.0)
            evicted: list[str] = []
            while len(self._entries) > self.max_entries or (
                self.max_bytes is not None and self._bytes > self.max_bytes
                and len(self._entries) > 1
            ):
                oldest = next(iter(self._entries))
                self._drop(oldest)
                evicted.append(oldest)
            self.evictions += len(evicted)
        if self.on_evict is not None:
            for key in evicted:
                self.on_evict(key)
        return True

    def release(self, lock: str, token: str) -> None:
        with self._lock:
            if self._scalar(lock, _now_ms()) == token.encode():
                del self._scalars[lock]

    def invalidate_tags(self, counter: str, guards: Sequence[str], tag_sets: Sequence[str],
                        guard_ms: int) -> int:
        dropped = 0
        with self._lock:
            now = _now_ms()
            for guard, tag_set in zip(guards, tag_sets, strict=True):
                self._scalars[guard] = (self._incr(counter), now + guard_ms)
                members, _ = self._sets.pop(tag_set, (set(), 0.0))
                dropped += sum(self._drop(key) for key in list(members))
        return dropped

    def invalidate_entries(self, counter: str, entries: Sequence[tuple[str, str]],
                           guard_ms: int) -> int:
        dropped = 0
        with self._lock:
            now = _now_ms()
            for entry, guard in entries:
                self._scalars[guard] = (self._incr(counter), now + guard_ms)
                dropped += self._drop(entry)
        return dropped

    def clear(self, prefix: str, counter: str, epoch: str) -> int:
        with self._lock:
            keys = [key for key in self._entries if key.startswith(prefix)]
            for key in keys:
                self._drop(key)
            self._scalars[epoch] = (self._incr(counter), 0.0)
            for key in [k for k in self._sets if k.startswith(prefix)]:
                del self._sets[key]
        return len(keys)

    def __len__(self) -> int:
        return len(self._entries)

    async def aget(self, key: str) -> bytes | None:
        return self.get(key)

    async def abegin(self, entry: str, lock: str, guards: Sequence[str], token: str,
                     lock_ms: int, check_entry: bool) -> BeginResult:
        return self.begin(entry, lock, guards, token, lock_ms, check_entry)

    async def apoll(self, entry: str, lock: str) -> tuple[bytes | None, bool]:
        return self.poll(entry, lock)

    async def astore(self, entry: str, lock: str, guards: Sequence[str],
                     tag_sets: Sequence[str], token: str, payload: bytes, ttl_ms: int,
                     versions: Versions) -> bool:
        return self.store(entry, lock, guards, tag_sets, token, payload, ttl_ms, versions)

    async def arelease(self, lock: str, token: str) -> None:
        self.release(lock, token)

    async def ainvalidate_tags(self, counter: str, guards: Sequence[str],
                               tag_sets: Sequence[str], guard_ms: int) -> int:
        return self.invalidate_tags(counter, guards, tag_sets, guard_ms)

    async def ainvalidate_entries(self, counter: str, entries: Sequence[tuple[str, str]],
                                  guard_ms: int) -> int:
        return self.invalidate_entries(counter, entries, guard_ms)

    async def aclear(self, prefix: str, counter: str, epoch: str) -> int:
        return self.clear(prefix, counter, epoch)


# ------------------------------------------------------------------------------------------
# Redis
# ------------------------------------------------------------------------------------------

# KEYS: entry, lock, guards...   ARGV: token, lock ms, check entry (1/0)
_BEGIN = """
if ARGV[3] == '1' then
  local value = redis.call('GET', KEYS[1])
  if value then return {value, 0} end
end
local got = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
local reply = {false, got and 1 or 0}
for i = 3, #KEYS do reply[#reply + 1] = redis.call('GET', KEYS[i]) end
return reply
"""

# KEYS: entry, lock   ->  {value or false, lock exists}
_POLL = """
return {redis.call('GET', KEYS[1]), redis.call('EXISTS', KEYS[2])}
"""

# KEYS: entry, lock, guards (n), tag sets   ARGV: token, payload, ttl ms, n, versions (n)
_STORE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
local n = tonumber(ARGV[4])
for i = 1, n do
  if (redis.call('GET', KEYS[2 + i]) or '') ~= ARGV[4 + i] then return 0 end
end
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
for i = 3 + n, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return 1
"""

# KEYS: lock   ARGV: token
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: counter, guards (n), tag sets (n)   ARGV: n, guard ms
_INVALIDATE_TAGS = """
local n = tonumber(ARGV[1])
local dropped = 0
for i = 1, n do
  redis.call('SET', KEYS[1 + i], redis.call('INCR', KEYS[1]), 'PX', ARGV[2])
  local members = redis.call('SMEMBERS', KEYS[1 + n + i])
  for j = 1, #members, 500 do
    dropped = dropped + redis.call('UNLINK', unpack(members, j, math.min(j + 499, #members)))
  end
  redis.call('DEL', KEYS[1 + n + i])
end
return dropped
"""

# KEYS: counter, (entry, guard) pairs   ARGV: guard ms
_INVALIDATE_ENTRIES = """
local dropped = 0
for i = 2, #KEYS, 2 do
  redis.call('SET', KEYS[i + 1], redis.call('INCR', KEYS[1]), 'PX', ARGV[1])
  dropped = dropped + redis.call('UNLINK', KEYS[i])
end
return dropped
"""

# KEYS: counter, epoch
_EPOCH = """
return redis.call('SET', KEYS[2], redis.call('INCR', KEYS[1]))
"""


def _flag(value: Any) -> bool:
    return bool(int(value)) if value is not None else False


class RedisBackend:
    """Redis (or Redis Cluster), shared by every process of the application.

    ``RedisBackend("redis://host:6379/0")``, or ``cluster=True`` for a Redis Cluster URL, or
    ready clients (``client=`` a ``redis.Redis`` / ``redis.cluster.RedisCluster``,
    ``async_client=`` its ``redis.asyncio`` twin). ``timeout`` (seconds) bounds every call,
    connecting and waiting for a free connection included (at most ``max_connections``, 64 by
    default, per client); no call is retried. Other keyword arguments go to the clients.
    """

    def __init__(self, url: str | None = None, *, cluster: bool = False, timeout: float = 0.25,
                 client: Any = None, async_client: Any = None, **options: Any) -> None:
        if url is None and client is None and async_client is None:
            url = "redis://127.0.0.1:6379/0"
        self.url = url
        self.cluster = cluster
        self.timeout = timeout
        self._options = options
        self._client = client
        self._given_async = async_client
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._client_lock = threading.Lock()
        self._scripts: dict[tuple[int, str], Any] = {}

    # -- clients --

    def _client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"socket_timeout": self.timeout,
                                   "socket_connect_timeout": self.timeout}
        options.update(self._options)
        return options

    @property
    def client(self) -> Any:
        """The sync client (made on first use)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if self.url is None:
            raise BackendError("RedisBackend was given an async client only: pass client= "
                               "to use it from sync code")
        options = self._client_options()
        if self.cluster:
            from redis.cluster import RedisCluster

            return RedisCluster.from_url(self.url, **options)
        import redis

        options.setdefault("retry", Retry(NoBackoff(), 0))
        # callers beyond max_connections wait (up to the timeout) for a connection to free up
        pool = redis.BlockingConnectionPool.from_url(
            self.url, max_connections=options.pop("max_connections", 64),
            timeout=self.timeout, **options)
        return redis.Redis(connection_pool=pool)

    def async_client(self) -> Any:
        """The async client of the running event loop (made on first use in that loop)."""
        if self._given_async is not None:
            return self._given_async
        loop = asyncio.get_running_loop()
        found = self._async.get(loop)
        if found is None:
            if self.url is None:
                raise BackendError("RedisBackend was given a sync client only: pass "
                                   "async_client= to use it from async code")
            options = self._client_options()
            if self.cluster:
                from redis.asyncio.cluster import RedisCluster

                found = RedisCluster.from_url(self.url, **options)
            else:
                import redis.asyncio
                from redis.asyncio.retry import Retry
                from redis.backoff import NoBackoff

                options.setdefault("retry", Retry(NoBackoff(), 0))
                pool = redis.asyncio.BlockingConnectionPool.from_url(
                    self.url, max_connections=options.pop("max_connections", 64),
                    timeout=self.timeout, **options)
                found = redis.asyncio.Redis(connection_pool=pool)
            self._async[loop] = found
        return found

    def _script(self, client: Any, source: str) -> Any:
        slot = (id(client), source)
        script = self._scripts.get(slot)
        if script is None:
            script = self._scripts[slot] = client.register_script(source)
        return script

    def _run(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return self._script(self.client, source)(keys=list(keys), args=list(args))
        except Exception as exc:
            raise BackendError(f"Redis: {exc.__class__.__name__}: {exc}") from exc

    async def _arun(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            client = self.async_client()
            return await self._script(client, source)(keys=list(keys), args=list(args))
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"Redis: {exc.__class__.__name__}: {exc}") from exc

    # -- shaping the scripts' arguments and replies --

    @staticmethod
    def _begin_args(entry: str, lock: str, guards: Sequence[str], token: str, lock_ms: int,
                    check_entry: bool) -> tuple[list[str], list[Any]]:
        return [entry, lock, *guards], [token, lock_ms, "1" if check_entry else "0"]

    @staticmethod
    def _begin_reply(reply: list[Any]) -> BeginResult:
        return reply[0] or None, _flag(reply[1]), [v or None for v in reply[2:]]

    @staticmethod
    def _store_args(entry: str, lock: str, guards: Sequence[str], tag_sets: Sequence[str],
                    token: str, payload: bytes, ttl_ms: int,
                    versions: Versions) -> tuple[list[str], list[Any]]:
        expected = [v if v is not None else b"" for v in versions]
        return ([entry, lock, *guards, *tag_sets],
                [token, payload, max(1, int(ttl_ms)), len(guards), *expected])

    @staticmethod
    def _entries_keys(counter: str, entries: Sequence[tuple[str, str]]) -> list[str]:
        return [counter, *(key for pair in entries for key in pair)]

    # -- sync protocol --

    def get(self, key: str) -> bytes | None:
        try:
            value: bytes | None = self.client.get(key)
            return value
        except Exception as exc:
            raise BackendError(f"Redis: {exc.__class__.__name__}: {exc}") from exc

    def begin(self, entry: str, lock: str, guards: Sequence[str], token: str, lock_ms: int,
              check_entry: bool) -> BeginResult:
        keys, args = self._begin_args(entry, lock, guards, token, lock_ms, check_entry)
        return self._begin_reply(self._run(_BEGIN, keys, args))

    def poll(self, entry: str, lock: str) -> tuple[bytes | None, bool]:
        value, locked = self._run(_POLL, [entry, lock], [])
        return value or None, _flag(locked)

    def store(self, entry: str, lock: str, guards: Sequence[str], tag_sets: Sequence[str],
              token: str, payload: bytes, ttl_ms: int, versions: Versions) -> bool:
        keys, args = self._store_args(entry, lock, guards, tag_sets, token, payload, ttl_ms,
                                      versions)
        return _flag(self._run(_STORE, keys, args))

    def release(self, lock: str, token: str) -> None:
        self._run(_RELEASE, [lock], [token])

    def invalidate_tags(self, counter: str, guards: Sequence[str], tag_sets: Sequence[str],
                        guard_ms: int) -> int:
        return int(self._run(_INVALIDATE_TAGS, [counter, *guards, *tag_sets],
                             [len(guards), guard_ms]))

    def invalidate_entries(self, counter: str, entries: Sequence[tuple[str, str]],
                           guard_ms: int) -> int:
        return int(self._run(_INVALIDATE_ENTRIES, self._entries_keys(counter, entries),
                             [guard_ms]))

    def clear(self, prefix: str, counter: str, epoch: str) -> int:
        self._run(_EPOCH, [counter, epoch], [])
        keep = {counter.encode(), epoch.encode()}
        dropped = 0
        try:
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
                if key not in keep:
                    batch.append(key)
                if len(batch) >= 500:
                    dropped += self.client.unlink(*batch)
                    batch = []
            if batch:
                dropped += self.client.unlink(*batch)
        except Exception as exc:
            raise BackendError(f"Redis: {exc.__class__.__name__}: {exc}") from exc
        return dropped

    # -- async protocol --

    async def aget(self, key: str) -> bytes | None:
        try:
            value: bytes | None = await self.async_client().get(key)
            return value
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"Redis: {exc.__class__.__name__}: {exc}") from exc

    async def abegin(self, entry: str, lock: str, guards: Sequence[str], token: str,
                     lock_ms: int, check_entry: bool) -> BeginResult:
        keys, args = self._begin_args(entry, lock, guards, token, lock_ms, check_entry)
        return self._begin_reply(await self._arun(_BEGIN, keys, args))

    async def apoll(self, entry: str, lock: str) -> tuple[bytes | None, bool]:
        value, locked = await self._arun(_POLL, [entry, lock], [])
        return value or None, _flag(locked)

    async def astore(self, entry: str, lock: str, guards: Sequence[str],
                     tag_sets: Sequence[str], token: str, payload: bytes, ttl_ms: int,
                     versions: Versions) -> bool:
        keys, args = self._store_args(entry, lock, guards, tag_sets, token, payload, ttl_ms,
                                      versions)
        return _flag(await self._arun(_STORE, keys, args))

    async def arelease(self, lock: str, token: str) -> None:
        await self._arun(_RELEASE, [lock], [token])

    async def ainvalidate_tags(self, counter: str, guards: Sequence[str],
                               tag_sets: Sequence[str], guard_ms: int) -> int:
        return int(await self._arun(_INVALIDATE_TAGS, [counter, *guards, *tag_sets],
                                    [len(guards), guard_ms]))

    async def ainvalidate_entries(self, counter: str, entries: Sequence[tuple[str, str]],
                                  guard_ms: int) -> int:
        return int(await self._arun(_INVALIDATE_ENTRIES, self._entries_keys(counter, entries),
                                    [guard_ms]))

    async def aclear(self, prefix: str, counter: str, epoch: str) -> int:
        await self._arun(_EPOCH, [counter, epoch], [])
        keep = {counter.encode(), epoch.encode()}
        dropped = 0
        try:
            client = self.async_client()
            batch: list[bytes] = []
            async for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
                if key not in keep:
                    batch.append(key)
                if len(batch) >= 500:
                    dropped += await client.unlink(*batch)
                    batch = []
            if batch:
                dropped += await client.unlink(*batch)
        except Exception as exc:
            raise BackendError(f"Redis: {exc.__class__.__name__}: {exc}") from exc
        return dropped

    def close(self) -> None:
        """Close the sync client's connections (async clients close with their loops)."""
        if self._client is not None:
            self._client.close()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
