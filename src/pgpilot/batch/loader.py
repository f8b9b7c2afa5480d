"""The asyncio DataLoader: many ``await loader.load(key)`` calls, one batch function call.

How a batch forms. The first load after a dispatch opens a batch. By default (``window=None``)
the batch is dispatched once the current tick's loads are queued: a callback scheduled with
``loop.call_soon`` runs after every callback that was ready when the batch opened, and it
re-schedules itself for as long as the previous hop added loads (tasks woken one or two hops
later, e.g. through ``asyncio.gather``, still get on the bus); it dispatches at the first hop
that added nothing. With ``window=0.005`` the batch waits that long instead (or until it holds
``max_batch_size`` keys). A dispatched queue longer than ``max_batch_size`` is split into chunks,
each its own call to the batch function, run concurrently.

The hot path is ``load``: one dict lookup (cached, queued or in flight: one dict says which),
one future and two list appends. No Task is created per load; one Task schedules and runs each
batch. Every call to ``load`` gets its own future, even for a key already queued or cached, so
that cancelling one waiting task cancels only that task's future and never the batch or another
task waiting for the same key.

Nothing is bound to an event loop at construction: ``load`` uses the running loop, so a loader
can be created at import time or in a thread and used later inside ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
from asyncio import AbstractEventLoop, Future, Task
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeAlias, TypeVar

from pgpilot.batch.errors import BatchLoadError, BatchResultError
from pgpilot.batch.stats import LoaderStats

K = TypeVar("K")
V = TypeVar("V")

# What a batch function may return: values aligned with its keys, or a mapping key -> value
# (a key missing from the mapping loads as None). An Exception instance as a value fails that
# key's load only.
BatchResult: TypeAlias = Sequence[V | Exception] | Mapping[K, V | Exception]
AsyncBatchFn: TypeAlias = Callable[[list[K]], Awaitable[BatchResult[K, V]]]

# How many call_soon hops a batch may wait for stragglers before it is dispatched regardless:
# enough for loads made behind several layers of gather/callbacks, bounded so that a program
# that loads something on every iteration of the loop still gets its batches.
_MAX_HOPS = 16

# Mark the state of a cache entry (see DataLoader._entries).
_WAITING: Any = object()
_LOADED: Any = object()
_get_running_loop = asyncio.get_running_loop
# The C future class, called directly: loop.create_future() is a Python-level method on the
# default loop that does exactly this, and a frame per load is measurable.
_new_future = asyncio.Future


def _callable_name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))


def result_values(result: object, keys: Sequence[Any], loader: str) -> Sequence[Any]:
    """The batch function's result as values aligned with ``keys``, or raise BatchResultError."""
    if type(result) is list:  # the common case, without the ABC isinstance checks
        if len(result) == len(keys):
            return result
    elif isinstance(result, Mapping):
        get = result.get
        return [get(key) for key in keys]
    if isinstance(result, Sequence) and not isinstance(result, str | bytes):
        if len(result) != len(keys):
            raise BatchResultError(
                f"batch function of {loader} returned {len(result)} values for {len(keys)} keys"
                " (a sequence must be aligned with the keys; return a mapping to omit keys)",
                loader=loader,
                keys=keys,
            )
        return result
    raise BatchResultError(
        f"batch function of {loader} returned {type(result).__name__}, expected a sequence"
        " aligned with the keys or a mapping key -> value",
        loader=loader,
        keys=keys,
    )


class AsyncBatcher(Generic[K, V]):
    """Queue, scheduling, dispatch and resolution shared by DataLoader and BatchExecutor.

    The queue is two parallel lists: the keys to send, and for each key the list of futures
    waiting for its value (one per ``load`` call). Subclasses decide what enters the queue.
    """

    __slots__ = (
        "_batch_fn",
        "_flush_at",
        "_max_batch_size",
        "_max_wait",
        "_n_batches",
        "_n_keys",
        "_n_shared",
        "_opened_at",
        "_queue_entries",
        "_queue_keys",
        "_running",
        "_timer",
        "_window",
        "name",
    )

    _kind = "batcher"

    def __init__(
        self,
        batch_fn: AsyncBatchFn[K, V],
        *,
        max_batch_size: int | None = None,
        window: float | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(batch_fn):
            raise TypeError(f"batch_fn must be callable, got {batch_fn!r}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        if window is not None and window < 0:
            raise ValueError(f"window must be >= 0 seconds or None, got {window}")
        self._batch_fn = batch_fn
        self.name = name or _callable_name(batch_fn)
        self._max_batch_size = max_batch_size or 0
        self._window = window
        # With a window, a full batch leaves at once rather than waiting out the window. A
        # tick batch is dispatched within microseconds anyway and split into chunks then.
        self._flush_at = max_batch_size if (window is not None and max_batch_size) else 0
        self._queue_keys: list[K] = []
        self._queue_entries: list[list[Future[V]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._opened_at = 0.0
        # asyncio keeps only weak references to tasks: hold the running batches here.
        self._running: set[Task[None]] = set()
        self._n_batches = 0
        self._n_keys = 0
        self._n_shared = 0  # loads that joined a key already queued or in flight
        self._max_wait = 0.0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} queued={len(self._queue_keys)}>"

    @property
    def label(self) -> str:
        return f"{type(self).__name__} {self.name!r}"

    # -- scheduling ---------------------------------------------------------------------------

    def _open_batch(self, loop: AbstractEventLoop) -> None:
        self._opened_at = loop.time()
        if self._window is None:
            self._track(loop.create_task(self._dispatch_after_tick(loop)))
        else:
            self._timer = loop.call_later(self._window, self._flush, loop)

    async def _dispatch_after_tick(self, loop: AbstractEventLoop) -> None:
        """Run the open batch once a whole loop iteration has passed without new loads.

        This task's first step comes one iteration after the batch opened, so every callback
        that was ready then has run; it then yields one more iteration (the loads of tasks
        woken by those callbacks, e.g. through gather) and again for as long as the previous
        iteration added loads. The first chunk runs in this task; no second task is needed.
        """
        queued = len(self._queue_keys)
        try:
            for _ in range(_MAX_HOPS):
                await asyncio.sleep(0)
                now = len(self._queue_keys)
                if now == queued:
                    break
                queued = now
        except asyncio.CancelledError:
            # Cancelled before dispatch (e.g. asyncio.run() ending): cancel the queued loads
            # and leave an empty queue, so that the next load, maybe in another loop, opens a
            # new batch instead of joining one that will never run.
            keys, entries = self._queue_keys, self._queue_entries
            self._queue_keys, self._queue_entries = [], []
            self._after_flush()
            self._cancel(keys, entries)
            raise
        chunks = self._take_queue(loop)
        if not chunks:
            return
        for keys, entries in chunks[1:]:
            self._start(loop, keys, entries)
        keys, entries = chunks[0]
        await self._run(keys, entries)

    def _flush(self, loop: AbstractEventLoop) -> None:
        """Dispatch everything queued now, each chunk in its own task."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for keys, entries in self._take_queue(loop):
            self._start(loop, keys, entries)

    def _take_queue(self, loop: AbstractEventLoop) -> list[tuple[list[K], list[list[Future[V]]]]]:
        """Empty the queue into chunks of at most max_batch_size keys, counted as batches."""
        keys = self._queue_keys
        if not keys:
            return []
        entries = self._queue_entries
        self._queue_keys = []
        self._queue_entries = []
        self._after_flush()
        waited = loop.time() - self._opened_at
        if waited > self._max_wait:
            self._max_wait = waited
        size = self._max_batch_size
        if size and len(keys) > size:
            chunks = [
                (keys[start : start + size], entries[start : start + size])
                for start in range(0, len(keys), size)
            ]
        else:
            chunks = [(keys, entries)]
        self._n_batches += len(chunks)
        self._n_keys += len(keys)
        return chunks

    def _start(
        self, loop: AbstractEventLoop, keys: list[K], entries: list[list[Future[V]]]
    ) -> None:
        self._track(loop.create_task(self._run(keys, entries)))

    def _track(self, task: Task[None]) -> None:
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _after_flush(self) -> None:
        """Hook: the queue was just handed to a batch."""

    def _forget(
        self, keys: list[K], entries: list[list[Future[V]]], values: Sequence[Any] | None
    ) -> None:
        """Hook: a batch finished (values is None when it failed as a whole)."""

    # -- running a batch ----------------------------------------------------------------------

    async def _run(self, keys: list[K], entries: list[list[Future[V]]]) -> None:
        try:
            result = await self._batch_fn(keys)
            values = result_values(result, keys, self.label)
        except asyncio.CancelledError:
            # The batch itself was cancelled (e.g. the loop is shutting down): its waiters
            # cannot get a value, so they are cancelled too rather than left hanging.
            self._cancel(keys, entries)
            raise
        except BatchResultError as exc:
            self._fail(keys, entries, exc, exc)
            return
        except Exception as exc:
            error = BatchLoadError(
                f"batch function of {self.label} raised {type(exc).__name__}: {exc}"
                f" (batch of {len(keys)} keys)",
                loader=self.label,
                keys=keys,
            )
            self._fail(keys, entries, error, exc)
            return
        self._resolve(keys, entries, values)

    def _cancel(self, keys: list[K], entries: list[list[Future[V]]]) -> None:
        """A batch that will never run or finish: forget its keys, cancel its waiters."""
        self._forget(keys, entries, None)
        for entry in entries:
            for future in entry:
                if future is not _WAITING:
                    future.cancel()

    def _resolve(
        self, keys: list[K], entries: list[list[Future[V]]], values: Sequence[Any]
    ) -> None:
        for entry, value in zip(entries, values, strict=True):
            _settle(entry, value)

    def _fail(
        self,
        keys: list[K],
        entries: list[list[Future[V]]],
        error: BatchLoadError,
        cause: BaseException,
    ) -> None:
        self._forget(keys, entries, None)
        first = True
        for entry in entries:
            for future in entry:
                if future is _WAITING or future.done():
                    continue
                # One instance per waiter: an exception raised in many tasks would otherwise
                # collect every task's traceback.
                exc = error if first else type(error)(str(error), loader=error.loader, keys=keys)
                first = False
                exc.__cause__ = cause
                future.set_exception(exc)

    # -- introspection ------------------------------------------------------------------------

    def _stats(self, cache_hits: int) -> LoaderStats:
        return LoaderStats(
            loads=self._n_keys + len(self._queue_keys) + self._n_shared + cache_hits,
            batches=self._n_batches,
            keys_dispatched=self._n_keys,
            cache_hits=cache_hits,
            max_wait_ms=self._max_wait * 1000.0,
        )

    @property
    def stats(self) -> LoaderStats:
        return self._stats(0)


class DataLoader(AsyncBatcher[K, V]):
    """Coalesce ``await loader.load(key)`` calls into calls of ``batch_fn(keys)``.

    ``batch_fn`` is an async function taking a list of distinct keys and returning either a
    sequence of values aligned with the keys or a mapping key -> value (a missing key loads as
    ``None``). An Exception instance as a value fails only that key's load. If the batch
    function raises, or returns a sequence of the wrong length, every load waiting on that batch
    fails with :class:`BatchLoadError` (or :class:`BatchResultError`) naming the loader.

    With ``cache=True`` (the default) a value, once loaded, is returned by later loads of the same
    key (as ``cache_key_fn(key)``) without a batch; failures are never cached. Keep one loader
    per request (see :func:`pgpilot.batch.request_scope`) so cached values do not outlive it.
    """

    __slots__ = ("_cache", "_cache_key_fn", "_entries", "_n_hits")

    _kind = "DataLoader"

    def __init__(
        self,
        batch_fn: AsyncBatchFn[K, V],
        max_batch_size: int | None = None,
        window: float | None = None,
        cache: bool = True,
        cache_key_fn: Callable[[K], Hashable] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(batch_fn, max_batch_size=max_batch_size, window=window, name=name)
        self._cache = cache
        self._cache_key_fn = cache_key_fn
        # One entry per cache key, a list that is either
        #   [future, _WAITING, future, ...]  the loads waiting for the key (queued or in
        #                                    flight; more loads of the key append), or
        #   [value, _LOADED]                 the cached value (cache=True only).
        # Two slots from the start so that caching is two item assignments, no resize.
        # The same list object sits in the queue and then in its batch, so resolving a batch
        # turns waiting entries into cached ones in place, without touching this dict. A key
        # whose entry is removed from the dict while in flight (clear) is therefore not cached.
        # Without a cache the dict only de-duplicates the queue and is replaced at each flush.
        self._entries: dict[Hashable, list[Any]] = {}
        self._n_hits = 0

    def load(self, key: K) -> Future[V]:
        """Return a future for the value of ``key``; await it (from the running event loop)."""
        future: Future[V] = _new_future(loop=_get_running_loop())
        cache_key: Hashable = key if self._cache_key_fn is None else self._cache_key_fn(key)  # type: ignore[assignment]
        entry = self._entries.get(cache_key)
        if entry is not None:
            if entry[1] is _LOADED:
                self._n_hits += 1
                future.set_result(entry[0])
            else:
                self._n_shared += 1
                entry.append(future)
            return future
        self._entries[cache_key] = entry = [future, _WAITING]
        keys = self._queue_keys
        keys.append(key)
        self._queue_entries.append(entry)
        queued = len(keys)
        if queued == 1:
            self._open_batch(future.get_loop())
        elif queued == self._flush_at:
            self._flush(future.get_loop())
        return future

    def load_many(self, keys: Iterable[K]) -> Awaitable[list[V]]:
        """Load every key (queued now, in one batch with the other loads of this tick).

        Awaiting the result gives the values in key order; if a load fails, the first failure
        is raised and the other loads of the call are cancelled or their errors consumed.
        """
        return _collect([self.load(key) for key in keys])

    def prime(self, key: K, value: V) -> None:
        """Put ``value`` in the cache for ``key`` unless the key is cached or being loaded.

        Does nothing with ``cache=False``. To replace a cached value, ``clear`` it first.
        """
        if self._cache:
            self._entries.setdefault(self._cache_key(key), [value, _LOADED])

    def clear(self, key: K) -> None:
        """Forget the cached value of ``key``: the next load fetches it again.

        A load of it already in flight still answers the loads waiting for it, but its value is
        not cached, and loads made after ``clear`` do not join it.
        """
        cache_key = self._cache_key(key)
        entry = self._entries.get(cache_key)
        if entry is not None and not any(queued is entry for queued in self._queue_entries):
            del self._entries[cache_key]

    def clear_all(self) -> None:
        """Forget every cached value (loads in flight are detached as with ``clear``)."""
        queued = {id(entry) for entry in self._queue_entries}
        self._entries = {k: e for k, e in self._entries.items() if id(e) in queued}

    @property
    def stats(self) -> LoaderStats:
        return self._stats(self._n_hits)

    def _cache_key(self, key: K) -> Hashable:
        return key if self._cache_key_fn is None else self._cache_key_fn(key)  # type: ignore[return-value]

    def _after_flush(self) -> None:
        if not self._cache:
            # Without a cache, a key is shared only while it waits in the same queue.
            self._entries = {}

    def _forget(
        self, keys: list[K], entries: list[list[Future[V]]], values: Sequence[Any] | None
    ) -> None:
        """Drop the entries of a failed batch, so that the next loads retry."""
        if not self._cache:
            return
        current = self._entries
        key_fn = self._cache_key_fn
        for key, entry in zip(keys, entries, strict=True):
            cache_key: Hashable = key if key_fn is None else key_fn(key)  # type: ignore[assignment]
            if current.get(cache_key) is entry:
                del current[cache_key]

    def _resolve(
        self, keys: list[K], entries: list[list[Future[V]]], values: Sequence[Any]
    ) -> None:
        if not self._cache:
            for entry, value in zip(entries, values, strict=True):
                _settle(entry, value)
            return
        # The hot loop, once per key of every batch: settle the waiters, then turn the entry
        # into a cached one in place. Lengths were checked by result_values.
        for key, entry, value in zip(keys, entries, values, strict=False):
            if isinstance(value, Exception):
                _settle(entry, value)
                self._forget([key], [entry], None)  # failures are not cached: loads retry
                continue
            first = entry[0]
            if not first.done():  # done: its task was cancelled while waiting
                first.set_result(value)
            if len(entry) > 2:  # more loads of the key joined
                for future in entry[2:]:
                    if not future.done():
                        future.set_result(value)
                del entry[2:]
            entry[0] = value
            entry[1] = _LOADED


def _settle(entry: list[Future[Any]], value: Any) -> None:
    """Give ``value`` (or raise it, if it is an Exception) to every future still waiting."""
    if isinstance(value, Exception):
        for future in entry:
            if future is not _WAITING and not future.done():
                future.set_exception(value)
    else:
        for future in entry:
            # A done future is one whose task was cancelled while waiting.
            if future is not _WAITING and not future.done():
                future.set_result(value)


async def _collect(futures: list[Future[V]]) -> list[V]:
    try:
        return [await future for future in futures]
    except BaseException:
        for future in futures:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # mark retrieved: asyncio would log it as never retrieved
        raise
