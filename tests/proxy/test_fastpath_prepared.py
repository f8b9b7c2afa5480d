"""Named prepared statements on the compiled fast path (``engine/statements.c``).

The engine renames a Bind or Describe of a statement the client prepared, on a server that has
it, and leaves everything else to Python's statement router (prepared.py). These tests check
both halves against real PostgreSQL: that the steady state really runs in the engine (Python is
not called), and that each case it hands back (a named Parse, a Close, a statement the server
lacks, a table changed under a statement, an unknown name) still behaves as on a direct
connection.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.proxy.conftest import RunningProxy, read_types, write_config

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
            assert "result type" in error["M"] and "H" not in error  # as directly
            # (The Close came after the error: skipped, as directly, so "s" is still there.)
            # Closed and prepared afresh under the same text (the error moved the catalog
            # generation on: the new Parse gets a server statement of its own), it sees the
            # new column.
            sock.sendall(m.close_message("S", "s") + m.parse_message(
                "s", "select * from pgp_fp_ddl2") + m.bind_simple("", "s")
                + m.describe_message("P", "") + m.execute_message() + m.sync())
            answers = read_answers(sock)
            assert [t for t, _ in answers] == ["3", "1", "2", "T", "C", "Z"]
            assert b"b\x00" in answers[3][1]
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


# -- the engine and the Python router answer alike, whatever the client sends ---------------

_NAMES = ["", "a", "b", "zz"]
_SQL = ["select 1", "select $1::int + 1", "select 1 / $1::int", "selec bad", "select 'x'::text"]


def _op(kind: str, name: str, arg: int) -> bytes:
    """One client message (or a few) of the extended protocol, by a small vocabulary."""
    if kind == "parse":
        return m.parse_message(name, _SQL[arg % len(_SQL)])
    if kind == "bind":
        params = [] if arg % 2 else [str(arg % 3)]
        return m.bind_simple("", name, params)
    if kind == "describe":
        return m.describe_message("S" if arg % 2 else "P", name if arg % 2 else "")
    if kind == "execute":
        return m.execute_message()
    if kind == "close":
        return m.close_message("S" if arg % 2 else "P", name if arg % 2 else "")
    if kind == "flush":
        return m.flush()
    if kind == "query":
        return m.query(["select 2", "deallocate all", "discard all"][arg % 3])
    return m.sync()


_ops = st.lists(st.tuples(
    st.sampled_from(["parse", "bind", "bind", "describe", "execute", "execute", "close",
                     "sync", "sync", "flush", "query"]),
    st.sampled_from(_NAMES), st.integers(0, 5)), min_size=1, max_size=14)


END = "pgpilot-end-of-stream"


def _answers(sock: socket.socket) -> list[tuple[str, str]]:
    """Everything up to the ReadyForQuery after the closing query's row (or the connection's
    end), as (type, what matters of the body): error code and text, rows, tags."""
    out: list[tuple[str, str]] = []
    buf = b""
    ending = False
    while True:
        while len(buf) < 5 or len(buf) < 1 + int.from_bytes(buf[1:5], "big"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return [*out, ("closed", "")]
            buf += chunk
        n = 1 + int.from_bytes(buf[1:5], "big")
        kind, body = chr(buf[0]), buf[5:n]
        buf = buf[n:]
        if kind == "E":
            fields = m.parse_error_fields(body)
            out.append((kind, f"{fields.get('C')} {fields.get('M')}"))
        else:
            out.append((kind, body.hex() if kind in "DCZ" else ""))
        if kind == "D" and END.encode() in body:
            ending = True
        elif kind == "Z" and ending:
            return out


def server_statement_names(proxy: RunningProxy) -> set[str]:
    """What PostgreSQL says the pooler's one server has prepared."""
    with login(proxy) as sock:
        sock.sendall(m.query("select name from pg_prepared_statements"))
        return {bytes(m.parse_data_row(body)[0] or b"").decode()
                for kind, body in read_answers(sock) if kind == "D"}


@given(writes=st.lists(_ops, min_size=1, max_size=3))
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_engine_and_python_router_answer_alike(differential: dict[str, RunningProxy],
                                               writes: list[list[tuple[str, str, int]]]) -> None:
    """The same client bytes, in the same writes, through the engine and through the
    pure-Python pooler (fast_path = 0): the same answers, message for message, and each
    pooler's record of its server's statements is what PostgreSQL says it has. Each write
    ends with Sync and a query whose row marks its end. The server's statements pile up
    from one example to the next, as they would."""
    got: dict[str, list[list[tuple[str, str]]]] = {}
    for name, proxy in differential.items():
        got[name] = []
        with login(proxy) as sock:
            for ops in writes:
                # Each write answered in full before the next: what the pooler sends then
                # does not depend on when the server's answers come (the router is ahead of
                # them by one write at most).
                sock.sendall(b"".join(_op(*op) for op in ops) + m.sync()
                             + m.query(f"select '{END}'"))
                got[name].append(_answers(sock))
        # The record of the server's statements is the server's truth.
        actual = server_statement_names(proxy)
        record = proxy.call(lambda p=proxy: {
            n for pool in p.pooler.pools.values() for srv in pool.all_servers()
            for n in srv.prepared})
        assert record == actual, (name, record - actual, actual - record)
    assert got["engine"] == got["python"]


@pytest.mark.parametrize("fast_path", ["on", "off"])
@pytest.mark.parametrize("queued", [True, False])
def test_statement_name_that_is_not_utf8(proxy_factory: Any, fast_path: str,
                                         queued: bool) -> None:
    """Refused as Python's parser refuses it, this client alone: after a statement of its
    own (the engine looks such names up), or sent while it waits for the pool's one server,
    which another client holds: read when that client lets it go, and that client, on
    whose answer this happens, carries on."""
    proxy = proxy_factory(default_pool_size=1, fast_path=fast_path)
    bad_bind = m.message(m.F.BIND, b"\x00\xff\xfe\x00\x00\x00\x00\x00\x00\x00")
    with login(proxy) as sock, psycopg.connect(proxy.dsn()) as holder:
        sock.sendall(m.parse_message("a", "select 1") + m.sync())
        assert [t for t, _ in read_answers(sock)] == ["1", "Z"]
        if queued:
            holder.execute("select 1")  # in a transaction: the one server is the holder's
        sock.sendall(bad_bind + m.execute_message() + m.sync())
        if queued:
            holder.commit()  # the server goes to the queued client, and its bytes are read
        answers = _answers(sock)
        assert answers[0][0] == "E" and answers[0][1].startswith("08P01 protocol violation")
        assert answers[-1] == ("closed", "")
        assert holder.execute("select 2").fetchone() == (2,)
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        assert other.execute("select 1").fetchone() == (1,)


@pytest.fixture(scope="module")
def differential(pg_params: dict[str, str],
                 tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two poolers on one server each (statements pile up on it as they would): the engine
    and the pure-Python one, for the whole module."""
    running = {}
    for name, fast in (("engine", "on"), ("python", "off")):
        path, port = write_config(tmp_path_factory.mktemp(name), dict(pg_params),
                                  {"default_pool_size": 1, "fast_path": fast})
        running[name] = RunningProxy(path, port).start()
    yield running
    for proxy in running.values():
        proxy.stop()


_GARBAGE_TYPES = b"PBDESHCQXFdcf?\x00\xff"


@given(messages=st.lists(st.tuples(st.sampled_from(list(_GARBAGE_TYPES)),
                                   st.one_of(st.binary(max_size=40),
                                             st.sampled_from([b"\x00a\x00\x00\x00\x00\x00",
                                                              b"Sa\x00", b"S\x00", b"Pa\x00",
                                                              b"a\x00select 1\x00\x00\x00",
                                                              b"\x00a\x00", b""]))),
                       min_size=1, max_size=8))
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_garbage_after_named_statements_touches_no_one_else(
        differential: dict[str, RunningProxy], messages: list[tuple[int, bytes]]) -> None:
    """Any framed bytes from a client that has named statements (the engine reads its Binds
    and Describes): an answer or a refusal for it, never a hang, and the next client is
    served as ever."""
    for proxy in differential.values():
        with login(proxy) as sock:
            sock.sendall(m.parse_message("a", "select 1") + m.sync())
            assert [t for t, _ in read_answers(sock)] == ["1", "Z"]
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"".join(bytes([t]) + (len(body) + 4).to_bytes(4, "big") + body
                                      for t, body in messages)
                             + m.sync() + m.query(f"select '{END}'"))
            answers = _answers(sock)  # ends at the closing query, or when refused
            assert answers[-1] in (("Z", "49"), ("closed", "")), answers
        with login(proxy) as other:
            other.sendall(m.query("select 42"))
            assert [t for t, _ in read_answers(other)] == ["T", "D", "C", "Z"]
