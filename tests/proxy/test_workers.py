"""``workers = N``: several pooler processes on one port, limits divided, cancels routed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pgpilot.embedded import free_port
from pgpilot.proxy.config import DatabaseConfig, default_config
from pgpilot.proxy.workers import share, worker_config

WORKERS_DB = "pgpilot_workers"


def test_limits_are_divided_exactly() -> None:
    cfg = default_config(
        default_pool_size=5, max_client_conn=1001, max_db_connections=7, min_pool_size=3,
        databases={"app": DatabaseConfig(name="app", pool_size=9, reserve_pool=1)})
    parts = [worker_config(cfg, i, 2) for i in range(2)]
    assert [p.default_pool_size for p in parts] == [3, 2]
    assert sum(p.max_client_conn for p in parts) == 1001
    assert sum(p.max_db_connections for p in parts) == 7
    assert sum(p.min_pool_size for p in parts) == 3
    assert sum(p.databases["app"].pool_size or 0 for p in parts) == 9
    assert all(p.so_reuseport for p in parts)
    assert [share(10, i, 3) for i in range(3)] == [4, 3, 3]
    assert worker_config(cfg, 0, 1) is cfg


@pytest.fixture
def workers_proxy(tmp_path: Path, pg_params, pg_dsn):
    yield from run_workers(tmp_path, pg_params, pg_dsn)


@pytest.fixture
def quiet_scram_workers_proxy(tmp_path: Path, pg_params, pg_dsn):
    """SCRAM logins and no connection logging: each worker's engine logs clients in alone
    once it has a login route (fastpath.LoginRoute)."""
    from tests.proxy.test_fastlogin import PASSWORD, scram_secret

    yield from run_workers(
        tmp_path, pg_params, pg_dsn,
        users=f'"carol" "{scram_secret(PASSWORD)}"\n',
        settings="auth_type = scram-sha-256\nlog_connections = 0\nlog_disconnections = 0\n",
        forced_user=pg_params["user"], login=f"carol:{PASSWORD}")


def run_workers(tmp_path: Path, pg_params, pg_dsn, users: str = "",
                settings: str = "auth_type = trust\n", forced_user: str = "",
                login: str = ""):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        if not conn.execute("select 1 from pg_database where datname = %s",
                            [WORKERS_DB]).fetchone():
            conn.execute(f"create database {WORKERS_DB}")
    port = free_port()
    (tmp_path / "users.txt").write_text(f'"{pg_params["user"]}" ""\n' + users)
    ini = tmp_path / "pgbouncer.ini"
    forced = f" user={forced_user}" if forced_user else ""
    ini.write_text(
        f"[databases]\n* = host={pg_params['host']} port={pg_params['port']}{forced}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"{settings}auth_file = users.txt\npool_mode = transaction\n"
        f"default_pool_size = 4\nworkers = 2\nlogfile = {tmp_path / 'log'}\n"
        f"pidfile = {tmp_path / 'pid'}\n")
    proc = subprocess.Popen([sys.executable, "-m", "pgpilot", "proxy", "--config", str(ini)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dsn = f"postgresql://{login or pg_params['user']}@127.0.0.1:{port}/{WORKERS_DB}"
    deadline = time.monotonic() + 30
    while True:
        try:
            psycopg.connect(dsn).close()
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)
    yield proc, dsn, tmp_path
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_two_workers_share_the_port_and_the_limits(workers_proxy, pg_dsn) -> None:
    proc, dsn, tmp = workers_proxy
    conns = [psycopg.connect(dsn, autocommit=False) for _ in range(30)]
    barrier_done = threading.Event()
    try:
        # Every client holds a transaction open on its server for a moment.
        def hold(conn: psycopg.Connection) -> None:
            conn.execute("select pg_sleep(0.3)")
            conn.commit()

        threads = [threading.Thread(target=hold, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        time.sleep(0.15)
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            row = admin.execute("select count(*) from pg_stat_activity where datname = %s",
                                [WORKERS_DB]).fetchone()
        for t in threads:
            t.join(30)
        barrier_done.set()
        assert row is not None and 2 <= row[0] <= 4  # both workers' pools, 4 in all
    finally:
        for c in conns:
            c.close()
    log = (tmp / "log").read_text()
    worker_pids = {line.split()[2] for line in log.splitlines() if "login ok" in line}
    assert len(worker_pids) == 2  # the kernel spread the clients over both workers
    assert (tmp / "pid").read_text().strip() == str(proc.pid)


@pytest.mark.parametrize("setup", ["workers_proxy", "quiet_scram_workers_proxy"])
def test_cancel_reaches_the_right_worker(setup: str, request: pytest.FixtureRequest) -> None:
    """Also for clients a worker's engine logged in alone: their cancel keys carry the
    worker's index as Python's do."""
    _proc, dsn, _tmp = request.getfixturevalue(setup)
    for _ in range(8):  # each cancel lands on a random worker; all must work
        conn = psycopg.connect(dsn, autocommit=True)
        timer = threading.Timer(0.3, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(20)")
        timer.join()
        conn.close()


def test_dead_worker_is_replaced_and_sigterm_stops_all(workers_proxy) -> None:
    proc, dsn, tmp = workers_proxy
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
    assert len(children) == 2
    os.kill(int(children[0]), signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                             text=True).stdout.split()
        if len(now) == 2 and children[0] not in now:
            break
        time.sleep(0.2)
    assert len(now) == 2 and children[0] not in now
    for _ in range(6):
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert not (tmp / "pid").exists()
