"""Limits and timeouts, each as PgBouncer documents it, each observed from outside.

Timeouts are small (0.5-2 s, the janitor ticks every 0.2 s); the tests wait for effects
(``eventually``) and never assert how long something took.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import RunningProxy

from pgpilot.wire import messages as m


def connect(proxy: RunningProxy, dbname: str = "test", **kw: Any) -> psycopg.Connection[Any]:
    kw.setdefault("autocommit", True)
    kw.setdefault("prepare_threshold", None)
    return psycopg.connect(proxy.dsn(dbname), **kw)


def eventually(check: Callable[[], Any], timeout: float = 10, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what or check}")
        time.sleep(0.05)


def pool_servers(proxy: RunningProxy, db: str, user: str = "postgres") -> int:
    pooler = proxy.pooler
    assert pooler is not None

    def count() -> int:
        pool = pooler.pools.get((db, user))
        return pool.server_count() if pool is not None else 0

    return int(proxy.call(count))


def waiting_clients(proxy: RunningProxy) -> int:
    pooler = proxy.pooler
    assert pooler is not None
    # Python's line and the fast path's (fastpath.py).
    return int(proxy.call(lambda: sum(p.waiting_count() for p in pooler.pools.values())))


def startup_error(port: int, dbname: str = "test") -> dict[str, str]:
    """Log in by hand; the fields of the ErrorResponse the pooler answers with."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(m.startup_message({"user": "postgres", "database": dbname}))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    while data:
        (length,) = struct.unpack("!i", data[1:5])
        if data[:1] == b"E":
            return m.parse_error_fields(data[5:1 + length])
        data = data[1 + length:]
    raise AssertionError("no ErrorResponse from the pooler")


class Background:
    """A statement run in a thread (a client that may have to wait for a server)."""

    def __init__(self, proxy: RunningProxy, sql: str, dbname: str = "test") -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(proxy, dbname, sql), daemon=True)
        self.thread.start()

    def _run(self, proxy: RunningProxy, dbname: str, sql: str) -> None:
        try:
            with connect(proxy, dbname) as conn:
                self.result = conn.execute(sql).fetchall()
        except BaseException as exc:
            self.error = exc

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def outcome(self, timeout: float = 20) -> Any:
        self.thread.join(timeout)
        assert self.done, "statement still waiting"
        return self.error if self.error is not None else self.result


@pytest.fixture
def direct(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


def upstream_db(pg_params: dict[str, str], **extra: str) -> str:
    return " ".join([f"host={pg_params['host']} port={pg_params['port']} "
                     f"dbname={pg_params['dbname']}",
                     *(f"password={pg_params['password']}" for _ in [1] if pg_params["password"]),
                     *(f"{k}={v}" for k, v in extra.items())])


# -- client and server counts --------------------------------------------------------------


def test_max_client_conn(proxy_factory: Any) -> None:
    proxy = proxy_factory(max_client_conn=2)
    first, second = connect(proxy), connect(proxy)
    with pytest.raises(psycopg.OperationalError, match=r"max_client_conn"):
        connect(proxy)
    error = startup_error(proxy.port)
    assert error["C"] == "53300"
    assert error["M"] == "no more connections allowed (max_client_conn)"
    assert first.execute("select 1").fetchone() == (1,)  # those inside are untouched
    first.close()
    with connect(proxy) as third:  # room again
        assert third.execute("select 3").fetchone() == (3,)
    second.close()


def test_max_db_connections(proxy_factory: Any) -> None:
    proxy = proxy_factory(default_pool_size=5, max_db_connections=2)
    holders = [connect(proxy, autocommit=False) for _ in range(2)]
    for conn in holders:
        conn.execute("select 1")  # each holds a server: a transaction is open
    waiter = Background(proxy, "select 42")
    eventually(lambda: waiting_clients(proxy) == 1, what="third client waits")
    assert pool_servers(proxy, "test") == 2
    holders[0].commit()
    assert waiter.outcome() == [(42,)]
    assert pool_servers(proxy, "test") == 2
    for conn in holders:
        conn.close()


def test_max_user_connections_across_pools(proxy_factory: Any,
                                           pg_params: dict[str, str]) -> None:
    """Two databases, one server user, max_user_connections = 2: the second pool's client
    gets a server once one of the first pool's closes (server_idle_timeout), as documented."""
    proxy = proxy_factory(default_pool_size=5, max_user_connections=2, server_idle_timeout=0.5,
                          databases={"other": upstream_db(pg_params)})
    holders = [connect(proxy, autocommit=False) for _ in range(2)]
    for conn in holders:
        conn.execute("select 1")
    waiter = Background(proxy, "select 7", dbname="other")
    time.sleep(0.5)  # its login waits for a first server the limit does not allow yet
    assert not waiter.done and pool_servers(proxy, "other") == 0
    for conn in holders:
        conn.commit()  # servers go idle, then close after server_idle_timeout
    assert waiter.outcome() == [(7,)]
    assert pool_servers(proxy, "test") + pool_servers(proxy, "other") <= 2
    for conn in holders:
        conn.close()


def test_min_pool_size_prewarms_and_holds(proxy_factory: Any, pg_params: dict[str, str]) -> None:
    proxy = proxy_factory(server_idle_timeout=0.5, default_pool_size=5, databases={
        "warm": upstream_db(pg_params, user=pg_params["user"], min_pool_size="2")})
    # Forced user: the pool exists and fills before any client connects.
    eventually(lambda: pool_servers(proxy, "warm", pg_params["user"]) == 2, what="pre-warmed")
    conns = [connect(proxy, "warm", autocommit=False) for _ in range(4)]
    for conn in conns:
        conn.execute("select 1")
    assert pool_servers(proxy, "warm", pg_params["user"]) == 4
    for conn in conns:
        conn.close()
    eventually(lambda: pool_servers(proxy, "warm", pg_params["user"]) == 2,
               what="extras closed by server_idle_timeout")
    time.sleep(1.2)  # several idle timeouts later, still at the minimum
    assert pool_servers(proxy, "warm", pg_params["user"]) == 2


def test_reserve_pool_after_reserve_pool_timeout(proxy_factory: Any) -> None:
    proxy = proxy_factory(default_pool_size=1, reserve_pool_size=1, reserve_pool_timeout=1.5)
    holder = connect(proxy, autocommit=False)
    holder.execute("select 1")
    waiter = Background(proxy, "select 2")
    eventually(lambda: waiting_clients(proxy) == 1, what="client waits")
    time.sleep(0.3)  # well inside reserve_pool_timeout: no extra server yet
    assert not waiter.done and pool_servers(proxy, "test") == 1
    assert waiter.outcome() == [(2,)]  # then the reserve serves it
    assert pool_servers(proxy, "test") == 2
    holder.close()


def test_no_reserve_when_reserve_pool_size_is_zero(proxy_factory: Any) -> None:
    proxy = proxy_factory(default_pool_size=1, reserve_pool_size=0, reserve_pool_timeout=0.2,
                          query_wait_timeout=1)
    holder = connect(proxy, autocommit=False)
    holder.execute("select 1")
    outcome = Background(proxy, "select 2").outcome()
    assert isinstance(outcome, psycopg.OperationalError)
    assert "query_wait_timeout" in str(outcome)
    assert pool_servers(proxy, "test") == 1
    holder.close()


# -- server upkeep ---------------------------------------------------------------------------


def test_server_lifetime_replaces_old_servers_when_unused(proxy_factory: Any) -> None:
    proxy = proxy_factory(default_pool_size=1, server_lifetime=1)
    with connect(proxy) as conn:
        first = conn.execute("select pg_backend_pid()").fetchone()
        # A server in use is never closed for its age: a transaction outlives the lifetime.
        with conn.transaction():
            conn.execute("select pg_sleep(1.2)")
            assert conn.execute("select pg_backend_pid()").fetchone() == first
        time.sleep(0.5)
        second = conn.execute("select pg_backend_pid()").fetchone()
        assert second != first


def test_server_idle_timeout(proxy_factory: Any) -> None:
    proxy = proxy_factory(server_idle_timeout=0.5)
    with connect(proxy) as conn:
        conn.execute("select 1")
        assert pool_servers(proxy, "test") == 1
        eventually(lambda: pool_servers(proxy, "test") == 0, what="idle server closed")
        assert conn.execute("select 1").fetchone() == (1,)  # a new one is opened


def test_server_connect_timeout(proxy_factory: Any) -> None:
    # A port that accepts connections (the kernel's backlog) but never answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    try:
        proxy = proxy_factory(server_connect_timeout=1, query_timeout=2.5, databases={
            "silent": f"host=127.0.0.1 port={port} dbname=nothing"})
        # As PgBouncer, the client keeps waiting while the pool retries (server_login_retry)
        # until query_timeout ends its wait; it is told the last failure.
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError,
                           match=r"(?s)query_timeout.*server_connect_timeout"):
            connect(proxy, "silent", connect_timeout=15)
        assert 2.5 <= time.monotonic() - started < 10
        with connect(proxy) as conn:  # other databases are unaffected
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        silent.close()


def test_server_check_query_runs_after_delay(proxy_factory: Any,
                                             direct: psycopg.Connection[Any]) -> None:
    direct.execute("drop sequence if exists pgpilot_check_seq")
    direct.execute("create sequence pgpilot_check_seq")
    try:
        proxy = proxy_factory(server_check_delay=0.5,
                              server_check_query="select nextval('pgpilot_check_seq')")

        def checks() -> int:
            row = direct.execute("select last_value, is_called from pgpilot_check_seq").fetchone()
            assert row is not None
            return int(row[0]) if row[1] else 0

        with connect(proxy) as conn:
            conn.execute("select 1")
            conn.execute("select 1")  # used again at once: no check
            assert checks() == 0
            time.sleep(0.8)
            conn.execute("select 1")  # idle longer than server_check_delay: checked first
            assert checks() == 1
    finally:
        direct.execute("drop sequence if exists pgpilot_check_seq")


def test_server_failing_its_check_is_replaced(proxy_factory: Any,
                                              direct: psycopg.Connection[Any]) -> None:
    direct.execute("create table if not exists pgpilot_check_tbl ()")
    try:
        proxy = proxy_factory(server_check_delay=0.3,
                              server_check_query="select 1 from pgpilot_check_tbl")
        with connect(proxy) as conn:
            first = conn.execute("select pg_backend_pid()").fetchone()
            direct.execute("drop table pgpilot_check_tbl")  # the check now fails
            time.sleep(0.6)
            second = conn.execute("select pg_backend_pid()").fetchone()
            assert second != first  # closed after its failed check; a new server served us
    finally:
        direct.execute("drop table if exists pgpilot_check_tbl")


def test_terminated_idle_server_does_not_reach_a_client(proxy_factory: Any,
                                                        direct: psycopg.Connection[Any]) -> None:
    proxy = proxy_factory(server_check_delay=0)
    with connect(proxy) as conn:
        (pid,) = conn.execute("select pg_backend_pid()").fetchone()
        direct.execute("select pg_terminate_backend(%s)", [pid])
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.execute("select pg_backend_pid()").fetchone() != (pid,)


# -- client timeouts -------------------------------------------------------------------------


def test_client_idle_timeout(proxy_factory: Any) -> None:
    proxy = proxy_factory(client_idle_timeout=0.5)
    with connect(proxy) as idle, connect(proxy) as busy:
        idle.execute("select 1")
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # activity keeps a client in
            busy.execute("select 1")
            time.sleep(0.1)
        with pytest.raises(psycopg.OperationalError):
            idle.execute("select 1")
        assert busy.execute("select 1").fetchone() == (1,)


def test_client_idle_timeout_per_user(proxy_factory: Any, pg_params: dict[str, str]) -> None:
    proxy = proxy_factory(client_idle_timeout=0,
                          users={pg_params["user"]: "client_idle_timeout=0.5"})
    with connect(proxy) as conn:
        conn.execute("select 1")
        time.sleep(1.2)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")


def test_idle_transaction_timeout_rolls_back(proxy_factory: Any,
                                             direct: psycopg.Connection[Any]) -> None:
    direct.execute("create table if not exists pgpilot_idle_txn (x int)")
    try:
        proxy = proxy_factory(idle_transaction_timeout=0.5, default_pool_size=1)
        conn = connect(proxy, autocommit=False)
        (pid,) = conn.execute("select pg_backend_pid()").fetchone()
        conn.execute("lock table pgpilot_idle_txn in access exclusive mode")

        def released() -> bool:
            row = direct.execute(
                "select state, (select count(*) from pg_locks l join pg_class c "
                "on c.oid = l.relation where l.pid = a.pid and c.relname = 'pgpilot_idle_txn') "
                "from pg_stat_activity a where pid = %s", [pid]).fetchone()
            return row is not None and row[0] == "idle" and row[1] == 0

        eventually(released, what="transaction rolled back, lock gone, server kept")
        with pytest.raises(psycopg.Error, match="idle transaction timeout") as info:
            conn.execute("select 1")
        assert info.value.sqlstate == "25P03"
        conn.close()
        with connect(proxy) as other:  # the same server serves the next client
            assert other.execute("select pg_backend_pid()").fetchone() == (pid,)
    finally:
        direct.execute("drop table if exists pgpilot_idle_txn")


def test_server_check_query_empty(proxy_factory: Any) -> None:
    """``<empty>`` (PgBouncer's default) sends an empty query; the server passes its check."""
    proxy = proxy_factory(server_check_delay=0, server_check_query="<empty>")
    with connect(proxy) as conn:
        first = conn.execute("select pg_backend_pid()").fetchone()
        for _ in range(3):
            assert conn.execute("select pg_backend_pid()").fetchone() == first
