"""Engine logins: clients the fast path's engine logs in alone, along a login route.

After Python has logged a client in with some StartupMessage, the engine serves later clients
that send the same bytes by itself (fastpath.LoginRoute, ``engine/logins.c``): they have no Python
object ("phantoms") until Python has to see them. These tests check that such clients work
like any other (queries, named statements, cancel, limits, the console, RELOAD, timeouts,
leaving mid-transaction) and that Python really does not see them until then.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import RunningProxy, forced_user_databases, wait_until
from tests.proxy.test_cancel import Running, wait_active
from tests.proxy.test_fastlogin import (
    PASSWORD,
    Raw,
    error_fields,
    login,
    scram_secret,
    warm_routes,
)

from pgpilot.proxy import fastpath
from pgpilot.proxy.states import ClientState

pytestmark = pytest.mark.skipif(not fastpath.available() and os.environ.get("CI") != "true",
                                reason="fast path not built (no C compiler at install)")


ADMIN_PASSWORD = "admin-Secret1"


def admin(proxy: RunningProxy) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(dbname="pgbouncer", password=ADMIN_PASSWORD),
                           autocommit=True)


def make_proxy(proxy_factory: Callable[..., RunningProxy], pg_params: dict[str, str],
               **settings: Any) -> RunningProxy:
    base: dict[str, Any] = {
        "auth_type": "scram-sha-256", "log_connections": 0, "log_disconnections": 0,
        "userlist": {pg_params["user"]: ADMIN_PASSWORD, "carol": scram_secret(PASSWORD)},
        "databases": forced_user_databases(pg_params),
    }
    base.update(settings)
    return proxy_factory(**base)


@pytest.fixture(params=["scram-sha-256", "trust"])
def routed(request: pytest.FixtureRequest, proxy_factory: Callable[..., RunningProxy],
           pg_params: dict[str, str]) -> RunningProxy:
    """Both kinds of login the engine can do alone: a SCRAM exchange, and none (trust)."""
    return make_proxy(proxy_factory, pg_params, auth_type=request.param)


def counts(proxy: RunningProxy) -> tuple[int, int, int]:
    """(phantoms, clients Python knows, cancel keys) as the pooler sees them now."""
    def read() -> tuple[int, int, int]:
        pooler = proxy.pooler
        assert pooler is not None and pooler.fast is not None
        known = sum(len(g) for s, g in pooler.clients.items() if s is not ClientState.CLOSED)
        return pooler.fast.engine.phantoms, known, len(pooler.cancel_keys)
    return tuple(proxy.call(read))  # type: ignore[return-value]


def connect(proxy: RunningProxy, **kw: Any) -> psycopg.Connection[Any]:
    kw.setdefault("autocommit", True)
    return psycopg.connect(proxy.dsn(user="carol", password=PASSWORD), **kw)


def psycopg_route(proxy: RunningProxy) -> None:
    """One psycopg login through Python: later psycopg logins (same StartupMessage) take
    the route."""
    with connect(proxy) as conn:
        conn.execute("SELECT 1")
    assert proxy.pooler is not None and proxy.pooler.fast is not None
    fast = proxy.pooler.fast
    wait_until(lambda: proxy.call(lambda: len(fast.routes)) == 1)


def test_a_second_login_never_reaches_python(routed: RunningProxy) -> None:
    psycopg_route(routed)
    wait_until(lambda: counts(routed) == (0, 0, 0))
    with connect(routed) as conn:
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        # Logged in and served by the engine alone: a phantom with a cancel key, no object.
        assert counts(routed) == (1, 0, 1)
        assert conn.info.backend_pid != 0
    # Gone without Python hearing of it: no client, no key left behind.
    wait_until(lambda: counts(routed) == (0, 0, 0))


def test_many_logins_and_the_welcome_is_the_pythons(routed: RunningProxy) -> None:
    """A routed login gets the same ParameterStatus messages as the Python one did."""
    with connect(routed) as conn:
        first = {name: conn.info.parameter_status(name)
                 for name in ("server_version", "client_encoding", "DateStyle", "TimeZone",
                              "application_name", "integer_datetimes")}
    for _ in range(20):
        with connect(routed) as conn:
            again = {name: conn.info.parameter_status(name) for name in first}
            assert again == first
            assert conn.execute("SELECT current_setting('application_name')").fetchone() \
                is not None
    assert counts(routed)[1] == 0


def test_the_console_sees_phantoms(routed: RunningProxy, pg_params: dict[str, str]) -> None:
    psycopg_route(routed)
    conns = [connect(routed) for _ in range(3)]
    try:
        assert counts(routed)[0] == 3
        with admin(routed) as console:
            rows = console.execute("SHOW CLIENTS").fetchall()
            users = [r[1] for r in rows]
            assert users.count("carol") == 3
            pools = {(r[0], r[1]): r for r in console.execute("SHOW POOLS").fetchall()}
            # One pool, the forced user's, as PgBouncer's (SHOW POOLS names that user).
            assert pools[("test", pg_params["user"])][2] == 3  # cl_active
        # SHOW claimed them: ordinary clients now, still working.
        wait_until(lambda: counts(routed)[:2] == (0, 3))
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        for conn in conns:
            conn.close()


def test_counts_do_not_claim(proxy_factory: Callable[..., RunningProxy],
                             pg_params: dict[str, str]) -> None:
    """SHOW POOLS, SHOW LISTS and /metrics count idle clients the engine logged in alone
    where they are (no Python objects made for a scrape); SHOW CLIENTS lists them."""
    from tests.proxy.test_metrics import scrape

    from pgpilot.embedded import free_port

    metrics_port = free_port()
    proxy = make_proxy(proxy_factory, pg_params, metrics_port=metrics_port)
    psycopg_route(proxy)
    conns = [connect(proxy) for _ in range(3)]
    try:
        # A fourth is inside a transaction: linked, so the readers take it back (claim it).
        busy = connect(proxy, autocommit=False)
        busy.execute("SELECT 1")
        assert counts(proxy)[0] == 4
        with admin(proxy) as console:
            pools = {(r[0], r[1]): r for r in console.execute("SHOW POOLS").fetchall()}
            assert pools[("test", pg_params["user"])][2] == 4  # cl_active: 3 phantoms + 1
            lists = dict(console.execute("SHOW LISTS").fetchall())
            assert lists["used_clients"] == 5  # and the console's own connection
            assert counts(proxy)[:2] == (3, 2)  # only the linked one was claimed
            sample = scrape(metrics_port)
            # Labelled by the pool's user: the forced one (one pool, as PgBouncer's).
            assert sample.get("pgpilot_clients", database="test", user=pg_params["user"],
                              state="idle") == 3
            assert sample.get("pgpilot_clients", database="test", user=pg_params["user"],
                              state="active") == 1
            assert counts(proxy)[0] == 3
            rows = console.execute("SHOW CLIENTS").fetchall()
            assert [r[1] for r in rows].count("carol") == 4
            assert counts(proxy)[0] == 0
        busy.rollback()
        busy.close()
    finally:
        for conn in conns:
            conn.close()


def test_cancel_reaches_a_phantoms_query(routed: RunningProxy, pg_dsn: str) -> None:
    """The CancelRequest names a key the engine gave out: Python claims the client, then
    cancels its query only."""
    psycopg_route(routed)
    with connect(routed) as conn:
        server_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        assert counts(routed)[0] == 1
        running = Running(conn, "SELECT pg_sleep(30)")
        wait_active(pg_dsn, server_pid)
        conn.cancel_safe()
        outcome = running.outcome(15)
        assert isinstance(outcome, psycopg.errors.QueryCanceled), outcome
        assert conn.execute("SELECT 7").fetchone() == (7,)
        assert counts(routed)[:2] == (0, 1)  # claimed by the cancel


def test_named_statements_hand_the_phantom_to_python(routed: RunningProxy) -> None:
    psycopg_route(routed)
    with connect(routed, prepare_threshold=0) as conn:
        for i in range(5):
            assert conn.execute("SELECT %s::int * 2", (i,)).fetchone() == (i * 2,)
        # The router (Python) renames named statements: this client was claimed for that.
        assert counts(routed)[:2] == (0, 1)


def test_leaving_mid_transaction_rolls_back(routed: RunningProxy, pg_dsn: str) -> None:
    psycopg_route(routed)
    with psycopg.connect(pg_dsn, autocommit=True) as direct:
        direct.execute("DROP TABLE IF EXISTS engine_login_t")
        direct.execute("CREATE TABLE engine_login_t (n int)")
    try:
        conn = connect(routed, autocommit=False)
        conn.execute("INSERT INTO engine_login_t VALUES (1)")
        conn.close()  # Terminate inside the transaction
        with connect(routed) as other:
            for _ in range(10):  # every server of the pool is clean
                assert other.execute("SELECT count(*) FROM engine_login_t").fetchone() == (0,)
        wait_until(lambda: counts(routed)[0] == 0)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as direct:
            direct.execute("DROP TABLE engine_login_t")


def test_max_client_conn_counts_phantoms(proxy_factory: Callable[..., RunningProxy],
                                         pg_params: dict[str, str]) -> None:
    proxy = make_proxy(proxy_factory, pg_params, max_client_conn=3)
    psycopg_route(proxy)
    held = [connect(proxy) for _ in range(3)]
    try:
        assert counts(proxy)[0] == 3
        with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
            connect(proxy)
    finally:
        for conn in held:
            conn.close()
    wait_until(lambda: counts(proxy)[:2] == (0, 0))
    with connect(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_reload_forgets_routes(proxy_factory: Callable[..., RunningProxy],
                               pg_params: dict[str, str], tmp_path: Path) -> None:
    """A new password in auth_file holds from the RELOAD on, for routed logins too."""
    proxy = make_proxy(proxy_factory, pg_params)
    psycopg_route(proxy)
    userlist = Path(proxy.pooler.config.auth_file)  # type: ignore[union-attr, arg-type]
    userlist.write_text(f'"{pg_params["user"]}" "{ADMIN_PASSWORD}"\n'
                        f'"carol" "{scram_secret("new-Secret9")}"\n')
    proxy.reload()
    assert proxy.call(lambda: len(proxy.pooler.fast.routes)) == 0  # type: ignore[union-attr]
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(proxy)
    with psycopg.connect(proxy.dsn(user="carol", password="new-Secret9")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_admin_commands_forget_routes_and_see_phantoms(routed: RunningProxy) -> None:
    """SHOW keeps the routes; a command that changes the pooler (KILL here) drops them, and
    acts on the clients the engine logged in alone as on any other."""
    psycopg_route(routed)
    victim = connect(routed)
    assert counts(routed)[0] == 1
    with admin(routed) as console:
        console.execute("SHOW POOLS")
        assert routed.call(lambda: len(routed.pooler.fast.routes)) == 1  # type: ignore
        console.execute("KILL test")
        assert routed.call(lambda: len(routed.pooler.fast.routes)) == 0  # type: ignore
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")  # killed, as a client Python knew would be
        victim.close()
        console.execute("RESUME test")
    with connect(routed) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_no_routes_where_python_must_see_every_login(
        proxy_factory: Callable[..., RunningProxy], pg_params: dict[str, str]) -> None:
    for settings in ({"pool_mode": "session"}, {"client_idle_timeout": 60},
                     {"max_user_client_connections": 50}, {"application_name_add_host": 1}):
        proxy = make_proxy(proxy_factory, pg_params, **settings)
        for _ in range(2):
            with connect(proxy) as conn:
                conn.execute("SELECT 1")
                assert counts(proxy)[0] == 0, settings
        assert proxy.call(lambda p=proxy: len(p.pooler.fast.routes)) == 0, settings


def phantoms_come_and_go(proxy: RunningProxy, count: int = 5) -> list[int]:
    """``count`` clients log in one after another along a route, each a phantom, run a query
    and leave; their local ports."""
    psycopg_route(proxy)
    ports = []
    for _ in range(count):
        with connect(proxy) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert counts(proxy)[:2] == (1, 0)  # a phantom: Python has no object for it
            ports.append(local_port(conn))
    wait_until(lambda: counts(proxy) == (0, 0, 0))
    return ports


def test_connection_logging_keeps_engine_logins(proxy_factory: Callable[..., RunningProxy],
                                                pg_params: dict[str, str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    """log_connections / log_disconnections (PgBouncer's defaults) no longer send every
    login through Python: the engine notes its phantoms' logins and departures and Python
    logs them in its usual words, under ids from the same sequence, which a phantom keeps
    when it gets its Python object."""
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    proxy = make_proxy(proxy_factory, pg_params, log_connections=1, log_disconnections=1)
    ports = phantoms_come_and_go(proxy)

    def lines(what: str) -> dict[int, int]:
        """client port -> id, of the pooler's log lines ending in ``what``."""
        found = {}
        for record in list(caplog.records):
            got = re.fullmatch(r"C-(\d+)\(test/carol@127\.0\.0\.1:(\d+)\) " + what
                               + r"(?: \(age=\d+s\))?",
                               record.getMessage())
            if got:
                found[int(got.group(2))] = int(got.group(1))
        return found

    wait_until(lambda: set(ports) <= set(lines("closing because: client closed the connection")))
    logins, leaves = lines("login ok"), lines("closing because: client closed the connection")
    assert all(logins[port] == leaves[port] for port in ports)
    assert len({logins[port] for port in ports}) == len(ports)  # an id each
    with connect(proxy) as conn, admin(proxy) as console:
        port = local_port(conn)
        wait_until(lambda: port in lines("login ok"))
        logged_id = lines("login ok")[port]
        rows = console.execute("SHOW CLIENTS").fetchall()
        columns = [c.name for c in console.cursor().execute("SHOW CLIENTS").description or []]
        mine = [r for r in rows if r[columns.index("port")] == port]
        assert [r[columns.index("id")] for r in mine] == [logged_id]  # claimed, same id


def test_the_engine_writes_its_logins_lines_itself(
        proxy_factory: Callable[..., RunningProxy], pg_params: dict[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """When the log is plain files (the CLI's), the engine formats and writes its phantoms'
    lines itself (FastPath.configure_logins, logs.direct_target): whole lines in the CLI's
    format, login before leaving under one id per client, none through Python's logging."""
    path = tmp_path / "connections.log"
    monkeypatch.setattr(fastpath, "direct_target", lambda logger, level: (
        [os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)], b" 4242 INFO "))
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    proxy = make_proxy(proxy_factory, pg_params, log_connections=1, log_disconnections=1)
    ports = phantoms_come_and_go(proxy)
    events: dict[int, list[tuple[str, int]]] = {}

    def read() -> dict[int, list[tuple[str, int]]]:
        events.clear()
        for line in path.read_text().splitlines():
            got = re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} 4242 INFO "
                               r"C-(\d+)\(test/carol@127\.0\.0\.1:(\d+)\) "
                               r"(login ok|closing because: client closed the connection)"
                               r"(?: \(age=\d+s\))?", line)
            assert got, line
            events.setdefault(int(got.group(2)), []).append((got.group(3), int(got.group(1))))
        return events

    wait_until(lambda: all(len(read().get(port, [])) == 2 for port in ports))
    for port in ports:
        (first, first_id), (second, second_id) = events[port]
        assert (first, second) == ("login ok",
                                   "closing because: client closed the connection")
        assert first_id == second_id
    assert len({events[port][0][1] for port in ports}) == len(ports)
    python_lines = [r.getMessage() for r in caplog.records if "carol@" in r.getMessage()]
    assert not any(f":{port})" in line for line in python_lines for port in ports)


def local_port(conn: psycopg.Connection[Any]) -> int:
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def test_a_silent_connection_is_timed_out(proxy_factory: Callable[..., RunningProxy],
                                          pg_params: dict[str, str]) -> None:
    """Accepted with no object (routes exist), then not a byte: client_login_timeout.
    (With tcp_defer_accept on, the kernel would not hand such a connection over yet.)"""
    proxy = make_proxy(proxy_factory, pg_params, client_login_timeout=1, tcp_defer_accept=0)
    warm_routes(proxy, "carol")
    raw = Raw(proxy.port)
    try:
        wait_until(lambda: counts(proxy)[0] == 1)
        raw.sock.settimeout(15)
        rest = raw.read_until_end()
        assert rest and error_fields(rest[-1][1])["C"] == "08P01", rest
    finally:
        raw.close()


def test_phantoms_on_shutdown_are_told(routed: RunningProxy) -> None:
    psycopg_route(routed)
    conn = connect(routed)
    assert counts(routed)[0] == 1
    routed.stop()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()


def test_churn_keeps_the_pooler_clean(routed: RunningProxy) -> None:
    """Many short connections (pgbench -C): none leaves a trace; SHOW STATS counts them."""
    warm_routes(routed, "carol")
    for _ in range(60):
        assert login(routed.port)[-1] == (b"Z", b"I")
    wait_until(lambda: counts(routed) == (0, 0, 0))
    with connect(routed) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_mix_leaves_nothing_behind(proxy_factory: Callable[..., RunningProxy],
                                          pg_params: dict[str, str], pg_dsn: str,
                                          seed: int) -> None:
    """Clients logged in by the engine alone and by Python, mixed with everything that claims
    them (named statements, SHOW, RELOAD, leaving mid-transaction), in a random order: every
    query gets its own answer, and at the end no client, key or open transaction is left."""
    import random

    rng = random.Random(seed)
    proxy = make_proxy(proxy_factory, pg_params, default_pool_size=2)
    psycopg_route(proxy)
    open_conns: list[tuple[psycopg.Connection[Any], bool]] = []  # (conn, in a transaction)

    def pick() -> int:
        return rng.randrange(len(open_conns))

    for step in range(60):
        action = rng.choice(["open", "open", "query", "query", "begin", "close", "named",
                             "show", "clients", "reload"])
        if action == "open" or not open_conns:
            open_conns.append((connect(proxy), False))
        elif action == "query":
            i = pick()
            conn, _ = open_conns[i]
            assert conn.execute("SELECT %s::int + 1", (step,)).fetchone() == (step + 1,)
        elif action == "begin":
            i = pick()
            conn, in_txn = open_conns[i]
            if not in_txn and not any(t for _, t in open_conns):  # one server stays free
                conn.autocommit = False
                conn.execute("SELECT %s", (step,))
                open_conns[i] = (conn, True)
        elif action == "close":
            conn, _ = open_conns.pop(pick())
            conn.close()  # mid-transaction or not
        elif action == "named":
            conn, _ = open_conns[pick()]
            cur = conn.cursor()
            assert cur.execute("SELECT %s::int * 3", (step,), prepare=True).fetchone() \
                == (step * 3,)
        elif action in ("show", "clients"):
            with admin(proxy) as console:
                console.execute("SHOW POOLS" if action == "show" else "SHOW CLIENTS")
        else:
            proxy.reload()
        # Whoever is not in a transaction can still run a query of its own.
        for conn, in_txn in open_conns:
            if not in_txn:
                assert conn.execute("SELECT %s::text", (f"s{step}",)).fetchone() == (f"s{step}",)
    for conn, _ in open_conns:
        conn.close()
    wait_until(lambda: counts(proxy) == (0, 0, 0))
    with psycopg.connect(pg_dsn, autocommit=True) as direct:
        wait_until(lambda: not direct.execute(
            "SELECT 1 FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%' "
            "AND datname = %s", (pg_params["dbname"],)).fetchall())


def listening_defer_accept(proxy: RunningProxy) -> list[int]:
    """TCP_DEFER_ACCEPT of each of the pooler's listening TCP sockets, as the kernel has it."""
    def read() -> list[int]:
        assert proxy.pooler is not None
        return [sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)
                for listener in proxy.pooler._listeners
                for sock in getattr(listener, "sockets", ())
                if sock.family in (socket.AF_INET, socket.AF_INET6)]
    return list(proxy.call(read))


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux's TCP option")
def test_tcp_defer_accept_takes_a_client_with_its_first_packet(
        proxy_factory: Callable[..., RunningProxy], pg_params: dict[str, str]) -> None:
    """tcp_defer_accept (PgBouncer's, on by default): a connection is the pooler's once it has
    sent something, and the engine reads that as it accepts; RELOAD takes the option off the
    listening sockets, after which a silent connection is accepted at once."""
    proxy = make_proxy(proxy_factory, pg_params, tcp_defer_accept=1)
    deferred = listening_defer_accept(proxy)
    assert deferred and all(v > 0 for v in deferred)
    warm_routes(proxy, "carol")
    wait_until(lambda: counts(proxy)[:2] == (0, 0))
    silent = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        # Logins right behind it are served; the silent one is still the kernel's.
        for _ in range(3):
            assert login(proxy.port)[-1] == (b"Z", b"I")
        assert counts(proxy)[:2] == (0, 0)
        text = proxy.config_path.read_text()
        assert "tcp_defer_accept = 1" in text
        proxy.config_path.write_text(text.replace("tcp_defer_accept = 1", "tcp_defer_accept = 0"))
        proxy.reload()
        deferred = listening_defer_accept(proxy)
        assert deferred and all(v == 0 for v in deferred)
        later = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        try:
            # Accepted, waiting for its startup packet (in Python: RELOAD dropped the routes).
            wait_until(lambda: sum(counts(proxy)[:2]) >= 1)
            assert login(proxy.port)[-1] == (b"Z", b"I")
        finally:
            later.close()
    finally:
        silent.close()
