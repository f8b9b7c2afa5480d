"""``pgpilot proxy`` as a user runs it: --check, --config, and the zero-config embedded mode."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from pgpilot import __version__
from pgpilot.embedded import EmbeddedPostgres, free_port
from pgpilot.proxy.listener import address_text

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


def pgpilot(*args: str, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgpilot", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_check_accepts_a_valid_file(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text('"app" "secret"\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[databases]\napp = host=127.0.0.1 dbname=app\n[pgbouncer]\n"
                   "auth_file = users.txt\npool_mode = transaction\nfrobnicate = 1\n")
    out = pgpilot("proxy", "--check", "--config", str(ini))
    assert out.returncode == 0, out.stderr
    assert "valid" in out.stdout
    assert "frobnicate" in out.stderr  # unknown setting: a warning naming it


def test_check_says_did_you_mean_and_strict_fails_on_unknown_settings(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text('"app" "secret"\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[databases]\napp = hots=127.0.0.1 dbname=app\n[pgbouncer]\n"
                   "auth_file = users.txt\npool_mod = transaction\nsyslog = 1\n")
    out = pgpilot("proxy", "--check", "--config", str(ini))
    assert out.returncode == 0, out.stderr  # without --strict: warnings
    assert f"warning: {ini}:5: unknown setting 'pool_mod' ignored; did you mean pool_mode?" \
        in out.stderr.splitlines()
    assert "unknown parameter 'hots' ignored; did you mean host?" in out.stderr
    strict = pgpilot("proxy", "--check", "--strict", "--config", str(ini))
    assert strict.returncode == 1
    assert "valid" not in strict.stdout
    assert "pool_mode?" in strict.stderr and "host?" in strict.stderr
    assert strict.stderr.splitlines()[-1] == (
        f"error: {ini}: --strict: 2 unknown settings (above); correct or remove them")
    # A PgBouncer setting pgpilot knows but does not act on is no typo: --strict lets it be.
    ini.write_text("[databases]\napp = host=127.0.0.1 dbname=app\n[pgbouncer]\n"
                   "auth_file = users.txt\npool_mode = transaction\nsyslog = 1\n")
    fixed = pgpilot("proxy", "--check", "--strict", "--config", str(ini))
    assert fixed.returncode == 0, fixed.stderr
    assert "not supported by pgpilot" in fixed.stderr and "valid" in fixed.stdout


def test_strict_refuses_to_start_with_unknown_settings(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "users.txt").write_text('"app" ""\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(f"[databases]\n* = host=127.0.0.1\n[pgbouncer]\nlisten_port = {port}\n"
                   "unix_socket_dir =\nauth_type = trust\nauth_file = users.txt\n"
                   "pool_mod = transaction\n")
    out = pgpilot("proxy", "--strict", "--config", str(ini), timeout=30)
    assert out.returncode == 1
    assert f"error: {ini}:8: unknown setting 'pool_mod' ignored; did you mean pool_mode?" \
        in out.stderr.splitlines()
    assert "--strict: 1 unknown setting (above); correct or remove it" in out.stderr
    assert "listening" not in out.stderr


def test_the_quick_start_sample_with_inline_comments_passes_check(tmp_path: Path) -> None:
    (tmp_path / "userlist.txt").write_text('"app" "app-password"\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        "app = host=127.0.0.1 port=5432 dbname=app   ; the application's database\n"
        "* = host=10.0.0.5   ; any other name: same name upstream\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1   # loopback only\n"
        "listen_port = 6432\n"
        "auth_type = scram-sha-256 ; as the server\n"
        "auth_file = userlist.txt\n"
        "pool_mode = transaction   ; server released at COMMIT\n"
        "default_pool_size = 20 # per database and user\n")
    out = pgpilot("proxy", "--check", "--strict", "--config", str(ini))
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout == f"{ini}: configuration is valid (2 databases, 0 users)\n"


def test_proxy_help_explains_every_option_and_the_embedded_fallback() -> None:
    out = pgpilot("proxy", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # as one line, whatever the terminal width
    assert "--verbose, -v log debug lines too" in text
    assert "--quiet, -q log only warnings and errors" in text
    assert "--strict unknown settings, [databases]/[users] parameters and sections" in text
    assert "--check exits with status 1" in text
    # the fallback, where its data goes, and who runs it as root
    assert "without --config: pgpilot starts an embedded PostgreSQL" in text
    assert "--data-dir, else $PGPILOT_DATA_DIR, else $XDG_DATA_HOME/pgpilot/pgdata" in text
    assert "as root it is /var/lib/pgpilot/pgdata" in text and "pgpilot_pg" in text
    assert "server.log" in text


def test_version() -> None:
    out = pgpilot("--version")
    assert out.returncode == 0
    # The same line as the admin console's SHOW VERSION (PgBouncer's suite compares them).
    assert out.stdout.strip() == f"pgpilot {__version__} (PgBouncer 1.23.1 compatible)"
    from pgpilot.proxy.admin import VERSION_STRING

    assert out.stdout.strip() == VERSION_STRING
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", __version__)


def test_addresses_are_written_host_colon_port() -> None:
    assert address_text(("127.0.0.1", 6432)) == "127.0.0.1:6432"
    assert address_text(("::1", 6432)) == "[::1]:6432"
    assert address_text("::", 6432) == "[::]:6432"
    assert address_text("/tmp/.s.PGSQL.6432") == "unix:/tmp/.s.PGSQL.6432"


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
        assert re.search(rf"^{STAMP} {proc.pid} INFO ready: 127\.0\.0\.1:{port}$", logged, re.M), \
            logged
        # log_connections / log_disconnections (on by default): a line each, whole
        who = f"{pg_params['dbname']}/{pg_params['user']}@127.0.0.1"
        for port in ports:
            for what in ("login ok",
                         r"closing because: client closed the connection \(age=\d+s\)"):
                line = rf"{STAMP} {proc.pid} INFO C-\d+\({re.escape(who)}:{port}\) {what}"
                assert re.search(f"^{line}$", logged, re.M), (port, what, logged)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_strict_refuses_a_reload_with_unknown_settings(tmp_path: Path, pg_params) -> None:
    port = free_port()
    log_file = tmp_path / "pgpilot.log"
    (tmp_path / "users.txt").write_text(f'"{pg_params["user"]}" ""\n')
    ini = tmp_path / "pgbouncer.ini"
    head = (f"[databases]\n* = host={pg_params['host']} port={pg_params['port']}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n"
            "unix_socket_dir =\nauth_type = trust\nauth_file = users.txt\n"
            f"admin_users = {pg_params['user']}\nlogfile = {log_file}\n")
    ini.write_text(head + "default_pool_size = 20\n")
    proc = subprocess.Popen([sys.executable, "-m", "pgpilot", "proxy", "--strict", "--config",
                             str(ini)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        admin = f"postgresql://{pg_params['user']}@127.0.0.1:{port}/pgbouncer"

        def pool_size() -> str:
            with _connect_retry(admin) as conn:
                rows = conn.execute("SHOW CONFIG").fetchall()
            return next(str(row[1]) for row in rows if row[0] == "default_pool_size")

        assert pool_size() == "20"
        ini.write_text(head + "default_pool_size = 7\npool_mod = transaction\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "reload refused" not in log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        logged = log_file.read_text()
        assert "unknown setting 'pool_mod' ignored; did you mean pool_mode?" in logged
        assert ("reload refused, keeping the running configuration: --strict: 1 unknown "
                "setting (above); correct or remove it") in logged
        assert pool_size() == "20"
        ini.write_text(head + "default_pool_size = 7\n")  # corrected: taken
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while pool_size() != "7" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pool_size() == "7"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
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


def _mode(path: Path) -> str:
    return stat.filemode(path.stat().st_mode)


def test_zero_config_starts_embedded_postgres_and_stops_it() -> None:
    """In a new 0700 folder (pytest's tmp_path is below a 0700 folder of root's, which the
    server's user could not pass when the tests run as root; the folder itself it may get)."""
    with tempfile.TemporaryDirectory(prefix="pgpilot-quickstart-") as folder:
        _zero_config_run(Path(folder))


def _zero_config_run(data: Path) -> None:
    data.chmod(0o700)
    above = [(parent, _mode(parent), parent.owner()) for parent in data.parents]
    port = free_port()
    if os.geteuid() == 0:
        # Below a folder the server's user cannot pass: refused, with what to do, and the
        # folder stays closed (it used to be opened to group and others, 0755).
        env = dict(os.environ, PGPILOT_DATA_DIR=str(data / "deeper"))
        refused = pgpilot("proxy", "--port", str(port), env=env)
        assert refused.returncode == 1
        assert f"cannot reach the data folder {data}/deeper" in refused.stderr
        assert "pgpilot does not open folders you did not name" in refused.stderr
        assert _mode(data) == "drwx------" and list(data.iterdir()) == []
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
        # No folder above the data folder changed (the data folder itself: 0700, and as
        # root the server user's).
        assert [(parent, _mode(parent), parent.owner()) for parent in data.parents] == above
        assert _mode(data) == "drwx------"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_second_proxy_on_the_same_data_folder_says_where_the_log_is() -> None:
    with tempfile.TemporaryDirectory(prefix="pgpilot-twice-") as folder:
        data = Path(folder)
        first = EmbeddedPostgres(data).start()  # what the first `pgpilot proxy` started
        try:
            out = pgpilot("proxy", "--port", str(free_port()),
                          env=dict(os.environ, PGPILOT_DATA_DIR=str(data)))
            assert out.returncode == 1
            assert "Examine the log output" not in out.stderr
            assert f"the data folder {data} is in use" in out.stderr
            postmaster = first._postmaster()
            assert postmaster is not None
            assert f"a PostgreSQL (pid {postmaster[0]}, port {first.port})" in out.stderr
            assert "probably for another pgpilot proxy" in out.stderr
            assert f"log: {data}/server.log" in out.stderr
            assert "Traceback" not in out.stderr
            assert first.running()  # the second one left the first alone
            assert "1" in first.psql("select 1")
        finally:
            first.stop()


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
