"""Fixtures that run a real pgpilot pooler (in a background thread) in front of real PostgreSQL.

``proxy_factory(**settings)`` starts a pooler whose ``[databases]`` points at the test
PostgreSQL and whose ``[pgbouncer]`` section holds ``settings``; it returns a
:class:`RunningProxy` with the port, a DSN builder and direct access to the ``Pooler`` (for
assertions on its pools and states, always read through ``call()`` on the pooler's own loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pgpilot.embedded import free_port
from pgpilot.proxy.config import load_config
from pgpilot.proxy.fastpath import new_event_loop
from pgpilot.proxy.pooler import Pooler
from pgpilot.proxy.workers import WorkerIdentity


def wait_until(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``condition`` until it returns something true (and return that), or fail."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)
    return value


def read_types(sock: socket.socket, count: int | None = None) -> list[str]:
    """Raw protocol: the types of the next ``count`` messages from ``sock``, or (None) of
    those up to and including ReadyForQuery. Bodies are read and dropped."""
    types: list[str] = []
    while count is None or len(types) < count:
        head = b""
        while len(head) < 5:
            chunk = sock.recv(5 - len(head))
            assert chunk, f"connection closed after {types}"
            head += chunk
        rest = int.from_bytes(head[1:5], "big") - 4
        while rest:
            chunk = sock.recv(min(rest, 65536))
            assert chunk, f"connection closed after {types}"
            rest -= len(chunk)
        types.append(chr(head[0]))
        if count is None and types[-1] == "Z":
            break
    return types


class RunningProxy:
    def __init__(self, config_path: Path, port: int,
                 loop_factory: Callable[[], asyncio.AbstractEventLoop] = new_event_loop,
                 worker: WorkerIdentity | None = None) -> None:
        self.config_path = config_path
        self.port = port
        self.worker = worker  # as if one of workers = N (test_balance.py)
        # The pooler's own loop (command.serve): asyncio's, on the engine's selector.
        self.loop = loop_factory()
        self.pooler: Pooler | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def boot() -> None:
            self.pooler = Pooler(load_config(self.config_path), self.worker)
            await self.pooler.start()

        try:
            self.loop.run_until_complete(boot())
        except BaseException as exc:  # surfaced to the test
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> RunningProxy:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the pooler's loop and return its result (a safe read of its state)."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(10)

    def reload(self) -> None:
        assert self.pooler is not None
        cfg = load_config(self.config_path)
        self.call(lambda: self.pooler.reload(cfg))  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.pooler is not None and self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self.pooler.stop(timeout=2), self.loop)
            with contextlib.suppress(Exception):
                fut.result(15)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def dsn(self, dbname: str = "test", user: str = "postgres", password: str | None = None,
            **extra: str) -> str:
        auth = f":{password}" if password else ""
        query = "&".join(f"{k}={v}" for k, v in extra.items())
        return (f"postgresql://{user}{auth}@127.0.0.1:{self.port}/{dbname}"
                + (f"?{query}" if query else ""))

    def conninfo(self, dbname: str = "test", user: str = "postgres",
                 **extra: Any) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "dbname": dbname, "user": user, **extra}

    def server_count(self) -> int:
        assert self.pooler is not None
        return int(self.call(lambda: sum(p.server_count() for p in self.pooler.pools.values())))


def forced_user_databases(pg_params: dict[str, str]) -> dict[str, str]:
    """A [databases] entry that sends every client user to the test database as the upstream
    user (so clients may log in as users PostgreSQL does not know)."""
    password = f" password={pg_params['password']}" if pg_params.get("password") else ""
    return {"test": f"host={pg_params['host']} port={pg_params['port']} "
                    f"dbname={pg_params['dbname']} user={pg_params['user']}{password}"}


_VARIANT_CERTS: list[tuple[str, str]] = []


def _tls_variant_settings() -> dict[str, Any]:
    """PGPILOT_TEST_CLIENT_TLS=1: every test pooler offers client TLS (``prefer``), so that
    psycopg, asyncpg and pgbench, which ask for it by default, run the test file encrypted
    (the fast path's TLS: engine/tls.c); raw-socket clients stay in clear text."""
    if not os.environ.get("PGPILOT_TEST_CLIENT_TLS"):
        return {}
    if not _VARIANT_CERTS:
        from tests.proxy.test_tls import Certs

        certs = Certs(Path(tempfile.mkdtemp(prefix="pgpilot-tls-variant-")))
        _VARIANT_CERTS.append((str(certs.cert), str(certs.key)))
    cert, key = _VARIANT_CERTS[0]
    return {"client_tls_sslmode": "prefer", "client_tls_cert_file": cert,
            "client_tls_key_file": key}


def write_config(tmp: Path, upstream: dict[str, str], settings: dict[str, Any],
                 databases: dict[str, str] | None = None, users: dict[str, str] | None = None,
                 userlist: dict[str, str] | None = None) -> tuple[Path, int]:
    port = int(settings.pop("listen_port", 0)) or free_port()
    if userlist is None:
        userlist = {upstream["user"]: upstream.get("password", "")}
    (tmp / "userlist.txt").write_text(
        "".join(f'"{u}" "{p}"\n' for u, p in userlist.items()))
    up = (f"host={upstream['host']} port={upstream['port']} dbname={upstream['dbname']}"
          + (f" password={upstream['password']}" if upstream.get("password") else ""))
    dbs = {"test": up, "*": f"host={upstream['host']} port={upstream['port']}"
           + (f" password={upstream['password']}" if upstream.get("password") else "")}
    dbs.update(databases or {})
    base: dict[str, Any] = {
        "listen_addr": "127.0.0.1", "listen_port": port, "unix_socket_dir": "",
        "auth_type": "trust", "auth_file": str(tmp / "userlist.txt"),
        "pool_mode": "transaction", "default_pool_size": 5, "max_client_conn": 1000,
        "server_login_retry": 1, "admin_users": upstream["user"],
    }
    if "client_tls_sslmode" not in settings:
        base.update(_tls_variant_settings())
    base.update(settings)
    lines = ["[databases]"] + [f"{k} = {v}" for k, v in dbs.items()]
    if users:
        lines += ["[users]"] + [f"{k} = {v}" for k, v in users.items()]
    lines += ["[pgbouncer]"] + [f"{k} = {v}" for k, v in base.items()]
    path = tmp / "pgbouncer.ini"
    path.write_text("\n".join(lines) + "\n")
    return path, port


@pytest.fixture
def proxy_factory(pg_params: dict[str, str],
                  tmp_path: Path) -> Iterator[Callable[..., RunningProxy]]:
    running: list[RunningProxy] = []
    counter = [0]

    def make(*, databases: dict[str, str] | None = None, users: dict[str, str] | None = None,
             userlist: dict[str, str] | None = None, upstream: dict[str, str] | None = None,
             loop_factory: Callable[[], asyncio.AbstractEventLoop] = new_event_loop,
             worker: WorkerIdentity | None = None, **settings: Any) -> RunningProxy:
        counter[0] += 1
        folder = tmp_path / f"proxy{counter[0]}"
        folder.mkdir()
        path, port = write_config(folder, upstream or pg_params, settings, databases, users,
                                  userlist)
        proxy = RunningProxy(path, port, loop_factory, worker).start()
        running.append(proxy)
        return proxy

    yield make
    for proxy in running:
        proxy.stop()


@pytest.fixture
def proxy(proxy_factory: Callable[..., RunningProxy]) -> RunningProxy:
    """A transaction-mode pooler, pool size 5, trust auth."""
    return proxy_factory()


PGBENCH_DB = "pgpilot_pgbench"


@pytest.fixture(scope="session")
def pgbench_db(pg_dsn: str) -> str:
    """A database of its own holding pgbench's tables (scale 1), initialized once."""
    import subprocess

    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s",
                              [PGBENCH_DB]).fetchone()
        if not exists:
            conn.execute(f'create database "{PGBENCH_DB}"')
    params = conninfo_to_dict(pg_dsn)
    params["dbname"] = PGBENCH_DB
    with psycopg.connect(make_conninfo(**params), autocommit=True) as conn:
        ready = conn.execute(
            "select count(*) = 4 from pg_tables where tablename in "
            "('pgbench_accounts', 'pgbench_branches', 'pgbench_tellers', 'pgbench_history')"
        ).fetchone()
    if ready and ready[0]:
        # Already there: re-initializing would drop the tables under a concurrent run.
        return PGBENCH_DB
    init = subprocess.run(["pgbench", "-i", "-q", "-s", "1", make_conninfo(**params)],
                          capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr
    return PGBENCH_DB
