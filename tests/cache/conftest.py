"""Fixtures of the cache tests: a backend of each kind (the real Redis, and in-process), each
test in a namespace of its own, and redis-servers a test can stop, pause or cluster."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from tests.conftest import EphemeralRedis

from pgpilot.cache import Cache, MemoryBackend, RedisBackend


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["memory", "redis"])
def make_cache(request: pytest.FixtureRequest, namespace: str) -> Iterator[Callable[..., Cache]]:
    """``make_cache(**options)``: a Cache on the parameter's backend, in this test's namespace
    (the same backend object for every call of one test, as processes share one Redis)."""
    if request.param == "redis":
        backend: MemoryBackend | RedisBackend = RedisBackend(
            request.getfixturevalue("redis_url"), timeout=2.0)
    else:
        backend = MemoryBackend()
    made: list[Cache] = []

    def make(**options: object) -> Cache:
        options.setdefault("namespace", namespace)
        cache = Cache(backend, **options)  # type: ignore[arg-type]
        made.append(cache)
        return cache

    yield make
    if made:
        made[0].clear()
    if isinstance(backend, RedisBackend):
        backend.close()


@pytest.fixture
def redis_server() -> Iterator[Callable[..., EphemeralRedis]]:
    """``redis_server(*args)``: start a redis-server of this test's own (stopped at the end)."""
    started: list[EphemeralRedis] = []

    def start(*args: str) -> EphemeralRedis:
        try:
            server = EphemeralRedis(*args).start()
        except (OSError, RuntimeError) as exc:
            from tests.conftest import service_missing

            service_missing(f"redis-server ({exc})")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
