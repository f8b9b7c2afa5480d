"""``pgpilot proxy`` as a user runs it: --check, --config, and the zero-config embedded mode."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from pgpilot.embedded import free_port

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


def pgpilot(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgpilot", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_check_accepts_a_valid_file(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text('"app" "secret"\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[databases]\napp = host=127.0.0.1 dbname=app\n[pgbouncer]\n"
                   "auth_file = users.txt\npool_mode = transaction\nfrobnicate = 1\n")
    out = pgpilot("proxy", "--check", "--config", str(ini))
    assert out.returncode == 0, out.stderr
    assert "valid" in out.stdout
    assert "frobnicate" in out.stderr  # unknown setting: a warning naming it


def test_check_rejects_an_invalid_value_with_file_and_line(tmp_path: Path) -> None:
    ini = tmp_path / "bad.ini"
    ini.write_text("[databases]\n[pgbouncer]\nauth_type = trust\npool_mode = sometimes\n")
    out = pgpilot("proxy", "--check", "--config", str(ini))
    assert out.returncode == 1
    assert f"{ini}:4" in out.stderr and "pool_mode" in out.stderr
    assert "Traceback" not in out.stderr


def test_runs_from_config_and_stops_on_sigterm(tmp_path: Path, pg_params) -> None:
    port = free_port()
    pidfile = tmp_path / "pgpilot.pid"
    (tmp_path / "users.txt").write_text(f'"{pg_params["user"]}" ""\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n* = host={pg_params['host']} port={pg_params['port']}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = users.txt\npidfile = {pidfile}\npool_mode = transaction\n"
        f"logfile = {tmp_path / 'pgpilot.log'}\n")
    proc = subprocess.Popen([sys.executable, "-m", "pgpilot", "proxy", "--config", str(ini)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        dsn = f"postgresql://{pg_params['user']}@127.0.0.1:{port}/{pg_params['dbname']}"
        ports = []
        for _ in range(3):  # the first login makes a route: the engine may log in the others
            conn = _connect_retry(dsn)
            assert conn.execute("select 1").fetchone() == (1,)
            ports.append(socket.socket(fileno=os.dup(conn.pgconn.socket)).getsockname()[1])
            conn.close()
        assert pidfile.read_text().strip() == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not pidfile.exists()
        logged = (tmp_path / "pgpilot.log").read_text()
        assert "listening on 127.0.0.1" in logged
        # log_connections / log_disconnections (on by default): a line each, whole
        who = f"{pg_params['dbname']}/{pg_params['user']}@127.0.0.1"
        for port in ports:
            for what in ("login ok", "closing: client closed the connection"):
                line = rf"{STAMP} {proc.pid} INFO C-\d+\({re.escape(who)}:{port}\) {what}"
                assert re.search(f"^{line}$", logged, re.M), (port, what, logged)
    finally:
        if proc.poll() is None:
            proc.kill()


def _connect_retry(dsn: str, seconds: float = 60) -> psycopg.Connection:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return psycopg.connect(dsn, autocommit=True)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_zero_config_starts_embedded_postgres_and_stops_it(tmp_path: Path) -> None:
    data = tmp_path / "pgdata"
    port = free_port()
    env = dict(os.environ, PGPILOT_DATA_DIR=str(data))
    proc = subprocess.Popen([sys.executable, "-m", "pgpilot", "proxy", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        lines = []
        dsn = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "pooling on postgresql://" in line:
                dsn = line.split("pooling on ", 1)[1].strip()
                break
        assert dsn is not None, "".join(lines)
        assert str(data) in "".join(lines)  # it names its data folder
        assert f":{port}/" in dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("select 6 * 7").fetchone() == (42,)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not (data / "postmaster.pid").exists()  # the embedded PostgreSQL stopped too
    finally:
        if proc.poll() is None:
            proc.kill()


def test_log_formatter_writes_what_the_standard_one_writes() -> None:
    """The pooler's formatter makes its date and time text once a second: the lines are the
    standard formatter's, to the millisecond, across second boundaries."""
    import logging

    from pgpilot.proxy.logs import LOG_FORMAT, LogFormatter

    standard, ours = logging.Formatter(LOG_FORMAT), LogFormatter()
    for created in (1733300000.001, 1733300000.999, 1733300001.0, 1733300001.5, 1733299999.25,
                    1751234567.75):
        record = logging.LogRecord("pgpilot.proxy", logging.INFO, __file__, 1, "C-%d login ok",
                                   (7,), None)
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
        assert ours.format(record) == standard.format(record)
