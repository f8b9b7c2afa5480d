"""Running ``pgpilot proxy`` as a process: signals, pidfile and logfile.

SIGHUP reloads the configuration without dropping anyone. SIGTERM and SIGINT stop accepting
connections, let running transactions finish (up to ``shutdown_timeout``), then exit 0.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from tests.proxy.conftest import wait_until, write_config


class ProxyProcess:
    def __init__(self, path: Path, port: int, folder: Path) -> None:
        self.config_path = path
        self.port = port
        self.pidfile = folder / "pgpilot.pid"
        self.logfile = folder / "pgpilot.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgpilot", "proxy", "--config", str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(self.accepts, timeout=30)

    def dsn(self, dbname: str = "test") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def accepts(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"pgpilot exited: {self.proc.stdout.read()}")  # type: ignore[union-attr]
        try:
            psycopg.connect(self.dsn("pgbouncer"), autocommit=True, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def refuses(self) -> bool:
        try:
            psycopg.connect(self.dsn(), connect_timeout=2).close()
        except psycopg.OperationalError:
            return True
        return False

    def console(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn("pgbouncer"), autocommit=True, row_factory=dict_row)


@pytest.fixture
def proxy_process(pg_params: dict[str, str], tmp_path: Path) -> Iterator[ProxyProcess]:
    settings = {"pidfile": str(tmp_path / "pgpilot.pid"), "logfile": str(tmp_path / "pgpilot.log"),
                "shutdown_timeout": 20, "pool_mode": "transaction"}
    path, port = write_config(tmp_path, pg_params, settings)
    process = ProxyProcess(path, port, tmp_path)
    yield process
    if process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait(10)


def test_pidfile_and_logfile(proxy_process: ProxyProcess) -> None:
    assert proxy_process.pidfile.read_text().strip() == str(proxy_process.proc.pid)
    with psycopg.connect(proxy_process.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
    wait_until(lambda: "listening on 127.0.0.1" in proxy_process.logfile.read_text(),
               timeout=15.0)
    proxy_process.proc.send_signal(signal.SIGTERM)
    assert proxy_process.proc.wait(30) == 0
    assert not proxy_process.pidfile.exists()
    assert "pgpilot stopped" in proxy_process.logfile.read_text()


def test_sighup_reloads_without_dropping_anyone(proxy_process: ProxyProcess) -> None:
    text = proxy_process.config_path.read_text()
    with psycopg.connect(proxy_process.dsn(), autocommit=True) as conn, \
            proxy_process.console() as console:
        conn.execute("begin")
        pid = conn.execute("select pg_backend_pid()").fetchone()
        proxy_process.config_path.write_text(
            text.replace("default_pool_size = 5", "default_pool_size = 2"))
        proxy_process.proc.send_signal(signal.SIGHUP)

        def reloaded() -> bool:
            rows = console.execute("SHOW DATABASES").fetchall()
            return {r["name"]: r["pool_size"] for r in rows}["test"] == 2

        wait_until(reloaded, timeout=15.0)
        # The open transaction went on, on the same server connection.
        assert conn.execute("select pg_backend_pid()").fetchone() == pid
        conn.execute("commit")
        assert conn.execute("select 1").fetchone() == (1,)
    assert proxy_process.proc.poll() is None


@pytest.mark.parametrize("signum", [signal.SIGINT])
def test_stop_signal_lets_running_transactions_finish(proxy_process: ProxyProcess,
                                                      pg_dsn: str, signum: int) -> None:
    table = f"pgpilot_stop_{signum}"
    with psycopg.connect(pg_dsn, autocommit=True) as direct:
        direct.execute(f"drop table if exists {table}")
        direct.execute(f"create table {table} (x int)")
    try:
        conn = psycopg.connect(proxy_process.dsn(), autocommit=True)
        conn.execute("begin")
        conn.execute(f"insert into {table} values (1)")
        proxy_process.proc.send_signal(signum)
        wait_until(proxy_process.refuses, timeout=15.0)  # no new clients
        assert proxy_process.proc.poll() is None  # still waiting for the transaction
        conn.execute(f"insert into {table} values (2)")
        conn.execute("commit")
        assert proxy_process.proc.wait(30) == 0
        conn.close()
        with psycopg.connect(pg_dsn, autocommit=True) as direct:
            assert direct.execute(f"select count(*) from {table}").fetchone() == (2,)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as direct:
            direct.execute(f"drop table if exists {table}")


def test_sigterm_waits_for_clients_to_disconnect(proxy_process: ProxyProcess) -> None:
    """SIGTERM as PgBouncer 1.23: no new clients, but the connected ones go on (a new
    transaction included) until they disconnect; then the process exits. SIGUSR2 (RESUME)
    meanwhile is ignored, and said so."""
    conn = psycopg.connect(proxy_process.dsn(), autocommit=True)
    conn.execute("select 1")
    proxy_process.proc.send_signal(signal.SIGTERM)
    wait_until(proxy_process.refuses, timeout=15.0)
    proxy_process.proc.send_signal(signal.SIGUSR2)
    time.sleep(0.5)
    assert conn.execute("select 2").fetchone() == (2,)  # still served
    assert proxy_process.proc.poll() is None
    conn.close()
    assert proxy_process.proc.wait(15) == 0
    assert "got SIGUSR2 while shutting down, ignoring" in proxy_process.logfile.read_text()


def test_each_worker_serves_its_own_metrics(pg_params: dict[str, str], tmp_path: Path) -> None:
    """workers = 2: worker i exports on metrics_port + i, and each counts its own traffic."""
    import socket
    import urllib.request

    from pgpilot.embedded import free_port

    def two_free_ports() -> int:
        """A port p with p + 1 free as well (both workers' exporters need theirs)."""
        while True:
            port = free_port()
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port

    metrics_port = two_free_ports()
    settings = {"workers": 2, "metrics_port": metrics_port, "unix_socket_dir": ""}
    path, port = write_config(tmp_path, pg_params, settings)
    process = ProxyProcess(path, port, tmp_path)

    def scrape(n: int) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port + n}/metrics",
                                        timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            return None

    try:
        for _ in range(6):
            with psycopg.connect(process.dsn(), autocommit=True) as conn:
                conn.execute("select 1")
        texts = [wait_until(lambda n=n: scrape(n), timeout=15.0) for n in range(2)]
        assert all("pgpilot_start_time_seconds" in text for text in texts)
        assert any('pgpilot_queries_total{database="test",user="postgres"}' in text
                   for text in texts)
    finally:
        process.proc.send_signal(signal.SIGTERM)
        process.proc.wait(30)
