"""The compiled fast path (proxy/_fastpath.c + fastpath.py) against real PostgreSQL.

The rest of the proxy suite already runs on it (it is on by default); these tests check that
the engine really carries the traffic, and each way a pair leaves it for Python and comes back:
a named Parse, hazards, COPY, parameter changes, differing startup parameters, a
server dying while idle in the engine, a client leaving mid-query, big results, pipelines.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import threading
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.proxy.conftest import RunningProxy, read_types, wait_until

from pgpilot.proxy import fastpath
from pgpilot.proxy.hazards import might_be_hazard
from pgpilot.proxy.states import ServerState

# Without a C compiler pgpilot installs without the extension; CI has one, so there its absence
# is a failure (the build broke), not a skip.
pytestmark = pytest.mark.skipif(not fastpath.available() and os.environ.get("CI") != "true",
                                reason="fast path not built (no C compiler at install)")


def test_the_extension_is_built() -> None:
    assert fastpath.available(), "pgpilot.proxy._fastpath did not build: see pip's output"


def connect(proxy: RunningProxy, **kw: Any) -> psycopg.Connection[Any]:
    kw.setdefault("autocommit", True)
    kw.setdefault("prepare_threshold", None)
    return psycopg.connect(proxy.dsn(), **kw)


def transports(proxy: RunningProxy) -> list[tuple[bool, bool]]:
    """(on the engine, on the fast path) for each client of the test pool."""
    def read() -> list[tuple[bool, bool]]:
        assert proxy.pooler is not None
        out = []
        for pool in proxy.pooler.pools.values():
            for client in pool.clients:
                conn = client.transport
                engine = fastpath.is_fast_conn(conn)
                out.append((engine, bool(engine and conn.fast)))  # type: ignore[union-attr]
        return out
    return list(proxy.call(read))


def engine_xacts(proxy: RunningProxy) -> int:
    """Transactions the engine itself carried since the last fold (not yet in SHOW STATS)."""
    def read() -> int:
        assert proxy.pooler is not None
        total = 0
        for pool in proxy.pooler.pools.values():
            if pool.lane is not None:
                got = pool.lane.fp.take_stats()
                total += got["xact_count"]
                pool.stats.xact_count += got["xact_count"]
        return total
    return int(proxy.call(read))


@pytest.fixture
def tx_proxy(proxy_factory: Any) -> RunningProxy:
    # Janitor folding is what SHOW STATS relies on; a long tick keeps these counts readable.
    return proxy_factory(default_pool_size=2, pool_mode="transaction")  # type: ignore[no-any-return]


def test_engine_carries_simple_and_extended_traffic(tx_proxy: RunningProxy) -> None:
    with connect(tx_proxy) as conn:
        engine_xacts(tx_proxy)  # start from zero
        for i in range(200):
            assert conn.execute("select %s::int", [i]).fetchone() == (i,)  # extended, unnamed
        for i in range(100):
            assert conn.execute(f"select {i}").fetchone() == (i,)  # psycopg: extended too
        assert transports(tx_proxy) == [(True, True)]
        carried = engine_xacts(tx_proxy)
    # The janitor may have folded some into SHOW STATS meanwhile; the engine carried most.
    assert carried > 0
    totals = tx_proxy.call(lambda: sum(p.stats.xact_count for p in tx_proxy.pooler.pools.values()))
    assert totals >= 300


def test_fast_path_off_is_the_python_pooler(proxy_factory: Any) -> None:
    proxy = proxy_factory(fast_path="off")
    with connect(proxy) as conn:
        assert conn.execute("select 41 + 1").fetchone() == (42,)
        assert transports(proxy) == [(False, False)]
        assert proxy.call(lambda: proxy.pooler.fast) is None


def test_named_prepared_statements_stay_on_the_fast_path(tx_proxy: RunningProxy) -> None:
    with connect(tx_proxy, prepare_threshold=0) as a, connect(tx_proxy, prepare_threshold=0) as b:
        for i in range(20):
            assert a.execute("select %s::int * 2", [i]).fetchone() == (i * 2,)
            assert b.execute("select %s::text || 'x'", [str(i)]).fetchone() == (f"{i}x",)
        # The engine renames their Binds itself (test_fastpath_prepared.py has the details).
        assert transports(tx_proxy) == [(True, True), (True, True)]


def test_session_state_statements_go_through_python(tx_proxy: RunningProxy) -> None:
    with connect(tx_proxy) as conn:
        conn.execute("select 1")
        conn.execute("set statement_timeout = '5s'")  # Python reads the session's settings
        wait_until(lambda: tx_proxy.call(lambda: [
            c.settings for p in tx_proxy.pooler.pools.values() for c in p.clients])
            == [{"statement_timeout": "5000"}])
        assert conn.execute("select 2, current_setting('statement_timeout')").fetchone() \
            == (2, "5s")
        conn.execute("listen fast_jobs")  # pins the client to its server (in Python)
        assert conn.execute("select 3").fetchone() == (3,)  # once the pin is counted
        assert tx_proxy.call(lambda: dict(tx_proxy.pooler.pins_total)) == {"listen": 1}
        conn.execute("unlisten *")


def test_transaction_mixes_fast_and_python_messages(tx_proxy: RunningProxy) -> None:
    with connect(tx_proxy, autocommit=False, prepare_threshold=0) as conn:
        conn.execute("create temp table if not exists t_mix (n int) on commit drop")
        conn.execute("insert into t_mix select generate_series(1, 10)")
        assert conn.execute("select count(*) from t_mix").fetchone() == (10,)
        conn.commit()


def test_copy_in_and_out_through_the_engine(tx_proxy: RunningProxy) -> None:
    with connect(tx_proxy) as conn:
        conn.execute("select 1")
        conn.execute("drop table if exists fp_copy")
        conn.execute("create table fp_copy (n int, s text)")
        try:
            with conn.cursor() as cur:
                with cur.copy("copy fp_copy from stdin") as copy:
                    for i in range(5000):
                        copy.write_row((i, f"row {i}"))
                assert cur.execute("select count(*), sum(n) from fp_copy").fetchone() == (
                    5000, sum(range(5000)))
                out = bytearray()
                with cur.copy("copy (select * from fp_copy order by n limit 3) to stdout") as copy:
                    for chunk in copy:
                        out += chunk
                assert bytes(out) == b"0\trow 0\n1\trow 1\n2\trow 2\n"
        finally:
            conn.execute("drop table fp_copy")
        assert conn.execute("select 3").fetchone() == (3,)


def test_parameter_changes_reach_the_client_and_stay_its_own(tx_proxy: RunningProxy) -> None:
    with connect(tx_proxy) as a, connect(tx_proxy) as b:
        a.execute("select 1")
        b.execute("select 1")
        a.execute("set application_name = 'client-a'")
        for _ in range(10):
            assert a.execute("show application_name").fetchone() == ("client-a",)
            assert b.execute("show application_name").fetchone() != ("client-a",)
        assert a.info.parameter_status("application_name") == "client-a"


def test_clients_with_different_startup_parameters_share_one_server(
        proxy_factory: Any) -> None:
    proxy = proxy_factory(default_pool_size=1)
    with psycopg.connect(proxy.dsn(), autocommit=True, application_name="app-one") as one, \
            psycopg.connect(proxy.dsn(), autocommit=True, application_name="app-two") as two, \
            psycopg.connect(proxy.dsn(), autocommit=True) as tz:
        tz.execute("set timezone = 'Asia/Tokyo'")
        for _ in range(10):
            assert one.execute("show application_name").fetchone() == ("app-one",)
            assert two.execute("show application_name").fetchone() == ("app-two",)
            assert tz.execute("show timezone").fetchone() == ("Asia/Tokyo",)
        assert proxy.server_count() == 1


def test_server_dying_while_idle_in_the_engine_is_replaced(tx_proxy: RunningProxy,
                                                           pg_dsn: str) -> None:
    with connect(tx_proxy) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]

        def idle_in_engine() -> bool:
            assert tx_proxy.pooler is not None
            return any(s.in_engine and s.transport.peer is None  # type: ignore[union-attr]
                       for p in tx_proxy.pooler.pools.values()
                       for s in p.servers[ServerState.IDLE])
        wait_until(lambda: tx_proxy.call(idle_in_engine))
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", [pid])
        wait_until(lambda: tx_proxy.server_count() == 0)
        new_pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        assert new_pid != pid


def test_client_leaving_mid_query_never_hands_on_its_server(tx_proxy: RunningProxy,
                                                            pg_dsn: str) -> None:
    conn = connect(tx_proxy)
    conn.execute("select 1")
    pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    done = threading.Event()

    def sleeper() -> None:
        with contextlib.suppress(psycopg.Error):
            conn.execute("select pg_sleep(30)")
        done.set()

    threading.Thread(target=sleeper, daemon=True).start()
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        wait_until(lambda: admin.execute(
            "select 1 from pg_stat_activity where pid = %s and query like 'select pg_sleep%%'",
            [pid]).fetchone())
        # The socket closes under the running query (shutdown: libpq is busy in the thread).
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        # The server was cancelled and closed: its backend goes away, nobody else gets it.
        wait_until(lambda: admin.execute(
            "select count(*) from pg_stat_activity where pid = %s", [pid]).fetchone() == (0,),
            timeout=15)
    with connect(tx_proxy) as other:
        assert other.execute("select pg_backend_pid()").fetchone() != (pid,)


def test_big_results_stream_to_a_slow_reader(tx_proxy: RunningProxy) -> None:
    with connect(tx_proxy) as conn, conn.cursor("big") as named, \
            connect(tx_proxy) as other:
        conn.autocommit = False
        named.itersize = 10
        named.execute("select n, repeat('x', 100000) from generate_series(1, 200) n")
        for seen, (n, text) in enumerate(named, start=1):
            assert len(text) == 100000 and n == seen
            if seen % 50 == 0:  # others keep being served meanwhile
                assert other.execute("select 5").fetchone() == (5,)
        conn.commit()
    with connect(tx_proxy) as conn:
        rows = conn.execute("select repeat('y', 1000000) from generate_series(1, 20)").fetchall()
        assert len(rows) == 20 and all(len(r[0]) == 1000000 for r in rows)


def test_pipeline_of_many_queries(tx_proxy: RunningProxy) -> None:
    with connect(tx_proxy) as conn:
        with conn.pipeline():
            cursors = [conn.execute("select %s::int + 1", [i]) for i in range(300)]
        assert [c.fetchone() for c in cursors] == [(i + 1,) for i in range(300)]


def test_many_clients_few_servers_no_crosstalk(proxy_factory: Any) -> None:
    proxy = proxy_factory(default_pool_size=3, max_client_conn=500)

    def worker(n: int) -> list[int]:
        with connect(proxy) as conn:
            return [conn.execute("select %s::int", [n * 1000 + i]).fetchone()[0]  # type: ignore[index]
                    for i in range(30)]

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(worker, range(120)))
    assert results == [[n * 1000 + i for i in range(30)] for n in range(120)]
    assert proxy.server_count() <= 3


def test_admin_console_sees_pairs_the_engine_linked(tx_proxy: RunningProxy) -> None:
    with connect(tx_proxy, autocommit=False) as busy, \
            psycopg.connect(tx_proxy.dsn(dbname="pgbouncer"), autocommit=True) as console:
        busy.execute("select 1")  # a transaction is open: the server stays linked in C
        pools = {r[0]: r for r in console.execute("show pools").fetchall()}
        cur = console.execute("show pools")
        names = [d.name for d in cur.description]
        row = dict(zip(names, cur.fetchall()[0], strict=True))
        assert row["cl_active"] == 1 and row["sv_active"] == 1, (row, pools)
        busy.commit()
        assert busy.execute("select 2").fetchone() == (2,)


def test_console_leaves_idle_clients_on_the_engine_and_counts_waiters(
        tx_proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """SHOW takes back only what Python's view lacks (linked pairs, clients the engine
    queues): idle clients stay on the fast path, and the counts are still exact."""
    taken_back: list[object] = []
    original = fastpath.Lane.ejected

    def counting(self: fastpath.Lane, client: Any, *rest: Any) -> None:
        taken_back.append(client)
        original(self, client, *rest)

    monkeypatch.setattr(fastpath.Lane, "ejected", counting)
    idle = [connect(tx_proxy) for _ in range(3)]
    try:
        for conn in idle:
            assert conn.execute("select 1").fetchone() == (1,)
        with connect(tx_proxy, autocommit=False) as a, connect(tx_proxy, autocommit=False) as b:
            a.execute("select 1")
            b.execute("select 1")  # both servers of the pool of 2 are in transactions
            blocked = threading.Thread(target=lambda: idle[0].execute("select 2"))
            blocked.start()  # queued in the engine: no server free
            wait_until(lambda: tx_proxy.call(lambda: sum(
                p.lane.waiting_count() for p in tx_proxy.pooler.pools.values()  # type: ignore[union-attr]
                if p.lane is not None)) == 1)
            with psycopg.connect(tx_proxy.dsn(dbname="pgbouncer"), autocommit=True) as console:
                taken_back.clear()
                cur = console.execute("show pools")
                names = [d.name for d in cur.description]
                row = dict(zip(names, cur.fetchall()[0], strict=True))
                assert (row["cl_active"], row["cl_waiting"], row["sv_active"]) == (4, 1, 2), row
                # Taken back: the two linked pairs and the queued client, not the idle two.
                assert len(taken_back) == 3, taken_back
            a.commit()
            blocked.join(10)
            assert not blocked.is_alive()
        for conn in idle:
            assert conn.execute("select 3").fetchone() == (3,)
    finally:
        for conn in idle:
            conn.close()


def waiting_in_engine(proxy: RunningProxy) -> int:
    return int(proxy.call(lambda: sum(
        p.lane.waiting_count() for p in proxy.pooler.pools.values()  # type: ignore[union-attr]
        if p.lane is not None)))


def test_queued_client_that_leaves_is_dropped_at_once(proxy_factory: Any) -> None:
    """A client queued in the engine for a server is still read: when it leaves, its place
    in the queue goes at once, not when a server frees up for it."""
    from pgpilot.wire import messages as m

    proxy = proxy_factory(default_pool_size=1)
    with connect(proxy, autocommit=False) as holder:
        holder.execute("select 1")  # the one server, in a transaction
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        sock.sendall(m.startup_message({"user": "postgres", "database": "test"}))
        assert read_types(sock)[-1] == "Z"
        sock.sendall(m.query("select 2"))
        wait_until(lambda: waiting_in_engine(proxy) == 1)
        sock.close()
        wait_until(lambda: waiting_in_engine(proxy) == 0)  # the server is still held
        assert holder.execute("select 3").fetchone() == (3,)
        holder.commit()
    with connect(proxy) as conn:
        assert conn.execute("select 4").fetchone() == (4,)


def test_queued_client_that_pipelines_on_gets_every_answer(proxy_factory: Any) -> None:
    from pgpilot.wire import messages as m

    proxy = proxy_factory(default_pool_size=1)
    with connect(proxy, autocommit=False) as holder, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        holder.execute("select 1")
        sock.sendall(m.startup_message({"user": "postgres", "database": "test"}))
        assert read_types(sock)[-1] == "Z"
        sock.sendall(m.query("select 2"))
        wait_until(lambda: waiting_in_engine(proxy) == 1)
        for i in range(3, 50):  # more requests while queued, in separate writes
            sock.sendall(m.query(f"select {i}"))
        holder.commit()
        for _ in range(2, 50):
            assert read_types(sock) == ["T", "D", "C", "Z"]
        sock.sendall(m.terminate())


def test_pipeline_that_turns_to_named_statements_midway(tx_proxy: RunningProxy) -> None:
    """psycopg prepares a statement on its 6th run: in one pipeline (no Sync between), the
    engine has forwarded unnamed requests still unanswered when the first named Parse comes;
    Python's router takes over knowing which answers are still owed."""
    with connect(tx_proxy, prepare_threshold=5) as conn:
        for _round in range(3):
            with conn.pipeline():
                cursors = [conn.execute("select %s::int * 3", [i]) for i in range(40)]
                more = [conn.execute("select %s::text", [f"t{i}"]) for i in range(10)]
            assert [c.fetchone() for c in cursors] == [(i * 3,) for i in range(40)]
            assert [c.fetchone() for c in more] == [(f"t{i}",) for i in range(10)]
        assert conn.execute("select 1").fetchone() == (1,)


def test_error_inside_a_pipeline_then_named_statements(tx_proxy: RunningProxy) -> None:
    with connect(tx_proxy, prepare_threshold=2) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
            conn.execute("select 1 / %s::int", [1])
            conn.execute("select 1 / %s::int", [0])
            conn.execute("select 1 / %s::int", [2])
        for i in range(1, 8):
            assert conn.execute("select 10 / %s::int", [i]).fetchone() == (10 // i,)


def test_named_statement_after_unanswered_unnamed_requests(proxy_factory: Any) -> None:
    """Raw protocol, no Sync between: unnamed Parse/Bind/Execute go through the engine; then a
    named Parse whose statement the server already has (the router answers ParseComplete
    itself). The answers must come back in request order."""
    from pgpilot.wire import messages as m

    proxy = proxy_factory(default_pool_size=1)
    # Puts the statement on the one server (prepare_threshold=None would turn prepare off).
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        other.execute("select 2::int", prepare=True)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(m.startup_message({"user": "postgres", "database": "test"}))
        assert read_types(sock)[-1] == "Z"
        # Still running (no answer yet) when the named Parse comes.
        sock.sendall(m.parse_message("", "select pg_sleep(0.5)") + m.bind_simple("", "")
                     + m.execute_message())
        # (Linked in the engine; found from the server's side: the client may have no
        # Python object, logged in along the login route psycopg's identical login made.)
        wait_until(lambda: proxy.call(lambda: any(
            fastpath.is_fast_conn(s.transport) and s.transport.peer is not None
            for p in proxy.pooler.pools.values() for s in p.all_servers())))
        sock.sendall(m.parse_message("mine", "select 2::int") + m.bind_simple("", "mine")
                     + m.execute_message() + m.sync())
        assert read_types(sock) == ["1", "2", "D", "C", "1", "2", "D", "C", "Z"]
        sock.sendall(m.query("select 3"))
        assert read_types(sock) == ["T", "D", "C", "Z"]


def test_named_statements_after_an_error_the_engine_saw(proxy_factory: Any) -> None:
    """An unnamed request fails on the engine's path, the client has not sent its Sync: the
    server skips what follows until it, named Parse included. Python's router, taking over
    there, must know (or it would count the skipped statement as prepared on the server)."""
    from pgpilot.wire import messages as m

    proxy = proxy_factory(default_pool_size=1)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(m.startup_message({"user": "postgres", "database": "test"}))
        assert read_types(sock)[-1] == "Z"
        sock.sendall(m.parse_message("", "select 1 / 0") + m.bind_simple("", "")
                     + m.execute_message() + m.flush())
        # The error (division by zero: at Parse, Bind or Execute, as the planner folds it).
        seen: list[str] = []
        while "E" not in seen:
            seen += read_types(sock, 1)
        sock.sendall(m.parse_message("mine", "select 7::int") + m.bind_simple("", "mine")
                     + m.execute_message() + m.sync())
        assert read_types(sock) == ["Z"]
        sock.sendall(m.parse_message("mine", "select 7::int") + m.bind_simple("", "mine")
                     + m.execute_message() + m.sync())
        assert read_types(sock) == ["1", "2", "D", "C", "Z"]


@pytest.mark.parametrize("sql", [
    "SET search_path = app", "  set TimeZone to 'UTC'", "select 1; SET x = 1",
    "/* hi */ SET statement_timeout = 0", "-- note\nset x = 1", "RESET ALL",
    "LISTEN jobs", "create temp table t (n int)", "select pg_advisory_lock(1)",
    "declare c cursor with hold for select 1", "PREPARE p AS select 1", "DISCARD ALL",
    "DEALLOCATE ALL", "select set_config('x', 'y', false)", "select 1; select 2",
])
def test_prefilter_sends_session_state_to_python(sql: str) -> None:
    assert _fastpath_module().sql_needs_python(sql.encode())


@pytest.mark.parametrize("sql", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1",
    "insert into t values ($1, $2)", "select settings from app_config",
])
def test_prefilter_lets_plain_statements_through(sql: str) -> None:
    assert not _fastpath_module().sql_needs_python(sql.encode())


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("tempholdisrcavyngfkTEMPHOLDFKx_ ")), max_size=40))
def test_prefilter_finds_its_words_anywhere(text: str) -> None:
    """The one-pass word search agrees with a plain substring search, at every position
    including the very end of the text, in any case."""
    words = ("advisory_lock", "set_config", "temp", "hold", "listen", "prepare", "discard",
             "deallocate")
    sql = "select " + text.replace(";", "")
    expected = any(w in sql.lower() for w in words)
    assert _fastpath_module().sql_needs_python(sql.encode()) == expected


def _fastpath_module() -> Any:
    from pgpilot.proxy import _fastpath  # type: ignore[attr-defined]

    return _fastpath


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("selctSETmpoaryhdiun_;- /*\n'vkfgRAL")), max_size=60))
def test_prefilter_is_never_laxer_than_the_hazard_check(sql: str) -> None:
    """Whatever the Python hazard check would look at, the C pre-filter sends to Python."""
    data = sql.encode()
    if might_be_hazard(data):
        assert _fastpath_module().sql_needs_python(data)
