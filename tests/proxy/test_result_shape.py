"""A shared prepared statement parsed again on another server after a schema change.

The pooler prepares a client's statement on whichever server runs it. After an ``ALTER TABLE
... ALTER COLUMN ... TYPE``, a copy parsed on a server that lacked the statement returns the new
column types, while the client still decodes with the types it was told when it described the
statement: wrong data, where a direct connection gets ``0A000 cached plan must not change result
type`` and the driver prepares again. These tests make the statement's next run land on a new
server (the old one closed) and check that the client gets PostgreSQL's error and recovers as
directly, with the compiled fast path on and off, with asyncpg and psycopg.
"""

from __future__ import annotations

import asyncio
import socket
import time

import asyncpg
import psycopg
import pytest
from tests.proxy.conftest import RunningProxy, read_types
from tests.proxy.test_fastpath_prepared import read_answers

from pgpilot.proxy import fastpath
from pgpilot.wire import messages as m

FAST_PATHS = ["on", "off"]


def close_idle_servers(proxy: RunningProxy) -> None:
    """Close every idle server of the pooler, so that the next transaction gets a new one,
    which has none of the statements prepared so far."""
    with psycopg.connect(proxy.dsn("pgbouncer"), autocommit=True) as admin:
        admin.execute("RECONNECT")
    deadline = time.monotonic() + 10
    while proxy.server_count() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.server_count() == 0


@pytest.fixture
def shape_table(pg_dsn: str):
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("drop table if exists pgp_shape; create table pgp_shape (a int, b int)")
        admin.execute("insert into pgp_shape values (1, 2)")
    yield "pgp_shape"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("drop table if exists pgp_shape")


def skip_without_engine(fast_path: str) -> None:
    if fast_path == "on" and not fastpath.available():
        pytest.skip("fast path not built")


@pytest.mark.parametrize("fast_path", FAST_PATHS)
def test_asyncpg_statement_cache_recovers_on_a_new_server(proxy_factory, shape_table: str,
                                                          fast_path: str) -> None:
    """asyncpg's test_prepare_cache_invalidation_silent, with the server changed between."""
    skip_without_engine(fast_path)
    proxy = proxy_factory(default_pool_size=1, fast_path=fast_path)

    async def run() -> None:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            for _ in range(3):
                assert tuple(await conn.fetchrow("select * from pgp_shape")) == (1, 2)
            await conn.execute("alter table pgp_shape alter column b set data type text")
            close_idle_servers(proxy)
            # Directly: 0A000, which asyncpg's statement cache takes as "prepare again".
            assert tuple(await conn.fetchrow("select * from pgp_shape")) == (1, "2")
            assert tuple(await conn.fetchrow("select * from pgp_shape")) == (1, "2")
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.mark.parametrize("fast_path", FAST_PATHS)
def test_asyncpg_prepared_statement_errs_as_directly(proxy_factory, shape_table: str,
                                                     fast_path: str) -> None:
    """An explicitly prepared statement fails as on a direct connection, in a transaction
    too (which is then aborted, as directly), and keeps failing until prepared again."""
    skip_without_engine(fast_path)
    proxy = proxy_factory(default_pool_size=1, fast_path=fast_path)

    async def run() -> None:
        conn = await asyncpg.connect(proxy.dsn())  # (without a cache: unnamed statements)
        try:
            stmt = await conn.prepare("select * from pgp_shape")
            assert tuple(await stmt.fetchrow()) == (1, 2)
            await conn.execute("alter table pgp_shape alter column b set data type text")
            close_idle_servers(proxy)
            # PostgreSQL's 0A000, which asyncpg knows by its routine (RevalidateCachedQuery)
            with pytest.raises(asyncpg.InvalidCachedStatementError):
                await stmt.fetchrow()
            tx = conn.transaction()
            await tx.start()
            with pytest.raises(asyncpg.FeatureNotSupportedError):
                await stmt.fetchrow()
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await conn.fetchval("select 1")
            await tx.rollback()
            with pytest.raises(asyncpg.FeatureNotSupportedError):
                await stmt.fetchrow()
            fresh = await conn.prepare("select * from pgp_shape")
            assert tuple(await fresh.fetchrow()) == (1, "2")
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.mark.parametrize("fast_path", FAST_PATHS)
def test_psycopg_prepared_statement_errs_as_directly(proxy_factory, shape_table: str,
                                                     pg_dsn: str, fast_path: str) -> None:
    """psycopg (prepare_threshold=0) never describes the statement itself: the pooler does,
    when it first parses it, so the check holds for it too."""
    skip_without_engine(fast_path)
    proxy = proxy_factory(default_pool_size=1, fast_path=fast_path)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for _ in range(3):
            assert conn.execute("select * from pgp_shape where a = %s", [1]).fetchall() \
                == [(1, 2)]
        # (From elsewhere: psycopg itself forgets its statements after DDL it runs.)
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("alter table pgp_shape alter column b set data type text")
        close_idle_servers(proxy)
        with pytest.raises(psycopg.errors.FeatureNotSupported,
                           match="cached plan must not change result type"):
            conn.execute("select * from pgp_shape where a = %s", [1])
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("select * from pgp_shape where a = %s", [1])
        conn.execute("deallocate all")  # psycopg's own cache of the name
        assert conn.execute("select * from pgp_shape where a = %s", [1]).fetchall() \
            == [(1, "2")]


@pytest.mark.parametrize("fast_path", FAST_PATHS)
def test_unchanged_result_runs_on_a_new_server(proxy_factory, shape_table: str,
                                               fast_path: str) -> None:
    """A schema change that leaves the statement's result as it was: it runs on, as
    directly (no error), with parameters of the types first described."""
    skip_without_engine(fast_path)
    proxy = proxy_factory(default_pool_size=1, fast_path=fast_path)

    async def run() -> None:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            stmt = await conn.prepare("select a, b from pgp_shape where a = $1")
            assert tuple(await stmt.fetchrow(1)) == (1, 2)
            await conn.execute("alter table pgp_shape add column c text")
            close_idle_servers(proxy)
            assert tuple(await stmt.fetchrow(1)) == (1, 2)
            assert tuple(await stmt.fetchrow(1)) == (1, 2)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.mark.parametrize("fast_path", FAST_PATHS)
def test_two_checks_in_one_pipeline_and_a_changed_one(proxy_factory, shape_table: str,
                                                     pg_dsn: str, fast_path: str) -> None:
    """One request that needs two statements checked on a new server (the requests wait
    twice, in order), then the same after one of them changed: its Bind fails with 0A000, the
    server skips to the Sync (the other statement's run too), and the next request works."""
    skip_without_engine(fast_path)
    proxy = proxy_factory(default_pool_size=1, fast_path=fast_path)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(m.startup_message({"user": "postgres", "database": "test"}))
        assert read_types(sock)[-1] == "Z"
        sock.sendall(m.parse_message("s1", "select b from pgp_shape")
                     + m.parse_message("s2", "select a from pgp_shape") + m.sync())
        assert read_types(sock) == ["1", "1", "Z"]
        run_both = (m.bind_simple("", "s1") + m.execute_message()
                    + m.bind_simple("", "s2") + m.execute_message() + m.sync())
        close_idle_servers(proxy)
        sock.sendall(run_both)
        assert read_types(sock) == ["2", "D", "C", "2", "D", "C", "Z"]
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("alter table pgp_shape alter column b set data type text")
        close_idle_servers(proxy)
        sock.sendall(run_both)
        answers = read_answers(sock)
        assert [t for t, _ in answers] == ["E", "Z"]
        error = m.parse_error_fields(answers[0][1])
        assert error["C"] == "0A000" and error["M"] == "cached plan must not change result type"
        sock.sendall(m.bind_simple("", "s2") + m.execute_message() + m.sync())
        assert read_types(sock) == ["2", "D", "C", "Z"]
