"""Named prepared statements on the compiled fast path (``_fastpath.c``, "named statements").

The engine renames a Bind or Describe of a statement the client prepared, on a server that has
it, and leaves everything else to Python's statement router (prepared.py). These tests check
both halves against real PostgreSQL: that the steady state really runs in the engine (Python is
not called), and that each case it hands back (a named Parse, a Close, a statement the server
lacks, a table changed under a statement, an unknown name) still behaves as on a direct
connection.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import RunningProxy, read_types

from pgpilot.proxy import fastpath
from pgpilot.wire import messages as m

pytestmark = pytest.mark.skipif(not fastpath.available() and os.environ.get("CI") != "true",
                                reason="fast path not built (no C compiler at install)")


class Ejections:
    """Counts the engine's hand-backs to Python (Lane.ejected) of a running pooler."""

    def __init__(self, proxy: RunningProxy) -> None:
        self.count = 0
        self.proxy = proxy

        def install() -> None:
            assert proxy.pooler is not None
            for pool in proxy.pooler.pools.values():
                lane = pool.lane
                if lane is None or "ejected" in vars(lane):
                    continue
                original = lane.ejected

                def counting(*args: Any, _original: Any = original) -> None:
                    self.count += 1
                    _original(*args)

                lane.ejected = counting  # type: ignore[method-assign]
        proxy.call(install)


def fast_flags(proxy: RunningProxy) -> list[bool]:
    def read() -> list[bool]:
        assert proxy.pooler is not None
        return [bool(fastpath.is_fast_conn(c.transport) and c.transport.fast)  # type: ignore[union-attr]
                for pool in proxy.pooler.pools.values() for c in pool.clients]
    return list(proxy.call(read))


def server_statements(proxy: RunningProxy) -> list[list[str]]:
    """Each server's prepared statements as the pooler tracks them, least recently used
    first."""
    def read() -> list[list[str]]:
        assert proxy.pooler is not None
        return [list(server.prepared) for pool in proxy.pooler.pools.values()
                for server in pool.all_servers()]
    return list(proxy.call(read))


def connect(proxy: RunningProxy) -> psycopg.Connection[Any]:
    # prepare_threshold=0: psycopg prepares every statement by name, on first use.
    return psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0)


def test_named_statements_run_in_the_engine(proxy_factory: Any) -> None:
    proxy = proxy_factory(default_pool_size=2)
    with connect(proxy) as a, connect(proxy) as b:
        for i in range(5):  # each statement prepared on each server it lands on
            assert a.execute("select %s::int * 2", [i]).fetchone() == (i * 2,)
            assert b.execute("select %s::text || 'x'", [str(i)]).fetchone() == (f"{i}x",)
        ejections = Ejections(proxy)
        before = ejections.count
        for i in range(200):
            assert a.execute("select %s::int * 2", [i]).fetchone() == (i * 2,)
            assert b.execute("select %s::text || 'x'", [str(i)]).fetchone() == (f"{i}x",)
        assert fast_flags(proxy) == [True, True]
        # 400 transactions with named statements: at most each statement's first use on a
        # server it had not reached yet went through Python.
        assert ejections.count - before <= 4, ejections.count


def test_server_lacking_a_statement_gets_it_prepared(proxy_factory: Any) -> None:
    proxy = proxy_factory(default_pool_size=3)
    clients = [connect(proxy) for _ in range(6)]
    try:
        barrier = threading.Barrier(len(clients))

        def run(n: int) -> None:
            conn = clients[n]
            barrier.wait()
            for i in range(60):
                assert conn.execute("select %s::int + 1000", [i + n]).fetchone() == (i + n + 1000,)

        threads = [threading.Thread(target=run, args=(n,)) for n in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        # One server-side name for the statement, on every server that ran it.
        names = {name for stmts in server_statements(proxy) for name in stmts}
        assert len(names) == 1 and next(iter(names)).startswith("pgpilot_")
    finally:
        for conn in clients:
            conn.close()


def test_engine_keeps_least_recently_used_order(proxy_factory: Any) -> None:
    """A Bind the engine renames marks its statement used, so eviction keeps it."""
    proxy = proxy_factory(default_pool_size=1, max_prepared_statements=2)
    with connect(proxy) as conn:
        assert conn.execute("select 'a', %s::int", [1]).fetchone() == ("a", 1)
        assert conn.execute("select 'b', %s::int", [1]).fetchone() == ("b", 1)
        [(first, second)] = [tuple(s) for s in server_statements(proxy)]
        ejections = Ejections(proxy)
        for i in range(5):  # statement a again: in the engine
            assert conn.execute("select 'a', %s::int", [i]).fetchone() == ("a", i)
        assert ejections.count == 0
        assert server_statements(proxy) == [[second, first]]
        # A third statement evicts b, the least recently used, not a.
        assert conn.execute("select 'c', %s::int", [1]).fetchone() == ("c", 1)
        [stmts] = server_statements(proxy)
        assert first in stmts and second not in stmts
        with psycopg.connect(proxy.dsn(), autocommit=True) as other:
            # ... as PostgreSQL says too (this connection shares the one server).
            names = {r[0] for r in other.execute(
                "select name from pg_prepared_statements where name like 'pgpilot_%%'",
                prepare=False)}
            assert first in names and second not in names


def login(proxy: RunningProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(m.startup_message({"user": "postgres", "database": "test"}))
    assert read_types(sock)[-1] == "Z"
    return sock


def read_answers(sock: socket.socket) -> list[tuple[str, bytes]]:
    """(type, body) of each message up to and including ReadyForQuery."""
    out: list[tuple[str, bytes]] = []
    buf = b""
    while not out or out[-1][0] != "Z":
        while len(buf) < 5 or len(buf) < 1 + int.from_bytes(buf[1:5], "big"):
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {out}"
            buf += chunk
        n = 1 + int.from_bytes(buf[1:5], "big")
        out.append((chr(buf[0]), buf[5:n]))
        buf = buf[n:]
    assert not buf
    return out


def test_pipelines_of_named_binds_and_describes(proxy_factory: Any) -> None:
    proxy = proxy_factory(default_pool_size=1)
    with login(proxy) as sock:
        sock.sendall(m.parse_message("two", "select 2::int") + m.parse_message(
            "plus", "select $1::int + 1") + m.sync())
        assert [t for t, _ in read_answers(sock)] == ["1", "1", "Z"]
        ejections = Ejections(proxy)
        for _ in range(3):
            # Several renamed messages in one write, mixed with unnamed ones and a Flush.
            sock.sendall(m.describe_message("S", "plus") + m.bind_simple("", "two")
                         + m.execute_message() + m.bind_simple("p1", "plus", ["41"])
                         + m.describe_message("P", "p1") + m.execute_message("p1")
                         + m.flush() + m.parse_message("", "select 'u'::text")
                         + m.bind_simple("", "") + m.execute_message() + m.sync())
            answers = read_answers(sock)
            assert [t for t, _ in answers] == ["t", "T", "2", "D", "C", "2", "T", "D", "C",
                                               "1", "2", "D", "C", "Z"]
            rows = [body for t, body in answers if t == "D"]
            assert rows[0].endswith(b"2") and rows[1].endswith(b"42") and rows[2].endswith(b"u")
        assert ejections.count == 0


def test_unknown_statement_name_gets_postgresql_error(proxy_factory: Any) -> None:
    proxy = proxy_factory(default_pool_size=1)
    with login(proxy) as sock:
        sock.sendall(m.parse_message("known", "select 1") + m.sync())
        assert [t for t, _ in read_answers(sock)] == ["1", "Z"]
        sock.sendall(m.bind_simple("", "known") + m.execute_message()
                     + m.bind_simple("", "nope") + m.execute_message() + m.sync())
        answers = read_answers(sock)
        assert [t for t, _ in answers] == ["2", "D", "C", "E", "Z"]
        error = m.parse_error_fields(answers[3][1])
        assert error["C"] == "26000" and "nope" in error["M"]
        # The session goes on, on the fast path again.
        sock.sendall(m.bind_simple("", "known") + m.execute_message() + m.sync())
        assert [t for t, _ in read_answers(sock)] == ["2", "D", "C", "Z"]


def test_error_for_a_renamed_statement_with_python_taking_over(proxy_factory: Any,
                                                               pg_dsn: str) -> None:
    """A renamed Bind still owed an answer when Python takes the client back (here: a Close
    of a statement, which Python answers): Python's router knows which statement it named,
    so the changed-table error is handled as on the Python path."""
    proxy = proxy_factory(default_pool_size=1)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("drop table if exists pgp_fp_ddl2; create table pgp_fp_ddl2 (a int)")
    try:
        with login(proxy) as sock:
            sock.sendall(m.parse_message("s", "select * from pgp_fp_ddl2") + m.sync())
            assert [t for t, _ in read_answers(sock)] == ["1", "Z"]
            sock.sendall(m.bind_simple("", "s") + m.execute_message() + m.sync())
            assert [t for t, _ in read_answers(sock)] == ["2", "C", "Z"]
            with psycopg.connect(pg_dsn, autocommit=True) as admin:
                admin.execute("alter table pgp_fp_ddl2 add column b int")
            sock.sendall(m.bind_simple("", "s") + m.execute_message() + m.flush())
            sock.sendall(m.close_message("S", "s") + m.sync())
            answers = read_answers(sock)
            assert [t for t, _ in answers] == ["E", "Z"]
            error = m.parse_error_fields(answers[0][1])
            assert "result type" in error["M"] and "run the statement again" in error["H"]
            # Prepared afresh under the same text, the statement sees the new column.
            sock.sendall(m.parse_message("s", "select * from pgp_fp_ddl2") + m.bind_simple(
                "", "s") + m.describe_message("P", "") + m.execute_message() + m.sync())
            answers = read_answers(sock)
            assert [t for t, _ in answers] == ["1", "2", "T", "C", "Z"]
            assert b"b\x00" in answers[2][1]
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("drop table pgp_fp_ddl2")


@pytest.mark.parametrize("fast_path", ["on", "off"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_mix_of_named_statements(proxy_factory: Any, seed: int, fast_path: str) -> None:
    """Clients on few servers with room for few statements: random prepared and unprepared
    queries, transactions, errors inside them (after which psycopg sends DEALLOCATE ALL),
    DEALLOCATE ALL of their own. Every answer is checked, with the engine and without."""
    proxy = proxy_factory(default_pool_size=2, max_prepared_statements=3, fast_path=fast_path)
    texts = [f"select %s::int + {k}" for k in range(6)]
    failures: list[BaseException] = []

    def run(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        try:
            with connect(proxy) as conn:
                for step in range(80):
                    k = rng.randrange(len(texts))
                    v = rng.randrange(1000)
                    action = rng.random()
                    if action < 0.6:
                        got = conn.execute(texts[k], [v], prepare=rng.random() < 0.8).fetchone()
                        assert got == (v + k,), (step, got)
                    elif action < 0.8:
                        with conn.transaction():
                            assert conn.execute(texts[k], [v], prepare=True).fetchone() == (v + k,)
                            assert conn.execute(texts[(k + 1) % len(texts)], [v],
                                                prepare=True).fetchone() == (v + (k + 1) % 6,)
                    elif action < 0.93:
                        with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
                            conn.execute(texts[k], [v], prepare=True)
                            conn.execute("select 1 / %s::int", [0], prepare=True)
                        assert conn.execute(texts[k], [v], prepare=True).fetchone() == (v + k,)
                    else:
                        conn.execute("deallocate all")  # psycopg forgets its names too
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures[0]
    assert all(len(stmts) <= 3 for stmts in server_statements(proxy))
