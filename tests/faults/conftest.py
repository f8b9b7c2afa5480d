"""The fault suite's harness: a throwaway PostgreSQL of its own, a client load, measurements.

The suite never stops or restarts a PostgreSQL anyone else uses: ``fault_pg`` is an embedded
PostgreSQL in a temporary folder on a free port, made for this module's tests alone (the
machine's binaries are not touched). ``Load`` runs psycopg clients through the pooler in
transaction mode, each checking that every answer is its own (a value it sent comes back) and
that every error carries a SQLSTATE. When a fault test fails, ``pooler_report`` says why:
what each load client was doing, the pooler's pools, clients and servers (as it holds them,
then as its admin console prints them) and the tail of its log.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.conftest import service_missing
from tests.proxy.conftest import RunningProxy, proxy_factory  # noqa: F401  (fixture)

from pgpilot.embedded import EmbeddedPostgres
from pgpilot.proxy.fastpath import is_fast_conn


@pytest.fixture(scope="module")
def fault_pg() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of the fault suite's own, that its tests stop, crash and restart."""
    with tempfile.TemporaryDirectory(prefix="pgpilot-fault-pg-") as tmp:
        pg = EmbeddedPostgres(Path(tmp))
        try:
            pg.start()
        except Exception as exc:  # pragma: no cover - depends on the machine
            service_missing(f"a throwaway PostgreSQL for the fault suite ({exc})")
        try:
            yield pg
        finally:
            pg.stop()


def ensure_running(pg: EmbeddedPostgres) -> None:
    if not pg.running():
        pg.start()


def stop(pg: EmbeddedPostgres, mode: str) -> None:
    """pg_ctl stop -m fast (clean) or immediate (a crash: no shutdown checkpoint)."""
    pg._run(["pg_ctl", "-D", str(pg.data_dir), "-m", mode, "-w", "-t", "30", "stop"],
            timeout=40)


def fault_params(pg: EmbeddedPostgres) -> dict[str, str]:
    return {"host": "127.0.0.1", "port": str(pg.port), "user": "postgres", "password": "",
            "dbname": "postgres"}


def open_fds() -> int:
    """Descriptors of this process (the pooler runs in a thread of it)."""
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Load:
    """``clients`` psycopg connections through the pooler, each running its own queries in a
    loop until stopped: every answer must be the value it sent; every error must carry a
    SQLSTATE; a broken connection is opened again."""

    proxy: RunningProxy
    clients: int = 8
    answers: int = 0
    wrong: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    bare_errors: list[str] = field(default_factory=list)  # errors with no SQLSTATE
    last_ok: dict[int, float] = field(default_factory=dict)
    # What each client is doing ("connect", "query", "pause") and since when; its last error.
    phase: dict[int, tuple[str, float]] = field(default_factory=dict)
    last_error: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        for n in range(self.clients):
            t = threading.Thread(target=self._run, args=(n,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, n: int) -> None:
        try:
            self._loop(n)
        except BaseException as exc:  # a client that died must say so in describe()
            self.phase[n] = (f"thread ended by {exc!r}", time.monotonic())
            raise

    def _loop(self, n: int) -> None:
        i = 0
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    self.phase[n] = ("connect", time.monotonic())
                    conn = psycopg.connect(self.proxy.dsn(dbname="test"), autocommit=True,
                                           prepare_threshold=None, connect_timeout=10)
                self.phase[n] = (f"query (backend pid {conn.info.backend_pid})",
                                 time.monotonic())
                i += 1
                token = n * 1_000_000 + i
                with conn.transaction():
                    got = conn.execute("select %s::int", [token]).fetchone()
                    again = conn.execute("select %s::int + 1", [token]).fetchone()
                with self._lock:
                    if got != (token,) or again != (token + 1,):
                        self.wrong.append(f"client {n}: sent {token}, got {got} {again}")
                    self.answers += 1
                    self.last_ok[n] = time.monotonic()
            except psycopg.Error as exc:
                text = f"{type(exc).__name__} {exc.sqlstate}: {str(exc).strip()[:200]}"
                with self._lock:
                    (self.errors if exc.sqlstate else self.bare_errors).append(text)
                    self.last_error[n] = f"{text} (at {time.monotonic():.3f})"
                self.phase[n] = ("pause after an error", time.monotonic())
                if conn is not None and not conn.closed and conn.info.transaction_status \
                        != psycopg.pq.TransactionStatus.IDLE:
                    conn.close()
                time.sleep(0.02)
        if conn is not None:
            conn.close()

    def ok_since(self, t: float) -> int:
        """How many clients got an answer after monotonic time ``t``."""
        with self._lock:
            return sum(1 for v in self.last_ok.values() if v > t)

    def describe(self, since: float) -> str:
        """One line per client: answered since ``since`` or not, what it does, its last
        error (monotonic times)."""
        now = time.monotonic()
        lines = []
        with self._lock:
            for n in range(self.clients):
                what, started = self.phase.get(n, ("not started", now))
                last = self.last_ok.get(n, 0.0)
                lines.append(f"load client {n}: {'ok' if last > since else 'NO ANSWER'} "
                             f"since {since:.3f} (last answer at {last:.3f}); {what} for "
                             f"{now - started:.1f} s; last error: "
                             f"{self.last_error.get(n, 'none')}")
        return "\n".join(lines)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


class LogTail(logging.Handler):
    """The last records of the pooler's log (``pgpilot.proxy``), at the level it logs at
    already: attaching this changes nothing the pooler does."""

    def __init__(self, size: int = 300) -> None:
        super().__init__(logging.DEBUG)
        self.records: collections.deque[str] = collections.deque(maxlen=size)
        self.setFormatter(logging.Formatter("%(relativeCreated)10.0f %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append(self.format(record))
        except Exception:  # a record that cannot be formatted must not break the pooler
            self.records.append(repr(record.msg))

    def __enter__(self) -> LogTail:
        logging.getLogger("pgpilot.proxy").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("pgpilot.proxy").removeHandler(self)


def _pools_as_held(proxy: RunningProxy) -> str:
    """The pooler's own view, read on its loop without taking anything off the fast path
    (the admin console's SHOW first brings the engine's pairs and queue back to Python, which
    may end the very wait being looked at)."""
    pooler = proxy.pooler
    assert pooler is not None
    now = time.monotonic()
    lines = []
    for pool in pooler.pools.values():
        lane = pool.lane
        lines.append(
            f"pool {pool.name}: paused={pool.paused} servers={pool.server_count()} "
            f"login_failures={pool.login_failures} next login in "
            f"{max(0.0, pool.login_failed_until - now):.2f} s; last login error: "
            f"{pool.last_login_error}; python waiting={[repr(c) for c in pool.waiting]}; "
            f"checking={len(pool.checking)} resetting={len(pool.resetting)}; engine "
            f"(linked, waiting, idle)={lane.fp.counts if lane is not None else None} "
            f"assist={lane.fp.assist if lane is not None else None} "
            f"py_waiters={lane.fp.py_waiters if lane is not None else None} "
            f"phantoms={lane.fp.phantoms if lane is not None else 0} "
            f"oldest engine wait={lane.fp.oldest_wait() if lane is not None else 0:.2f} s")
        for server in sorted(pool.all_servers(), key=lambda s: s.id):
            transport = server.transport
            lines.append(
                f"  {server!r}: client={server.client!r} in_engine={server.in_engine} "
                f"in_idle={server.in_idle} fast={is_fast_conn(transport) and transport.fast} "
                f"engine_peer={transport.peer if is_fast_conn(transport) else None!r} "
                f"internal={server.busy_internal} cancels_pending={server.cancels_pending} "
                f"txn={server.txn_status} age={now - server.created_at:.2f} s "
                f"closed_reason={server.closed_reason!r}")
    for state, clients in pooler.clients.items():
        for client in sorted(clients, key=lambda c: c.id):
            transport = client.transport
            fast = is_fast_conn(transport) and transport.fast  # type: ignore[union-attr]
            lines.append(
                f"{state.name} {client!r}: server={client.server!r} "
                f"expected_rfq={client.expected_rfq} pending={len(client._pending)} "
                f"settling={client.settling} closing={client.closing} "
                f"waited={now - client.wait_started if client.wait_started else 0.0:.2f} s "
                f"engine={transport.fast_state if fast else 'off'}")  # type: ignore[union-attr]
    return "\n".join(lines)


def pooler_report(proxy: RunningProxy, log_tail: LogTail | None = None) -> str:
    """Why a client got no answer: the pooler's state as it holds it, then as SHOW POOLS /
    CLIENTS / SERVERS print it, then its last log lines."""
    parts = [f"-- the pooler's view (at {time.monotonic():.3f})"]
    try:
        parts.append(proxy.call(lambda: _pools_as_held(proxy)))
    except Exception as exc:  # the report must not hide the failure it explains
        parts.append(f"(could not read: {exc!r})")
    try:
        with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True,
                             connect_timeout=5) as console:
            for what in ("POOLS", "CLIENTS", "SERVERS"):
                cur = console.execute(f"SHOW {what}")
                names = [d.name for d in cur.description or ()]
                parts.append(f"-- SHOW {what}\n" + "\n".join(
                    " ".join(f"{k}={v}" for k, v in zip(names, row, strict=True)
                             if v not in (None, "", 0) or k in ("state", "wait"))
                    for row in cur.fetchall()))
    except psycopg.Error as exc:
        parts.append(f"(admin console: {exc})")
    if log_tail is not None:
        parts.append("-- the pooler's log, last lines\n" + "\n".join(log_tail.records))
    return "\n".join(parts)


class Asked:
    """A query running in a thread of its own, so that the test can act while it waits."""

    def __init__(self, conn: psycopg.Connection[Any], sql: str) -> None:
        self.sql = sql
        self._result: list[Any] = []
        self._thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
        self._thread.start()

    def _run(self, conn: psycopg.Connection[Any]) -> None:
        try:
            self._result.append(conn.execute(self.sql).fetchone())
        except psycopg.Error as exc:
            self._result.append(exc)

    def answer(self, proxy: RunningProxy, bound: float) -> Any:
        """The first row, or the error the query met, which must come within ``bound``
        seconds; a client that waits longer fails the test with the pooler's report (what
        it holds, not what a timeout of its own would make of it)."""
        self._thread.join(bound)
        if self._thread.is_alive():
            raise AssertionError(f"no answer to {self.sql!r} within {bound:g} s\n"
                                 f"{pooler_report(proxy)}")
        return self._result[0]


def answered_within(proxy: RunningProxy, conn: psycopg.Connection[Any], sql: str,
                    bound: float) -> Any:
    """``sql``'s first row on ``conn``, or its error, within ``bound`` seconds (Asked)."""
    return Asked(conn, sql).answer(proxy, bound)


def servers_idle_in_the_fast_path(proxy: RunningProxy,
                                  clients: int = 3) -> list[psycopg.Connection[Any]]:
    """``clients`` connections that took turns (more clients than servers: the engine asked
    for servers, so released ones stay idle in it); at least one server is idle in the fast
    path when this returns."""
    conns = [psycopg.connect(proxy.dsn(dbname="test"), autocommit=True, connect_timeout=10)
             for _ in range(clients)]
    for _ in range(5):
        for conn in conns:
            assert conn.execute("select 1").fetchone() == (1,)
    pooler = proxy.pooler
    assert pooler is not None
    idle = proxy.call(lambda: sum(p.lane.fp.counts[2] for p in pooler.pools.values()
                                  if p.lane is not None))
    assert idle >= 1, "no server idle in the fast path: the case is not set up"
    return conns
