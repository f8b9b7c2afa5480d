"""BatchExecutor: DataLoader-style coalescing for any bulk backend, without a cache.

Where a DataLoader loads values by key (cached, each key fetched once), a BatchExecutor sends
items: ``await executor.submit(item)`` from many tasks becomes one ``bulk_fn(items)`` call per
tick (or per ``window``), in chunks of ``max_batch_size``. Items need not be hashable and are
not de-duplicated, so it also fits writes: Redis ``MSET``/pipelines, an HTTP bulk endpoint,
``executemany``. ``bulk_fn`` returns one result per item, in order (or a mapping item -> result
for hashable items); an Exception instance as a result fails that item's submit only.

Scheduling, chunking, error reporting and cancellation are the DataLoader's (same code).

    r = redis.asyncio.Redis()
    async def mget(keys: list[str]) -> list[bytes | None]:
        return await r.mget(keys)
    get = BatchExecutor(mget, max_batch_size=500)
    values = await asyncio.gather(*(get.submit(f"user:{i}") for i in range(1000)))  # 2 MGETs
"""

from __future__ import annotations

from asyncio import Future, get_running_loop
from collections.abc import Awaitable, Iterable
from typing import TypeVar

from pgpilot.batch.loader import AsyncBatcher, _collect

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")


class BatchExecutor(AsyncBatcher[I, R]):
    """Coalesce ``await executor.submit(item)`` calls into ``bulk_fn(items)`` calls."""

    __slots__ = ()

    _kind = "BatchExecutor"

    def submit(self, item: I) -> Future[R]:
        """Queue ``item``; the future gets its result when its batch has run."""
        future: Future[R] = get_running_loop().create_future()
        items = self._queue_keys
        items.append(item)
        self._queue_entries.append([future])
        queued = len(items)
        if queued == 1:
            self._open_batch(future.get_loop())
        elif queued == self._flush_at:
            self._flush(future.get_loop())
        return future

    def submit_many(self, items: Iterable[I]) -> Awaitable[list[R]]:
        """Submit every item now; awaiting gives their results in order."""
        return _collect([self.submit(item) for item in items])
