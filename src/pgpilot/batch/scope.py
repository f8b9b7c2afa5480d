"""Per-request loaders: ``request_scope()`` gives each request its own set, via contextvars.

A loader caches what it loaded, so one shared across requests would serve one user's data to
another and grow forever. Inside ``with request_scope():`` each loader factory produces one
loader, reused by everything that runs in that request (including tasks it starts, which copy
the context), and dropped when the scope ends.

    def users_loader() -> DataLoader[int, User]:
        return DataLoader(fetch_users)

    async def handle(request):
        with request_scope():
            ...
            user = await scoped(users_loader).load(42)   # anywhere below, same loader
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")


class RequestScope:
    """The loaders of one request, one per factory, created on first use."""

    __slots__ = ("_instances",)

    def __init__(self) -> None:
        self._instances: dict[Callable[[], Any], Any] = {}

    def get(self, factory: Callable[[], T]) -> T:
        """The scope's instance made by ``factory``, creating it on first use."""
        try:
            instance: T = self._instances[factory]
        except KeyError:
            instance = self._instances[factory] = factory()
        return instance

    def __len__(self) -> int:
        return len(self._instances)


_current: ContextVar[RequestScope | None] = ContextVar("pgpilot_batch_scope", default=None)


@contextmanager
def request_scope() -> Iterator[RequestScope]:
    """Open a fresh scope for the duration of the ``with`` block (scopes nest)."""
    scope = RequestScope()
    token = _current.set(scope)
    try:
        yield scope
    finally:
        _current.reset(token)


def current_scope() -> RequestScope:
    """The innermost open scope; LookupError outside any ``request_scope()``."""
    scope = _current.get()
    if scope is None:
        raise LookupError(
            "no pgpilot.batch.request_scope() is open: wrap the request handler in"
            " `with request_scope():` so that loaders are not shared across requests"
        )
    return scope


def scoped(factory: Callable[[], T]) -> T:
    """``current_scope().get(factory)``: this request's instance made by ``factory``."""
    return current_scope().get(factory)
