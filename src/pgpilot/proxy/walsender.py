"""Replication connections: a client's ``replication=database|true`` session on a server of its own.

A client that logs in with the ``replication`` startup parameter (pg_basebackup,
pg_receivewal, pg_recvlogical, a logical-replication subscriber, Debezium ...) talks to a
WAL sender, whose protocol (``IDENTIFY_SYSTEM``, ``START_REPLICATION``, CopyBoth streams) no
pooling mode can share. As PgBouncer 1.23 does, such a client gets a server connection opened
for it alone:

* the server's StartupMessage carries ``replication`` and the client's own parameters
  (``application_name``, ``client_encoding`` ..., and its ``options`` string as sent, so
  settings that cannot be SET on a physical WAL sender, and ``-c extra_float_digits=3`` of a
  subscriber, apply);
* the server counts against the pool's ``pool_size`` (and ``max_db_connections``,
  ``max_user_connections``) like any other; when the pool is full, an idle server of the pool
  is closed for it ("closing because: evicted"), else the client waits, as for any server
  (``query_wait_timeout``, ``PAUSE``);
* once both are logged in, bytes go both ways unread, whatever the pooling mode; the server is
  closed when the client leaves, and the client when the server goes.

A replication login PostgreSQL refuses (no replication privilege, no ``replication`` line in
pg_hba.conf) is told to the client with PostgreSQL's reason and logged in PgBouncer's words;
it does not hold back the pool's other clients (no login backoff).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import TYPE_CHECKING

from pgpilot.proxy.server import ServerConnection, ServerError
from pgpilot.proxy.states import ClientState, ServerState
from pgpilot.proxy.tls import TLSNegotiationError, negotiate_server_tls
from pgpilot.wire import messages as m

if TYPE_CHECKING:
    from pgpilot.proxy.client import ClientConnection
    from pgpilot.proxy.pool import Pool

log = logging.getLogger("pgpilot.proxy")

# What PostgreSQL accepts as the replication parameter (a boolean, or "database"), and the
# value the server is sent: "true" (physical) or "database" (logical).
_TRUE = frozenset({"true", "on", "yes", "1", "t", "y"})
_FALSE = frozenset({"false", "off", "no", "0", "f", "n"})
# How long a waiting replication client sleeps between looks at its pool at most (a server
# closing or going idle wakes it sooner: Pool.wake_slot_waiters).
_RECHECK = 1.0


def replication_kind(value: str) -> str:
    """``"true"`` (physical), ``"database"`` (logical) or ``""`` (not a replication
    connection) for a ``replication`` startup parameter; ValueError for anything else."""
    low = value.strip().lower()
    if low == "database":
        return "database"
    if low in _TRUE:
        return "true"
    if low in _FALSE:
        return ""
    raise ValueError(f'invalid value for parameter "replication": "{value}"')


class ReplicationServer(ServerConnection):
    """A server connection opened for one replication client and piped to it after login."""

    pooled = False  # its refused login is its client's alone: no backoff for the pool

    def __init__(self, pool: Pool, client: ClientConnection) -> None:
        super().__init__(pool)
        self.owner = client
        self.piped = False

    def startup_params(self) -> dict[str, str]:
        params = super().startup_params()
        params.update(self.owner.params)  # the client's values win over the database's
        # Startup parameters a pooled client's session carries as settings (client.py) go
        # to a replication connection's own server as they came: a WAL sender takes no SET.
        params.update(self.owner.startup_settings)
        params["replication"] = self.owner.replication
        if self.owner.startup_options:
            params["options"] = self.owner.startup_options
        return params

    def data_received(self, data: bytes) -> None:
        if self.piped:
            client = self.client
            if client is not None:
                client.write(data)
                self.pool.stats.bytes_sent += len(data)
            return
        super().data_received(data)

    def _closed(self, reason: str) -> None:
        client = self.client if self.piped else None
        if client is None:
            super()._closed(reason)
            return
        # What PostgreSQL said before it went (a FATAL, the end of a stream) reached the
        # client as it was: the client is closed after it, with nothing of the pooler's.
        self.client = None
        client.server = None
        super()._closed(reason)
        client.close(f"replication server closed: {reason}")


def start(client: ClientConnection, pool: Pool) -> asyncio.Task[None]:
    """Open ``client``'s replication server (it waits as WAITING meanwhile) and link them."""
    client.wait_started = time.monotonic()
    client.set_state(ClientState.WAITING)
    task = asyncio.get_running_loop().create_task(_serve(client, pool))
    pool.pooler.track_task(task)
    return task


async def _wait_for_slot(client: ClientConnection, pool: Pool) -> None:
    """Until the pool may open one more server: evict an idle one of its own when it is full,
    else wait for a server to close or go idle (the janitor ends too long a wait)."""
    loop = asyncio.get_running_loop()
    while True:
        if not pool.paused and not pool.pooler.stopping:
            if pool.can_open():
                return
            if pool.server_count() >= pool.size:
                victim = pool.take_any_idle()
                if victim is not None:
                    log.info("%r closing because: evicted (replication connection %r needs "
                             "a server of pool %s)", victim, client, pool.name)
                    victim.close("evicted")
                    continue
            else:  # max_db_connections / max_user_connections: an idle server elsewhere
                pool.evict_for_limit()
        waiter: asyncio.Future[None] = loop.create_future()
        pool.slot_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, _RECHECK)
        except TimeoutError:
            pass
        finally:
            if waiter in pool.slot_waiters:
                pool.slot_waiters.remove(waiter)


async def _dial(server: ReplicationServer, pool: Pool) -> None:
    """Connect and log in ``server`` as the pool's servers are (host list, TLS); raises
    ServerError with what the client is told."""
    cfg = pool.pooler.config
    host = pool.db.host or pool.pooler.default_socket_dir()
    if "," in host:
        hosts = [h.strip() for h in host.split(",") if h.strip()]
        host = hosts[pool.next_host % len(hosts)]
        pool.next_host += 1
    port = pool.db.port
    server.address = (host, port)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(cfg.server_connect_timeout or None):
            if host.startswith("/"):
                await loop.create_unix_connection(lambda: server,
                                                  path=f"{host}/.s.PGSQL.{port}")
            else:
                await negotiate_server_tls(server, host=host, port=port, config=cfg,
                                           context=pool.pooler.server_ssl_context)
            await server.login_done
    except ServerError:
        raise
    except TimeoutError as exc:
        raise ServerError(f"server_connect_timeout: could not connect to {host}:{port} "
                          f"within {cfg.server_connect_timeout:g} s") from exc
    except (OSError, ssl.SSLError, TLSNegotiationError) as exc:
        raise ServerError(f"could not connect to server {host}:{port}: {exc}") from exc


async def _serve(client: ClientConnection, pool: Pool) -> None:
    server: ReplicationServer | None = None
    try:
        await _wait_for_slot(client, pool)
        if client.gone:
            return
        server = ReplicationServer(pool, client)
        pool.add_server(server)
        await _dial(server, pool)
    except asyncio.CancelledError:
        # The client left (ClientConnection._disconnect cancels the task).
        if server is not None:
            server.close("replication client disconnected")
        return
    except ServerError as exc:
        assert server is not None
        age = time.monotonic() - server.created_at
        if exc.from_server:  # PgBouncer's words, which alerts grep
            log.warning("%s: server login failed: FATAL %s", pool.name, exc)
            log.warning("%r closing because: login failed (age=%ds)", server, age)
        else:
            log.warning("%r closing because: connect failed (age=%ds): %s", server, age, exc)
        server.close(str(exc), terminate=False)
        if not client.gone:
            client.fail(exc.sqlstate if exc.from_server else "08006",
                        f"server login failed: {exc}", reason="login failed")
        return
    if client.gone or server.state is ServerState.CLOSED:
        server.close("replication client disconnected")
        return
    client.link_replication(server)
    server.piped = True
    if pool.pooler.config.log_connections:
        local = server.local_addr
        log.info("%r new replication connection to server (from %s)", server,
                 "unix socket" if local == "unix" else f"{local}:{server.local_port}")


def welcome(server: ServerConnection) -> bytes:
    """The ParameterStatus messages a replication client is welcomed with: the server's own
    (it was started with the client's values)."""
    return b"".join(m.parameter_status(name, value) for name, value in server.params.items())
