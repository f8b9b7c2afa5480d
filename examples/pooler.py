"""pgpilot proxy in transaction mode: 40 clients share 5 PostgreSQL connections.

The script writes a temporary pgbouncer.ini (transaction pooling, pool size 5, a free port),
starts ``pgpilot proxy`` on it, connects 20 asyncpg and 20 psycopg clients through it, keeps
them all connected while each runs transactions (asyncpg's prepared statements included), and
asks the admin console for ``SHOW POOLS``: 40 clients, at most 5 server connections. Then it
drops its table and stops the proxy with SIGTERM.

    python examples/pooler.py [DSN]

The DSN (default ``$PGPILOT_DSN``, else postgresql://postgres@127.0.0.1:5432/test) is the
PostgreSQL the proxy pools; its user must be able to create a schema there.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from psycopg.conninfo import conninfo_to_dict

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
POOL_SIZE = 5
CLIENTS_PER_DRIVER = 20
TRANSACTIONS_PER_CLIENT = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(folder: Path, upstream: dict[str, Any], port: int) -> Path:
    """A PgBouncer-style config: clients log in as the upstream user (trust, listed in the
    auth_file), the pooler logs in to PostgreSQL with the DSN's password, if any."""
    user = str(upstream.get("user") or os.environ.get("USER", "postgres"))
    password = str(upstream.get("password") or "").replace('"', '""')
    (folder / "userlist.txt").write_text(f'"{user}" "{password}"\n')
    host = upstream.get("host") or "127.0.0.1"
    target = f"host={host} port={upstream.get('port') or 5432} dbname={upstream['dbname']}"
    config = folder / "pgbouncer.ini"
    config.write_text(
        f"""[databases]
{upstream["dbname"]} = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder / "userlist.txt"}
admin_users = {user}
pool_mode = transaction
default_pool_size = {POOL_SIZE}
max_client_conn = 1000
logfile = {folder / "pgpilot.log"}
"""
    )
    return config


def wait_for_proxy(proxy: subprocess.Popen[bytes], dsn: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proxy.poll() is not None:
            raise SystemExit(f"pgpilot proxy exited with {proxy.returncode}:\n{log.read_text()}")
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def asyncpg_client(dsn: str, table: str, number: int, ready: asyncio.Barrier) -> set[int]:
    """One application connection: runs its transactions, then stays connected until told."""
    conn = await asyncpg.connect(dsn)
    backends: set[int] = set()
    try:
        for i in range(TRANSACTIONS_PER_CLIENT):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} (client, n) VALUES ($1, $2)", number, i)
                backends.add(await conn.fetchval("SELECT pg_backend_pid()"))
        await ready.wait()  # every client connected and done: SHOW POOLS now
        await ready.wait()  # SHOW POOLS read: disconnect
    finally:
        await conn.close()
    return backends


async def psycopg_client(dsn: str, table: str, number: int, ready: asyncio.Barrier) -> set[int]:
    conn = await psycopg.AsyncConnection.connect(dsn)
    backends: set[int] = set()
    try:
        for i in range(TRANSACTIONS_PER_CLIENT):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} (client, n) VALUES (%s, %s)", (number, i))
                cursor = await conn.execute("SELECT pg_backend_pid()")
                row = await cursor.fetchone()
                assert row is not None
                backends.add(row[0])
        await ready.wait()
        await ready.wait()
    finally:
        await conn.close()
    return backends


def show_pools(admin_dsn: str, dbname: str) -> dict[str, Any]:
    """The admin console speaks the simple query protocol: autocommit, no parameters."""
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        cursor = admin.execute("SHOW POOLS")
        columns = [column.name for column in cursor.description or ()]
        pools = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    for pool in pools:
        if pool["database"] == dbname:
            return pool
    raise SystemExit(f"no pool for {dbname} in SHOW POOLS: {pools}")


async def run_clients(dsn: str, admin_dsn: str, dbname: str, table: str) -> None:
    clients = 2 * CLIENTS_PER_DRIVER
    ready = asyncio.Barrier(clients + 1)
    tasks = [
        asyncio.create_task(client(dsn, table, number, ready))
        for number, client in enumerate([asyncpg_client, psycopg_client] * CLIENTS_PER_DRIVER)
    ]
    await ready.wait()
    pool = await asyncio.to_thread(show_pools, admin_dsn, dbname)
    await ready.wait()
    backends = set().union(*await asyncio.gather(*tasks))

    columns = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "pool_mode")
    print(
        f"SHOW POOLS ({pool['database']}/{pool['user']}):",
        " ".join(f"{name}={pool[name]}" for name in columns),
    )
    servers = pool["sv_active"] + pool["sv_idle"] + pool["sv_used"]
    print(
        f"{pool['cl_active']} clients connected, {servers} server connections "
        f"(default_pool_size = {POOL_SIZE})"
    )
    print(f"backends seen by the clients (pg_backend_pid): {len(backends)}")


def main(dsn: str) -> None:
    upstream = conninfo_to_dict(dsn)
    upstream.setdefault("dbname", upstream.get("user") or "postgres")
    dbname = str(upstream["dbname"])
    schema = f"pgpilot_example_pooler_{uuid.uuid4().hex[:8]}"
    table = f"{schema}.visits"
    with tempfile.TemporaryDirectory(prefix="pgpilot-example-") as tmp:
        folder = Path(tmp)
        port = free_port()
        config = write_config(folder, upstream, port)
        user = str(upstream.get("user") or os.environ.get("USER", "postgres"))
        pooled = f"postgresql://{user}@127.0.0.1:{port}/{dbname}"
        admin = f"postgresql://{user}@127.0.0.1:{port}/pgbouncer"
        log = folder / "pgpilot.log"
        print(f"starting: pgpilot proxy --config {config}  (transaction mode, port {port})")
        with open(folder / "output.txt", "wb") as output:
            proxy = subprocess.Popen(
                [sys.executable, "-m", "pgpilot", "proxy", "--config", str(config)],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_proxy(proxy, pooled, log)
            with psycopg.connect(pooled, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {schema}")
                conn.execute(f"CREATE TABLE {table} (client int NOT NULL, n int NOT NULL)")
            try:
                asyncio.run(run_clients(pooled, admin, dbname, table))
                with psycopg.connect(pooled) as conn:
                    count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                print(f"rows written through the pooler: {count[0] if count else 0}")
            finally:
                with psycopg.connect(pooled, autocommit=True) as conn:
                    conn.execute(f"DROP SCHEMA {schema} CASCADE")
        finally:
            proxy.send_signal(signal.SIGTERM)
            try:
                status = proxy.wait(30)
            except subprocess.TimeoutExpired:
                proxy.kill()
                status = proxy.wait()
            print(f"pgpilot proxy stopped (exit status {status})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PGPILOT_DSN", DEFAULT_DSN))
