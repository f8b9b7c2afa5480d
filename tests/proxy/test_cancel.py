"""Cancel requests through the pooler: each client's own BackendKeyData, routed to the one
server that client is using at that moment, and to nobody else, ever."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import RunningProxy

from pgpilot.wire import messages as m


def connect(proxy: RunningProxy, **kw: Any) -> psycopg.Connection[Any]:
    kw.setdefault("autocommit", True)
    kw.setdefault("prepare_threshold", None)
    return psycopg.connect(proxy.dsn(), **kw)


class Running:
    """A statement run in a thread; ``outcome()`` is its result or the exception it raised."""

    def __init__(self, conn: psycopg.Connection[Any], sql: str) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(conn, sql), daemon=True)
        self.thread.start()

    def _run(self, conn: psycopg.Connection[Any], sql: str) -> None:
        try:
            self.result = conn.execute(sql).fetchall()
        except BaseException as exc:
            self.error = exc

    def outcome(self, timeout: float = 30) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "statement still running"
        return self.error if self.error is not None else self.result


def wait_active(pg_dsn: str, pid: int) -> None:
    """Until backend ``pid`` runs a statement (pg_stat_activity says active)."""
    deadline = time.monotonic() + 10
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        while time.monotonic() < deadline:
            row = admin.execute("select state, wait_event from pg_stat_activity where pid = %s",
                                [pid]).fetchone()
            if row and row[0] == "active" and row[1] == "PgSleep":
                return
            time.sleep(0.05)
    raise AssertionError(f"backend {pid} never started its pg_sleep")


def send_cancel(port: int, pid: int, key: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(m.cancel_request(pid, key))
        sock.settimeout(5)
        assert sock.recv(100) == b""  # closed without a word, as PostgreSQL does


def test_cancel_interrupts_the_clients_query(proxy: RunningProxy, pg_dsn: str) -> None:
    with connect(proxy) as conn:
        server_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        # The pooler's key data is its own, not the server's.
        assert conn.info.backend_pid != server_pid
        running = Running(conn, "select pg_sleep(30)")
        wait_active(pg_dsn, server_pid)
        conn.cancel_safe()
        outcome = running.outcome(15)
        assert isinstance(outcome, psycopg.errors.QueryCanceled), outcome
        assert outcome.sqlstate == "57014"
        # The connection is usable afterwards, and so is its server.
        assert conn.execute("select 1").fetchone() == (1,)


def test_cancel_with_unknown_key_or_for_an_idle_client_hits_nobody(
        proxy: RunningProxy, pg_dsn: str) -> None:
    with connect(proxy) as sleeper, connect(proxy) as idle:
        idle.execute("select 1")
        server_pid = sleeper.execute("select pg_backend_pid()").fetchone()[0]
        running = Running(sleeper, "select pg_sleep(1.5)")
        wait_active(pg_dsn, server_pid)
        # Made-up keys, including the sleeper's pid with a wrong key and the server's own pid.
        send_cancel(proxy.port, 12345, 67890)
        send_cancel(proxy.port, sleeper.info.backend_pid, 1)
        send_cancel(proxy.port, server_pid, 0)
        # A real key, of a client with nothing running.
        idle.cancel_safe()
        assert running.outcome(15) == [("",)]  # pg_sleep finished, not canceled
        assert idle.execute("select 2").fetchone() == (2,)


def test_cancel_never_hits_another_clients_query(proxy_factory: Any, pg_dsn: str) -> None:
    """Two clients on one server (transaction mode, pool_size 1): A's cancel, sent while B
    runs on the server A used a moment ago, does nothing to B."""
    proxy = proxy_factory(default_pool_size=1)
    with connect(proxy) as a, connect(proxy) as b:
        pid_a = a.execute("select pg_backend_pid()").fetchone()[0]
        pid_b = b.execute("select pg_backend_pid()").fetchone()[0]
        assert pid_a == pid_b  # the same server
        running = Running(b, "select pg_sleep(1.5)")
        wait_active(pg_dsn, pid_b)
        for _ in range(3):
            a.cancel_safe()
        assert running.outcome(15) == [("",)]


def test_cancel_right_after_the_query_ends_spares_the_next_client(
        proxy_factory: Any, pg_dsn: str) -> None:
    """A cancel racing with the end of its query: the server is not lent to the next client
    until PostgreSQL has taken the cancel, so B's statements all complete."""
    proxy = proxy_factory(default_pool_size=1)
    with connect(proxy) as a, connect(proxy) as b:
        stop = threading.Event()
        errors: list[BaseException] = []

        def b_loop() -> None:
            while not stop.is_set():
                try:
                    b.execute("select pg_sleep(0.02)")
                except BaseException as exc:
                    errors.append(exc)
                    return

        thread = threading.Thread(target=b_loop, daemon=True)
        thread.start()
        try:
            for i in range(60):
                running = Running(a, "select pg_sleep(0.02)")
                time.sleep((i % 12) * 0.004)  # cancels landing before, at and after its end
                a.cancel_safe()
                outcome = running.outcome(15)
                assert outcome == [("",)] or isinstance(outcome, psycopg.errors.QueryCanceled)
        finally:
            stop.set()
            thread.join(15)
        assert not errors, errors


def test_cancel_packet_garbage_is_harmless(proxy: RunningProxy) -> None:
    with connect(proxy) as conn:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            # A CancelRequest cut short, then a close.
            sock.sendall(struct.pack("!ii", 16, 80877102) + b"\x00\x00")
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize("mode", ["session", "statement"])
def test_cancel_in_other_pool_modes(proxy_factory: Any, pg_dsn: str, mode: str) -> None:
    proxy = proxy_factory(pool_mode=mode)
    with connect(proxy) as conn:
        server_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        running = Running(conn, "select pg_sleep(30)")
        wait_active(pg_dsn, server_pid)
        conn.cancel_safe()
        assert isinstance(running.outcome(15), psycopg.errors.QueryCanceled)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_the_cancel_connection_closes_once_postgresql_took_the_request(
        proxy_factory: Any, mode: str) -> None:
    """As PostgreSQL, the pooler closes a client's cancel connection only once the cancel
    reached the server (PostgreSQL closed the pooler's own cancel connection): asyncpg waits
    for that close, then for the cancelled query's end, then sends its next query. Closed at
    once, a cancel still on its way hit that next query now and then (asyncpg's
    test_timeout_02: QueryCanceledError on the 'select 1' after a timed-out statement)."""
    import asyncio

    import asyncpg

    proxy = proxy_factory(pool_mode=mode, default_pool_size=2)

    async def check() -> list[str]:
        con = await asyncpg.connect(proxy.dsn())
        wrong: list[str] = []
        try:
            st = await con.prepare("select pg_sleep(10)")
            for i in range(30):
                try:
                    await st.fetchval(timeout=0.02)
                    wrong.append(f"{i}: no timeout")
                except TimeoutError:
                    pass
                except asyncpg.PostgresError as exc:
                    wrong.append(f"{i}: the statement: {exc!r}")
                try:
                    assert await con.fetchval("select 1") == 1
                except asyncpg.PostgresError as exc:
                    wrong.append(f"{i}: the next query: {exc!r}")
        finally:
            await con.close()
        return wrong

    assert asyncio.run(check()) == []
