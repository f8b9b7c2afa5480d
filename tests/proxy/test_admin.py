"""The admin console through real clients (psql, psycopg, asyncpg) against real PostgreSQL.

Every command is checked by its effect on the pooler and on PostgreSQL, not only by its answer.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.rows import dict_row
from tests.proxy.conftest import RunningProxy, wait_until


def admin(proxy: RunningProxy, user: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(dbname="pgbouncer", user=user), autocommit=True,
                           row_factory=dict_row, **kwargs)


def show(proxy: RunningProxy, what: str) -> list[dict[str, Any]]:
    with admin(proxy) as conn:
        return conn.execute(f"SHOW {what}").fetchall()


def client(proxy: RunningProxy, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None, **kwargs)


def psql(proxy: RunningProxy, command: str, db: str = "pgbouncer",
         user: str = "postgres") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-X", "-A", "-F", "|", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", user,
         "-d", db, "-c", command], capture_output=True, text=True, timeout=30)


def pool_row(proxy: RunningProxy, db: str = "test") -> dict[str, Any]:
    rows = [r for r in show(proxy, "POOLS") if r["database"] == db]
    assert len(rows) == 1, rows
    return rows[0]


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        yield pool


# ---------------------------------------------------------------------------------------
# SHOW
# ---------------------------------------------------------------------------------------

SHOW_HEADERS = {
    "POOLS": "database|user|cl_active|cl_waiting|cl_active_cancel_req|cl_waiting_cancel_req|"
             "sv_active|sv_active_cancel|sv_being_canceled|sv_idle|sv_used|sv_tested|sv_login|"
             "maxwait|maxwait_us|pool_mode|load_balance_hosts|sv_pinned",
    "STATS": "database|total_server_assignment_count|total_xact_count|total_query_count|"
             "total_received|total_sent|total_xact_time|total_query_time|total_wait_time|"
             "total_client_parse_count|total_server_parse_count|total_bind_count|"
             "avg_server_assignment_count|avg_xact_count|avg_query_count|avg_recv|avg_sent|"
             "avg_xact_time|avg_query_time|avg_wait_time|avg_client_parse_count|"
             "avg_server_parse_count|avg_bind_count",
    "CLIENTS": "type|user|database|replication|state|addr|port|local_addr|local_port|"
               "connect_time|request_time|wait|wait_us|close_needed|ptr|link|remote_pid|tls|"
               "application_name|prepared_statements|id|pinned",
    "DATABASES": "name|host|port|database|force_user|pool_size|min_pool_size|"
                 "reserve_pool_size|server_lifetime|pool_mode|load_balance_hosts|"
                 "max_connections|current_connections|max_client_connections|"
                 "current_client_connections|paused|disabled",
    "USERS": "name|pool_size|reserve_pool_size|pool_mode|max_user_connections|"
             "current_connections|max_user_client_connections|current_client_connections",
    "CONFIG": "key|value|default|changeable",
    "LISTS": "list|items",
    "VERSION": "version",
    "HAZARDS": "database|user|application_name|hazard|count|first_seen|last_seen|example|hint",
}


def test_every_show_command_through_psql(proxy: RunningProxy) -> None:
    with client(proxy) as conn:
        conn.execute("select 1")
        for what, header in [*SHOW_HEADERS.items(), ("SERVERS", SHOW_HEADERS["CLIENTS"])]:
            out = psql(proxy, f"SHOW {what};")
            assert out.returncode == 0, out.stderr
            assert out.stdout.splitlines()[0] == header, what
        for what in ("STATS_TOTALS", "STATS_AVERAGES", "TOTALS", "STATE", "HELP"):
            out = psql(proxy, f"show {what.lower()}")
            assert out.returncode == 0, out.stderr
    lines = psql(proxy, "SHOW SERVERS").stdout.splitlines()
    assert lines[1].startswith("S|postgres|test|none|idle|")
    assert psql(proxy, "SHOW VERSION").stdout.splitlines()[1].startswith("pgpilot ")
    assert "PAUSE" in psql(proxy, "SHOW HELP").stderr


def test_numeric_columns_are_typed_for_drivers(proxy: RunningProxy) -> None:
    with client(proxy) as conn:
        conn.execute("select 1")
    row = pool_row(proxy)
    assert isinstance(row["cl_active"], int) and isinstance(row["maxwait"], int)
    stats = next(r for r in show(proxy, "STATS") if r["database"] == "test")
    assert isinstance(stats["total_query_count"], int)
    assert {r["list"]: r["items"] for r in show(proxy, "LISTS")}["pools"] == 1


def test_show_pools_counts_active_and_waiting(proxy_factory: Callable[..., RunningProxy],
                                              executor: concurrent.futures.Executor) -> None:
    proxy = proxy_factory(default_pool_size=1)
    holder = client(proxy)
    waiter = client(proxy)
    try:
        holder.execute("begin")
        holder.execute("select 1")
        row = pool_row(proxy)
        assert (row["sv_active"], row["cl_active"], row["cl_waiting"]) == (1, 2, 0)
        blocked = executor.submit(lambda: waiter.execute("select 2").fetchone())
        row = wait_until(lambda: (r := pool_row(proxy))["cl_waiting"] == 1 and r)
        assert row["sv_active"] == 1 and row["cl_active"] == 1 and row["pool_mode"] == \
            "transaction"
        clients = {r["state"] for r in show(proxy, "CLIENTS") if r["database"] == "test"}
        assert clients == {"active", "waiting"}
        holder.execute("commit")
        assert blocked.result(10) == (2,)
        row = wait_until(lambda: (r := pool_row(proxy))["sv_active"] == 0 and r)
        assert (row["cl_waiting"], row["cl_active"], row["sv_idle"]) == (0, 2, 1)
    finally:
        holder.close()
        waiter.close()


def test_show_clients_and_servers_link_up(proxy: RunningProxy) -> None:
    with client(proxy, application_name="linked-app") as conn:
        conn.execute("begin")
        backend_pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        clients = [r for r in show(proxy, "CLIENTS") if r["application_name"] == "linked-app"]
        servers = [r for r in show(proxy, "SERVERS") if r["remote_pid"] == backend_pid]
        assert len(clients) == 1 and len(servers) == 1
        assert clients[0]["state"] == "active" and servers[0]["state"] == "active"
        assert clients[0]["link"] == servers[0]["ptr"]
        assert servers[0]["link"] == clients[0]["ptr"]
        assert servers[0]["application_name"] == "linked-app"
        conn.execute("commit")


def test_show_stats_totals_and_averages(proxy_factory: Callable[..., RunningProxy]) -> None:
    proxy = proxy_factory(stats_period=1)
    with client(proxy) as conn:
        for _ in range(5):
            conn.execute("select 1")

        def stats() -> dict[str, Any]:
            return next(r for r in show(proxy, "STATS") if r["database"] == "test")

        before = stats()
        assert before["total_query_count"] >= 5 and before["total_xact_count"] >= 5
        assert before["total_received"] > 0 and before["total_sent"] > 0

        def averaged() -> bool:
            conn.execute("select 1")
            return bool(stats()["avg_query_count"] > 0)

        wait_until(averaged)
        after = stats()
        assert after["total_query_count"] > before["total_query_count"]
        # PgBouncer 1.23's names: the figures without total_ / avg_, bytes_received ...
        totals = next(r for r in show(proxy, "STATS_TOTALS") if r["database"] == "test")
        assert totals["query_count"] >= after["total_query_count"]
        assert totals["bytes_received"] >= after["total_received"]
        assert not any(k.startswith(("total_", "avg_")) for k in totals)
        averages = next(r for r in show(proxy, "STATS_AVERAGES") if r["database"] == "test")
        assert set(averages) == set(totals)


def test_show_stats_times_transactions_and_queries(proxy: RunningProxy) -> None:
    with client(proxy) as conn:
        conn.execute("select pg_sleep(0.2)")  # one autocommit statement: 0.2 s
        with conn.transaction():  # one transaction of two statements: 0.3 s in all
            conn.execute("select pg_sleep(0.1)")
            conn.execute("select pg_sleep(0.1)")
            time.sleep(0.1)  # the client thinks inside its transaction
    row = next(r for r in show(proxy, "STATS") if r["database"] == "test")
    # microseconds, as PgBouncer: queries ran >= 0.4 s, transactions lasted >= 0.5 s
    assert row["total_query_time"] >= 400_000
    assert row["total_xact_time"] >= 500_000
    assert row["total_xact_time"] > row["total_query_time"]


def test_show_databases_users_config_lists(proxy_factory: Callable[..., RunningProxy],
                                           pg_params: dict[str, str]) -> None:
    upstream = f"host={pg_params['host']} port={pg_params['port']} dbname={pg_params['dbname']}"
    proxy = proxy_factory(
        databases={"secretdb": upstream + " password=hunter2-secret pool_size=3"},
        users={"postgres": "pool_mode=session"}, stats_users="postgres")
    with client(proxy) as conn:
        conn.execute("select 1")
    databases = {r["name"]: r for r in show(proxy, "DATABASES")}
    assert databases["secretdb"]["pool_size"] == 3
    assert databases["test"]["pool_size"] == 5 and databases["test"]["current_connections"] == 1
    assert databases["test"]["current_client_connections"] == 0  # the client has left
    assert databases["pgbouncer"]["pool_mode"] == "statement"
    users = {r["name"]: r for r in show(proxy, "USERS")}
    assert users["postgres"]["pool_mode"] == "session"
    assert users["postgres"]["current_connections"] == 1
    config = {r["key"]: r for r in show(proxy, "CONFIG")}
    assert config["default_pool_size"]["value"] == "5"
    assert config["default_pool_size"]["default"] == "20"
    assert config["listen_port"]["changeable"] == "no"
    assert config["stats_users"]["value"] == "postgres"
    lists = {r["list"]: r["items"] for r in show(proxy, "LISTS")}
    assert lists["pools"] == 1 and lists["used_servers"] == 1
    everything = " ".join(
        psql(proxy, f"SHOW {what}").stdout for what in ("CONFIG", "DATABASES", "USERS"))
    assert "hunter2" not in everything


# ---------------------------------------------------------------------------------------
# Access
# ---------------------------------------------------------------------------------------

async def test_non_admin_user_is_refused_with_42501(
        proxy_factory: Callable[..., RunningProxy], pg_params: dict[str, str]) -> None:
    forced = (f"host={pg_params['host']} port={pg_params['port']} dbname={pg_params['dbname']}"
              f" user={pg_params['user']}")
    proxy = proxy_factory(userlist={"postgres": "", "app": ""}, databases={"forced": forced})
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(proxy.dsn(dbname="pgbouncer", user="app"))
    out = psql(proxy, "SHOW POOLS", user="app")
    assert out.returncode != 0 and "permission denied" in out.stderr
    # The same user still reaches real databases.
    conn = await asyncpg.connect(proxy.dsn(dbname="forced", user="app"))
    await conn.close()


def test_stats_user_may_show_but_not_control(proxy_factory: Callable[..., RunningProxy]) -> None:
    proxy = proxy_factory(userlist={"postgres": "", "viewer": ""}, stats_users="viewer")
    with admin(proxy, user="viewer") as conn:
        assert conn.execute("SHOW VERSION").fetchone()
        for command in ("PAUSE", "RESUME", "KILL test", "RELOAD", "SHUTDOWN", "RECONNECT"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(command)
        assert conn.execute("SHOW LISTS").fetchall()  # still usable
    assert proxy.call(lambda: not proxy.pooler.paused and not proxy.pooler.stopping)


def test_admin_login_checks_the_password(proxy_factory: Callable[..., RunningProxy]) -> None:
    proxy = proxy_factory(auth_type="scram-sha-256", userlist={"postgres": "adminpw"})
    with psycopg.connect(proxy.dsn(dbname="pgbouncer", password="adminpw"),
                         autocommit=True) as conn:
        assert conn.execute("SHOW VERSION").fetchone()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(dbname="pgbouncer", password="wrong"))


def test_unknown_command_and_extended_protocol_errors_keep_connection(
        proxy: RunningProxy) -> None:
    with admin(proxy) as conn:
        with pytest.raises(psycopg.errors.SyntaxError, match="unknown admin console command"):
            conn.execute("FROBNICATE everything")
        with pytest.raises(psycopg.errors.SyntaxError, match="unknown SHOW argument"):
            conn.execute("SHOW NONSENSE")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="simple query protocol"):
            conn.execute("SHOW %s", ["POOLS"])
        with pytest.raises(psycopg.errors.UndefinedObject):
            conn.execute("KILL_CLIENT 987654")
        with pytest.raises(psycopg.errors.InvalidCatalogName):
            conn.execute("PAUSE nosuchdb")
        conn.execute("SET application_name = 'tool'")  # drivers' connect-time SETs pass
        assert conn.execute("SHOW VERSION; SHOW LISTS").fetchall()
    out = psql(proxy, "SHOW POOLS; SHOW VERSION;")
    assert out.returncode == 0 and "pgpilot" in out.stdout
    with client(proxy) as conn:  # the pooler itself is unaffected
        assert conn.execute("select 1").fetchone() == (1,)


# ---------------------------------------------------------------------------------------
# Control
# ---------------------------------------------------------------------------------------

def test_pause_waits_for_transactions_and_blocks_until_resume(
        proxy: RunningProxy, executor: concurrent.futures.Executor) -> None:
    with client(proxy) as busy, client(proxy) as later, admin(proxy) as console:
        busy.execute("begin")
        busy.execute("select 1")
        pausing = executor.submit(console.execute, "PAUSE")
        wait_until(lambda: proxy.call(lambda: proxy.pooler.paused))
        assert not pausing.done()  # the open transaction holds PAUSE
        busy.execute("commit")
        pausing.result(10)
        assert proxy.server_count() == 0  # PAUSE closed the servers
        blocked = executor.submit(lambda: later.execute("select 42").fetchone())
        wait_until(lambda: pool_row(proxy)["cl_waiting"] == 1)
        assert not blocked.done()
        console.execute("RESUME")
        assert blocked.result(10) == (42,)
        assert busy.execute("select 1").fetchone() == (1,)


def test_pause_one_database_leaves_others_running(
        proxy_factory: Callable[..., RunningProxy], pg_params: dict[str, str],
        executor: concurrent.futures.Executor) -> None:
    upstream = f"host={pg_params['host']} port={pg_params['port']} dbname={pg_params['dbname']}"
    proxy = proxy_factory(databases={"other": upstream})
    with client(proxy) as paused_client, \
            psycopg.connect(proxy.dsn(dbname="other"), autocommit=True) as other, \
            admin(proxy) as console:
        console.execute("PAUSE test")
        blocked = executor.submit(lambda: paused_client.execute("select 1").fetchone())
        assert other.execute("select 2").fetchone() == (2,)
        assert {r["name"]: r["paused"] for r in show(proxy, "DATABASES")}["test"] == 1
        assert not blocked.done()
        console.execute("RESUME test")
        assert blocked.result(10) == (1,)


def test_kill_database_drops_its_clients_and_servers(
        proxy: RunningProxy, executor: concurrent.futures.Executor) -> None:
    victim = client(proxy)
    victim.execute("select 1")
    with admin(proxy) as console:
        console.execute("KILL test")
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
        assert proxy.server_count() == 0
        with client(proxy) as newcomer:  # new clients wait for RESUME
            blocked = executor.submit(lambda: newcomer.execute("select 7").fetchone())
            wait_until(lambda: pool_row(proxy)["cl_waiting"] == 1)
            console.execute("RESUME")
            assert blocked.result(10) == (7,)
    victim.close()


def test_kill_client_closes_exactly_that_client(proxy: RunningProxy) -> None:
    with client(proxy, application_name="doomed") as doomed, \
            client(proxy, application_name="spared") as spared, admin(proxy) as console:
        doomed.execute("begin")
        doomed.execute("select 1")
        spared.execute("select 1")
        ids = {r["application_name"]: r["id"] for r in console.execute("SHOW CLIENTS")}
        console.execute(f"KILL_CLIENT {ids['doomed']}")
        with pytest.raises(psycopg.OperationalError):
            doomed.execute("select 1")
        assert spared.execute("select 'alive'").fetchone() == ("alive",)
        names = {r["application_name"] for r in console.execute("SHOW CLIENTS")}
        assert "doomed" not in names and "spared" in names
        assert all(r["state"] != "active" for r in console.execute("SHOW SERVERS"))


def test_reconnect_replaces_server_connections(proxy_factory: Callable[..., RunningProxy],
                                               pg_dsn: str) -> None:
    proxy = proxy_factory(default_pool_size=1)
    with client(proxy) as conn, admin(proxy) as console, \
            psycopg.connect(pg_dsn, autocommit=True) as direct:
        old_pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        assert [r["remote_pid"] for r in console.execute("SHOW SERVERS")] == [old_pid]
        console.execute("RECONNECT test")
        new_pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        assert new_pid != old_pid
        assert [r["remote_pid"] for r in console.execute("SHOW SERVERS")] == [new_pid]

        def old_backend_gone() -> bool:
            row = direct.execute("select count(*) from pg_stat_activity where pid = %s",
                                 [old_pid]).fetchone()
            return row == (0,)

        wait_until(old_backend_gone)


def test_reconnect_marks_busy_servers_close_needed(proxy: RunningProxy) -> None:
    with client(proxy) as conn, admin(proxy) as console:
        conn.execute("begin")
        old_pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        console.execute("RECONNECT")
        servers = console.execute("SHOW SERVERS").fetchall()
        assert [(r["remote_pid"], r["close_needed"]) for r in servers] == [(old_pid, 1)]
        conn.execute("commit")  # released: closed instead of reused
        wait_until(lambda: proxy.server_count() == 0)


def test_reload_picks_up_a_changed_pool_size(proxy: RunningProxy) -> None:
    text = proxy.config_path.read_text()
    assert "default_pool_size = 5" in text
    with admin(proxy) as console:
        proxy.config_path.write_text(text.replace("default_pool_size = 5",
                                                  "default_pool_size = 2"))
        console.execute("RELOAD")
        assert {r["name"]: r["pool_size"] for r in console.execute("SHOW DATABASES")}[
            "test"] == 2
        config = {r["key"]: r["value"] for r in console.execute("SHOW CONFIG")}
        assert config["default_pool_size"] == "2"
        proxy.config_path.write_text(text + "pool_mode = bogus\n")
        with pytest.raises(psycopg.errors.ConfigFileError, match="reload failed"):
            console.execute("RELOAD")
        assert console.execute("SHOW VERSION").fetchone()  # still usable, old config kept
    assert proxy.call(lambda: proxy.pooler.config.default_pool_size) == 2


def test_shutdown_stops_the_pooler(proxy: RunningProxy) -> None:
    out = psql(proxy, "SHUTDOWN")
    assert out.returncode == 0, out.stderr
    wait_until(lambda: proxy.pooler is not None and proxy.pooler.stopped.is_set())
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(), connect_timeout=3)


def test_shutdown_wait_for_clients(proxy: RunningProxy) -> None:
    assert proxy.pooler is not None
    pooler = proxy.pooler
    stayer = client(proxy)
    with admin(proxy) as console:
        console.execute("SHUTDOWN WAIT_FOR_CLIENTS")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(), connect_timeout=3)  # no new clients
    assert not pooler.stopped.is_set()
    assert stayer.execute("select 'still served'").fetchone() == ("still served",)
    assert not pooler.stopped.is_set()
    stayer.close()
    wait_until(pooler.stopped.is_set)


def test_pause_from_one_console_while_another_watches(proxy: RunningProxy) -> None:
    """A console waiting in PAUSE does not hold up the pooler or other consoles."""
    with client(proxy) as busy, admin(proxy) as first, admin(proxy) as second:
        busy.execute("begin")
        busy.execute("select 1")
        done = threading.Event()

        def pause() -> None:
            first.execute("PAUSE")
            done.set()

        thread = threading.Thread(target=pause)
        thread.start()
        wait_until(lambda: proxy.call(lambda: proxy.pooler.paused))
        assert second.execute("SHOW STATE").fetchall()
        assert not done.is_set()
        busy.execute("rollback")
        thread.join(10)
        assert done.is_set()
        second.execute("RESUME")
        assert busy.execute("select 1").fetchone() == (1,)


def test_shutdown_wait_for_servers(proxy: RunningProxy) -> None:
    assert proxy.pooler is not None
    pooler = proxy.pooler
    with client(proxy) as busy:
        busy.execute("begin")
        busy.execute("select 1")
        with admin(proxy) as console:
            console.execute("SHUTDOWN WAIT_FOR_SERVERS")
        assert not pooler.stopped.is_set()  # the open transaction holds the shutdown
        busy.execute("commit")
        wait_until(pooler.stopped.is_set)


def test_kill_without_database_drops_every_client(proxy_factory: Callable[..., RunningProxy],
                                                  pg_params: dict[str, str]) -> None:
    upstream = f"host={pg_params['host']} port={pg_params['port']} dbname={pg_params['dbname']}"
    proxy = proxy_factory(databases={"other": upstream})
    first = client(proxy)
    second = psycopg.connect(proxy.dsn(dbname="other"), autocommit=True)
    try:
        first.execute("select 1")
        second.execute("select 1")
        with admin(proxy) as console:
            console.execute("KILL")
            for victim in (first, second):
                with pytest.raises(psycopg.OperationalError):
                    victim.execute("select 1")
            assert proxy.server_count() == 0
            assert console.execute("SHOW STATE").fetchall()  # the console itself survives
            console.execute("RESUME")
        with client(proxy) as again:
            assert again.execute("select 1").fetchone() == (1,)
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("command", [
    "SHOW", "SHOW POOLS extra", "KILL_CLIENT abc", 'PAUSE "unterminated', "'", "RESUME a b",
    "SHUTDOWN NOW", "SET pool_mode = sometimes", "SET listen_port = 1", "SET nosuch = 1",
    "x" * 10_000, "KILL_CLIENT 99999999999999999999",
])
def test_bad_commands_get_errors_and_change_nothing(proxy: RunningProxy, command: str) -> None:
    with admin(proxy) as console:
        with pytest.raises(psycopg.errors.Error) as failure:
            console.execute(command)
        assert failure.value.sqlstate is not None
        assert console.execute("SHOW STATE").fetchall()
    assert proxy.call(lambda: not proxy.pooler.paused and not proxy.pooler.stopping)
    with client(proxy) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_paused_pooler_keeps_no_servers_for_new_pools(
        proxy: RunningProxy, executor: concurrent.futures.Executor) -> None:
    """A database first used while paused gets its login, but no server stays open."""
    with admin(proxy) as console:
        console.execute("PAUSE")
        with psycopg.connect(proxy.dsn(dbname="postgres"), autocommit=True) as newcomer:
            blocked = executor.submit(lambda: newcomer.execute("select 5").fetchone())
            wait_until(lambda: proxy.server_count() == 0)
            assert not blocked.done()
            console.execute("RESUME")
            assert blocked.result(10) == (5,)


def test_pause_completes_while_clients_keep_waiting(
        proxy_factory: Callable[..., RunningProxy],
        executor: concurrent.futures.Executor) -> None:
    proxy = proxy_factory(default_pool_size=1)
    with client(proxy) as holder, client(proxy) as waiter, admin(proxy) as console:
        holder.execute("begin")
        holder.execute("select 1")
        blocked = executor.submit(lambda: waiter.execute("select 3").fetchone())
        wait_until(lambda: pool_row(proxy)["cl_waiting"] == 1)
        pausing = executor.submit(console.execute, "PAUSE")
        wait_until(lambda: proxy.call(lambda: proxy.pooler.paused))
        holder.execute("commit")  # its server goes back, is closed, and no new one opens
        pausing.result(10)
        assert proxy.server_count() == 0 and not blocked.done()
        console.execute("RESUME")
        assert blocked.result(10) == (3,)


def test_raw_protocol_sync_and_extended_messages(proxy: RunningProxy) -> None:
    """Every Sync gets a ReadyForQuery; extended messages are refused up to the Sync."""
    import socket

    from pgpilot.wire import messages as m
    from pgpilot.wire.framing import MessageReader

    reader = MessageReader()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:

        def until_ready() -> list[tuple[int, bytes]]:
            got: list[tuple[int, bytes]] = []
            while not got or got[-1][0] != m.B.READY_FOR_QUERY:
                data = sock.recv(65536)
                assert data, "connection closed"
                got += [(t, b or b"") for t, b in reader.feed(data)]
            return got

        sock.sendall(m.startup_message({"user": "postgres", "database": "pgbouncer"}))
        assert until_ready()[0] == (m.B.AUTHENTICATION, b"\x00\x00\x00\x00")
        sock.sendall(m.sync())
        assert [t for t, _ in until_ready()] == [m.B.READY_FOR_QUERY]
        sock.sendall(m.parse_message("", "SHOW POOLS") + m.bind_simple("", "")
                     + m.execute_message() + m.sync())
        replies = until_ready()
        assert [t for t, _ in replies] == [m.B.ERROR_RESPONSE, m.B.READY_FOR_QUERY]
        assert m.parse_error_fields(replies[0][1])["C"] == "0A000"
        sock.sendall(m.query("SHOW VERSION"))
        replies = until_ready()
        assert [t for t, _ in replies] == [m.B.ROW_DESCRIPTION, m.B.DATA_ROW,
                                           m.B.COMMAND_COMPLETE, m.B.READY_FOR_QUERY]
        sock.sendall(m.query(""))
        assert [t for t, _ in until_ready()] == [m.B.EMPTY_QUERY, m.B.READY_FOR_QUERY]
        sock.sendall(m.terminate())


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_query_count_counts_requests_as_pgbouncer(
        proxy_factory: Callable[..., RunningProxy], pool_mode: str) -> None:
    """A query is a request answered by a ReadyForQuery (PgBouncer's count): two statements
    in one Query count once, a Parse + Sync (psycopg preparing a statement) once; the
    console's own commands are counted under its database, as PgBouncer's."""
    proxy = proxy_factory(pool_mode=pool_mode)
    with client(proxy) as conn:
        conn.execute("select 1; select 2")  # one request, two CommandCompletes
        conn.pgconn.prepare(b"st", b"select 3")  # Parse + Sync: no CommandComplete
        conn.pgconn.prepare(b"st2", b"select 4")
    wanted = 3  # (requests before it: none, a fresh pooler; CommandCompletes: 2)

    def counted() -> bool:
        row = next(r for r in show(proxy, "STATS") if r["database"] == "test")
        return bool(row["total_query_count"] == wanted)
    wait_until(counted)
    console = next(r for r in show(proxy, "STATS") if r["database"] == "pgbouncer")
    assert console["total_query_count"] >= 2 and console["total_xact_count"] >= 2
