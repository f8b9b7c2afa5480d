"""SyncDataLoader: the DataLoader for threads and for plain synchronous code.

``load(key)`` never blocks: it queues the key and returns a :class:`LoadHandle`. The batch runs
when someone needs a value or asks for it:

- **Deferred style** (one thread): queue loads, then ``dispatch()`` runs the queued batch (the
  classic enqueue-then-flush pattern); or call ``handle.result()``, which dispatches the batch
  its key is in if nobody has yet.
- **Threads**: with ``window=0.005``, the first thread to need a value waits until the batch is
  5 ms old (or full at ``max_batch_size``), so loads from other threads arriving meanwhile join
  it; then that thread runs the batch function for everyone, and the others wake with their
  values. No background thread: the batch runs in a thread that was waiting anyway.

The loader's state is guarded by one lock; the batch function itself runs outside it, so loads
keep queueing (into the next batch) while a batch is running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from enum import Enum
from typing import Any, Generic, TypeAlias, TypeVar

from pgpilot.batch.errors import BatchLoadError, BatchResultError
from pgpilot.batch.loader import BatchResult, result_values
from pgpilot.batch.stats import LoaderStats

K = TypeVar("K")
V = TypeVar("V")

SyncBatchFn: TypeAlias = Callable[[list[K]], BatchResult[K, V]]


class _State(Enum):
    OPEN = "open"  # accepting keys
    SEALED = "sealed"  # full: waiting for a thread to run it
    RUNNING = "running"
    DONE = "done"


class _Batch:
    __slots__ = ("handles", "keys", "opened_at", "state")

    def __init__(self, opened_at: float) -> None:
        self.keys: list[Any] = []
        self.handles: list[LoadHandle[Any]] = []
        self.opened_at = opened_at
        self.state = _State.OPEN


class LoadHandle(Generic[V]):
    """A value that a SyncDataLoader will load: ``result()`` gives it (or raises its error)."""

    __slots__ = ("_batch", "_done", "_error", "_loader", "_value")

    def __init__(self, loader: SyncDataLoader[Any, V], batch: _Batch | None) -> None:
        self._loader = loader
        self._batch = batch
        self._done = False
        self._value: V | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done

    def result(self, timeout: float | None = None) -> V:
        """The loaded value, running or waiting for its batch as needed.

        Raises the key's exception, BatchLoadError if the whole batch failed, or TimeoutError
        if the value is not there within ``timeout`` seconds.
        """
        if not self._done:
            self._loader._wait_for(self, timeout)
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return f"<LoadHandle {state}>"


class ManyHandle(Generic[V]):
    """The handles of one ``load_many`` call; ``result()`` gives the values in key order."""

    __slots__ = ("handles",)

    def __init__(self, handles: list[LoadHandle[V]]) -> None:
        self.handles = handles

    def done(self) -> bool:
        return all(handle.done() for handle in self.handles)

    def result(self, timeout: float | None = None) -> list[V]:
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for handle in self.handles:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(handle.result(left))
        return values


class SyncDataLoader(Generic[K, V]):
    """Coalesce ``loader.load(key)`` calls, from one thread or many, into ``batch_fn(keys)``.

    Same contract as :class:`pgpilot.batch.DataLoader` except that ``batch_fn`` is a plain
    function and ``load`` returns a :class:`LoadHandle`. Thread-safe.
    """

    def __init__(
        self,
        batch_fn: SyncBatchFn[K, V],
        max_batch_size: int | None = None,
        window: float | None = None,
        cache: bool = True,
        cache_key_fn: Callable[[K], Hashable] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        if not callable(batch_fn):
            raise TypeError(f"batch_fn must be callable, got {batch_fn!r}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        if window is not None and window < 0:
            raise ValueError(f"window must be >= 0 seconds or None, got {window}")
        self._batch_fn = batch_fn
        self.name = name or str(getattr(batch_fn, "__qualname__", None) or repr(batch_fn))
        self._max_batch_size = max_batch_size or 0
        self._window = window or 0.0
        self._cache = cache
        self._cache_key_fn = cache_key_fn
        self._cond = threading.Condition(threading.Lock())
        self._open: _Batch | None = None
        self._queued: list[_Batch] = []  # open or sealed, not yet running, oldest first
        self._values: dict[Hashable, V] = {}
        # Handle of each key queued or (with cache=True) running, by cache key; identity says
        # whether it is still current (clear() detaches running ones).
        self._waiting: dict[Hashable, LoadHandle[V]] = {}
        self._n_loads = 0
        self._n_hits = 0
        self._n_batches = 0
        self._n_keys = 0
        self._max_wait = 0.0

    @property
    def label(self) -> str:
        return f"SyncDataLoader {self.name!r}"

    def __repr__(self) -> str:
        return f"<{self.label} queued={sum(len(b.keys) for b in self._queued)}>"

    def _cache_key(self, key: K) -> Hashable:
        return key if self._cache_key_fn is None else self._cache_key_fn(key)  # type: ignore[return-value]

    # -- loading ------------------------------------------------------------------------------

    def load(self, key: K) -> LoadHandle[V]:
        """Queue ``key`` (unless cached or already queued) and return its handle."""
        cache_key = self._cache_key(key)
        with self._cond:
            self._n_loads += 1
            if cache_key in self._values:
                self._n_hits += 1
                handle = LoadHandle(self, None)
                handle._value = self._values[cache_key]
                handle._done = True
                return handle
            existing = self._waiting.get(cache_key)
            if existing is not None:
                return existing
            batch = self._open
            if batch is None:
                batch = self._open = _Batch(time.monotonic())
                self._queued.append(batch)
            handle = LoadHandle(self, batch)
            batch.keys.append(key)
            batch.handles.append(handle)
            self._waiting[cache_key] = handle
            if self._max_batch_size and len(batch.keys) >= self._max_batch_size:
                batch.state = _State.SEALED
                self._open = None
                self._cond.notify_all()  # a thread waiting out the window can go now
            return handle

    def load_many(self, keys: Iterable[K]) -> ManyHandle[V]:
        return ManyHandle([self.load(key) for key in keys])

    def dispatch(self) -> int:
        """Run every queued batch now, in this thread; return how many batch calls were made."""
        with self._cond:
            batches = self._queued
            self._queued = []
            self._open = None
            for batch in batches:
                self._take(batch)
        for batch in batches:
            self._run(batch)
        return len(batches)

    # -- cache --------------------------------------------------------------------------------

    def prime(self, key: K, value: V) -> None:
        """Cache ``value`` for ``key`` unless a value is cached already (no-op if cache=False)."""
        if not self._cache:
            return
        cache_key = self._cache_key(key)
        with self._cond:
            self._values.setdefault(cache_key, value)

    def clear(self, key: K) -> None:
        """Forget the cached value of ``key``; a load of it already running is not cached."""
        cache_key = self._cache_key(key)
        with self._cond:
            self._values.pop(cache_key, None)
            handle = self._waiting.get(cache_key)
            batch = None if handle is None else handle._batch
            if batch is not None and batch.state is _State.RUNNING:
                del self._waiting[cache_key]

    def clear_all(self) -> None:
        with self._cond:
            self._values.clear()
            self._waiting = {
                k: h
                for k, h in self._waiting.items()
                if h._batch is not None and h._batch.state is not _State.RUNNING
            }

    @property
    def stats(self) -> LoaderStats:
        with self._cond:
            return LoaderStats(
                loads=self._n_loads,
                batches=self._n_batches,
                keys_dispatched=self._n_keys,
                cache_hits=self._n_hits,
                max_wait_ms=self._max_wait * 1000.0,
            )

    # -- running batches ----------------------------------------------------------------------

    def _take(self, batch: _Batch) -> None:
        """Mark ``batch`` as running (lock held)."""
        if self._open is batch:
            self._open = None
        if batch in self._queued:
            self._queued.remove(batch)
        batch.state = _State.RUNNING
        if not self._cache:
            for key in batch.keys:
                cache_key = self._cache_key(key)
                if self._waiting.get(cache_key) is not None:
                    del self._waiting[cache_key]
        self._n_batches += 1
        self._n_keys += len(batch.keys)
        self._max_wait = max(self._max_wait, time.monotonic() - batch.opened_at)

    def _wait_for(self, handle: LoadHandle[V], timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not handle._done:
                batch = handle._batch
                assert batch is not None  # a handle without a batch is born done
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise TimeoutError(f"{self.label}: no value within {timeout} s")
                if batch.state is _State.OPEN and now < batch.opened_at + self._window:
                    # Let loads from other threads join until the window closes (or the batch
                    # fills up, which notifies).
                    wake = batch.opened_at + self._window
                    self._cond.wait(wake - now if deadline is None else min(wake, deadline) - now)
                elif batch.state in (_State.OPEN, _State.SEALED):
                    self._take(batch)
                    break
                else:  # running in another thread
                    self._cond.wait(None if deadline is None else deadline - now)
            else:
                return
        self._run(batch)

    def _run(self, batch: _Batch) -> None:
        keys = batch.keys
        values: Sequence[Any] | None = None
        error: BatchLoadError | None = None
        cause: BaseException | None = None
        try:
            values = result_values(self._batch_fn(keys), keys, self.label)
        except BatchResultError as exc:
            error, cause = exc, exc
        except Exception as exc:
            error = BatchLoadError(
                f"batch function of {self.label} raised {type(exc).__name__}: {exc}"
                f" (batch of {len(keys)} keys)",
                loader=self.label,
                keys=keys,
            )
            cause = exc
        except BaseException as exc:  # KeyboardInterrupt etc.: waiters must not hang
            error = BatchLoadError(
                f"batch of {self.label} interrupted", loader=self.label, keys=keys
            )
            self._settle(batch, None, error, exc)
            raise
        self._settle(batch, values, error, cause)

    def _settle(
        self,
        batch: _Batch,
        values: Sequence[Any] | None,
        error: BatchLoadError | None,
        cause: BaseException | None,
    ) -> None:
        with self._cond:
            for index, (key, handle) in enumerate(zip(batch.keys, batch.handles, strict=True)):
                cache_key = self._cache_key(key)
                current = self._waiting.get(cache_key) is handle
                if current:
                    del self._waiting[cache_key]
                if values is None:
                    assert error is not None
                    # One instance per handle: threads re-raising one object would tangle
                    # their tracebacks.
                    exc = type(error)(str(error), loader=error.loader, keys=error.keys)
                    exc.__cause__ = cause
                    handle._error = exc
                else:
                    value = values[index]
                    if isinstance(value, Exception):
                        handle._error = value
                    else:
                        handle._value = value
                        if current and self._cache:
                            self._values[cache_key] = value
                handle._done = True
            batch.state = _State.DONE
            self._cond.notify_all()
