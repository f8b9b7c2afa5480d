"""The cache: ``Cache``, its ``cached`` decorator, and how one call goes through it.

A call's way through the cache is one procedure, written once as a generator that yields what
it needs done (``begin`` / ``poll`` / ``store`` / ``release`` on the backend, ``sleep``, and
``compute``: call the function) and is driven three ways: with the sync backend (plain
functions), with the async backend (coroutine functions), and from inside SQLAlchemy's asyncio
greenlet (statements cached through an ``AsyncSession``). The hit path does not enter it: one
``GET`` and a decode.

On a miss: callers in this process that want the same key wait for the first one (threads on a
``threading.Event``, tasks on a future); that one runs the procedure: ``begin`` reads the
entry's guards and takes the entry's lock in Redis (``SET NX PX``), so callers in other
processes poll the entry until it appears (or the lock goes, or ``lock_timeout`` passes, and
then they fill it themselves). The filler stores its value only if no guard moved (see
:mod:`pgpilot.cache.keys`).

When the backend fails (down, slow past its timeout, refusing), the call counts an error,
logs one warning, and is answered by the function; the backend is left alone for
``retry_after`` seconds. Invalidations that could not be sent are kept and sent before the
backend is used again (and retried every ``retry_after`` seconds in the background).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, ParamSpec, TypeVar, cast

from pgpilot.cache.backends import Backend, BackendError, MemoryBackend
from pgpilot.cache.keys import EntryKeys, KeySpace, hash_key_material, table_tag
from pgpilot.cache.serialize import (
    MsgpackSerializer,
    SerializationError,
    Serializer,
    canonical_bytes,
)
from pgpilot.cache.stats import CacheStats, Counters

__all__ = ["Cache", "CachedFunction"]

log = logging.getLogger("pgpilot.cache")

P = ParamSpec("P")
R = TypeVar("R")

_HEADER = struct.Struct(">BQI")  # serializer format id, expires at (unix ms), ttl (ms)
_MISSING: Any = object()
_RETRY: Any = object()  # a flight's leader went away: followers fill for themselves
COMPUTE = ("compute",)
Op = tuple[Any, ...]
Procedure = Generator[Op, Any, tuple[Any, bytes | None]]


class _Spec:
    """One call: its keys, tags and policy."""

    __slots__ = ("counters", "early", "entry", "name", "rest", "tags", "ttl_ms")

    def __init__(self, name: str, counters: Counters, entry: str, rest: str, ttl_ms: int,
                 tags: Sequence[str], early: float | None) -> None:
        self.name = name
        self.counters = counters
        self.entry = entry
        self.rest = rest
        self.ttl_ms = ttl_ms
        self.tags = tags
        self.early = early


class _Flight:
    """One thread's read-or-fill of a key, which other threads asking for it meanwhile join."""

    __slots__ = ("error", "event", "hit", "payload", "value")

    def __init__(self) -> None:
        # Made by the first thread that joins (under the flights' lock): a hit nobody joins,
        # the common case, costs no Event.
        self.event: threading.Event | None = None
        self.value: Any = _RETRY
        self.payload: bytes | None = None
        self.error: BaseException | None = None
        self.hit = False  # the value came from the backend: joiners count a hit


_caches: weakref.WeakSet[Cache] = weakref.WeakSet()


class Cache:
    """A query-result cache in one namespace of a backend.

    ``Cache(RedisBackend(url), namespace="shop", default_ttl=600)``. ``version`` is part of
    every key (bump it when cached values change shape). ``serializer`` defaults to
    :class:`~pgpilot.cache.serialize.MsgpackSerializer`. ``lock_timeout`` (seconds) is how long
    one caller may fill a key while others wait for it. ``early_refresh`` (a fraction of the
    TTL, e.g. ``0.1``) refreshes an entry in the background when a hit finds it that close to
    expiring. ``retry_after`` (seconds) is how long a failed backend is left alone.
    ``follow_writes`` makes every SQLAlchemy ``Session`` of the process invalidate the tables it
    writes to when it commits (see :meth:`from_cache`).
    """

    def __init__(self, backend: Backend | None = None, *, namespace: str = "default",
                 default_ttl: float = 300.0, version: str = "1",
                 serializer: Serializer | None = None, lock_timeout: float = 10.0,
                 early_refresh: float | None = None, retry_after: float = 1.0,
                 follow_writes: bool = True) -> None:
        self.backend: Backend = backend if backend is not None else MemoryBackend()
        self.keys = KeySpace(namespace)
        self.namespace = namespace
        self.default_ttl = default_ttl
        self.version = str(version)
        self.serializer: Serializer = serializer or MsgpackSerializer()
        self.lock_timeout = lock_timeout
        self.early_refresh = early_refresh
        self.retry_after = retry_after
        self._lock_ms = max(1, int(lock_timeout * 1000))
        self._guard_ms = max(60_000, 4 * self._lock_ms)
        self._counters: dict[str, Counters] = {}
        self._counters_lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()
        self._aflights: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, asyncio.Future[Any]]
        ] = weakref.WeakKeyDictionary()
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._down_until = 0.0
        self._pending: list[Op] = []
        self._pending_lock = threading.Lock()
        self._timer: threading.Timer | None = None
        if isinstance(self.backend, MemoryBackend) and self.backend.on_evict is None:
            self.backend.on_evict = self._evicted
        _caches.add(self)
        if follow_writes:
            from pgpilot.cache import sqla

            sqla.follow_session_writes(_caches)

    def __repr__(self) -> str:
        return f"<Cache namespace={self.namespace!r} backend={type(self.backend).__name__}>"

    # ------------------------------------------------------------------ decorator, options

    def cached(self, ttl: float | None = None, *,
               tags: Iterable[str] | Callable[..., Iterable[str]] = (),
               name: str | None = None, version: str | None = None,
               key: Callable[..., Any] | None = None, ignore: Iterable[str] = ("self", "cls"),
               early_refresh: float | None = None,
               ) -> Callable[[Callable[P, R]], CachedFunction[P, R]]:
        """Cache a function's results (sync or ``async def``) keyed by its arguments.

        ``tags``: tag names, or a function of the call's arguments returning them.
        ``name``: the key's function part (default ``module.qualname``). ``key``: a function
        of the call's arguments whose result is hashed instead of the arguments. ``ignore``:
        parameters left out of the key.
        """

        def decorate(fn: Callable[P, R]) -> CachedFunction[P, R]:
            return CachedFunction(self, fn, ttl=ttl, tags=tags, name=name, version=version,
                                  key=key, ignore=ignore, early_refresh=early_refresh)

        return decorate

    def from_cache(self, ttl: float | None = None, *, tags: Iterable[str] = ()) -> Any:
        """A SQLAlchemy option: ``session.execute(stmt.options(cache.from_cache(ttl=60)))``
        answers from the cache, keyed by the statement's SQL and parameters, tagged with the
        tables it reads (and ``tags``)."""
        from pgpilot.cache import sqla

        return sqla.FromCache(self, ttl=ttl, tags=tuple(tags))

    def transaction(self, conn: Any, *, tables: Iterable[str] = ()) -> Any:
        """A transaction on a psycopg (sync or async) or asyncpg connection that, when it
        commits, invalidates every table it wrote to (and ``tables``)."""
        from pgpilot.cache import drivers

        return drivers.transaction(self, conn, tables=tuple(tables))

    # ------------------------------------------------------------------ invalidation

    def invalidate_tags(self, *tags: str) -> int:
        """Drop every entry carrying any of ``tags``, in every process; the number dropped."""
        return self._invalidate(self._tags_op(tags)) if tags else 0

    async def ainvalidate_tags(self, *tags: str) -> int:
        return await self._ainvalidate(self._tags_op(tags)) if tags else 0

    def invalidate_tables(self, *tables: str) -> int:
        """Drop every entry tagged with these tables (statements that read them)."""
        return self.invalidate_tags(*{table_tag(t) for t in tables})

    async def ainvalidate_tables(self, *tables: str) -> int:
        return await self.ainvalidate_tags(*{table_tag(t) for t in tables})

    def clear(self) -> int:
        """Drop every entry of this namespace (and every fill in flight)."""
        return self._invalidate(("clear", self.keys.prefix, self.keys.counter, self.keys.epoch))

    async def aclear(self) -> int:
        return await self._ainvalidate(
            ("clear", self.keys.prefix, self.keys.counter, self.keys.epoch))

    def _tags_op(self, tags: Sequence[str]) -> Op:
        unique = sorted(set(tags))
        return ("invalidate_tags", self.keys.counter,
                [self.keys.tag_guard(t) for t in unique],
                [self.keys.tag_set(t) for t in unique], self._guard_ms)

    def _entry_op(self, keys: EntryKeys) -> Op:
        return ("invalidate_entries", self.keys.counter, [(keys.entry, keys.guard)],
                self._guard_ms)

    def _invalidate(self, op: Op) -> int:
        if (self._pending or self._breaker_open()) and not self._flush_pending():
            self._defer(op)
            return 0
        try:
            return int(getattr(self.backend, op[0])(*op[1:]))
        except BackendError as exc:
            self._failed(exc, None)
            self._defer(op)
            return 0

    async def _ainvalidate(self, op: Op) -> int:
        if (self._pending or self._breaker_open()) and not await self._aflush_pending():
            self._defer(op)
            return 0
        try:
            return int(await getattr(self.backend, "a" + op[0])(*op[1:]))
        except BackendError as exc:
            self._failed(exc, None)
            self._defer(op)
            return 0

    def _defer(self, op: Op) -> None:
        with self._pending_lock:
            if op not in self._pending:
                self._pending.append(op)
            if self._timer is None:
                self._timer = threading.Timer(self.retry_after, self._retry_pending)
                self._timer.daemon = True
                self._timer.start()

    def _retry_pending(self) -> None:
        with self._pending_lock:
            self._timer = None
        if not self._flush_pending(force=True):
            with self._pending_lock:
                if self._timer is None and self._pending:
                    self._timer = threading.Timer(self.retry_after, self._retry_pending)
                    self._timer.daemon = True
                    self._timer.start()

    def _flush_pending(self, force: bool = False) -> bool:
        """Send deferred invalidations; whether none is left."""
        if self._breaker_open() and not force:
            return False
        while self._pending:
            op = self._pending[0]
            try:
                getattr(self.backend, op[0])(*op[1:])
            except BackendError as exc:
                self._failed(exc, None)
                return False
            with self._pending_lock:
                if self._pending and self._pending[0] is op:
                    self._pending.pop(0)
        return True

    async def _aflush_pending(self) -> bool:
        if self._breaker_open():
            return False
        while self._pending:
            op = self._pending[0]
            try:
                await getattr(self.backend, "a" + op[0])(*op[1:])
            except BackendError as exc:
                self._failed(exc, None)
                return False
            with self._pending_lock:
                if self._pending and self._pending[0] is op:
                    self._pending.pop(0)
        return True

    @property
    def pending_invalidations(self) -> int:
        """Invalidations waiting for the backend to come back."""
        return len(self._pending)

    # ------------------------------------------------------------------ statistics

    def counters(self, name: str) -> Counters:
        found = self._counters.get(name)
        if found is None:
            with self._counters_lock:
                found = self._counters.setdefault(name, Counters())
        return found

    def stats(self) -> dict[str, CacheStats]:
        """A snapshot of every cached function's counters, by name."""
        return {name: c.snapshot(self.namespace, name) for name, c in list(self._counters.items())}

    def _evicted(self, entry_key: str) -> None:
        if entry_key.startswith(self.keys.prefix):
            self.counters(self.keys.name_of(entry_key)).evictions += 1

    def metrics_collector(self) -> Any:
        """A prometheus_client collector of :meth:`stats` (register it on a registry)."""
        from pgpilot.cache.metrics import CacheCollector

        return CacheCollector(self)

    # ------------------------------------------------------------------ failures

    def _breaker_open(self) -> bool:
        return self._down_until > 0.0 and time.monotonic() < self._down_until

    def _failed(self, exc: BaseException, counters: Counters | None) -> None:
        if counters is not None:
            counters.errors += 1
        now = time.monotonic()
        if now >= self._down_until:
            log.warning("pgpilot.cache namespace %r: backend unavailable (%s); answering from "
                        "the functions for %.1f s", self.namespace, exc, self.retry_after)
        self._down_until = now + self.retry_after

    # ------------------------------------------------------------------ values

    def _encode(self, value: Any, spec: _Spec) -> bytes | None:
        try:
            body = self.serializer.dumps(value)
        except Exception as exc:
            spec.counters.errors += 1
            log.warning("pgpilot.cache: %s: value not cached: %s", spec.name, exc)
            return None
        expires = int(time.time() * 1000) + spec.ttl_ms
        return _HEADER.pack(self.serializer.format_id, expires, spec.ttl_ms) + body

    def _decode(self, raw: bytes, spec: _Spec) -> Any:
        if len(raw) < _HEADER.size or raw[0] != self.serializer.format_id:
            return _MISSING
        try:
            return self.serializer.loads(raw[_HEADER.size:])
        except (SerializationError, Exception) as exc:
            spec.counters.errors += 1
            log.warning("pgpilot.cache: %s: cached value not read: %s", spec.name, exc)
            return _MISSING

    def _due(self, raw: bytes, spec: _Spec) -> bool:
        early = spec.early
        if not early:
            return False
        _, expires, ttl_ms = _HEADER.unpack_from(raw)
        return bool(expires - time.time() * 1000 < early * ttl_ms)

    # ------------------------------------------------------------------ specs

    def _spec(self, name: str, counters: Counters, version: str, material: bytes,
              ttl: float | None, tags: Sequence[str], early: float | None) -> _Spec:
        rest = f"{version}:{name}:{hash_key_material(material)}"
        seconds = self.default_ttl if ttl is None else ttl
        return _Spec(name, counters, self.keys.prefix + "e:" + rest, rest,
                     max(1, int(seconds * 1000)), tags, early)

    def _entry_keys(self, spec: _Spec) -> EntryKeys:
        prefix = self.keys.prefix
        return EntryKeys(spec.entry, prefix + "l:" + spec.rest, prefix + "k:" + spec.rest)

    # ------------------------------------------------------------------ the procedure

    def _procedure(self, spec: _Spec, refresh: bool = False) -> Procedure:
        """Fill one entry; yields operations, returns (value, stored payload or None)."""
        keys = self._entry_keys(spec)
        guards = [keys.guard, self.keys.epoch, *(self.keys.tag_guard(t) for t in spec.tags)]
        tag_sets = [self.keys.tag_set(t) for t in spec.tags]
        token = uuid.uuid4().hex
        counters = spec.counters
        try:
            raw, acquired, versions = yield ("begin", keys.entry, keys.lock, guards, token,
                                             self._lock_ms, not refresh)
        except BackendError as exc:
            self._failed(exc, counters)
            counters.degraded += 1
            return (yield COMPUTE), None
        if raw is not None:
            value = self._decode(raw, spec)
            if value is not _MISSING:
                return value, raw[_HEADER.size:]
            try:  # an entry that cannot be read (foreign, corrupt, forged): replace it
                raw, acquired, versions = yield ("begin", keys.entry, keys.lock, guards, token,
                                                 self._lock_ms, False)
            except BackendError as exc:
                self._failed(exc, counters)
                counters.degraded += 1
                return (yield COMPUTE), None
        if not acquired:
            if refresh:
                return _MISSING, None
            counters.stampede_waits += 1
            deadline = time.monotonic() + self.lock_timeout
            delay = 0.002
            while time.monotonic() < deadline:
                yield ("sleep", delay)
                delay = min(delay * 2, 0.05)
                try:
                    raw, locked = yield ("poll", keys.entry, keys.lock)
                    if raw is None and not locked:  # the filler went away: take over
                        raw, acquired, versions = yield ("begin", keys.entry, keys.lock, guards,
                                                         token, self._lock_ms, True)
                except BackendError as exc:
                    self._failed(exc, counters)
                    counters.degraded += 1
                    return (yield COMPUTE), None
                if raw is not None:
                    value = self._decode(raw, spec)
                    if value is not _MISSING:
                        return value, raw[_HEADER.size:]
                    break  # unreadable: fill it ourselves
                if acquired:
                    break
        try:
            value = yield COMPUTE
        except BaseException:
            if acquired:
                with contextlib.suppress(BackendError):
                    yield ("release", keys.lock, token)
            raise
        payload = self._encode(value, spec)
        if payload is None:
            if acquired:
                with contextlib.suppress(BackendError):
                    yield ("release", keys.lock, token)
            return value, None
        try:
            stored = yield ("store", keys.entry, keys.lock, guards, tag_sets, token, payload,
                            spec.ttl_ms, versions)
        except BackendError as exc:
            self._failed(exc, counters)
            return value, None
        if not stored:
            counters.fills_discarded += 1
            return value, None
        return value, payload[_HEADER.size:]

    # ------------------------------------------------------------------ sync driver

    def _timed_sync(self, counters: Counters, compute: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return compute()
        finally:
            counters.fills += 1
            counters.fill_seconds += time.perf_counter() - started

    def _drive_sync(self, procedure: Procedure, counters: Counters,
                    compute: Callable[[], Any]) -> tuple[Any, bytes | None]:
        backend = self.backend
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = procedure.throw(error) if error is not None else procedure.send(reply)
            except StopIteration as stop:
                return cast(tuple[Any, bytes | None], stop.value)
            reply, error = None, None
            try:
                kind = op[0]
                if kind == "compute":
                    reply = self._timed_sync(counters, compute)
                elif kind == "sleep":
                    time.sleep(op[1])
                else:
                    reply = getattr(backend, kind)(*op[1:])
            except BaseException as exc:  # handed to the procedure, which decides
                error = exc

    def get_sync(self, spec: _Spec, compute: Callable[[], Any]) -> Any:
        """Answer one call from the cache, filling it with ``compute()`` on a miss.

        The first thread to ask for a key leads: it reads the backend and, on a miss, fills;
        threads asking for the same key meanwhile join it instead of asking the backend
        themselves, so a stampede costs one backend call per key and process (200 callers at
        once each waiting for a pooled connection ran past the timeout and degraded)."""
        counters = spec.counters
        # The backend is down (or invalidations are still owed): the function answers, and
        # callers of the same key meanwhile still share one call of it.
        degraded = (self._pending and not self._flush_pending()) or self._breaker_open()
        joined: threading.Event | None = None  # set when another thread leads this key
        with self._flights_lock:
            flight = self._flights.get(spec.entry)
            if flight is None:
                flight = self._flights[spec.entry] = _Flight()
            else:
                if flight.event is None:
                    flight.event = threading.Event()
                joined = flight.event
        if joined is not None:
            return self._follow_sync(joined, flight, counters, compute)
        try:
            if degraded:
                counters.misses += 1
                counters.degraded += 1
                flight.value = self._timed_sync(counters, compute)
            else:
                flight.value, flight.payload, flight.hit = self._lead_sync(spec, compute)
            return flight.value
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            with self._flights_lock:
                self._flights.pop(spec.entry, None)
                event = flight.event  # no thread joins once the flight is gone
            if event is not None:
                event.set()

    def _lead_sync(self, spec: _Spec, compute: Callable[[], Any]) -> tuple[Any, bytes | None,
                                                                            bool]:
        """The leader's read, then fill on a miss: (value, its serialized form for joiners
        to decode a copy of, or None to share the value, whether it was a hit)."""
        counters = spec.counters
        try:
            raw = self.backend.get(spec.entry)
        except BackendError as exc:
            self._failed(exc, counters)
            counters.misses += 1
            counters.degraded += 1
            return self._timed_sync(counters, compute), None, False
        if raw is not None:
            value = self._decode(raw, spec)
            if value is not _MISSING:
                counters.hits += 1
                if spec.early and self._due(raw, spec):
                    self._refresh_sync(spec, compute)
                return value, raw[_HEADER.size:], True
        counters.misses += 1
        value, payload = self._drive_sync(self._procedure(spec), counters, compute)
        return value, payload, False

    def _follow_sync(self, event: threading.Event, flight: _Flight, counters: Counters,
                     compute: Callable[[], Any]) -> Any:
        """Wait for the leading thread's answer for the same key (or compute, if it gave up
        or ``lock_timeout`` passed)."""
        if event.wait(self.lock_timeout):
            if flight.error is not None:
                counters.misses += 1
                raise flight.error
            if flight.value is not _RETRY:
                if flight.hit:
                    counters.hits += 1
                else:
                    counters.misses += 1
                    counters.stampede_waits += 1
                if flight.payload is not None:
                    return self.serializer.loads(flight.payload)
                return flight.value
        counters.misses += 1
        counters.stampede_waits += 1
        return self._timed_sync(counters, compute)

    def _refresh_sync(self, spec: _Spec, compute: Callable[[], Any]) -> None:
        with self._flights_lock:
            if spec.entry in self._refreshing:
                return
            self._refreshing.add(spec.entry)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(2, thread_name_prefix="pgpilot-cache")

        def run() -> None:
            def counted() -> Any:
                spec.counters.early_refreshes += 1
                return compute()

            try:
                self._drive_sync(self._procedure(spec, refresh=True), spec.counters, counted)
            except Exception as exc:
                log.warning("pgpilot.cache: %s: early refresh failed: %s", spec.name, exc)
            finally:
                with self._flights_lock:
                    self._refreshing.discard(spec.entry)

        self._executor.submit(run)

    # ------------------------------------------------------------------ async driver

    async def _timed_async(self, counters: Counters,
                           compute: Callable[[], Awaitable[Any]]) -> Any:
        started = time.perf_counter()
        try:
            return await compute()
        finally:
            counters.fills += 1
            counters.fill_seconds += time.perf_counter() - started

    async def _drive_async(self, procedure: Procedure, counters: Counters,
                           compute: Callable[[], Awaitable[Any]]) -> tuple[Any, bytes | None]:
        backend = self.backend
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = procedure.throw(error) if error is not None else procedure.send(reply)
            except StopIteration as stop:
                return cast(tuple[Any, bytes | None], stop.value)
            reply, error = None, None
            try:
                kind = op[0]
                if kind == "compute":
                    reply = await self._timed_async(counters, compute)
                elif kind == "sleep":
                    await asyncio.sleep(op[1])
                else:
                    reply = await getattr(backend, "a" + kind)(*op[1:])
            except BaseException as exc:
                error = exc

    async def get_async(self, spec: _Spec, compute: Callable[[], Awaitable[Any]]) -> Any:
        """:meth:`get_sync` for coroutine functions (the async backend; the first task to
        ask for a key leads, tasks of the same loop asking meanwhile join it)."""
        counters = spec.counters
        degraded = (self._pending and not await self._aflush_pending()) or self._breaker_open()
        loop = asyncio.get_running_loop()
        flights = self._aflights.get(loop)
        if flights is None:
            flights = self._aflights.setdefault(loop, {})
        future = flights.get(spec.entry)
        if future is not None:
            return await self._follow_async(future, counters, compute)
        future = flights[spec.entry] = loop.create_future()
        result: tuple[Any, bytes | None, bool]
        try:
            if degraded:  # (see get_sync) the function answers, shared by the key's callers
                counters.misses += 1
                counters.degraded += 1
                result = (await self._timed_async(counters, compute), None, False)
            else:
                result = await self._lead_async(spec, compute)
            future.set_result(result)
            return result[0]
        except asyncio.CancelledError:
            future.set_result((_RETRY, None, False))
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without followers
            raise
        finally:
            flights.pop(spec.entry, None)

    async def _lead_async(self, spec: _Spec, compute: Callable[[], Awaitable[Any]]
                          ) -> tuple[Any, bytes | None, bool]:
        """:meth:`_lead_sync` for coroutine functions."""
        counters = spec.counters
        try:
            raw = await self.backend.aget(spec.entry)
        except BackendError as exc:
            self._failed(exc, counters)
            counters.misses += 1
            counters.degraded += 1
            return await self._timed_async(counters, compute), None, False
        if raw is not None:
            value = self._decode(raw, spec)
            if value is not _MISSING:
                counters.hits += 1
                if spec.early and self._due(raw, spec):
                    self._refresh_async(spec, compute)
                return value, raw[_HEADER.size:], True
        counters.misses += 1
        value, payload = await self._drive_async(self._procedure(spec), counters, compute)
        return value, payload, False

    async def _follow_async(self, future: asyncio.Future[Any], counters: Counters,
                            compute: Callable[[], Awaitable[Any]]) -> Any:
        """Wait for the leading task's answer for the same key (see :meth:`_follow_sync`)."""
        try:
            value, payload, hit = await asyncio.wait_for(asyncio.shield(future),
                                                         self.lock_timeout)
        except TimeoutError:
            value, payload, hit = _RETRY, None, False
        except Exception:
            counters.misses += 1
            raise
        if value is not _RETRY:
            if hit:
                counters.hits += 1
            else:
                counters.misses += 1
                counters.stampede_waits += 1
            return self.serializer.loads(payload) if payload is not None else value
        counters.misses += 1
        counters.stampede_waits += 1
        return await self._timed_async(counters, compute)

    def _refresh_async(self, spec: _Spec, compute: Callable[[], Awaitable[Any]]) -> None:
        if spec.entry in self._refreshing:
            return
        self._refreshing.add(spec.entry)

        async def run() -> None:
            async def counted() -> Any:
                spec.counters.early_refreshes += 1
                return await compute()

            try:
                await self._drive_async(self._procedure(spec, refresh=True), spec.counters,
                                        counted)
            except Exception as exc:
                log.warning("pgpilot.cache: %s: early refresh failed: %s", spec.name, exc)
            finally:
                self._refreshing.discard(spec.entry)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ greenlet driver

    def get_in_greenlet(self, spec: _Spec, compute: Callable[[], Any],
                        await_: Callable[[Awaitable[Any]], Any]) -> Any:
        """:meth:`get_sync` from inside SQLAlchemy's asyncio greenlet: the backend is used
        through its async methods (``await_`` hands each to the event loop), ``compute`` runs
        in the greenlet (it may itself await through SQLAlchemy)."""
        counters = spec.counters
        if (self._pending and not await_(self._aflush_pending())) or self._breaker_open():
            counters.misses += 1
            counters.degraded += 1
            return self._timed_sync(counters, compute)
        try:
            raw = await_(self.backend.aget(spec.entry))
        except BackendError as exc:
            self._failed(exc, counters)
            counters.misses += 1
            counters.degraded += 1
            return self._timed_sync(counters, compute)
        if raw is not None:
            value = self._decode(raw, spec)
            if value is not _MISSING:
                counters.hits += 1
                return value
        counters.misses += 1
        procedure = self._procedure(spec)
        backend = self.backend
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = procedure.throw(error) if error is not None else procedure.send(reply)
            except StopIteration as stop:
                return stop.value[0]
            reply, error = None, None
            try:
                kind = op[0]
                if kind == "compute":
                    reply = self._timed_sync(counters, compute)
                elif kind == "sleep":
                    await_(asyncio.sleep(op[1]))
                else:
                    reply = await_(getattr(backend, "a" + kind)(*op[1:]))
            except BaseException as exc:
                error = exc


class _Unkeyable(Exception):
    pass


class CachedFunction(Generic[P, R]):
    """A function whose results are cached; call it as the function.

    ``.invalidate(*args, **kwargs)`` drops the entry of those arguments (in every process),
    ``.key(*args, **kwargs)`` is its backend key; ``await .ainvalidate(...)`` from async code.
    """

    def __init__(self, cache: Cache, fn: Callable[P, R], *, ttl: float | None,
                 tags: Iterable[str] | Callable[..., Iterable[str]], name: str | None,
                 version: str | None, key: Callable[..., Any] | None, ignore: Iterable[str],
                 early_refresh: float | None) -> None:
        self.cache = cache
        self.__wrapped__ = fn
        self.name = name or f"{fn.__module__}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
        self.ttl = ttl
        self.version = cache.version + "." + (version or "1")
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None))  # noqa: B004 - an object whose __call__ is async
        self._fn = fn
        self._key = key
        self._tags_fn = tags if callable(tags) else None
        self._tags: tuple[str, ...] = () if callable(tags) else tuple(sorted(set(tags)))
        self._early = early_refresh if early_refresh is not None else cache.early_refresh
        self._signature = inspect.signature(fn)
        params = list(self._signature.parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._fast = len(params) if all(p.kind in positional for p in params) else -1
        ignored = set(ignore)
        self._keep = [i for i, p in enumerate(params) if p.name not in ignored]
        self._drop = len(self._keep) != len(params)
        self._counters = cache.counters(self.name)
        self.__name__ = getattr(fn, "__name__", self.name)
        self.__qualname__ = getattr(fn, "__qualname__", self.name)
        self.__doc__ = fn.__doc__
        self.__module__ = fn.__module__
        if self.is_async:  # so that frameworks see a coroutine function
            mark = getattr(inspect, "markcoroutinefunction", None)  # Python 3.12+
            if mark is not None:
                mark(self)
            else:
                self._is_coroutine = getattr(asyncio.coroutines, "_is_coroutine", None)

    def __repr__(self) -> str:
        return f"<cached {self.name} in {self.cache!r}>"

    def _material(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        if self._key is not None:
            return canonical_bytes(self._key(*args, **kwargs))
        values: Sequence[Any]
        if not kwargs and len(args) == self._fast:
            values = args
        else:
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = tuple(bound.arguments.values())
        if self._drop:
            values = [values[i] for i in self._keep]
        try:
            return canonical_bytes(list(values))
        except TypeError as exc:
            raise _Unkeyable(str(exc)) from exc

    def _spec(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Spec:
        tags = self._tags
        if self._tags_fn is not None:
            tags = tuple(sorted(set(self._tags_fn(*args, **kwargs))))
        return self.cache._spec(self.name, self._counters, self.version,
                                self._material(args, kwargs), self.ttl, tags, self._early)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            spec = self._spec(args, kwargs)
        except _Unkeyable as exc:
            self._counters.errors += 1
            log.warning("pgpilot.cache: %s: called without the cache: %s", self.name, exc)
            return self._fn(*args, **kwargs)
        fn = self._fn
        if self.is_async:
            return cast(R, self.cache.get_async(
                spec, lambda: cast(Awaitable[Any], fn(*args, **kwargs))))
        return cast(R, self.cache.get_sync(spec, lambda: fn(*args, **kwargs)))

    def key(self, *args: Any, **kwargs: Any) -> str:
        """The backend key of a call with these arguments."""
        return self._spec(args, kwargs).entry

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Drop the entry of a call with these arguments; whether there was one."""
        spec = self._spec(args, kwargs)
        dropped = self.cache._invalidate(self.cache._entry_op(self.cache._entry_keys(spec)))
        return dropped > 0

    async def ainvalidate(self, *args: Any, **kwargs: Any) -> bool:
        spec = self._spec(args, kwargs)
        return bool(await self.cache._ainvalidate(
            self.cache._entry_op(self.cache._entry_keys(spec))))

    def stats(self) -> CacheStats:
        return self._counters.snapshot(self.cache.namespace, self.name)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return _BoundCached(self, instance)


class _BoundCached:
    """A cached method bound to its instance (``self`` is left out of the key by default)."""

    __slots__ = ("_cached", "_self")

    def __init__(self, cached: CachedFunction[Any, Any], instance: Any) -> None:
        self._cached = cached
        self._self = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._cached(self._self, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        return self._cached.invalidate(self._self, *args, **kwargs)

    async def ainvalidate(self, *args: Any, **kwargs: Any) -> bool:
        return await self._cached.ainvalidate(self._self, *args, **kwargs)

    def key(self, *args: Any, **kwargs: Any) -> str:
        return self._cached.key(self._self, *args, **kwargs)
