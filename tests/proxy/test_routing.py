"""The pooler's read/write split (proxy/routing.py) on real streaming replication (the
``replication_cluster`` test bed): where each kind of statement runs, read-your-writes by LSN
with no client change, health (a stopped replica leaves the read set), failover to a promoted
replica, and 1,000 write-then-read iterations by 50 concurrent clients under injected lag.

Where a statement ran is read from the server that ran it (``inet_server_port()``), staleness
from the rows returned; no test asserts a time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from tests.proxy.conftest import RunningProxy, wait_until, write_config

from pgpilot.replication import parse_lsn
from pgpilot.testbed import ReplicationCluster

PORT_SQL = "SELECT inet_server_port()"


@pytest.fixture
def cluster(replication_cluster: ReplicationCluster) -> ReplicationCluster:
    c = replication_cluster
    c.execute(c.primary_name, "DROP TABLE IF EXISTS split_notes")
    c.execute(c.primary_name, "CREATE TABLE split_notes (id serial PRIMARY KEY, body text)")
    c.wait_caught_up()
    return c


def _write(cluster: ReplicationCluster, tmp_path: Path, replicas: list[str] | None = None,
           **settings: Any) -> tuple[Path, int]:
    """The pooler's configuration: database ``app`` on the test bed's primary with
    ``replicas`` (node names; default all; [] = no replicas= at all)."""
    primary = cluster.nodes[cluster.primary_name]
    upstream = {"host": "127.0.0.1", "port": str(primary.port), "user": "postgres",
                "dbname": "postgres"}
    names = cluster.replica_names if replicas is None else replicas
    listed = ",".join(f"127.0.0.1:{cluster.port(n)}" for n in names)
    databases = {"app": f"host=127.0.0.1 port={primary.port} dbname=postgres user=postgres"
                        + (f" replicas={listed}" if listed else "")}
    base = {"replica_check_interval": 0.05, "default_pool_size": 20, "fast_path": 1}
    base.update(settings)
    return write_config(tmp_path, upstream, base, databases)


def _start(cluster: ReplicationCluster, tmp_path: Path, **settings: Any) -> RunningProxy:
    path, port = _write(cluster, tmp_path, **settings)
    proxy = RunningProxy(path, port).start()
    if settings.get("replicas", True):
        wait_until(lambda: all(_states(proxy, n)["up"] for n in ("replica1", "replica2")))
    return proxy


def _router(proxy: RunningProxy) -> Any:
    assert proxy.pooler is not None
    return proxy.pooler.routers["app"]


def _states(proxy: RunningProxy, name: str) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        state = _router(proxy).replica_set.states[name]
        return {"up": state.up, "in_recovery": state.in_recovery, "lsn": state.replay_lsn}
    result: dict[str, Any] = proxy.call(read)
    return result


@pytest.fixture
def split(cluster: ReplicationCluster, tmp_path: Path) -> Iterator[RunningProxy]:
    proxy = _start(cluster, tmp_path)
    yield proxy
    proxy.stop()


def _caught_up(cluster: ReplicationCluster, proxy: RunningProxy) -> None:
    """Both replicas replayed all the primary's WAL, and the pooler's health check saw it."""
    cluster.wait_caught_up()
    lsn = parse_lsn(cluster.primary_lsn())
    wait_until(lambda: min(_states(proxy, n)["lsn"] for n in ("replica1", "replica2")) >= lsn)


def _ports(cluster: ReplicationCluster) -> tuple[int, set[int]]:
    return cluster.port(cluster.primary_name), {cluster.port(n) for n in cluster.replica_names}


def test_reads_to_replicas_writes_to_the_primary(cluster: ReplicationCluster,
                                                  split: RunningProxy) -> None:
    primary_port, replica_ports = _ports(cluster)
    with psycopg.connect(split.dsn("app"), autocommit=True) as conn:
        # (a statement sent while the login's welcome still holds a primary server runs there)
        conn.execute("SELECT 1")
        seen = {conn.execute(PORT_SQL).fetchone()[0] for _ in range(8)}  # type: ignore[index]
        assert seen == replica_ports  # both replicas, least outstanding in turn
        # the extended protocol too (psycopg sends Parse/Bind/Execute/Sync for parameters)
        assert conn.execute("SELECT inet_server_port() + %s", (0,)).fetchone()[0] \
            in replica_ports  # type: ignore[index]
        for sql in ("INSERT INTO split_notes (body) VALUES ('w') RETURNING inet_server_port()",
                    "SELECT inet_server_port() FROM split_notes FOR UPDATE",
                    "/* pgpilot:primary */ SELECT inet_server_port()",
                    "SELECT inet_server_port() FROM (SELECT nextval('split_notes_id_seq')) s",
                    "WITH w AS (INSERT INTO split_notes (body) VALUES ('c') RETURNING id) "
                    "SELECT inet_server_port() FROM w"):
            assert conn.execute(sql).fetchone()[0] == primary_port, sql  # type: ignore[index]
        # a read-write transaction: the primary; BEGIN READ ONLY: a replica
        conn.execute("BEGIN")
        assert conn.execute(PORT_SQL).fetchone()[0] == primary_port  # type: ignore[index]
        conn.execute("COMMIT")
        _caught_up(cluster, split)  # the client wrote: replicas once they replayed that
        conn.execute("BEGIN READ ONLY")
        assert conn.execute(PORT_SQL).fetchone()[0] in replica_ports  # type: ignore[index]
        conn.execute("COMMIT")
    counts = split.call(lambda: _router(split).counted()[0])
    assert counts["primary"] >= 6 and counts["replica1"] >= 4 and counts["replica2"] >= 4


def test_read_your_writes_with_no_client_change(cluster: ReplicationCluster,
                                                split: RunningProxy) -> None:
    primary_port, replica_ports = _ports(cluster)
    for name in cluster.replica_names:
        cluster.pause_replay(name)
    with psycopg.connect(split.dsn("app"), autocommit=True) as writer, \
            psycopg.connect(split.dsn("app"), autocommit=True) as other:
        other.execute("SELECT 1")
        writer.execute("INSERT INTO split_notes (body) VALUES ('mine')")
        # the writer's next read: only a replica that replayed its commit, here none
        row = writer.execute("SELECT count(*), inet_server_port() FROM split_notes "
                             "WHERE body = 'mine'").fetchone()
        assert row == (1, primary_port)
        # another client has no write to wait for: a replica, which has not replayed it
        row = other.execute("SELECT count(*), inet_server_port() FROM split_notes "
                            "WHERE body = 'mine'").fetchone()
        assert row is not None and row[0] == 0 and row[1] in replica_ports
        for name in cluster.replica_names:
            cluster.resume_replay(name)
        _caught_up(cluster, split)
        row = writer.execute("SELECT count(*), inet_server_port() FROM split_notes "
                             "WHERE body = 'mine'").fetchone()
        assert row is not None and row[0] == 1 and row[1] in replica_ports  # fresh replica


def test_stopped_replica_leaves_the_read_set(cluster: ReplicationCluster,
                                             split: RunningProxy) -> None:
    first, second = cluster.replica_names
    cluster.stop_node(first)
    wait_until(lambda: not _states(split, "replica1")["up"])
    with psycopg.connect(split.dsn("app"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        ports = {conn.execute(PORT_SQL).fetchone()[0] for _ in range(6)}  # type: ignore[index]
    assert ports == {cluster.port(second)}
    cluster.start_node(first)
    wait_until(lambda: _states(split, "replica1")["up"])
    with psycopg.connect(split.dsn("app"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        ports = {conn.execute(PORT_SQL).fetchone()[0] for _ in range(6)}  # type: ignore[index]
    assert ports == {cluster.port(first), cluster.port(second)}


async def _write_then_read(dsn: str, clients: int, iterations: int) -> int:
    stale = 0
    left = iterations

    async def client(n: int) -> None:
        nonlocal stale, left
        conn = await asyncpg.connect(dsn, statement_cache_size=0)
        try:
            while left > 0:
                left -= 1
                body = f"c{n}-{left}"
                await conn.execute(f"INSERT INTO split_notes (body) VALUES ('{body}')")
                got = await conn.fetchval(
                    f"SELECT count(*) FROM split_notes WHERE body = '{body}'")
                if got != 1:
                    stale += 1
        finally:
            await conn.close()

    await asyncio.gather(*(client(n) for n in range(clients)))
    return stale


@pytest.mark.slow
def test_read_after_write_under_lag_never_stale(cluster: ReplicationCluster,
                                                split: RunningProxy) -> None:
    cluster.set_apply_delay(cluster.replica_names[0], 100)
    cluster.set_apply_delay(cluster.replica_names[1], 500)
    before = split.call(lambda: _router(split).counted()[0])
    stale = asyncio.run(_write_then_read(split.dsn("app"), 50, 1000))
    after = split.call(lambda: _router(split).counted()[0])
    print(f"pooler, LSN rule on: {stale} stale reads of 1000; transactions per target "
          f"{ {k: after[k] - before[k] for k in after} }")
    assert stale == 0
    if split.call(lambda: split.pooler.fast) is not None:  # type: ignore[union-attr]
        # the compiled fast path sent the writes to the primary itself (route_reads)
        assert split.call(lambda: _router(split).engine_routed()) >= 500

    def rule_off() -> None:
        _router(split).read_your_writes = False
    split.call(rule_off)
    before = split.call(lambda: _router(split).counted()[0])
    stale_without = asyncio.run(_write_then_read(split.dsn("app"), 50, 200))
    after = split.call(lambda: _router(split).counted()[0])
    print(f"pooler, LSN rule off: {stale_without} stale reads of 200; transactions per target "
          f"{ {k: after[k] - before[k] for k in after} }")
    assert stale_without > 0  # the test bites


def test_failover_to_a_promoted_replica(cluster: ReplicationCluster, tmp_path: Path) -> None:
    proxy = _start(cluster, tmp_path)
    try:
        first = cluster.replica_names[0]
        stopped = time.monotonic()
        cluster.stop_node("primary")
        cluster.promote(first)

        def write() -> int | None:
            try:
                with psycopg.connect(proxy.dsn("app"), autocommit=True,
                                     connect_timeout=2) as conn:
                    row = conn.execute("INSERT INTO split_notes (body) VALUES ('after') "
                                       "RETURNING inet_server_port()").fetchone()
                    return None if row is None else int(row[0])
            except psycopg.Error:
                return None

        port = wait_until(write, timeout=30)
        print(f"failover: writes resumed {time.monotonic() - stopped:.2f} s after the primary "
              "stopped (promotion included)")
        assert port == cluster.port(first)
    finally:
        proxy.stop()


def test_replica_stopped_under_load(cluster: ReplicationCluster, split: RunningProxy) -> None:
    """20 clients read without pause; replica1 stops. Errors only for clients that had a query
    on it when it stopped (one each at most); once the health check saw it down, no error and
    no read there; reads go on on replica2."""
    import threading

    first, second = cluster.replica_names
    stop = threading.Event()
    down = threading.Event()
    errors: list[tuple[bool, str]] = []
    after_down: list[int] = []
    lock = threading.Lock()

    def reader() -> None:
        conn: psycopg.Connection[Any] | None = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(split.dsn("app"), autocommit=True)
                seen_down = down.is_set()
                row = conn.execute(PORT_SQL).fetchone()
                if seen_down and row is not None:
                    with lock:
                        after_down.append(int(row[0]))
            except psycopg.Error as exc:
                with lock:
                    errors.append((down.is_set(), str(exc.sqlstate)))
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=reader) for _ in range(20)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: split.call(lambda: _router(split).counted()[0]["replica1"]) > 50)
        cluster.stop_node(first)
        wait_until(lambda: not _states(split, "replica1")["up"])
        down.set()
        count = len(after_down)
        wait_until(lambda: len(after_down) > count + 200)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [e for e in errors if e[0]] == []  # none once it was seen down
    assert len(errors) <= 20  # mid-query on it at most
    print(f"replica stopped under 20 readers: {len(errors)} errors, {sorted(set(errors))}")
    assert all(state in ("57P01", "08006", "None") for _, state in errors), errors
    assert set(after_down) == {cluster.port(second)}


def test_route_and_min_lsn_settings(cluster: ReplicationCluster, split: RunningProxy) -> None:
    """SET pgpilot.route pins a client's reads to the primary (and back); SHOW pgpilot.min_lsn
    gives the position of its last write, which SET pgpilot.min_lsn hands to another client
    (another service) so that its reads are fresh too. Simple and extended protocol."""
    primary_port, replica_ports = _ports(cluster)
    with psycopg.connect(split.dsn("app"), autocommit=True) as a, \
            psycopg.connect(split.dsn("app"), autocommit=True) as b:
        a.execute("SELECT 1")
        b.execute("SELECT 1")
        assert a.execute(PORT_SQL).fetchone()[0] in replica_ports  # type: ignore[index]
        a.execute("SET pgpilot.route = primary")  # psycopg: extended protocol
        assert a.execute("SHOW pgpilot.route").fetchone() == ("primary",)
        assert a.execute(PORT_SQL).fetchone()[0] == primary_port  # type: ignore[index]
        a.pgconn.exec_(b"SET pgpilot.route TO 'auto'")  # simple protocol
        assert a.execute("SHOW pgpilot.route").fetchone() == ("auto",)
        assert a.execute(PORT_SQL).fetchone()[0] in replica_ports  # type: ignore[index]
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            a.execute("SET pgpilot.route = sideways")
        # route = replica: writes too go to a replica (refused there), every time (the
        # compiled fast path, which sends writes to the primary, does not take the client)
        a.execute("SET pgpilot.route = replica")
        for _ in range(3):
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                a.execute("INSERT INTO split_notes (body) VALUES ('refused')")
        a.execute("RESET pgpilot.route")
        assert a.execute("INSERT INTO split_notes (body) VALUES ('ok') RETURNING "
                         "inet_server_port()").fetchone() == (primary_port,)
        assert b.execute("SHOW pgpilot.min_lsn").fetchone() == ("0/0",)  # never wrote
        before = a.execute("SHOW pgpilot.min_lsn").fetchone()[0]  # type: ignore[index]
        for name in cluster.replica_names:
            cluster.pause_replay(name)
        a.execute("INSERT INTO split_notes (body) VALUES ('handed over')")
        token = a.execute("SHOW pgpilot.min_lsn").fetchone()[0]  # type: ignore[index]
        assert parse_lsn(token) > parse_lsn(before)
        sql = "SELECT count(*), inet_server_port() FROM split_notes WHERE body = 'handed over'"
        row = b.execute(sql).fetchone()
        assert row is not None and row[0] == 0 and row[1] in replica_ports  # stale, no token
        b.execute(f"SET pgpilot.min_lsn = '{token}'")
        assert b.execute(sql).fetchone() == (1, primary_port)  # fresh: the primary


def test_metrics_show_decisions_and_replica_health(cluster: ReplicationCluster,
                                                   split: RunningProxy) -> None:
    from prometheus_client import generate_latest

    from pgpilot.proxy.metrics import registry_for

    with psycopg.connect(split.dsn("app"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        for _ in range(4):
            conn.execute(PORT_SQL)
        conn.execute("INSERT INTO split_notes (body) VALUES ('m')")
    cluster.stop_node(cluster.replica_names[0])
    wait_until(lambda: not _states(split, "replica1")["up"])
    text = split.call(lambda: generate_latest(registry_for(split.pooler)).decode())  # type: ignore[arg-type]
    assert 'pgpilot_routed_transactions_total{database="app",target="primary"} 1.0' in text
    replica_reads = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith('pgpilot_routed_transactions_total{database="app",'
                                           'target="replica'))
    assert replica_reads >= 4
    assert 'pgpilot_replica_up{database="app",replica="replica1"} 0.0' in text
    assert 'pgpilot_replica_up{database="app",replica="replica2"} 1.0' in text
    assert 'pgpilot_replica_eligible{database="app",replica="replica2"} 1.0' in text


def _admin_rows(proxy: RunningProxy, command: str) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    with psycopg.connect(proxy.dsn("pgbouncer"), autocommit=True, row_factory=dict_row) as c:
        return c.execute(command).fetchall()


def test_show_routes_shows_decisions_and_why(cluster: ReplicationCluster,
                                             split: RunningProxy) -> None:
    """SHOW ROUTES: a row per node, its health, the transactions sent there, and why those
    sent to the primary went there; the same reasons in the metrics."""
    from prometheus_client import generate_latest

    from pgpilot.proxy.metrics import registry_for

    primary_port, replica_ports = _ports(cluster)
    with psycopg.connect(split.dsn("app"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        for _ in range(6):
            assert conn.execute(PORT_SQL).fetchone()[0] in replica_ports  # type: ignore[index]
        conn.execute("/* pgpilot:primary */ SELECT 1")
        conn.execute("BEGIN")
        conn.execute("COMMIT")
        for name in cluster.replica_names:
            cluster.pause_replay(name)
        conn.execute("INSERT INTO split_notes (body) VALUES ('routes')")
        written = parse_lsn(cluster.primary_lsn())
        wait_until(lambda: split.call(lambda: _router(split).lsn_sample[1]) >= written)
        assert conn.execute(PORT_SQL).fetchone()[0] == primary_port  # type: ignore[index]
    rows = {r["node"]: r for r in _admin_rows(split, "SHOW ROUTES")}
    assert set(rows) == {"primary", "replica1", "replica2"}
    primary = rows["primary"]
    assert (primary["database"], primary["role"], primary["state"]) == ("app", "primary", "up")
    assert int(primary["port"]) == primary_port
    assert int(primary["hinted"]) == 1
    assert int(primary["may_write"]) >= 2  # the BEGIN, the INSERT
    assert int(primary["read_your_writes"]) == 1  # the read after the INSERT
    assert int(primary["no_replica"]) == 0
    replica_reads = sum(int(rows[n]["transactions"]) for n in ("replica1", "replica2"))
    assert replica_reads >= 6
    assert {int(rows[n]["port"]) for n in ("replica1", "replica2")} == replica_ports
    assert {rows[n]["role"] for n in ("replica1", "replica2")} == {"replica"}
    assert {rows[n]["state"] for n in ("replica1", "replica2")} <= {"eligible", "lagging"}
    text = split.call(lambda: generate_latest(registry_for(split.pooler)).decode())  # type: ignore[arg-type]
    assert 'pgpilot_routed_to_primary_total{database="app",reason="hinted"} 1.0' in text
    assert 'pgpilot_routed_to_primary_total{database="app",reason="read_your_writes"} 1.0' \
        in text


def _ports_seen(dsn_conn: psycopg.Connection[Any], times: int = 12) -> set[int]:
    return {dsn_conn.execute(PORT_SQL).fetchone()[0] for _ in range(times)}  # type: ignore[index]


def test_reload_changes_the_topology_without_dropping_clients(cluster: ReplicationCluster,
                                                              tmp_path: Path) -> None:
    """RELOAD with another replicas= list, read_write_split and lag bounds: connected
    clients stay connected (one of them mid-transaction on a replica that leaves the list)
    and their next transactions follow the new configuration."""
    first, second = cluster.replica_names
    primary_port, _ = _ports(cluster)
    proxy = _start(cluster, tmp_path)
    try:
        with psycopg.connect(proxy.dsn("app"), autocommit=True) as conn, \
                psycopg.connect(proxy.dsn("app"), autocommit=True) as busy:
            conn.execute("SELECT 1")
            busy.execute("SELECT 1")
            assert _ports_seen(conn) == {cluster.port(first), cluster.port(second)}
            busy.execute("BEGIN READ ONLY")
            busy_port = busy.execute(PORT_SQL).fetchone()[0]  # type: ignore[index]
            leaving = first if busy_port == cluster.port(first) else second
            staying = second if leaving == first else first
            # 1. only the other replica is listed (it becomes "replica1")
            _write(cluster, tmp_path, replicas=[staying], listen_port=proxy.port)
            proxy.reload()
            assert busy.execute(PORT_SQL).fetchone()[0] == busy_port  # type: ignore[index]
            busy.execute("COMMIT")  # the transaction ran to its end where it began
            wait_until(lambda: _ports_seen(conn, 4) == {cluster.port(staying)})
            assert _ports_seen(busy) == {cluster.port(staying)}
            rows = _admin_rows(proxy, "SHOW ROUTES")
            assert [(r["node"], int(r["port"])) for r in rows] == [
                ("primary", primary_port), ("replica1", cluster.port(staying))]
            # 2. the split off: everything to the primary
            _write(cluster, tmp_path, replicas=[staying], listen_port=proxy.port,
                   read_write_split=0)
            proxy.reload()
            assert _ports_seen(conn) == {primary_port}
            # 3. both replicas again, split on, with a lag bound one replica breaks
            cluster.pause_replay(leaving)
            cluster.execute(cluster.primary_name,
                            "INSERT INTO split_notes (body) SELECT 'x' FROM generate_series(1, "
                            "2000)")
            _write(cluster, tmp_path, listen_port=proxy.port, replica_max_lag_bytes=1024)
            proxy.reload()
            wait_until(lambda: _ports_seen(conn, 4) == {cluster.port(staying)})
            cluster.resume_replay(leaving)
            wait_until(lambda: _ports_seen(conn, 6) == {cluster.port(first),
                                                         cluster.port(second)})
            assert not conn.closed and not busy.closed
            assert busy.execute("SELECT 1").fetchone() == (1,)
    finally:
        proxy.stop()


def test_reload_adds_replicas_to_a_database(cluster: ReplicationCluster,
                                            tmp_path: Path) -> None:
    """A database without replicas= (served by the compiled fast path) gets them on RELOAD:
    the same connection's reads go to the replicas from then on (statements it prepared
    before, whose text the pooler never saw, run on the primary: prepare_threshold=None)."""
    primary_port, replica_ports = _ports(cluster)
    proxy = _start(cluster, tmp_path, replicas=[])
    try:
        with psycopg.connect(proxy.dsn("app"), autocommit=True, prepare_threshold=None) as conn:
            assert _ports_seen(conn) == {primary_port}
            _write(cluster, tmp_path, listen_port=proxy.port)
            proxy.reload()
            wait_until(lambda: _ports_seen(conn, 6) == replica_ports)
            assert conn.execute("INSERT INTO split_notes (body) VALUES ('r') RETURNING "
                                "inet_server_port()").fetchone() == (primary_port,)
            _write(cluster, tmp_path, replicas=[], listen_port=proxy.port)
            proxy.reload()  # and removes them again
            assert _ports_seen(conn) == {primary_port}
            assert proxy.call(lambda: "app" not in proxy.pooler.routers)  # type: ignore[union-attr]
    finally:
        proxy.stop()


def test_session_mode_pins_a_choice_at_connect(cluster: ReplicationCluster,
                                               tmp_path: Path) -> None:
    """Session pools are not split: a client keeps the server it got at connect, the
    primary's unless it asked for a replica (pgpilot.route=replica in options or as a
    startup parameter), which it then keeps for every statement, writes refused there;
    pgpilot.min_lsn at connect rules out replicas that did not replay it."""
    primary_port, replica_ports = _ports(cluster)
    proxy = _start(cluster, tmp_path, pool_mode="session")
    replica_opts = {"options": "-c pgpilot.route=replica"}
    try:
        with psycopg.connect(proxy.dsn("app"), autocommit=True) as plain:
            assert _ports_seen(plain) == {primary_port}  # reads too: the primary
        with psycopg.connect(proxy.dsn("app"), autocommit=True, **replica_opts) as a, \
                psycopg.connect(proxy.dsn("app"), autocommit=True, **replica_opts) as b:
            seen_a, seen_b = _ports_seen(a), _ports_seen(b)
            assert len(seen_a) == 1 and seen_a <= replica_ports  # pinned
            assert len(seen_b) == 1 and seen_b <= replica_ports
            assert seen_a != seen_b  # least outstanding: a holds one replica
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                a.execute("INSERT INTO split_notes (body) VALUES ('no')")
            assert _ports_seen(a, 2) == seen_a  # still there after the error

        async def startup_param() -> int:
            conn = await asyncpg.connect(proxy.dsn("app"),
                                         server_settings={"pgpilot.route": "replica"})
            try:
                return int(await conn.fetchval(PORT_SQL))
            finally:
                await conn.close()
        assert asyncio.run(startup_param()) in replica_ports
        for name in cluster.replica_names:
            cluster.pause_replay(name)
        cluster.execute(cluster.primary_name, "INSERT INTO split_notes (body) VALUES ('n')")
        fresh = cluster.primary_lsn()
        with psycopg.connect(proxy.dsn("app"), autocommit=True,
                             options=f"-c pgpilot.route=replica -c pgpilot.min_lsn={fresh}"
                             ) as c:
            assert _ports_seen(c, 3) == {primary_port}  # no replica replayed it
        with pytest.raises(psycopg.OperationalError, match=r"pgpilot\.route"):
            psycopg.connect(proxy.dsn("app"), options="-c pgpilot.route=sideways")
        rows = {r["node"]: r for r in _admin_rows(proxy, "SHOW ROUTES")}
        assert sum(int(rows[n]["sessions"]) for n in ("replica1", "replica2")) == 3
        assert int(rows["primary"]["sessions"]) == 2
    finally:
        proxy.stop()
