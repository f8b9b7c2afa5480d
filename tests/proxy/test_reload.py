"""``pgpilot proxy --config`` as a process under signals: what a reload changes, and when.

SIGHUP: a larger pool_size serves clients already waiting; a changed [databases] host/port
closes old servers once they are free (never under a running transaction); TLS settings apply to
new clients; a broken file keeps the running configuration. SIGTERM: ``shutdown_timeout``
bounds the wait for running transactions, and the exit status is 0.
(tests/proxy/test_operations.py covers pidfile/logfile and the plain SIGHUP/SIGTERM cases.)
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import write_config
from tests.proxy.test_operations import ProxyProcess, wait_until
from tests.proxy.test_tls import Certs


@pytest.fixture
def start(pg_params: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def make(**settings: Any) -> ProxyProcess:
        databases = settings.pop("databases", None)
        settings.setdefault("logfile", str(tmp_path / "pgpilot.log"))
        path, port = write_config(tmp_path, pg_params, settings, databases)
        process = ProxyProcess(path, port, tmp_path)
        started.append(process)
        return process

    yield make
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(10)


def edit(process: ProxyProcess, pattern: str, replacement: str) -> None:
    text = process.config_path.read_text()
    new = re.sub(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert new != text, pattern
    process.config_path.write_text(new)


def reload(process: ProxyProcess) -> None:
    log = process.logfile
    before = log.read_text().count("configuration reloaded") if log.exists() else 0
    process.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: log.read_text().count("configuration reloaded") > before)


def connect(process: ProxyProcess, dbname: str = "test", **kw: Any) -> psycopg.Connection[Any]:
    kw.setdefault("autocommit", True)
    return psycopg.connect(process.dsn(dbname), **kw)


def in_transaction(process: ProxyProcess) -> psycopg.Connection[Any]:
    """A client holding a server: its transaction is open after a first statement."""
    conn = connect(process)
    conn.execute("begin")
    conn.execute("select 1")
    return conn


def backend_alive(pg_dsn: str, pid: int) -> bool:
    with psycopg.connect(pg_dsn, autocommit=True) as direct:
        return direct.execute("select count(*) from pg_stat_activity where pid = %s",
                              [pid]).fetchone() == (1,)


def test_larger_pool_size_serves_clients_already_waiting(start: Callable[..., ProxyProcess]
                                                         ) -> None:
    process = start(default_pool_size=1, query_wait_timeout=30)
    holder = in_transaction(process)  # the pool's only server is held
    result: list[Any] = []
    waiter = threading.Thread(
        target=lambda: result.append(connect(process).execute("select 2").fetchone()),
        daemon=True)
    waiter.start()
    waiter.join(1)
    assert waiter.is_alive()  # waiting for a server
    edit(process, r"^default_pool_size = 1$", "default_pool_size = 2")
    reload(process)
    waiter.join(15)
    assert result == [(2,)]  # served by a second server while the first is still held
    holder.execute("commit")
    holder.close()


def test_changed_database_address_closes_old_servers_once_free(
        start: Callable[..., ProxyProcess], pg_params: dict[str, str], pg_dsn: str) -> None:
    if pg_params["host"] != "127.0.0.1":
        pytest.skip("the test PostgreSQL is not on 127.0.0.1")
    process = start(default_pool_size=2)
    busy, other = connect(process), connect(process)
    busy.execute("begin")
    (old_busy,) = busy.execute("select pg_backend_pid()").fetchone()
    (old_idle,) = other.execute("select pg_backend_pid()").fetchone()
    assert old_busy != old_idle
    # The same PostgreSQL under another name: a different address as far as the pooler knows.
    edit(process, r"^test = host=127\.0\.0\.1 ", "test = host=localhost ")
    reload(process)
    wait_until(lambda: not backend_alive(pg_dsn, old_idle))  # a free old server: closed now
    # The running transaction goes on, on its old server.
    assert busy.execute("select pg_backend_pid()").fetchone() == (old_busy,)
    assert backend_alive(pg_dsn, old_busy)
    busy.execute("commit")
    wait_until(lambda: not backend_alive(pg_dsn, old_busy))  # closed once free
    (new,) = busy.execute("select pg_backend_pid()").fetchone()
    assert new not in (old_busy, old_idle)
    assert other.execute("select 1").fetchone() == (1,)
    busy.close()
    other.close()


def test_tls_enabled_by_reload(start: Callable[..., ProxyProcess], tmp_path: Path) -> None:
    certs = Certs(tmp_path / "certs")
    process = start(client_tls_sslmode="disable")
    kept = connect(process, sslmode="disable")
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        connect(process, sslmode="require")
    text = process.config_path.read_text().replace(
        "client_tls_sslmode = disable",
        f"client_tls_sslmode = require\nclient_tls_cert_file = {certs.cert}\n"
        f"client_tls_key_file = {certs.key}")
    process.config_path.write_text(text)
    reload(process)
    with connect(process, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        connect(process, sslmode="disable")
    assert kept.execute("select 1").fetchone() == (1,)  # a client already in stays
    kept.close()


def test_broken_config_on_reload_keeps_the_running_one(start: Callable[..., ProxyProcess]
                                                       ) -> None:
    process = start()
    with connect(process) as conn:
        process.config_path.write_text(process.config_path.read_text()
                                       + "default_pool_size = many\n")
        process.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload failed" in process.logfile.read_text())
        assert conn.execute("select 1").fetchone() == (1,)
    with connect(process) as conn:
        assert conn.execute("select 2").fetchone() == (2,)
    assert process.proc.poll() is None


def test_shutdown_timeout_bounds_the_wait(start: Callable[..., ProxyProcess]) -> None:
    process = start(shutdown_timeout=1)
    stuck = in_transaction(process)
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(20) == 0  # did not wait for the transaction past the timeout
    with pytest.raises(psycopg.OperationalError):
        stuck.execute("select 1")
    stuck.close()
    assert "pgpilot stopped" in process.logfile.read_text()


def test_client_between_transactions_gets_no_new_one_during_shutdown(
        start: Callable[..., ProxyProcess]) -> None:
    """Transaction mode: while the drain waits for a running transaction, an idle client's new
    transaction is not started (it waits, then is told the pooler is shutting down)."""
    process = start(shutdown_timeout=20)
    running, idle = in_transaction(process), connect(process)
    idle.execute("select 1")
    process.proc.send_signal(signal.SIGINT)  # (SIGTERM waits for clients, as PgBouncer)
    wait_until(process.refuses)
    outcome: list[BaseException] = []

    def late() -> None:
        try:
            idle.execute("select 2")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=late, daemon=True)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive()  # held back: the drain converges
    running.execute("commit")
    assert process.proc.wait(20) == 0
    thread.join(10)
    assert outcome and isinstance(outcome[0], psycopg.OperationalError)
    assert "shutting down" in str(outcome[0])
    running.close()
    idle.close()


def test_second_stop_signal_stops_at_once(start: Callable[..., ProxyProcess]) -> None:
    process = start(shutdown_timeout=60)
    stuck = in_transaction(process)
    process.proc.send_signal(signal.SIGTERM)
    wait_until(process.refuses)
    assert process.proc.poll() is None  # waiting for the transaction
    process.proc.send_signal(signal.SIGINT)
    assert process.proc.wait(15) == 0  # well before shutdown_timeout
    with pytest.raises(psycopg.OperationalError):
        stuck.execute("select 1")
    stuck.close()
