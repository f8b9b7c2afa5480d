"""The pooler with real clients: psycopg (sync, async), asyncpg, psql, pgbench; all three modes."""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import psycopg
import pytest
from tests.proxy.conftest import RunningProxy


@pytest.mark.parametrize("mode", ["session", "transaction", "statement"])
def test_psycopg_sync_in_every_mode(proxy_factory, mode: str) -> None:
    proxy = proxy_factory(pool_mode=mode)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        assert conn.execute("select 40 + 2").fetchone() == (42,)
        assert conn.execute("select %s::text || 'b'", ["a"]).fetchone() == ("ab",)
        assert conn.info.parameter_status("server_version")
        assert conn.info.backend_pid != 0


async def test_psycopg_async_transactions(proxy: RunningProxy) -> None:
    async with await psycopg.AsyncConnection.connect(proxy.dsn(), prepare_threshold=None) \
            as conn, conn.transaction():
        await conn.execute("create temp table t (x int)")
        await conn.execute("insert into t values (1), (2)")
        cur = await conn.execute("select sum(x) from t")
        assert await cur.fetchone() == (3,)


async def test_asyncpg_simple_and_extended(proxy_factory) -> None:
    proxy = proxy_factory(pool_mode="session")
    conn = await asyncpg.connect(proxy.dsn())
    try:
        assert await conn.fetchval("select $1::int * 2", 21) == 42
        rows = await conn.fetch("select generate_series(1, 100) as n")
        assert [r["n"] for r in rows] == list(range(1, 101))
        await conn.execute("select 1; select 2")
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", ["session", "transaction", "statement"])
def test_psql(proxy_factory, mode: str) -> None:
    proxy = proxy_factory(pool_mode=mode)
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "postgres",
         "-d", "test", "-c", "select 'through ' || 'pgpilot'"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "through pgpilot"


@pytest.mark.parametrize("mode,protocol", [("transaction", "simple"),
                                           ("transaction", "extended"),
                                           ("statement", "simple"),
                                           ("session", "extended")])
def test_pgbench(proxy_factory, pgbench_db: str, mode: str, protocol: str) -> None:
    proxy = proxy_factory(pool_mode=mode, default_pool_size=4)
    args = ["pgbench", "-n", "-c", "12", "-j", "2", "-t", "50", "-M", protocol,
            "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "postgres", pgbench_db]
    if mode == "statement":
        args.insert(1, "-S")
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "number of transactions actually processed: 600/600" in out.stdout
    assert "number of failed transactions: 0" in out.stdout
    # Twelve clients went through at most four server connections.
    assert proxy.server_count() <= 4


async def test_many_clients_no_cross_talk(proxy_factory) -> None:
    """500 concurrent clients on a pool of 10: every result is the asking client's own."""
    proxy = proxy_factory(default_pool_size=10, max_client_conn=600)
    sem = asyncio.Semaphore(500)

    async def client(n: int) -> int:
        async with sem:
            conn = await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True,
                                                         prepare_threshold=None)
            try:
                ok = 0
                for i in range(5):
                    cur = await conn.execute("select %s::int, %s::text, pg_backend_pid()",
                                             [n, f"client-{n}-{i}"])
                    row = await cur.fetchone()
                    assert row is not None
                    assert row[0] == n and row[1] == f"client-{n}-{i}"
                    ok += 1
                async with conn.transaction():
                    await conn.execute("create temp table mine (v int) on commit drop")
                    await conn.execute("insert into mine values (%s)", [n])
                    cur = await conn.execute("select v from mine")
                    assert await cur.fetchall() == [(n,)]
                return ok
            finally:
                await conn.close()

    results = await asyncio.gather(*(client(n) for n in range(500)))
    assert results == [5] * 500
    assert proxy.server_count() <= 10
