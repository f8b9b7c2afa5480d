"""A PgBouncer deployment runs unchanged: admin access over the unix socket, console SET,
auth_user / auth_query / auth_dbname, an hba file, the order of login checks, DISABLE /
ENABLE, and PgBouncer's command line. Real PostgreSQL, real clients (psycopg)."""

from __future__ import annotations

import getpass
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from tests.faults.relay import FaultRelay
from tests.proxy.conftest import RunningProxy, forced_user_databases, wait_until, write_config

from pgpilot import VERSION_LINE
from pgpilot.proxy.auth_query import query_text, sql_literal
from pgpilot.proxy.config import ConfigError, parse_config
from pgpilot.proxy.hba import parse_hba

ProxyFactory = Callable[..., RunningProxy]


def admin(proxy: RunningProxy, **kw: object) -> psycopg.Connection:
    params = {"host": "127.0.0.1", "port": proxy.port, "dbname": "pgbouncer",
              "user": "postgres", "autocommit": True}
    params.update(kw)
    return psycopg.connect(**params)  # type: ignore[arg-type]


def config_value(conn: psycopg.Connection, key: str) -> str:
    rows = conn.execute("SHOW CONFIG").fetchall()
    return next(str(r[1]) for r in rows if r[0] == key)


# -- the admin console ----------------------------------------------------------------------

def test_pgbouncer_user_over_the_unix_socket_is_admin_without_a_password(
        proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    # md5 for everybody, and "pgbouncer" is in neither auth_file nor admin_users.
    proxy = proxy_factory(auth_type="md5", unix_socket_dir=str(sock_dir), admin_users="")
    with admin(proxy, host=str(sock_dir), user="pgbouncer") as conn:
        conn.execute("SET default_pool_size = 3")  # an admin command: allowed
        assert config_value(conn, "default_pool_size") == "3"
    # The same user over TCP gets no such pass: it must authenticate (and is unknown).
    with pytest.raises(psycopg.OperationalError) as err:
        admin(proxy, user="pgbouncer", password="x")
    assert "password authentication failed" in str(err.value)


def test_console_set_applies_as_reload_and_refuses_bad_values(
        proxy_factory: ProxyFactory, pg_params: dict[str, str]) -> None:
    proxy = proxy_factory(userlist={pg_params["user"]: "", "viewer": ""},
                          stats_users="viewer")
    with admin(proxy) as conn:
        assert conn.execute("SET default_pool_size = 1").statusmessage == \
            "SET default_pool_size=1"
        assert config_value(conn, "default_pool_size") == "1"
        # A bad value changes nothing and says why, with PostgreSQL's SQLSTATE.
        with pytest.raises(psycopg.errors.InvalidParameterValue) as bad:
            conn.execute("SET pool_mode = 'sometimes'")
        assert "invalid value for pool_mode" in str(bad.value)
        assert config_value(conn, "pool_mode") == "transaction"
        with pytest.raises(psycopg.errors.CantChangeRuntimeParam):
            conn.execute("SET listen_port = 1")
        with pytest.raises(psycopg.errors.UndefinedObject):
            conn.execute("SET no_such_setting = 1")
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("SET client_encoding = 'UTF8'")  # drivers send it: ignored, said so
        conn.execute("SET tcp_user_timeout = 1000")  # PgBouncer's, not acted on: said so
        assert notices == ["SET ignored", "SET tcp_user_timeout has no effect: pgpilot does "
                           "not act on this PgBouncer setting"]
    with admin(proxy, user="viewer") as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SET default_pool_size = 5")
    # The new pool size is acted on: with 1 server, a second client waits for the first.
    with psycopg.connect(proxy.dsn(), autocommit=True) as one, \
            psycopg.connect(proxy.dsn(), autocommit=True) as two:
        one.execute("begin")
        one.execute("select 1")
        with admin(proxy) as conn:
            conn.execute("SET query_wait_timeout = 1")
        with pytest.raises(psycopg.OperationalError) as waited:
            two.execute("select 1")
        assert "query_wait_timeout" in str(waited.value)


def test_disable_refuses_new_clients_until_enable(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory()
    with psycopg.connect(proxy.dsn(), autocommit=True) as before:
        with admin(proxy) as conn:
            conn.execute("DISABLE test")
            row = next(r for r in conn.execute("SHOW DATABASES").fetchall() if r[0] == "test")
            assert row[-1] == 1  # disabled
        assert before.execute("select 1").fetchone() == (1,)  # connected ones carry on
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(proxy.dsn())
        assert 'database "test" is disabled' in str(err.value)
        with admin(proxy) as conn:
            conn.execute("ENABLE test")
    with psycopg.connect(proxy.dsn(), autocommit=True) as after:
        assert after.execute("select 1").fetchone() == (1,)


# -- order of checks ------------------------------------------------------------------------

def test_an_unknown_database_is_told_only_after_authentication(
        pg_params: dict[str, str], tmp_path: Path) -> None:
    path, port = write_config(tmp_path, pg_params, {"auth_type": "md5"},
                              userlist={pg_params["user"]: "right"})
    # No "*" fallback: only "test" is known.
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if not line.startswith("* = ")))
    proxy = RunningProxy(path, port).start()
    try:
        with pytest.raises(psycopg.OperationalError) as wrong:
            psycopg.connect(proxy.dsn(dbname="nosuchdb", password="wrong"))
        with pytest.raises(psycopg.OperationalError) as right:
            psycopg.connect(proxy.dsn(dbname="nosuchdb", password="right"))
    finally:
        proxy.stop()
    assert "password authentication failed" in str(wrong.value)
    assert "nosuchdb" not in str(wrong.value)
    assert "no such database: nosuchdb" in str(right.value)


# -- auth_user / auth_query -----------------------------------------------------------------

@pytest.fixture
def login_role(pg_dsn: str) -> Iterator[tuple[str, str]]:
    """A role with a SCRAM password, made for the test and dropped after it."""
    name = f"pgpilot_aq_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD {sql_literal(password)}")
    yield name, password
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {name}")


def test_auth_query_logs_in_users_not_in_auth_file(
        proxy_factory: ProxyFactory, pg_params: dict[str, str],
        login_role: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    name, password = login_role
    # auth_file holds only the auth user; the role is known to PostgreSQL alone.
    proxy = proxy_factory(auth_type="scram-sha-256", auth_user=pg_params["user"],
                          userlist={pg_params["user"]: pg_params.get("password", "")})
    with psycopg.connect(proxy.dsn(user=name, password=password), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (name,)
    with pytest.raises(psycopg.OperationalError) as wrong:
        psycopg.connect(proxy.dsn(user=name, password="not-" + password))
    with pytest.raises(psycopg.OperationalError) as unknown:
        psycopg.connect(proxy.dsn(user="pgpilot_no_such_role", password="x"))
    # No enumeration: an unknown role fails exactly as a wrong password does.
    assert "password authentication failed" in str(wrong.value)
    assert str(unknown.value).replace("pgpilot_no_such_role", name) == str(wrong.value)
    assert password not in caplog.text


def test_a_failing_auth_query_is_a_clear_login_error(
        proxy_factory: ProxyFactory, pg_params: dict[str, str],
        login_role: tuple[str, str]) -> None:
    name, password = login_role
    proxy = proxy_factory(auth_type="md5", auth_user=pg_params["user"],
                          auth_query="SELECT usename, passwd FROM no_such_table WHERE u=$1")
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(proxy.dsn(user=name, password=password), connect_timeout=10)
    assert "auth_query failed" in str(err.value) and "no_such_table" in str(err.value)
    assert time.monotonic() - started < 5


def test_auth_query_runs_with_a_safe_search_path_and_a_quoted_user() -> None:
    sql = query_text("SELECT usename, passwd FROM pg_shadow WHERE usename = $1", "o'b\\x")
    assert sql == ("BEGIN; SET LOCAL search_path TO pg_catalog, pg_temp; SELECT usename, "
                   "passwd FROM pg_shadow WHERE usename = E'o''b\\\\x'; COMMIT")


# -- hba ------------------------------------------------------------------------------------

def test_hba_file_decides_the_method_per_connection(
        proxy_factory: ProxyFactory, pg_params: dict[str, str], tmp_path: Path) -> None:
    hba = tmp_path / "pgbouncer_hba.conf"
    hba.write_text("# TYPE DATABASE USER ADDRESS METHOD\n"
                   "host  all  mallory  127.0.0.1/32  reject\n"
                   "host  all  alice    127.0.0.1/32  password\n"
                   "host  all  all      0.0.0.0/0     trust\n")
    proxy = proxy_factory(auth_type="hba", auth_hba_file=str(hba),
                          userlist={pg_params["user"]: "", "alice": "secret", "mallory": "m"},
                          databases={"test": f"host={pg_params['host']} port={pg_params['port']}"
                                             f" dbname={pg_params['dbname']} "
                                             f"user={pg_params['user']}"})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:  # trust
        assert conn.execute("select 1").fetchone() == (1,)
    with psycopg.connect(proxy.dsn(user="alice", password="secret"), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError) as bad:
        psycopg.connect(proxy.dsn(user="alice", password="wrong"))
    assert "password authentication failed" in str(bad.value)
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(proxy.dsn(user="mallory", password="m"))
    assert "login rejected" in str(refused.value)


def test_a_deployment_with_auth_query_an_hba_file_and_console_set(
        proxy_factory: ProxyFactory, pg_params: dict[str, str], tmp_path: Path,
        login_role: tuple[str, str]) -> None:
    """The three together, as a PgBouncer deployment has them: the hba file picks the method
    per connection, auth_query supplies the secret of a role that only PostgreSQL knows, and
    the console changes settings (auth_query included) while clients come and go."""
    name, password = login_role
    hba = tmp_path / "pgbouncer_hba.conf"
    hba.write_text(f"host  all  {pg_params['user']}  127.0.0.1/32  trust\n"
                   "host  all  mallory  127.0.0.1/32  reject\n"
                   "host  all  all  127.0.0.1/32  scram-sha-256\n")
    proxy = proxy_factory(auth_type="hba", auth_hba_file=str(hba), auth_user=pg_params["user"],
                          userlist={pg_params["user"]: "", "mallory": "m"})
    with psycopg.connect(proxy.dsn(user=name, password=password), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (name,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(user=name, password="not-" + password))
    with pytest.raises(psycopg.OperationalError, match="login rejected"):
        psycopg.connect(proxy.dsn(user="mallory", password="m"))
    with admin(proxy) as console:
        console.execute("SET default_pool_size = 2")
        assert config_value(console, "default_pool_size") == "2"
        # A broken auth_query set from the console is used at the next login...
        console.execute("SET auth_query = 'SELECT usename, passwd FROM no_such_table "
                        "WHERE usename = $1'")
        with pytest.raises(psycopg.OperationalError, match="no_such_table"):
            psycopg.connect(proxy.dsn(user=name, password=password), connect_timeout=10)
        # ... and the working one again after it.
        console.execute("SET auth_query = 'SELECT usename, passwd FROM pg_shadow "
                        "WHERE usename = $1'")
    with psycopg.connect(proxy.dsn(user=name, password=password), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (name,)
    with admin(proxy) as console:
        pools = {(r[0], r[1]) for r in console.execute("SHOW POOLS").fetchall()}
    assert ("test", name) in pools


def test_hba_lines_pgpilot_cannot_follow_make_the_config_invalid(tmp_path: Path) -> None:
    rules = parse_hba("local all all peer\nhostssl db1,db2 bob 10.0.0.0 255.0.0.0 md5\n")
    assert rules.method_for(unix=True, tls=False, address="unix", database="x", user="y") \
        == "peer"
    assert rules.method_for(unix=False, tls=True, address="10.1.2.3", database="db2",
                            user="bob") == "md5"
    assert rules.method_for(unix=False, tls=False, address="10.1.2.3", database="db2",
                            user="bob") == "reject"  # hostssl only; no rule: reject
    bad = tmp_path / "hba.conf"
    bad.write_text("host all all 0.0.0.0/0 ldap\n")
    users = tmp_path / "userlist.txt"
    users.write_text('"alice" "x"\n')
    with pytest.raises(ConfigError) as err:
        parse_config(f"[pgbouncer]\nauth_type = hba\nauth_hba_file = {bad}\n"
                     f"auth_file = {users}\n")
    assert "unsupported auth method 'ldap'" in str(err.value) and ":1:" in str(err.value)


# -- PgBouncer's command line ---------------------------------------------------------------

def test_pgbouncer_command_line_version_matches_show_version(
        proxy_factory: ProxyFactory) -> None:
    out = subprocess.run([sys.executable, "-m", "pgpilot.proxy.pgbouncer_cli", "-V"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == VERSION_LINE
    proxy = proxy_factory()
    with admin(proxy) as conn:
        assert conn.execute("SHOW VERSION").fetchone() == (VERSION_LINE,)


def test_pgbouncer_command_line_runs_a_config_quietly(
        pg_params: dict[str, str], tmp_path: Path) -> None:
    from pgpilot.embedded import free_port

    port = free_port()
    log = tmp_path / "pgbouncer.log"
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(f"[databases]\ntest = host={pg_params['host']} port={pg_params['port']} "
                   f"dbname={pg_params['dbname']}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
                   f"listen_port = {port}\nunix_socket_dir = {tmp_path}\nauth_type = trust\n"
                   f"logfile = {log}\nauth_file = {tmp_path / 'userlist.txt'}\n")
    (tmp_path / "userlist.txt").write_text(f'"{pg_params["user"]}" ""\n')
    proc = subprocess.Popen([sys.executable, "-m", "pgpilot.proxy.pgbouncer_cli", "-q",
                             str(ini)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                # The unix socket, as PgBouncer's own tooling reaches the console.
                with psycopg.connect(host=str(tmp_path), port=port, dbname="pgbouncer",
                                     user="pgbouncer", autocommit=True) as conn:
                    assert conn.execute("SHOW VERSION").fetchone() == (VERSION_LINE,)
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert err == ""  # -q: nothing on stderr ...
    assert "pgbouncer access from unix socket" in log.read_text()  # ... all in the logfile
    assert getpass.getuser()  # (the peer check compared uids of this very user)


# -- the options startup parameter ----------------------------------------------------------

def test_options_startup_parameter_sets_tracked_and_carries_other_settings(
        proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(ignore_startup_parameters="extra_float_digits")

    def show(name: str, options: str) -> str:
        with psycopg.connect(**proxy.conninfo(options=options)) as conn:
            return str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]

    assert show("DateStyle", r"  -c    datestyle=German,\ YMD") == "German, YMD"
    assert show("TimeZone", r"-ctimezone=Portugal  --datestyle=German,\ YMD") == "Portugal"
    assert show("TimeZone", r"-c t\imezone=\P\o\r\t\ugal") == "Portugal"
    # The setting follows its client: another client on the same server sees its own.
    with psycopg.connect(**proxy.conninfo()) as plain:
        assert plain.execute("SHOW TimeZone").fetchone()[0] != "Portugal"  # type: ignore[index]
    # In ignore_startup_parameters: dropped, the server's default stays.
    assert show("extra_float_digits", "-c extra_float_digits=2") == "1"
    for bad in ("-d", "-c timezone"):
        with pytest.raises(psycopg.OperationalError, match="only '-c config=val' and "
                           "'--config=val' are allowed"):
            show("TimeZone", bad)
    # Beyond the tracked ones (PgBouncer refuses them): the client's session setting, as a
    # SET would be; one the server does not know is the server's refusal, as directly.
    assert show("enable_seqscan", "-c enable_seqscan=off") == "off"
    with psycopg.connect(**proxy.conninfo()) as plain:
        assert plain.execute("SHOW enable_seqscan").fetchone()[0] == "on"  # type: ignore[index]
    with pytest.raises(psycopg.OperationalError,
                       match='unrecognized configuration parameter "pgp_no_such_setting"'):
        show("TimeZone", "-c pgp_no_such_setting=1")
    with admin(proxy) as conn:
        conn.execute("SET ignore_startup_parameters = options")
    # options ignored: what is not tracked is dropped, what is tracked still applies.
    assert show("enable_seqscan", "-c enable_seqscan=off") == "on"
    assert show("TimeZone", "-c enable_seqscan=off -c timezone=Portugal") == "Portugal"


# -- timeouts and lifetimes -----------------------------------------------------------------

def backend_alive(pg_dsn: str, pid: int) -> bool:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                            [pid]).fetchone() == (1,)


def test_server_lifetime_closes_idle_servers(proxy_factory: ProxyFactory, pg_dsn: str) -> None:
    # server_idle_timeout far away: only server_lifetime may close the idle server, which
    # the fast path holds between transactions.
    proxy = proxy_factory(server_lifetime=1, server_idle_timeout=600)
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        started = time.monotonic()
        wait_until(lambda: proxy.server_count() == 0, timeout=5)
        assert time.monotonic() - started >= 0.5
        assert not backend_alive(pg_dsn, pid)
        # The next transaction gets a new server.
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != pid  # type: ignore[index]


def test_query_and_idle_transaction_timeouts_use_pgbouncers_words(
        proxy_factory: ProxyFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    proxy = proxy_factory(query_timeout=0.5, idle_transaction_timeout=0.5)
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn, \
            pytest.raises(psycopg.Error, match="query timeout") as err:
        conn.execute("SELECT pg_sleep(5)")
    assert err.value.sqlstate == "57014"
    with psycopg.connect(**proxy.conninfo()) as conn:
        conn.execute("SELECT 1")  # a transaction open, then idle
        time.sleep(1.5)
        with pytest.raises(psycopg.Error, match="idle transaction timeout") as err:
            conn.execute("SELECT 1")
    assert err.value.sqlstate == "25P03"
    text = caplog.text
    assert "closing because: query timeout" in text
    assert "closing because: idle transaction timeout" in text


def test_clients_wait_while_an_unreachable_server_is_retried(
        proxy_factory: ProxyFactory, pg_params: dict[str, str],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    relay = FaultRelay(pg_params["host"], int(pg_params["port"]))
    relay.refuse = True  # PostgreSQL unreachable: every connection is reset
    try:
        proxy = proxy_factory(server_login_retry=0.5, databases={
            "flaky": f"host=127.0.0.1 port={relay.port} dbname={pg_params['dbname']}"})
        threading.Timer(1.5, lambda: setattr(relay, "refuse", False)).start()
        started = time.monotonic()
        # As PgBouncer: the client is not told the failure, it waits while the pool retries.
        with psycopg.connect(**proxy.conninfo(dbname="flaky", connect_timeout=10)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert time.monotonic() - started >= 1.4
        assert "closing because: connect failed" in caplog.text
        # With query_timeout, a client waiting for an unreachable server is let go, told why.
        relay.refuse = True
        proxy = proxy_factory(server_login_retry=0.5, query_timeout=1, databases={
            "flaky": f"host=127.0.0.1 port={relay.port} dbname={pg_params['dbname']}"})
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(**proxy.conninfo(dbname="flaky", connect_timeout=10))
        assert "query_timeout" in str(err.value)
        assert "The last server login failed" in str(err.value)
    finally:
        relay.close()


# -- connect_query --------------------------------------------------------------------------

def test_connect_query_runs_on_each_new_server(proxy_factory: ProxyFactory,
                                               pg_params: dict[str, str], pg_dsn: str) -> None:
    up = f"host={pg_params['host']} port={pg_params['port']} dbname={pg_params['dbname']}"
    proxy = proxy_factory(databases={
        "cq": f"{up} connect_query='set enable_seqscan=off; set enable_nestloop=off'",
        "bad": f"{up} connect_query='select no_such_column'"})
    for _ in range(2):  # a new server, then the same one again
        with psycopg.connect(**proxy.conninfo(dbname="cq"), autocommit=True) as conn:
            assert conn.execute("SHOW enable_seqscan").fetchone() == ("off",)
            assert conn.execute("SHOW enable_nestloop").fetchone() == ("off",)
    # Another database on the same PostgreSQL: untouched.
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        assert conn.execute("SHOW enable_seqscan").fetchone() == ("on",)
    with pytest.raises(psycopg.OperationalError, match="connect_query failed: column "
                       '"no_such_column" does not exist'):
        psycopg.connect(**proxy.conninfo(dbname="bad"), connect_timeout=10)


# -- server_fast_close ----------------------------------------------------------------------

def test_server_fast_close_ends_session_servers_between_transactions(
        proxy_factory: ProxyFactory, pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    proxy = proxy_factory(pool_mode="session", server_fast_close=1)
    idle = psycopg.connect(**proxy.conninfo(), autocommit=True)
    busy = psycopg.connect(**proxy.conninfo())
    idle_pid = idle.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    busy.execute("SELECT 1")  # a transaction open
    with admin(proxy) as conn:
        conn.execute("RECONNECT test")
    wait_until(lambda: not backend_alive(pg_dsn, idle_pid), timeout=5)
    with pytest.raises(psycopg.OperationalError, match="database configuration changed"):
        idle.execute("SELECT 1")
    # The one in a transaction finishes it first, then its server is closed.
    time.sleep(0.5)
    assert busy.execute("SELECT 2").fetchone() == (2,)
    busy.commit()
    wait_until(lambda: "closing because: database configuration changed" in caplog.text
               and caplog.text.count("closing because: database configuration changed") >= 2,
               timeout=5)
    with pytest.raises(psycopg.OperationalError):
        busy.execute("SELECT 1")
    idle.close()
    busy.close()
    # Without server_fast_close the session keeps its server to the end (PgBouncer's default).
    proxy = proxy_factory(pool_mode="session")
    with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        with admin(proxy) as console:
            console.execute("RECONNECT test")
        time.sleep(0.6)
        assert conn.execute("SELECT 1").fetchone() == (1,)


# -- host lists -----------------------------------------------------------------------------

def test_a_host_list_spreads_new_servers_round_robin(
        proxy_factory: ProxyFactory, pg_params: dict[str, str],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    proxy = proxy_factory(databases={
        "both": f"host=127.0.0.1,localhost port={pg_params['port']} "
                f"dbname={pg_params['dbname']}"})
    first = psycopg.connect(**proxy.conninfo(dbname="both"))
    second = psycopg.connect(**proxy.conninfo(dbname="both"))
    try:
        first.execute("SELECT 1")  # each holds a server: two servers, one per host
        second.execute("SELECT 1")
        with admin(proxy) as conn:
            rows = conn.execute("SHOW SERVERS").fetchall()
            names = [d.name for d in conn.execute("SHOW SERVERS").description or []]
        addr = names.index("addr")
        assert sorted(str(r[addr]) for r in rows) == ["127.0.0.1", "localhost"]
        assert caplog.text.count("new connection to server (from 127.0.0.1:") == 2
    finally:
        first.close()
        second.close()


# -- pool sizing ----------------------------------------------------------------------------

def test_a_new_pool_opens_a_server_per_concurrent_client(proxy_factory: ProxyFactory) -> None:
    """The first clients of a fresh pool arrive before any server exists: each gets its own
    server (PgBouncer's test_pool_size), none waits for another's query to end."""
    proxy = proxy_factory(default_pool_size=5)
    barrier = threading.Barrier(3)

    def sleeper() -> None:
        with psycopg.connect(**proxy.conninfo(), autocommit=True) as conn:
            barrier.wait(5)
            conn.execute("SELECT pg_sleep(1)")

    threads = [threading.Thread(target=sleeper) for _ in range(3)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert time.monotonic() - started < 1.9  # not one after the other
    assert proxy.server_count() == 3


def test_a_forced_user_is_one_pool_sized_by_its_own_settings(
        proxy_factory: ProxyFactory, pg_params: dict[str, str]) -> None:
    """As PgBouncer: clients of a database with user= share the forced user's pool, whose
    [users] pool_size is the forced user's, not each client's."""
    up = f"host={pg_params['host']} port={pg_params['port']} dbname={pg_params['dbname']}"
    proxy = proxy_factory(
        databases={"forced": f"{up} user={pg_params['user']} pool_size=2"},
        users={"small": "pool_size=1"},
        userlist={pg_params["user"]: "", "small": "", "other": ""})
    barrier = threading.Barrier(4)

    def sleeper(user: str) -> None:
        with psycopg.connect(**proxy.conninfo(dbname="forced", user=user),
                             autocommit=True) as conn:
            barrier.wait(5)
            conn.execute("SELECT pg_sleep(0.5)")

    threads = [threading.Thread(target=sleeper, args=(u,))
               for u in ("small", "small", "other", "other")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    pools = proxy.call(lambda: [(k, p.server_count()) for k, p in proxy.pooler.pools.items()
                                if k[0] == "forced"])  # type: ignore[union-attr]
    assert pools == [(("forced", pg_params["user"]), 2)]


@pytest.fixture
def five_roles(pg_dsn: str) -> Iterator[list[str]]:
    users = [f"pgpilot_evict_u{i}" for i in range(5)]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for user in users:
            conn.execute(f"DROP ROLE IF EXISTS {user}")
            conn.execute(f"CREATE ROLE {user} LOGIN")
    yield users
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for user in users:
            conn.execute(f"DROP ROLE IF EXISTS {user}")


def test_max_db_connections_evicts_idle_servers_for_waiting_pools(
        proxy_factory: ProxyFactory, pg_params: dict[str, str], five_roles: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Five users' pools on a database limited to 2 servers: each pool's clients are
    served in turn, an idle server of another pool being closed for them (PgBouncer's
    eviction), where before a pool without a server waited for ever."""
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    up = f"host={pg_params['host']} port={pg_params['port']} dbname={pg_params['dbname']}"
    users = five_roles
    proxy = proxy_factory(databases={"limited": f"{up} max_db_connections=2"},
                          userlist={u: "" for u in users},
                          auth_type="trust")
    errors: list[BaseException] = []

    def run(user: str) -> None:
        try:
            with psycopg.connect(**proxy.conninfo(dbname="limited", user=user),
                                 autocommit=True, connect_timeout=10) as conn:
                conn.execute("SELECT pg_sleep(0.3)")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(u,)) for u in users for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert errors == []
    assert "closing because: evicted (max_db_connections reached" in caplog.text


def test_reserve_pool_is_logged_in_pgbouncers_words(
        proxy_factory: ProxyFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    proxy = proxy_factory(default_pool_size=1, reserve_pool_size=1, reserve_pool_timeout=0.3)
    threads = [threading.Thread(target=lambda: psycopg.connect(
        **proxy.conninfo(), autocommit=True).execute("SELECT pg_sleep(1)")) for _ in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: proxy.server_count() == 2, timeout=5)
    for t in threads:
        t.join(10)
    assert caplog.text.count("taking connection from reserve_pool") == 1


# -- shutdown -------------------------------------------------------------------------------

def test_shutdown_wait_for_servers_closes_new_transactions_and_refuses_resume(
        proxy_factory: ProxyFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    proxy = proxy_factory()
    running = psycopg.connect(**proxy.conninfo())
    idle = psycopg.connect(**proxy.conninfo(), autocommit=True)
    console = admin(proxy)
    try:
        running.execute("SELECT 1")  # inside a transaction
        idle.execute("SELECT 1")
        console.execute("SHUTDOWN WAIT_FOR_SERVERS")
        with pytest.raises(psycopg.errors.ProtocolViolation, match="pooler is shutting down"):
            console.execute("RESUME")
        assert running.execute("SELECT 2").fetchone() == (2,)  # its transaction goes on
        with pytest.raises(psycopg.OperationalError, match="server shutting down"):
            idle.execute("SELECT 3")  # a new transaction: closed, as PgBouncer
        assert "closing because: server shutting down" in caplog.text
        running.commit()
    finally:
        for conn in (running, idle, console):
            conn.close()


def test_hba_lists_may_have_blanks_around_commas_and_quoted_names() -> None:
    hba = parse_hba('host  tmp1,all  user1,user2 , user3  16.0.0.0/8  md5\n'
                    'host  "q1""q2"  "a , b"  19.0.0.0/8  cert\n', "hba.conf")
    for user in ("user1", "user2", "user3"):
        assert hba.method_for(unix=False, tls=False, address="16.1.1.1", database="x",
                              user=user) == "md5"
    assert hba.method_for(unix=False, tls=False, address="16.1.1.1", database="x",
                          user="user4") == "reject"
    assert hba.method_for(unix=False, tls=True, address="19.0.0.2", database='q1"q2',
                          user="a , b") == "cert"
    assert hba.method_for(unix=False, tls=True, address="19.0.0.2", database="q1",
                          user="a") == "reject"


def test_hba_peer_rule_with_an_ident_map(proxy_factory: ProxyFactory,
                                         pg_params: dict[str, str], tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """``local all all peer map=mymap``: the OS user of the socket's peer may log in as the
    users its map names (auth_ident_file), and only those."""
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    me = getpass.getuser()
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    (tmp_path / "ident.conf").write_text(f"mymap  {me}  {pg_params['user']}\n"
                                         f'mymap  {me}  "someone"\n')
    (tmp_path / "hba.conf").write_text("local  all  all  peer  map=mymap\n")
    proxy = proxy_factory(auth_type="hba", auth_hba_file=str(tmp_path / "hba.conf"),
                          auth_ident_file=str(tmp_path / "ident.conf"),
                          unix_socket_dir=str(sock_dir),
                          userlist={pg_params["user"]: "", "someone": "", "stranger": ""},
                          databases=forced_user_databases(pg_params))
    for user in (pg_params["user"], "someone"):
        with psycopg.connect(host=str(sock_dir), port=proxy.port, dbname="test", user=user,
                             autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="unix socket login rejected"):
        psycopg.connect(host=str(sock_dir), port=proxy.port, dbname="test", user="stranger")
    assert "ident map mymap cannot be matched" in caplog.text
    # The map is read again when the file changes.
    (tmp_path / "ident.conf").write_text(f"mymap  /^{me}$  all\n")
    os.utime(tmp_path / "ident.conf", (time.time() + 5, time.time() + 5))
    with psycopg.connect(host=str(sock_dir), port=proxy.port, dbname="test",
                         user="stranger", autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_client_arriving_after_a_refused_login_waits_for_the_retry(
        proxy_factory: ProxyFactory, pg_params: dict[str, str]) -> None:
    """PostgreSQL refused a server login: the clients waiting then get its error; one that
    arrives during server_login_retry waits for the next try (as PgBouncer), and is served
    if that one succeeds (here: the configuration was mended meanwhile)."""
    up = f"host={pg_params['host']} port={pg_params['port']}"
    proxy = proxy_factory(server_login_retry=1,
                          databases={"flip": f"{up} dbname=pgpilot_no_such_db"})
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        psycopg.connect(**proxy.conninfo(dbname="flip"), connect_timeout=10)
    text = proxy.config_path.read_text().replace("dbname=pgpilot_no_such_db",
                                                 f"dbname={pg_params['dbname']}")
    proxy.config_path.write_text(text)
    proxy.reload()
    started = time.monotonic()
    with psycopg.connect(**proxy.conninfo(dbname="flip"), connect_timeout=10,
                         autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert time.monotonic() - started < 5


def test_check_warns_of_settings_without_effect() -> None:
    """A setting pgpilot parses but does not act on is a warning (--check prints it), unless
    it holds its default; one it acts on is not."""
    base = "[databases]\nx = host=127.0.0.1\n[pgbouncer]\nauth_type = any\n"
    config = parse_config(base + "transaction_timeout = 5\nsbuf_loopcnt = 5\n"
                          "server_fast_close = 1\n")
    assert [w for w in config.warnings if "has no effect" in w] == [
        "<string>:5: 'transaction_timeout' has no effect in pgpilot (accepted for PgBouncer "
        "compatibility, shown by SHOW CONFIG)"]


def test_auth_dbname_naming_the_admin_console_is_warned_about() -> None:
    """PgBouncer's words at load (and so at RELOAD, and in --check)."""
    config = parse_config("[databases]\nx = host=127.0.0.1\n[pgbouncer]\nauth_type = md5\n"
                          "auth_user = someone\nauth_dbname = pgbouncer\n")
    assert '<string>:6: cannot use the reserved "pgbouncer" database as an auth_dbname' \
        in config.warnings


def test_reload_forgets_what_auth_query_read(
        proxy_factory: ProxyFactory, pg_params: dict[str, str],
        login_role: tuple[str, str]) -> None:
    """A secret auth_query read under the previous configuration is not used after RELOAD:
    a per-database auth_query that now returns a broken secret refuses the login at once
    (not after the answer's cache time)."""
    name, password = login_role
    good = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1"
    broken = "SELECT usename, substring(passwd, 1, 3) FROM pg_shadow WHERE usename = $1"
    db = (f"host={pg_params['host']} port={pg_params['port']} dbname={pg_params['dbname']}"
          f" auth_query='{{}}'")
    proxy = proxy_factory(auth_type="scram-sha-256", auth_user=pg_params["user"],
                          databases={"aq": db.format(good)},
                          userlist={pg_params["user"]: pg_params.get("password", "")})
    with psycopg.connect(proxy.dsn(dbname="aq", user=name, password=password)) as conn:
        assert conn.execute("select current_user").fetchone() == (name,)
    text = proxy.config_path.read_text().replace(good, broken)
    proxy.config_path.write_text(text)
    proxy.reload()
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(proxy.dsn(dbname="aq", user=name, password=password))
    assert "password authentication failed" in str(err.value)


def test_verbose_set_from_the_console_turns_debug_lines_on_and_off(
        proxy_factory: ProxyFactory) -> None:
    """console SET verbose (applied as RELOAD) changes what is logged from then on, as
    PgBouncer's; verbose = 0 returns to the level the pooler started with."""
    root = logging.getLogger()
    before = root.level
    proxy = proxy_factory()
    try:
        with admin(proxy) as console:
            console.execute("SET verbose = 2")
            assert root.level == logging.DEBUG
            console.execute("SET verbose = 0")
            assert root.level != logging.DEBUG
    finally:
        root.setLevel(before)


def test_console_set_of_a_new_key_and_certificate_one_at_a_time(
        proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    """The key of a new pair set first fails to make a TLS context with the old certificate
    (the running context stays); the certificate set next completes the pair, and new clients
    get it. Before, the failed SET undid the key, so the pair never came together."""
    from tests.proxy.test_tls import Certs

    old, new = Certs(tmp_path / "old"), Certs(tmp_path / "new")
    proxy = proxy_factory(client_tls_sslmode="require", client_tls_cert_file=str(old.cert),
                          client_tls_key_file=str(old.key))

    def verified_by(ca: Path) -> bool:
        try:
            with psycopg.connect(proxy.dsn(sslmode="verify-ca", sslrootcert=str(ca))) as c:
                return c.execute("select 1").fetchone() == (1,)
        except psycopg.OperationalError:
            return False

    assert verified_by(old.ca) and not verified_by(new.ca)
    with admin(proxy, sslmode="require") as console:
        console.execute(f"SET client_tls_key_file = '{new.key}'")  # no pair yet: old context
        assert verified_by(old.ca)
        console.execute(f"SET client_tls_cert_file = '{new.cert}'")
    assert verified_by(new.ca) and not verified_by(old.ca)
