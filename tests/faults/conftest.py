"""The fault suite's harness: a throwaway PostgreSQL of its own, a client load, measurements.

The suite never stops or restarts a PostgreSQL anyone else uses: ``fault_pg`` is an embedded
PostgreSQL in a temporary folder on a free port, made for this module's tests alone (the
machine's binaries are not touched). ``Load`` runs psycopg clients through the pooler in
transaction mode, each checking that every answer is its own (a value it sent comes back) and
that every error carries a SQLSTATE.
"""

from __future__ import annotations

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
        i = 0
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.proxy.dsn(dbname="test"), autocommit=True,
                                           prepare_threshold=None, connect_timeout=10)
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
                with self._lock:
                    (self.errors if exc.sqlstate else self.bare_errors).append(
                        f"{type(exc).__name__} {exc.sqlstate}: {str(exc).strip()[:200]}")
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

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
