"""pgpilot.orm.RoutingSession / AsyncRoutingSession on real streaming replication (the
``replication_cluster`` test bed): where each kind of statement runs, read-your-writes by LSN
(per session and across requests by token), health, lag bounds, load balancing, and 1,000
write-then-read iterations by 50 concurrent clients under injected lag.

Where a statement ran is read from the server that ran it (``pg_is_in_recovery()``, the
replica's port), and staleness from the rows it returned; no test asserts a time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pgpilot.orm import AsyncRoutingSession, ReplicaRouter, RoutingSession
from pgpilot.testbed import ReplicationCluster

WHERE = text("SELECT inet_server_port()")


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "routing_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


def _url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


@pytest.fixture
def cluster(replication_cluster: ReplicationCluster) -> ReplicationCluster:
    c = replication_cluster
    c.execute(c.primary_name, "DROP TABLE IF EXISTS routing_notes")
    c.execute(c.primary_name, "CREATE TABLE routing_notes (id serial PRIMARY KEY, body text)")
    c.execute(c.primary_name, "CREATE OR REPLACE FUNCTION routing_touch() RETURNS int "
              "LANGUAGE sql VOLATILE AS 'SELECT 1'")
    c.wait_caught_up()
    return c


@pytest.fixture
def engines(cluster: ReplicationCluster) -> Iterator[tuple[Engine, list[Engine]]]:
    primary = create_engine(_url(cluster.primary_dsn, "psycopg"), pool_size=60)
    replicas = [create_engine(_url(d, "psycopg"), pool_size=60) for d in cluster.replica_dsns]
    yield primary, replicas
    for engine in (primary, *replicas):
        for router in engine.__dict__.get("_pgpilot_routers", ()):
            router.close()
        engine.dispose()


def _ports(cluster: ReplicationCluster) -> tuple[int, set[int]]:
    return cluster.port(cluster.primary_name), {cluster.port(n) for n in cluster.replica_names}


def test_reads_go_to_replicas_and_writes_to_the_primary(
        cluster: ReplicationCluster, engines: tuple[Engine, list[Engine]]) -> None:
    primary, replicas = engines
    primary_port, replica_ports = _ports(cluster)
    with RoutingSession(primary=primary, replicas=replicas) as s:
        assert s.execute(WHERE).scalar() in replica_ports
        assert s.execute(select(Note)).all() == []
        assert s.execute(text("SELECT now(), lower('A')")).one()[1] == "a"
        assert s.execute(WHERE).scalar() in replica_ports  # same transaction, same replica
        s.rollback()
        # writes, locks, volatile functions not allowlisted: the primary
        s.add(Note(body="x"))
        s.flush()
        assert s.execute(WHERE).scalar() == primary_port  # after a write, the transaction
        s.commit()                                         # reads its own writes: primary
        assert s.execute(select(Note).with_for_update()).scalars().one().body == "x"
        assert s.execute(WHERE).scalar() == primary_port
        s.commit()
        assert s.execute(select(func.routing_touch())).scalar() == 1
        assert s.execute(WHERE).scalar() == primary_port
        s.commit()
        assert s.execute(text("SELECT nextval('routing_notes_id_seq')")).scalar() == 2
        s.commit()
        s.execute(insert(Note).values(body="core"))
        s.commit()
        with s.primary():
            assert s.execute(WHERE).scalar() == primary_port
        s.commit()
        s.execute(text("/* pgpilot:primary */ SELECT 1"))
        assert s.execute(WHERE).scalar() == primary_port
        s.commit()
        cluster.wait_caught_up()
        s.router.check()  # the replicas' replay positions now reach the session's writes
        assert s.execute(WHERE).scalar() in replica_ports  # a read-only transaction again
    assert primary.url.port == primary_port


def test_user_function_allowlisted_runs_on_a_replica(
        cluster: ReplicationCluster, engines: tuple[Engine, list[Engine]]) -> None:
    primary, replicas = engines
    _, replica_ports = _ports(cluster)
    with RoutingSession(primary=primary, replicas=replicas,
                        router_options={"safe_functions": ["routing_touch"]}) as s:
        row = s.execute(select(func.routing_touch(), func.inet_server_port())).one()
        assert row[0] == 1
        assert row[1] in replica_ports


def _paused(cluster: ReplicationCluster) -> None:
    for name in cluster.replica_names:
        cluster.pause_replay(name)


def test_read_your_writes_by_lsn(cluster: ReplicationCluster,
                                 engines: tuple[Engine, list[Engine]]) -> None:
    """Both replicas stop replaying: a session's read after its write goes to the primary and
    sees the row; without the LSN rule the same read goes to a replica and misses it."""
    primary, replicas = engines
    primary_port, replica_ports = _ports(cluster)
    _paused(cluster)
    with RoutingSession(primary=primary, replicas=replicas) as s:
        s.add(Note(body="mine"))
        s.commit()
        token = s.lsn_token
        assert token is not None
        assert s.execute(select(Note.body)).scalars().all() == ["mine"]
        assert s.execute(WHERE).scalar() == primary_port
    # the next request carries the token: fresh as well
    with RoutingSession(primary=primary, replicas=replicas, min_lsn=token) as s:
        assert s.execute(select(Note.body)).scalars().all() == ["mine"]
    # a request without the token reads a replica, which has not replayed the write
    with RoutingSession(primary=primary, replicas=replicas) as s:
        assert s.execute(WHERE).scalar() in replica_ports
        assert s.execute(select(Note.body)).scalars().all() == []
    off = ReplicaRouter(primary, replicas, read_your_writes=False)
    try:
        with RoutingSession(router=off) as s:
            s.add(Note(body="again"))
            s.commit()
            assert s.execute(select(Note.body)).scalars().all() == []  # stale, as it should be
    finally:
        off.close()
    for name in cluster.replica_names:
        cluster.resume_replay(name)
    cluster.wait_caught_up()
    off_router = ReplicaRouter.shared(primary, replicas)
    off_router.check()
    with RoutingSession(primary=primary, replicas=replicas, min_lsn=token) as s:
        assert s.execute(WHERE).scalar() in replica_ports  # caught up: replicas again
        assert sorted(s.execute(select(Note.body)).scalars()) == ["again", "mine"]


def test_stopped_replica_leaves_the_read_set_and_comes_back(
        cluster: ReplicationCluster, engines: tuple[Engine, list[Engine]]) -> None:
    primary, replicas = engines
    first, second = cluster.replica_names
    router = ReplicaRouter.shared(primary, replicas)
    router.start()
    cluster.stop_node(first)
    router.check()
    assert not router.replica_set.states["replica1"].up
    for _ in range(6):
        with RoutingSession(router=router) as s:
            assert s.execute(WHERE).scalar() == cluster.port(second)
    cluster.stop_node(second)
    router.check()
    with RoutingSession(router=router) as s:  # no replica: the primary
        assert s.execute(WHERE).scalar() == cluster.port(cluster.primary_name)
    cluster.start_node(first)
    cluster.start_node(second)
    cluster.wait_caught_up()
    router.check()
    seen = set()
    for _ in range(6):
        with RoutingSession(router=router) as s:
            seen.add(s.execute(WHERE).scalar())
    assert seen == {cluster.port(first), cluster.port(second)}


def test_lag_bound_and_least_outstanding(cluster: ReplicationCluster,
                                         engines: tuple[Engine, list[Engine]]) -> None:
    primary, replicas = engines
    first, second = cluster.replica_names
    router = ReplicaRouter(primary, replicas, max_lag_bytes=1024)
    try:
        router.check()
        # two open transactions at once go to the two replicas
        a, b = RoutingSession(router=router), RoutingSession(router=router)
        assert {a.execute(WHERE).scalar(), b.execute(WHERE).scalar()} == {
            cluster.port(first), cluster.port(second)}
        a.close()
        b.close()
        cluster.pause_replay(first)
        cluster.execute(cluster.primary_name,
                        "INSERT INTO routing_notes (body) SELECT repeat('x', 100) "
                        "FROM generate_series(1, 200)")
        cluster.wait_replayed(second, cluster.primary_lsn())
        router.check()
        assert router.replica_set.states["replica1"].lag_bytes > 1024
        for _ in range(4):
            with RoutingSession(router=router) as s:
                assert s.execute(WHERE).scalar() == cluster.port(second)
    finally:
        router.close()


def _stale_reads(cluster: ReplicationCluster, read_your_writes: bool, clients: int = 50,
                 iterations: int = 1000) -> tuple[int, dict[str, int]]:
    """``iterations`` write-then-read-back rounds by ``clients`` concurrent async sessions
    (asyncpg); the number of reads that missed their own write, and reads per target."""
    cluster.set_apply_delay(cluster.replica_names[0], 100)
    cluster.set_apply_delay(cluster.replica_names[1], 500)

    async def run() -> tuple[int, dict[str, int]]:
        primary = create_async_engine(_url(cluster.primary_dsn, "asyncpg"), pool_size=clients)
        replicas = [create_async_engine(_url(d, "asyncpg"), pool_size=clients)
                    for d in cluster.replica_dsns]
        router = ReplicaRouter(primary, replicas, read_your_writes=read_your_writes,
                               check_interval=0.05)
        router.start()
        stale = 0
        left = iterations

        async def client(n: int) -> None:
            nonlocal stale, left
            token: str | None = None
            while left > 0:
                left -= 1
                async with AsyncRoutingSession(router=router, min_lsn=token) as s:
                    body = f"c{n}-{left}"
                    s.add(Note(body=body))
                    await s.commit()
                    token = s.lsn_token
                    got = (await s.execute(select(Note.body).where(Note.body == body)
                                           )).scalars().all()
                    if got != [body]:
                        stale += 1

        try:
            await asyncio.gather(*(client(n) for n in range(clients)))
        finally:
            router.close()
            for engine in (primary, *replicas):
                await engine.dispose()
        return stale, dict(router.counts)

    return asyncio.run(run())


@pytest.mark.slow
def test_read_after_write_under_lag_never_stale_with_the_lsn_rule(
        cluster: ReplicationCluster) -> None:
    stale, counts = _stale_reads(cluster, read_your_writes=True)
    print(f"LSN rule on: {stale} stale reads; statements per target {counts}")
    assert stale == 0
    assert counts["primary"] >= 1000  # the writes, at least
    stale_without, counts = _stale_reads(cluster, read_your_writes=False, iterations=200)
    print(f"LSN rule off: {stale_without} stale reads of 200; statements per target {counts}")
    assert stale_without > 0  # the test bites: routing without the rule reads stale rows


async def test_async_session_routes_and_reads_its_writes(cluster: ReplicationCluster) -> None:
    primary_port, replica_ports = _ports(cluster)
    primary: AsyncEngine = create_async_engine(_url(cluster.primary_dsn, "asyncpg"))
    replicas = [create_async_engine(_url(d, "asyncpg")) for d in cluster.replica_dsns]
    router = ReplicaRouter(primary, replicas)
    try:
        await asyncio.to_thread(router.start)
        async with AsyncRoutingSession(router=router) as s:
            assert (await s.execute(WHERE)).scalar() in replica_ports
            assert s.replica in ("replica1", "replica2")
        await asyncio.to_thread(_paused, cluster)
        async with AsyncRoutingSession(router=router) as s:
            s.add(Note(body="async"))
            await s.commit()
            assert s.lsn_token is not None
            assert (await s.execute(select(Note.body))).scalars().all() == ["async"]
            assert (await s.execute(WHERE)).scalar() == primary_port
            with s.primary():
                assert (await s.execute(WHERE)).scalar() == primary_port
    finally:
        router.close()
        for engine in (primary, *replicas):
            await engine.dispose()


def test_sync_sessions_in_threads_read_their_writes(
        cluster: ReplicationCluster, engines: tuple[Engine, list[Engine]]) -> None:
    primary, replicas = engines
    cluster.set_apply_delay(cluster.replica_names[0], 300)
    cluster.set_apply_delay(cluster.replica_names[1], 300)
    stale: list[Any] = []

    def client(n: int) -> None:
        with RoutingSession(primary=primary, replicas=replicas) as s:
            for i in range(10):
                s.add(Note(body=f"t{n}-{i}"))
                s.commit()
                if s.execute(select(Note.id).where(Note.body == f"t{n}-{i}")).first() is None:
                    stale.append((n, i))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stale == []
