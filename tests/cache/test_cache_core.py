"""The cache's contract on both backends: keys, hits, invalidation, values, statistics."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import subprocess
import sys
import uuid
from collections.abc import Callable
from decimal import Decimal

import pytest

from pgpilot.cache import (
    Cache,
    MemoryBackend,
    MsgpackSerializer,
    RedisBackend,
    SerializationError,
    SignedPickleSerializer,
)
from pgpilot.cache.serialize import canonical_bytes

MakeCache = Callable[..., Cache]


def test_sync_function_is_called_once_per_distinct_arguments(make_cache: MakeCache) -> None:
    cache = make_cache()
    calls: list[tuple[int, bool]] = []

    @cache.cached(ttl=60)
    def profile(customer_id: int, full: bool = False) -> dict[str, object]:
        calls.append((customer_id, full))
        return {"id": customer_id, "full": full}

    assert profile(1) == {"id": 1, "full": False}
    assert profile(1) == {"id": 1, "full": False}
    assert profile(customer_id=1) == {"id": 1, "full": False}  # same key, defaults applied
    assert profile(1, False) == {"id": 1, "full": False}
    assert profile(1, full=True) == {"id": 1, "full": True}
    assert calls == [(1, False), (1, True)]
    stats = profile.stats()
    assert (stats.hits, stats.misses, stats.fills) == (3, 2, 2)
    assert cache.stats()[profile.name] == stats


def test_async_function_is_cached_and_shares_the_entry_with_its_arguments(
        make_cache: MakeCache) -> None:
    cache = make_cache()
    calls: list[int] = []

    @cache.cached(ttl=60)
    async def orders(customer_id: int) -> list[int]:
        calls.append(customer_id)
        await asyncio.sleep(0)
        return [customer_id * 10, customer_id * 10 + 1]

    async def main() -> None:
        assert await orders(4) == [40, 41]
        assert await orders(customer_id=4) == [40, 41]
        assert await orders.ainvalidate(4) is True
        assert await orders(4) == [40, 41]

    asyncio.run(main())
    assert asyncio.iscoroutinefunction(orders)
    assert calls == [4, 4]


def test_each_hit_returns_its_own_copy(make_cache: MakeCache) -> None:
    cache = make_cache()

    @cache.cached(ttl=60)
    def items() -> list[int]:
        return [1, 2]

    first = items()
    first.append(3)  # the caller's object, not the cache's
    assert items() == [1, 2]


def test_invalidate_drops_only_that_call(make_cache: MakeCache) -> None:
    cache = make_cache()
    calls: list[int] = []

    @cache.cached(ttl=60)
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    square(2), square(3)
    assert square.invalidate(2) is True
    assert square.invalidate(2) is False  # nothing left to drop
    square(2), square(3)
    assert calls == [2, 3, 2]


def test_invalidate_tags_drops_every_entry_with_the_tag_and_nothing_else(
        make_cache: MakeCache) -> None:
    cache = make_cache()
    calls: list[str] = []

    @cache.cached(ttl=60, tags=["customers"])
    def customer(n: int) -> str:
        calls.append(f"c{n}")
        return f"c{n}"

    @cache.cached(ttl=60, tags=lambda n: [f"order:{n}", "orders"])
    def order(n: int) -> str:
        calls.append(f"o{n}")
        return f"o{n}"

    for n in range(5):
        customer(n), order(n)
    assert cache.invalidate_tags("customers") == 5
    assert cache.invalidate_tags("order:3") == 1
    for n in range(5):
        customer(n), order(n)
    assert calls.count("c0") == 2 and calls.count("c4") == 2  # refilled
    assert calls.count("o3") == 2  # its own tag
    assert calls.count("o0") == 1 and calls.count("o4") == 1  # untouched: hits


def test_invalidation_reaches_a_cache_made_elsewhere_on_the_same_backend(
        make_cache: MakeCache) -> None:
    """Two Cache objects on one backend and namespace: two processes sharing a Redis."""
    here, there = make_cache(), make_cache()
    calls: list[str] = []

    def make(cache: Cache) -> Callable[[int], int]:
        @cache.cached(ttl=60, tags=["t"], name="shared.f")
        def f(n: int) -> int:
            calls.append(f"{cache is here}")
            return n

        return f

    f_here, f_there = make(here), make(there)
    f_here(1)
    f_there(1)  # a hit: the entry is shared
    assert calls == ["True"]
    there.invalidate_tags("t")
    f_here(1)
    assert calls == ["True", "True"]
    f_there.invalidate(1)  # type: ignore[attr-defined]
    f_here(1)
    assert calls == ["True", "True", "True"]


def test_clear_drops_the_namespace_only(make_cache: MakeCache) -> None:
    ours, other = make_cache(), make_cache(namespace=f"other-{uuid.uuid4().hex[:8]}")
    calls: list[str] = []

    @ours.cached(ttl=60)
    def a() -> int:
        calls.append("a")
        return 1

    @other.cached(ttl=60)
    def b() -> int:
        calls.append("b")
        return 2

    a(), b()
    assert ours.clear() >= 1
    a(), b()
    assert calls == ["a", "b", "a"]
    other.clear()


def test_version_changes_the_key_so_old_values_are_never_read(make_cache: MakeCache) -> None:
    v1, v2 = make_cache(version="1"), make_cache(version="2")

    @v1.cached(ttl=60, name="shape")
    def old() -> dict[str, int]:
        return {"a": 1}

    @v2.cached(ttl=60, name="shape")
    def new() -> dict[str, int]:
        return {"a": 1, "b": 2}

    assert old() == {"a": 1}
    assert new() == {"a": 1, "b": 2}
    assert old.key() != new.key()
    assert new.stats().misses == 1


def test_keys_follow_the_documented_layout_in_any_process(namespace: str) -> None:
    cache = Cache(MemoryBackend(), namespace=namespace)

    @cache.cached(name="shop.customer_profile")
    def profile(customer_id: int, full: bool = False) -> None:
        return None

    digest = hashlib.blake2b(canonical_bytes([42, False]), digest_size=16).hexdigest()
    assert profile.key(42) == f"pgc:{{{namespace}}}:e:1.1:shop.customer_profile:{digest}"
    # another interpreter (another hash seed) computes the same key from the same arguments
    code = (
        "from pgpilot.cache import Cache, MemoryBackend\n"
        f"c = Cache(MemoryBackend(), namespace={namespace!r}, follow_writes=False)\n"
        "@c.cached(name='shop.customer_profile')\n"
        "def profile(customer_id, full=False): pass\n"
        "print(profile.key(customer_id=42))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin"})
    assert out.stdout.strip() == profile.key(42)


def test_key_material_is_canonical_for_dicts_and_sets() -> None:
    assert canonical_bytes({"a": 1, "b": 2}) == canonical_bytes({"b": 2, "a": 1})
    assert canonical_bytes({3, 1, 2}) == canonical_bytes({2, 3, 1})
    assert canonical_bytes([1, "1"]) != canonical_bytes(["1", 1])


def test_methods_leave_self_out_of_the_key(make_cache: MakeCache) -> None:
    cache = make_cache()
    calls: list[int] = []

    class Repo:
        @cache.cached(ttl=60)
        def get(self, n: int) -> int:
            calls.append(n)
            return n + 1

    assert Repo().get(1) == 2
    assert Repo().get(1) == 2  # another instance, same key
    assert Repo().get.invalidate(1) is True
    assert Repo().get(1) == 2
    assert calls == [1, 1]


def test_arguments_that_cannot_be_keyed_call_the_function_uncached(
        make_cache: MakeCache) -> None:
    cache = make_cache()
    calls: list[object] = []

    @cache.cached(ttl=60)
    def f(thing: object) -> str:
        calls.append(thing)
        return "ok"

    marker = object()
    assert f(marker) == "ok" and f(marker) == "ok"
    assert len(calls) == 2
    assert f.stats().errors == 2


# ------------------------------------------------------------------------------ values

NOW = dt.datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
VALUES: list[object] = [
    None, True, 7, -2**63, 1.5, "text", b"\x00bytes",
    [1, [2, 3]], {"a": {"b": 1}}, {1: "int key"},
    (1, (2, "three")), {1, 2}, frozenset({"x"}),
    NOW, NOW.replace(tzinfo=None), NOW.date(), NOW.time(), dt.timedelta(days=-1, seconds=5),
    Decimal("12.50"), Decimal("NaN"), uuid.UUID("12345678-1234-5678-1234-567812345678"),
    ipaddress.ip_address("10.0.0.1"), ipaddress.ip_network("2001:db8::/32"),
]


@pytest.mark.parametrize("value", VALUES, ids=[type(v).__name__ + str(i)
                                               for i, v in enumerate(VALUES)])
def test_msgpack_round_trips_database_types_exactly(value: object) -> None:
    serializer = MsgpackSerializer()
    back = serializer.loads(serializer.dumps(value))
    if isinstance(value, Decimal) and value.is_nan():
        assert isinstance(back, Decimal) and back.is_nan()
        return
    assert back == value
    assert type(back) is type(value)


def test_msgpack_keeps_sqlalchemy_rows_as_rows_and_mappings_as_dicts() -> None:
    from sqlalchemy.engine.result import result_tuple

    row = result_tuple(["id", "total"])([1, Decimal("9.99")])
    serializer = MsgpackSerializer()
    back = serializer.loads(serializer.dumps([row, row._mapping]))
    assert back[0].id == 1 and back[0].total == Decimal("9.99")
    assert back[0]._fields == ("id", "total") and tuple(back[0]) == (1, Decimal("9.99"))
    assert back[1] == {"id": 1, "total": Decimal("9.99")}


def test_msgpack_refuses_objects_it_cannot_rebuild_without_running_code() -> None:
    class Custom:
        pass

    with pytest.raises(TypeError, match="Custom"):
        MsgpackSerializer().dumps({"x": Custom()})


def test_a_value_msgpack_cannot_hold_is_returned_but_not_cached(make_cache: MakeCache) -> None:
    cache = make_cache()
    calls: list[int] = []

    class Custom:
        pass

    @cache.cached(ttl=60)
    def f() -> Custom:
        calls.append(1)
        return Custom()

    assert isinstance(f(), Custom) and isinstance(f(), Custom)
    assert len(calls) == 2 and f.stats().errors == 2


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


def test_signed_pickle_stores_objects_and_refuses_tampered_bytes() -> None:
    serializer = SignedPickleSerializer(b"0123456789abcdef-secret")
    data = serializer.dumps(Point(3))
    assert serializer.loads(data).x == 3
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(SerializationError, match="signature"):
        serializer.loads(tampered)
    other_key = SignedPickleSerializer(b"another-key-of-16-bytes")
    with pytest.raises(SerializationError):
        other_key.loads(data)
    with pytest.raises(ValueError, match="16 bytes"):
        SignedPickleSerializer(b"short")


def test_a_forged_pickle_in_redis_is_never_loaded(redis_url: str, namespace: str) -> None:
    import pickle

    import redis

    cache = Cache(RedisBackend(redis_url), namespace=namespace,
                  serializer=SignedPickleSerializer(b"application-secret-key"))
    calls: list[int] = []

    @cache.cached(ttl=60)
    def f() -> Point:
        calls.append(1)
        return Point(1)

    assert f().x == 1
    # someone with write access to Redis replaces the entry with a pickle that runs code
    raw = redis.Redis.from_url(redis_url)
    stored = raw.get(f.key())
    assert stored is not None
    evil = pickle.dumps(Point(666))
    raw.set(f.key(), stored[:13] + b"\x00" * 32 + evil)
    assert f().x == 1  # not the forged value: a miss, the function ran again
    assert len(calls) == 2 and f.stats().errors >= 1
    raw.close()
    cache.clear()


def test_memory_backend_is_an_lru_with_a_size_bound(namespace: str) -> None:
    backend = MemoryBackend(max_entries=3)
    cache = Cache(backend, namespace=namespace)
    calls: list[int] = []

    @cache.cached(ttl=60)
    def f(n: int) -> int:
        calls.append(n)
        return n

    for n in (1, 2, 3):
        f(n)
    f(1)  # 1 is now the most recently used
    f(4)  # evicts 2, the least recently used
    assert len(backend) == 3
    f(1), f(3), f(4)
    assert calls == [1, 2, 3, 4]
    f(2)
    assert calls == [1, 2, 3, 4, 2]
    assert f.stats().evictions == 2  # 2, then 1 (or 3) to make room for 2 again


def test_memory_backend_bounds_bytes_too(namespace: str) -> None:
    backend = MemoryBackend(max_entries=100, max_bytes=2_000)
    cache = Cache(backend, namespace=namespace)

    @cache.cached(ttl=60)
    def blob(n: int) -> bytes:
        return bytes(500)

    for n in range(10):
        blob(n)
    assert len(backend) <= 4
    assert blob.stats().evictions >= 6


def test_entries_expire_after_their_ttl(make_cache: MakeCache) -> None:
    cache = make_cache()
    calls: list[int] = []

    @cache.cached(ttl=0.05)
    def f() -> int:
        calls.append(1)
        return len(calls)

    assert f() == 1
    deadline = 200
    while f() == 1 and deadline:
        deadline -= 1
        import time

        time.sleep(0.01)
    assert f() == 2 and len(calls) == 2
