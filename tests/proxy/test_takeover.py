"""Online restart (``pgpilot-pgbouncer -R``): the new process takes the listening sockets over,
the old one finishes with its clients and leaves the socket file and the pidfile to it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgpilot.embedded import free_port
from pgpilot.proxy.config import default_config
from pgpilot.proxy.takeover import TAKEOVER_HELLO, TakeoverError, take_over, takeover_socket_path


def write_ini(tmp_path: Path, pg_params: dict[str, str], port: int) -> Path:
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(f"[databases]\ntest = host={pg_params['host']} port={pg_params['port']} "
                   f"dbname={pg_params['dbname']}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
                   f"listen_port = {port}\nunix_socket_dir = {tmp_path}\nauth_type = trust\n"
                   f"auth_file = {tmp_path / 'userlist.txt'}\npool_mode = transaction\n"
                   f"logfile = {tmp_path / 'log'}\npidfile = {tmp_path / 'pid'}\n"
                   "shutdown_timeout = 60\n")
    (tmp_path / "userlist.txt").write_text(f'"{pg_params["user"]}" ""\n')
    return ini


def start(ini: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pgpilot.proxy.pgbouncer_cli", "-q", *flags,
                             str(ini)], stderr=subprocess.PIPE, text=True)


def select_one(port: int, pg_params: dict[str, str]) -> Any:
    """A new client over TCP runs ``select 1``."""
    with psycopg.connect(host="127.0.0.1", port=port, dbname="test", user=pg_params["user"],
                         autocommit=True, connect_timeout=5) as conn:
        return conn.execute("select 1").fetchone()


def wait_listening(port: int, host: str, pg_params: dict[str, str],
                   proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(host=host, port=port, dbname="test", user=pg_params["user"],
                                 connect_timeout=5):
                return
        except psycopg.OperationalError:
            assert time.monotonic() < deadline and proc.poll() is None, "never listened"
            time.sleep(0.2)


def stop(*procs: subprocess.Popen[str] | None) -> None:
    """Stop the poolers a test started that still run (SIGTERM, then SIGKILL after 30 s)."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_a_new_process_takes_the_sockets_and_the_old_finishes_its_clients(
        tmp_path: Path, pg_params: dict[str, str]) -> None:
    port = free_port()
    ini = write_ini(tmp_path, pg_params, port)
    old = start(ini)
    new: subprocess.Popen[str] | None = None
    try:
        wait_listening(port, "127.0.0.1", pg_params, old)
        # A client of the old process, in the middle of a transaction.
        stayer = psycopg.connect(host="127.0.0.1", port=port, dbname="test",
                                 user=pg_params["user"])
        stayer.execute("create temp table during_restart (x int)")
        stayer.execute("insert into during_restart values (1)")
        new = start(ini, "-R")
        deadline = time.monotonic() + 30
        while (tmp_path / "pid").read_text().strip() != str(new.pid):
            assert time.monotonic() < deadline and new.poll() is None, "new one never ran"
            time.sleep(0.1)
        log = (tmp_path / "log").read_text()
        while "serves the listening sockets now" not in log:
            assert time.monotonic() < deadline, log
            time.sleep(0.1)
            log = (tmp_path / "log").read_text()
        # The old process has stopped accepting but not left: its client goes on.
        assert old.poll() is None
        for _ in range(5):  # every new client lands on the new process, none is refused
            assert select_one(port, pg_params) == (1,)
        wait_listening(port, str(tmp_path), pg_params, new)  # the unix socket too
        assert stayer.execute("select x from during_restart").fetchall() == [(1,)]
        stayer.commit()
        stayer.close()
        # ... and once its last client has gone, the old one exits, as on SIGTERM, leaving
        # the pidfile and the unix socket to the new one.
        assert old.wait(30) == 0
        assert (tmp_path / "pid").read_text().strip() == str(new.pid)
        wait_listening(port, str(tmp_path), pg_params, new)
        assert select_one(port, pg_params) == (1,)
        assert new.poll() is None
    finally:
        stop(old, new)


def test_reboot_with_nothing_running_is_a_clear_error(
        tmp_path: Path, pg_params: dict[str, str]) -> None:
    ini = write_ini(tmp_path, pg_params, free_port())
    proc = start(ini, "-R")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "no running pooler answered" in err
    # pgpilot's own command line has it too.
    proc = subprocess.Popen([sys.executable, "-m", "pgpilot", "proxy", "-R", "--config",
                             str(ini)], stderr=subprocess.PIPE, text=True)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "no running pooler answered" in err


def test_a_failed_reboot_as_a_daemon_says_why_in_the_log(
        tmp_path: Path, pg_params: dict[str, str]) -> None:
    """-R -d (PgBouncer's usual pair): stderr is gone once detached, the logfile says it."""
    ini = write_ini(tmp_path, pg_params, free_port())
    proc = start(ini, "-d", "-R")
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 30
    log = tmp_path / "log"
    while not (log.exists() and "no running pooler answered" in log.read_text()):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.1)
    assert "online restart (-R) failed" in log.read_text()


def test_reboot_needs_a_unix_socket(tmp_path: Path, pg_params: dict[str, str]) -> None:
    ini = write_ini(tmp_path, pg_params, free_port())
    ini.write_text(ini.read_text().replace(f"unix_socket_dir = {tmp_path}",
                                           "unix_socket_dir ="))
    proc = start(ini, "-R")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "needs unix_socket_dir" in err


def fake_running_pooler(path: Path, listen_as: int | None = None) -> threading.Thread:
    """A process listening at the takeover socket ``path`` that hands over one listening TCP
    socket to whoever says hello. ``listen_as``: the uid whose process calls listen() (that
    is the uid SO_PEERCRED reports to the connecting side)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    if listen_as is None:
        server.listen()
    else:
        child = os.fork()
        if child == 0:  # pragma: no cover (the child only)
            try:
                os.setuid(listen_as)
                server.listen()
            finally:
                os._exit(0)
        os.waitpid(child, 0)
    tcp = socket.create_server(("127.0.0.1", 0))

    def hand_over() -> None:
        with server, tcp:
            server.settimeout(30)
            try:
                conn, _ = server.accept()
            except TimeoutError:
                return
            with conn:
                conn.settimeout(30)
                if conn.recv(100) == TAKEOVER_HELLO:
                    header = json.dumps({"pid": os.getpid(), "sockets": []}).encode() + b"\n"
                    socket.send_fds(conn, [header], [tcp.fileno()])
                    conn.recv(100)

    thread = threading.Thread(target=hand_over, daemon=True)
    thread.start()
    return thread


def test_reboot_takes_sockets_only_from_a_process_of_its_own_user(tmp_path: Path) -> None:
    """The socket directory may be shared (/tmp): a process of another user listening at the
    takeover path is refused, and what is taken from one of this user is not inherited by
    child processes."""
    if os.getuid() != 0:
        pytest.skip("needs root, to listen as another user")
    tmp_path.chmod(0o755)
    port = free_port()
    config = default_config(unix_socket_dir=str(tmp_path), listen_port=port)
    path = takeover_socket_path(config)
    assert path is not None
    fake = fake_running_pooler(Path(path), listen_as=65534)
    with pytest.raises(TakeoverError, match="runs as uid 65534"):
        take_over(config)
    fake.join(30)
    os.unlink(path)
    fake = fake_running_pooler(Path(path))
    takeover = take_over(config)
    try:
        assert len(takeover.sockets) == 1
        assert takeover.sockets[0].getsockname()[0] == "127.0.0.1"
        assert not any(sock.get_inheritable() for sock in takeover.sockets)
    finally:
        takeover.abandon()
    fake.join(30)


def test_a_new_process_that_fails_after_taking_the_sockets_leaves_the_old_one_serving(
        tmp_path: Path, pg_params: dict[str, str]) -> None:
    """The new process says ready only once nothing more can fail: here it cannot write its
    pidfile, so it gives up, and the old one goes on accepting (it stopped before)."""
    port = free_port()
    ini = write_ini(tmp_path, pg_params, port)
    old = start(ini)
    try:
        wait_listening(port, "127.0.0.1", pg_params, old)
        (tmp_path / "pid").unlink()
        (tmp_path / "pid").mkdir()  # the new process's pidfile cannot be written
        new = start(ini, "-R")
        _out, err = new.communicate(timeout=60)
        assert new.returncode == 1, err
        assert "pidfile" in err or "pidfile" in (tmp_path / "log").read_text()
        assert old.poll() is None
        for _ in range(3):
            assert select_one(port, pg_params) == (1,)
    finally:
        if old.poll() is None:
            old.terminate()
            try:
                old.wait(30)
            except subprocess.TimeoutExpired:
                old.kill()


def test_reboot_with_a_metrics_port(tmp_path: Path, pg_params: dict[str, str]) -> None:
    """The new process serves metrics_port too, though the old one listens on it until it
    hands over (both bind it with SO_REUSEPORT; the old one closes its own at hand-over)."""
    port, metrics_port = free_port(), free_port()
    ini = write_ini(tmp_path, pg_params, port)
    ini.write_text(ini.read_text() + f"metrics_port = {metrics_port}\n")
    old = start(ini)
    new: subprocess.Popen[str] | None = None
    try:
        wait_listening(port, "127.0.0.1", pg_params, old)
        new = start(ini, "-R")
        deadline = time.monotonic() + 30
        while (tmp_path / "pid").read_text().strip() != str(new.pid):
            assert time.monotonic() < deadline and new.poll() is None, "new one never ran"
            time.sleep(0.1)
        assert old.wait(30) == 0  # no client: it leaves at once
        assert select_one(port, pg_params) == (1,)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as response:
            assert response.status == 200 and b"pgpilot_" in response.read()
        assert new.poll() is None
    finally:
        stop(old, new)
