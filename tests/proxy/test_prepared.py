"""Protocol-level prepared statements through transaction pooling, with real drivers."""

from __future__ import annotations

import asyncio
import socket
import subprocess

import asyncpg
import psycopg
import pytest
from tests.proxy.conftest import RunningProxy, read_types

from pgpilot.proxy import fastpath
from pgpilot.wire import messages as m


async def test_asyncpg_statement_cache_many_clients_few_servers(proxy_factory) -> None:
    proxy = proxy_factory(default_pool_size=3)

    async def worker(n: int) -> int:
        conn = await asyncpg.connect(proxy.dsn())  # default statement cache on
        try:
            total = 0
            for i in range(20):
                assert await conn.fetchval("select $1::int + $2::int", n, i) == n + i
                row = await conn.fetchrow("select $1::text as t, $2::int as i", f"c{n}", i)
                assert row is not None and row["t"] == f"c{n}" and row["i"] == i
                async with conn.transaction():
                    assert await conn.fetchval("select $1::int * 2", i) == 2 * i
                total += 1
            stmt = await conn.prepare("select $1::int - 1")
            assert await stmt.fetchval(10) == 9
            return total
        finally:
            await conn.close()

    assert await asyncio.gather(*(worker(n) for n in range(24))) == [20] * 24
    assert proxy.server_count() <= 3


def test_pgbench_prepared(proxy_factory, pgbench_db: str) -> None:
    proxy = proxy_factory(default_pool_size=3)
    # One thread per client here; one thread for all: the test below.
    for script in (["-S"], []):
        out = subprocess.run(
            ["pgbench", "-n", "-c", "10", "-j", "10", "-t", "30", "-M", "prepared", *script,
             "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "postgres", pgbench_db],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr + out.stdout
        assert "actually processed: 300/300" in out.stdout
        assert "failed transactions: 0" in out.stdout
        assert "already exists" not in out.stderr
    assert proxy.server_count() <= 3


ONE_THREAD_SCRIPT = """\\set aid random(1, 100000)
begin;
update pgbench_accounts set abalance = abalance + 1 where aid = :aid;
select abalance from pgbench_accounts where aid = :aid;
end;
"""


@pytest.mark.parametrize("fast_path", [0, 1])
def test_pgbench_prepared_one_thread_more_clients_than_servers(proxy_factory, pgbench_db: str,
                                                              tmp_path, fast_path: int) -> None:
    """pgbench -M prepared on one thread, 8 clients, 4 servers, in transaction mode. pgbench
    prepares each command synchronously (PQprepare: Parse + Sync) at its first use, and its
    thread blocks there; a BEGIN prepared between transactions used to wait for a server
    while the other clients of the same thread held all four in open transactions, which
    could never go on: a hang. Now the pooler answers the Parse + Sync of a statement some
    server has parsed without a server."""
    if fast_path and not fastpath.available():
        pytest.skip("fast path not built")
    proxy = proxy_factory(default_pool_size=4, max_prepared_statements=100,
                          fast_path=fast_path)
    script = tmp_path / "txn.sql"
    script.write_text(ONE_THREAD_SCRIPT)
    for args in (["-b", "tpcb-like"], ["-f", str(script)]):
        try:
            out = subprocess.run(
                ["pgbench", "-n", "-c", "8", "-j", "1", "-t", "100", "-M", "prepared", *args,
                 "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "postgres", pgbench_db],
                capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pgbench {' '.join(args)} hung through the pooler")
        assert out.returncode == 0, out.stderr + out.stdout
        assert "actually processed: 800/800" in out.stdout, out.stdout
        assert "failed transactions: 0" in out.stdout
    assert proxy.server_count() <= 4


def server_statement_count(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "select count(*) from pg_prepared_statements where name like 'pgpilot_%%'",
        prepare=False).fetchone()
    assert row is not None
    return int(row[0])


def test_max_prepared_statements_evicts_least_recently_used(proxy_factory) -> None:
    proxy = proxy_factory(default_pool_size=1, max_prepared_statements=3)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for i in range(8):
            assert conn.execute(f"select {i} + %s::int", [1]).fetchone() == (i + 1,)
            assert server_statement_count(conn) <= 3
        # statements evicted on the server are prepared again transparently
        for i in range(8):
            assert conn.execute(f"select {i} + %s::int", [2]).fetchone() == (i + 2,)


@pytest.mark.parametrize("fast_path", ["on", "off"])
def test_max_prepared_statements_changed_while_clients_are_connected(proxy_factory,
                                                                      fast_path: str) -> None:
    """A console SET applies to the clients connected, as PgBouncer's: a new bound from the
    next statement made room for; 0 stops renaming from the next message (on the fast path
    too), so a statement prepared before is unknown to the server; on again, it works."""
    proxy = proxy_factory(default_pool_size=1, max_prepared_statements=1, fast_path=fast_path)

    def console_set(value: int) -> None:
        with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as admin:
            admin.execute(f"set max_prepared_statements = {value}")

    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for i in range(3):
            assert conn.execute(f"select {i} + %s::int", [1]).fetchone() == (i + 1,)
        assert server_statement_count(conn) == 1
        console_set(4)
        for i in range(3, 8):
            assert conn.execute(f"select {i} + %s::int", [1]).fetchone() == (i + 1,)
        assert server_statement_count(conn) == 4
        on_engine = proxy.call(lambda: [fastpath.is_fast_conn(c.transport) and c.transport.fast
                                        for p in proxy.pooler.pools.values() for c in p.clients])
        assert on_engine == [fast_path == "on" and fastpath.available()]
        console_set(0)
        # psycopg binds its own name for a statement it prepared: it reaches the server as
        # sent, and the server never had it.
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute("select 7 + %s::int", [1])
        assert server_statement_count(conn) == 4  # nothing is closed for it
        console_set(2)
        # On again: the client's statements are renamed (and prepared again) as before.
        assert conn.execute("select 6 + %s::int", [2]).fetchone() == (8,)
        assert server_statement_count(conn) == 4  # room is made when one is added
        assert conn.execute("select 100 + %s::int", [2]).fetchone() == (102,)
        assert server_statement_count(conn) == 2


@pytest.mark.parametrize("fast_path", ["on", "off"])
def test_a_name_prepared_again_while_renaming_is_off_means_the_new_statement(
        proxy_factory, fast_path: str) -> None:
    """max_prepared_statements 200 -> 0 -> 200: a name the client prepared again while
    renaming was off (it reached the server as sent) must run that statement once renaming
    is back on, not the one the pooler recorded for the name before."""
    proxy = proxy_factory(default_pool_size=1, max_prepared_statements=200,
                          fast_path=fast_path)

    def console_set(value: int) -> None:
        with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as admin:
            admin.execute(f"set max_prepared_statements = {value}")

    def run(pgconn: psycopg.pq.abc.PGconn) -> bytes | None:
        result = pgconn.exec_prepared(b"s1", [])
        assert result.status == psycopg.pq.ExecStatus.TUPLES_OK, result.error_message
        return result.get_value(0, 0)

    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        pgconn = conn.pgconn
        assert pgconn.prepare(b"s1", b"select 'first'").status == psycopg.pq.ExecStatus.COMMAND_OK
        assert run(pgconn) == b"first"
        console_set(0)
        # Renaming off: "s1" goes to the server as sent (the server had only the renamed
        # one), so preparing it again works.
        prepared = pgconn.prepare(b"s1", b"select 'second'")
        assert prepared.status == psycopg.pq.ExecStatus.COMMAND_OK, prepared.error_message
        assert run(pgconn) == b"second"
        console_set(200)
        assert run(pgconn) == b"second"


def test_statements_shared_between_clients_on_one_server(proxy_factory) -> None:
    proxy = proxy_factory(default_pool_size=1)
    a = psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0)
    b = psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0)
    try:
        assert a.execute("select 'shared', %s::int", [1]).fetchone() == ("shared", 1)
        assert b.execute("select 'shared', %s::int", [2]).fetchone() == ("shared", 2)
        assert a.execute("select 'shared', %s::int", [3]).fetchone() == ("shared", 3)
        # one server-side statement (plus the counting query's own) serves both clients
        names = a.execute("select name from pg_prepared_statements "
                          "where statement like '%%shared%%' and name like 'pgpilot_%%' "
                          "and statement not like '%%pg_prepared%%'"
                          ).fetchall()
        assert len(names) == 1
    finally:
        a.close()
        b.close()


def test_close_is_answered_locally_and_name_can_be_reused(proxy: RunningProxy) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(proxy.dsn(), statement_cache_size=0)
        try:
            for i in range(3):
                stmt = await conn.prepare(f"select {i}::int + $1::int")
                assert await stmt.fetchval(1) == i + 1
                del stmt
        finally:
            await conn.close()

    asyncio.run(run())


def test_deallocate_all_and_discard_all(proxy_factory) -> None:
    proxy = proxy_factory(default_pool_size=1)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        conn.execute("select 101 + %s::int", [1])
        assert server_statement_count(conn) >= 1
        conn.execute("deallocate all")
        assert server_statement_count(conn) == 0
        # the client's statement is prepared again where needed
        assert conn.execute("select 101 + %s::int", [1]).fetchone() == (102,)
        conn.execute("discard all")
        assert server_statement_count(conn) == 0
        assert conn.execute("select 101 + %s::int", [2]).fetchone() == (103,)


@pytest.mark.parametrize("fast_path", ["on", "off"])
def test_ddl_changing_result_type_errs_as_directly(proxy_factory, pg_dsn: str,
                                                      fast_path: str) -> None:
    proxy = proxy_factory(default_pool_size=1, fast_path=fast_path)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("drop table if exists pgp_ddl; create table pgp_ddl (a int)")
        admin.execute("insert into pgp_ddl values (1)")
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for _ in range(3):  # prepared, then run as a Bind the engine renames (fast path on)
            assert conn.execute("select * from pgp_ddl where a = %s", [1]).fetchall() == [(1,)]
        on_engine = proxy.call(lambda: [fastpath.is_fast_conn(c.transport) and c.transport.fast
                                        for p in proxy.pooler.pools.values() for c in p.clients])
        assert on_engine == [fast_path == "on" and fastpath.available()]
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("alter table pgp_ddl add column b text default 'x'")
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            conn.execute("select * from pgp_ddl where a = %s", [1])
        # PostgreSQL's own error, as a direct connection gets it, and again on the next try
        # (the client's statement was parsed before the change) ...
        assert err.value.diag.message_hint is None
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("select * from pgp_ddl where a = %s", [1])
        # ... until the client prepares it again: parsed against today's catalog
        conn.execute("deallocate all")  # psycopg's own cache of the name
        assert conn.execute("select * from pgp_ddl where a = %s", [1]).fetchall() == [(1, "x")]
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("drop table pgp_ddl")


def test_errors_in_pipelines_keep_statements_consistent(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("selec 1 + %s::int", [1])
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table_pgp where x = %s", [1])
        for i in range(5):
            assert conn.execute("select %s::int * 3", [i]).fetchone() == (i * 3,)
        with conn.pipeline():
            curs = [conn.execute("select %s::int + 100", [i]) for i in range(10)]
        assert [c.fetchone() for c in curs] == [(i + 100,) for i in range(10)]


def test_requests_sent_after_an_error_before_sync(proxy_factory) -> None:
    """After an error PostgreSQL skips every request up to the next Sync. Requests the client
    sends once the error has come back, still before its Sync, are skipped too: they are owed
    nothing, and the statement router must not wait for their answers (which would shift every
    later answer of this client)."""
    proxy = proxy_factory(default_pool_size=1)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(m.startup_message({"user": "postgres", "database": "test"}))
        assert read_types(sock)[-1] == "Z"
        sock.sendall(m.parse_message("good", "select 2::int")
                     + m.parse_message("bad", "select 1 / $1::int")
                     + m.bind_simple("", "bad", ["0"]) + m.execute_message()
                     + m.flush())
        # (The division is folded when the Bind plans it: the Bind fails.)
        assert read_types(sock, 3) == ["1", "1", "E"]
        # The error is in; the client goes on before its Sync (pipelined requests).
        sock.sendall(m.bind_simple("", "good") + m.execute_message()
                     + m.parse_message("late", "select 3::int") + m.sync())
        assert read_types(sock) == ["Z"]
        # The server has "good"'s statement already: the router answers this Parse (of the
        # same text under another name) itself, which only works if its queue of owed answers
        # is right.
        sock.sendall(m.parse_message("good2", "select 2::int") + m.bind_simple("", "good2")
                     + m.execute_message() + m.sync())
        assert read_types(sock) == ["1", "2", "D", "C", "Z"]
        # "good" is still the client's: defined again without a Close, refused as directly.
        sock.sendall(m.parse_message("good", "select 2::int") + m.bind_simple("", "good")
                     + m.execute_message() + m.sync())
        assert read_types(sock) == ["E", "Z"]
        sock.sendall(m.parse_message("again", "select 4::int") + m.bind_simple("", "again")
                     + m.execute_message() + m.sync())
        assert read_types(sock) == ["1", "2", "D", "C", "Z"]
        sock.sendall(m.query("select 5"))
        assert read_types(sock) == ["T", "D", "C", "Z"]


@pytest.mark.parametrize("fast_path", ["on", "off"])
@pytest.mark.parametrize("max_prepared", [200, 0])
def test_query_behind_an_error_before_sync_is_skipped(proxy_factory, fast_path: str,
                                                      max_prepared: int) -> None:
    """After an error in the extended protocol PostgreSQL skips everything until Sync,
    simple Query messages too: no answer and no ReadyForQuery comes for them. The pooler must
    not wait for one, or the client would keep its server (here the pool's only one), with
    statements renamed or not (max_prepared_statements = 0)."""
    proxy = proxy_factory(default_pool_size=1, fast_path=fast_path,
                          max_prepared_statements=max_prepared)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as other:
        for s in (sock, other):
            s.sendall(m.startup_message({"user": "postgres", "database": "test"}))
            assert read_types(s)[-1] == "Z"
        sock.sendall(m.parse_message("keep", "select 1") + m.sync())
        assert read_types(sock) == ["1", "Z"]
        sock.sendall(m.bind_simple("", "no_such_statement") + m.query("select 1")
                     + m.close_message("S", "keep") + m.sync())
        assert read_types(sock) == ["E", "Z"]  # the Query and the Close: skipped
        other.sendall(m.query("select 2"))  # the one server is free again
        assert read_types(other) == ["T", "D", "C", "Z"]
        # Skipped, the Close did not happen: the statement is still the client's.
        sock.sendall(m.bind_simple("", "keep") + m.execute_message() + m.sync())
        assert read_types(sock) == ["2", "D", "C", "Z"]


@pytest.mark.parametrize("fast_path", ["on", "off"])
def test_unnamed_statement_lasts_across_transactions(proxy_factory, fast_path: str) -> None:
    """PostgreSQL keeps the unnamed statement until the next unnamed Parse or simple query, so
    a driver may prepare it in one request and bind it in a later one (asyncpg does, without
    its statement cache, around a type introspection). Here the server changes in between."""
    if fast_path == "on" and not fastpath.available():
        pytest.skip("fast path not built")
    proxy = proxy_factory(default_pool_size=1, fast_path=fast_path)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(m.startup_message({"user": "postgres", "database": "test"}))
        assert read_types(sock)[-1] == "Z"
        sock.sendall(m.parse_message("", "select 40 + $1::int") + m.describe_message("S", "")
                     + m.sync())
        assert read_types(sock) == ["1", "t", "T", "Z"]
        with psycopg.connect(proxy.dsn("pgbouncer"), autocommit=True) as admin:
            admin.execute("RECONNECT")  # the next transaction gets a new server
        for _ in range(2):
            sock.sendall(m.bind_simple("", "", ["2"]) + m.execute_message() + m.sync())
            answers = read_types(sock)
            assert answers == ["2", "D", "C", "Z"]
        # A simple query drops it, as directly: then it is gone.
        sock.sendall(m.query("select 1"))
        assert read_types(sock) == ["T", "D", "C", "Z"]
        sock.sendall(m.bind_simple("", "", ["2"]) + m.execute_message() + m.sync())
        assert read_types(sock) == ["E", "Z"]


@pytest.mark.parametrize("fast_path", ["on", "off"])
def test_prepared_name_reuse_is_refused(proxy_factory, fast_path: str, caplog) -> None:
    """A Parse of a name the client has prepared and not closed: PostgreSQL's 42P05, and the
    line PgBouncer logs (its test_prepared_disallow_name_reuse greps it); the statement stays
    as it was."""
    if fast_path == "on" and not fastpath.available():
        pytest.skip("fast path not built")
    proxy = proxy_factory(default_pool_size=1, fast_path=fast_path)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.pgconn.prepare(b"test", b"SELECT 1").status == psycopg.pq.ExecStatus.COMMAND_OK
        with caplog.at_level("WARNING", logger="pgpilot.proxy"):
            refused = conn.pgconn.prepare(b"test", b"SELECT 2")
        assert refused.status == psycopg.pq.ExecStatus.FATAL_ERROR
        assert refused.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42P05"
        assert refused.error_message.decode().startswith(
            'ERROR:  prepared statement "test" already exists')
        assert "prepared statement 'test' was already prepared" in caplog.text
        ran = conn.pgconn.exec_prepared(b"test", [])
        assert ran.get_value(0, 0) == b"1"  # still the first one


@pytest.mark.parametrize("fast_path", ["on", "off"])
def test_sql_execute_of_a_protocol_statement(proxy_factory, fast_path: str) -> None:
    """asyncpg's test_prepare_explicitly_named: a statement prepared in the protocol under the
    client's own name runs by SQL ``EXECUTE name`` (itself prepared by asyncpg, or sent
    unnamed by psycopg), on whichever server; preparing the name again is refused (42P05)."""
    if fast_path == "on" and not fastpath.available():
        pytest.skip("fast path not built")
    proxy = proxy_factory(default_pool_size=1, fast_path=fast_path)

    async def run() -> None:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            stmt = await conn.prepare("select 1", name="foobar")
            assert stmt.get_name() == "foobar"
            assert await conn.fetchval("EXECUTE foobar") == 1
            with psycopg.connect(proxy.dsn("pgbouncer"), autocommit=True) as admin:
                admin.execute("RECONNECT")  # a new server, which lacks both statements
            assert await conn.fetchval("EXECUTE foobar") == 1
            assert await conn.fetchval('execute "foobar"') == 1
            with pytest.raises(asyncpg.DuplicatePreparedStatementError,
                               match='prepared statement "foobar" already exists'):
                await conn.prepare("select 1", name="foobar")
        finally:
            await conn.close()

    asyncio.run(run())
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.pgconn.prepare(b"two", b"SELECT $1::int * 2").status \
            == psycopg.pq.ExecStatus.COMMAND_OK
        with psycopg.connect(proxy.dsn("pgbouncer"), autocommit=True) as admin:
            admin.execute("RECONNECT")
        ran = conn.pgconn.exec_params(b"EXECUTE two(21)", [])  # an unnamed Parse
        assert ran.status == psycopg.pq.ExecStatus.TUPLES_OK, ran.error_message
        assert ran.get_value(0, 0) == b"42"
