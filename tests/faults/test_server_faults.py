"""Faults between the pooler and PostgreSQL while clients run (issue 26's fault suite): a
pooled server terminated mid-transaction and while idle, a network that resets and stalls
(a fault-injecting relay), PAUSE/RESUME and RELOAD under load.

Each asserts that every client gets its own answers or an error with a SQLSTATE, that the
pool serves again within a stated bound, and that descriptors come back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from tests.faults.conftest import (
    Asked,
    Load,
    answered_within,
    ensure_running,
    fault_params,
    open_fds,
    servers_idle_in_the_fast_path,
)
from tests.faults.relay import FaultRelay
from tests.proxy.conftest import wait_until

from pgpilot.embedded import EmbeddedPostgres

pytestmark = pytest.mark.slow


def admin(proxy: Any, command: str) -> None:
    with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as conn:
        conn.execute(command)


def terminate_all(pg: EmbeddedPostgres, state: str) -> int:
    """pg_terminate_backend on the pooler's servers in ``state`` ('idle', 'idle in
    transaction', 'active'); returns how many."""
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
        rows = conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where datname = 'postgres'"
            " and pid <> pg_backend_pid() and backend_type = 'client backend' and state = %s",
            [state]).fetchall()
    return len(rows)


def test_server_terminated_mid_transaction_and_while_idle(proxy_factory: Any,
                                                          fault_pg: EmbeddedPostgres) -> None:
    ensure_running(fault_pg)
    proxy = proxy_factory(upstream=fault_params(fault_pg), default_pool_size=4)
    with psycopg.connect(proxy.dsn(dbname="test"), autocommit=False) as holder:
        holder.execute("select 1")  # its server is idle in transaction, linked
        killed = terminate_all(fault_pg, "idle in transaction")
        assert killed >= 1
        with pytest.raises(psycopg.OperationalError) as caught:
            holder.execute("select 2")
        assert caught.value.sqlstate in ("57P01", "08006"), caught.value
    load = Load(proxy, clients=6).start()
    try:
        wait_until(lambda: load.answers > 30, timeout=30)
        for _ in range(3):
            terminate_all(fault_pg, "idle")  # servers idle in the pool
            time.sleep(0.2)
        before = load.answers
        wait_until(lambda: load.answers > before + 30, timeout=15)
    finally:
        load.stop()
    assert load.wrong == []
    assert [e for e in load.bare_errors if "server closed the connection" not in e] == []
    with psycopg.connect(proxy.dsn(dbname="test"), autocommit=True) as conn:
        assert conn.execute("select 'fine'").fetchone() == ("fine",)


def test_network_resets_and_stalls_under_load(proxy_factory: Any,
                                              fault_pg: EmbeddedPostgres) -> None:
    ensure_running(fault_pg)
    relay = FaultRelay("127.0.0.1", fault_pg.port)
    try:
        proxy = proxy_factory(upstream={**fault_params(fault_pg), "port": str(relay.port)},
                              default_pool_size=4, query_wait_timeout=20)
        with psycopg.connect(proxy.dsn(dbname="test"), autocommit=True) as warm:
            warm.execute("select 1")
        def fds() -> int:  # the relay runs in this process too: 2 descriptors per server
            return open_fds() - proxy.server_count() - 2 * relay.open_pairs()

        baseline = fds()
        load = Load(proxy, clients=6).start()
        try:
            wait_until(lambda: load.answers > 30, timeout=30)
            for _ in range(3):  # the network drops every connection (RST)
                relay.reset_all()
                before = load.answers
                wait_until(lambda b=before: load.answers > b + 10, timeout=15)
            relay.delay = 0.05  # a slow network: still served
            before = load.answers
            wait_until(lambda: load.answers > before + 10, timeout=20)
            relay.delay = 0.0
            relay.stall()  # nothing passes for a while ...
            time.sleep(1.0)
            relay.resume()  # ... then everything does
            before = load.answers
            wait_until(lambda: load.answers > before + 30, timeout=15)
        finally:
            load.stop()
        assert load.wrong == []
        assert [e for e in load.bare_errors if "server closed the connection" not in e] == []
        wait_until(lambda: fds() <= baseline + 2, timeout=15)
    finally:
        relay.close()


def test_idle_servers_reset_are_never_lent_again(proxy_factory: Any,
                                                 fault_pg: EmbeddedPostgres) -> None:
    """The network resets the connections of servers idle in the compiled fast path: the
    engine hands each back to Python as dead, never as free to lend (it was lent again as it
    closed, and the next client waited forever: test_postgres_down's crash case)."""
    ensure_running(fault_pg)
    relay = FaultRelay("127.0.0.1", fault_pg.port)
    try:
        proxy = proxy_factory(upstream={**fault_params(fault_pg), "port": str(relay.port)},
                              default_pool_size=2)
        conns = servers_idle_in_the_fast_path(proxy)
        assert relay.reset_all() >= 1
        wait_until(lambda: proxy.server_count() == 0)  # the pooler has seen them end
        for conn in conns:
            assert answered_within(proxy, conn, "select 'back'", 10) == ("back",)
            conn.close()
    finally:
        relay.close()


def test_server_lost_while_set_to_a_clients_parameters(proxy_factory: Any,
                                                       fault_pg: EmbeddedPostgres) -> None:
    """A server being SET to a client's parameters (its application_name differs from the
    last user's) ends before it is the client's: nothing of the client's reached it, so the
    client gets the next server as if nothing happened. (Before, it was left with no server
    and in no line, and waited forever.)"""
    ensure_running(fault_pg)
    relay = FaultRelay("127.0.0.1", fault_pg.port)
    try:
        proxy = proxy_factory(upstream={**fault_params(fault_pg), "port": str(relay.port)},
                              default_pool_size=1)
        first = psycopg.connect(proxy.dsn(dbname="test", application_name="first"),
                                autocommit=True)
        second = psycopg.connect(proxy.dsn(dbname="test", application_name="second"),
                                 autocommit=True)
        assert first.execute("select 1").fetchone() == (1,)  # the server is first's again
        relay.stall()  # the SET for second's parameters goes nowhere ...
        asked = Asked(second, "select current_setting('application_name')")
        pooler = proxy.pooler
        assert pooler is not None
        wait_until(lambda: proxy.call(lambda: any(
            s.busy_internal for p in pooler.pools.values() for s in p.all_servers())))
        relay.reset_all()  # ... and the server ends under it
        relay.resume()
        assert asked.answer(proxy, 10) == ("second",)
        first.close()
        second.close()
    finally:
        relay.close()


def test_session_server_lost_while_its_startup_settings_are_put_back(
        proxy_factory: Any, fault_pg: EmbeddedPostgres) -> None:
    """Session mode: after a RESET ALL the pooler reads the session and SETs the client's
    startup settings again on its own server. If that server ends then, the session (its
    temporary tables, session locks, prepared statements) is gone with it: the client is
    told its connection is lost, as directly, and never goes on silently on a new backend
    (the line that serves a client between transactions is for clients whose server held
    none of theirs)."""
    ensure_running(fault_pg)
    relay = FaultRelay("127.0.0.1", fault_pg.port)
    try:
        proxy = proxy_factory(upstream={**fault_params(fault_pg), "port": str(relay.port)},
                              pool_mode="session", default_pool_size=2)
        conn = psycopg.connect(proxy.dsn(dbname="test"), options="-c statement_timeout=54321",
                               autocommit=True, connect_timeout=10)
        try:
            pid = conn.info.backend_pid
            conn.execute("create temporary table session_state (x int)")
            seen = [0]

            def cut(msg: bytes) -> bytes:
                # RESET ALL's ReadyForQuery, then the one of the pooler's read of the
                # session: the connection ends behind it, as the SET goes out.
                if msg[:1] == b"Z" and relay.rewrite_server is cut:
                    seen[0] += 1
                    if seen[0] == 2:
                        relay.rewrite_server = None
                        relay.end_after_rewrite = True
                return msg

            relay.rewrite_server = cut
            conn.execute("reset all")
            pooler = proxy.pooler
            assert pooler is not None
            wait_until(lambda: not proxy.call(lambda: [  # the pooler saw it end
                s for p in pooler.pools.values() for s in p.all_servers()
                if s.backend_pid == pid]))
            with pytest.raises(psycopg.OperationalError):
                # (the bug: answered by another backend, the session's table gone)
                row = conn.execute("select pg_backend_pid(), count(*) from session_state")
                raise AssertionError(f"went on silently: {row.fetchone()} (was pid {pid})")
        finally:
            conn.close()
    finally:
        relay.close()


def end_instead_of_next_ready_for_query(relay: FaultRelay) -> None:
    """The server's next ReadyForQuery never reaches the pooler: the connection ends in its
    place (a backend stopped -m immediate after its result: its WARNING flushes the result
    it had buffered, then it exits)."""
    def cut(msg: bytes) -> bytes:
        if msg[:1] == b"Z" and relay.rewrite_server is cut:
            relay.rewrite_server = None
            relay.end_after_rewrite = True
            return b""
        return msg

    relay.rewrite_server = cut


def commit_cut_off(dsn: str, relay: FaultRelay) -> psycopg.Error:
    """The error a client's COMMIT meets when PostgreSQL's CommandComplete reaches it and the
    connection then ends before the ReadyForQuery."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn, \
            pytest.raises(psycopg.Error) as caught, conn.transaction():
        conn.execute("select 1")
        end_instead_of_next_ready_for_query(relay)  # COMMIT's
    return caught.value


def empty_query_cut_off(dsn: str, relay: FaultRelay) -> psycopg.Error:
    """The error an empty query meets when PostgreSQL's EmptyQueryResponse (a result, as
    libpq reads it) reaches the client and the connection then ends before the
    ReadyForQuery."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn, \
            pytest.raises(psycopg.Error) as caught:
        conn.execute("select 1")
        end_instead_of_next_ready_for_query(relay)  # the empty query's
        conn.execute("")
    return caught.value


@pytest.mark.parametrize("fast_path", ["on", "off"])
@pytest.mark.parametrize("cut_off", [commit_cut_off, empty_query_cut_off],
                         ids=["commit", "empty_query"])
def test_server_lost_between_a_result_and_its_ready_for_query(
        proxy_factory: Any, fault_pg: EmbeddedPostgres, fast_path: str,
        cut_off: Callable[[str, FaultRelay], psycopg.Error]) -> None:
    """A server lost after it sent a result of the client's request and before its
    ReadyForQuery: the client reads what it would read directly, the result and then the
    close, without an error of the pooler's, which libpq read as a second result (psycopg's
    COMMIT: "received 2 results from command 'COMMIT'", the other rare failure of
    test_postgres_restarted_under_load[immediate]). An EmptyQueryResponse, the result of an
    empty query, is such a result too: the engine counts it, and so must the Python path."""
    ensure_running(fault_pg)
    relay = FaultRelay("127.0.0.1", fault_pg.port)
    try:
        upstream = {**fault_params(fault_pg), "port": str(relay.port)}
        direct = cut_off(
            f"postgresql://{upstream['user']}@127.0.0.1:{relay.port}/{upstream['dbname']}",
            relay)
        proxy = proxy_factory(upstream=upstream, fast_path=fast_path)
        through = cut_off(proxy.dsn(dbname="test"), relay)
        assert (type(through), through.sqlstate, str(through)) == \
            (type(direct), direct.sqlstate, str(direct))
    finally:
        relay.close()


def test_pause_resume_and_reload_under_load(proxy_factory: Any,
                                            fault_pg: EmbeddedPostgres) -> None:
    ensure_running(fault_pg)
    proxy = proxy_factory(upstream=fault_params(fault_pg), default_pool_size=4)
    load = Load(proxy, clients=6).start()
    try:
        wait_until(lambda: load.answers > 30, timeout=30)
        admin(proxy, "PAUSE test")
        paused_at = load.answers
        time.sleep(0.5)
        assert load.answers <= paused_at + load.clients  # at most the ones under way
        admin(proxy, "RESUME test")
        wait_until(lambda: load.answers > paused_at + 30, timeout=15)
        for _ in range(3):
            admin(proxy, "RELOAD")
            before = load.answers
            wait_until(lambda b=before: load.answers > b + 10, timeout=15)
    finally:
        load.stop()
    assert load.wrong == []
    assert load.errors == [] and load.bare_errors == []  # PAUSE and RELOAD lose nobody
