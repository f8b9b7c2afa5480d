"""The pooler as a whole: its configuration, pools, clients, cancel keys and lifecycle.

One :class:`Pooler` per process. It owns the listening sockets (through
:mod:`pgpilot.proxy.listener`), the per-(database, user) pools, the registry of client
connections by state, the map from the BackendKeyData each client was given to that client, and
the janitor. Everything connection-level lives in ``client.py`` / ``server.py`` / ``pool.py``;
this file answers the questions that span them (limits across pools, cancel routing, reload,
shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from pgpilot.proxy.config import Config, DatabaseConfig
from pgpilot.proxy.fastpath import is_fast_conn
from pgpilot.proxy.peering import send_cancel_request
from pgpilot.proxy.pool import Pool
from pgpilot.proxy.prepared import Catalog
from pgpilot.proxy.states import ClientState
from pgpilot.proxy.workers import WORKER_SHIFT, WorkerIdentity, cancel_socket_path
from pgpilot.wire import messages as m

if TYPE_CHECKING:
    from pgpilot.proxy.client import ClientConnection
    from pgpilot.proxy.fastpath import FastPath
    from pgpilot.proxy.fdlimit import DescriptorBudget
    from pgpilot.proxy.server import ServerConnection

log = logging.getLogger("pgpilot.proxy")

ADMIN_DATABASES = ("pgbouncer", "pgpilot")


class Pooler:
    def __init__(self, config: Config, worker: WorkerIdentity | None = None) -> None:
        self.config = config
        self.worker = worker  # set when this process is one of several (workers = N)
        self.pools: dict[tuple[str, str], Pool] = {}
        # One per upstream database (host, port, dbname), shared by its pools (prepared.py).
        self.catalogs: dict[tuple[str | None, int, str], Catalog] = {}
        self.clients: dict[ClientState, set[ClientConnection]] = {s: set() for s in ClientState}
        # Values: clients, or the engine's Conn of a client it logged in alone (fastpath.py).
        self.cancel_keys: dict[tuple[int, int], Any] = {}
        # Peering (peering.py): the id this pooler's cancel keys carry, fixed for its life
        # (keys given out keep it), and the requests it passes on to its peers.
        self.peer_id = config.peer_id
        from pgpilot.proxy.peering import PeerCancels

        self.peer_cancels = PeerCancels(self)
        # SCRAM ClientKeys clients revealed by logging in (user -> key), for server logins
        # where auth_file holds only the SCRAM secret (pass-through, as PgBouncer).
        self.scram_client_keys: dict[str, bytes] = {}
        self.stopping = False
        self._stop_now = False  # hurry_stop: a second signal ends the wait for transactions
        # A shutdown that waits, as PgBouncer 1.23's: "WAIT_FOR_CLIENTS" (SIGTERM, SHUTDOWN
        # WAIT_FOR_CLIENTS) or "WAIT_FOR_SERVERS" (SHUTDOWN WAIT_FOR_SERVERS); "" = none.
        self.shutdown_mode = ""
        self.paused = False
        self.auth_failures = 0
        self.started_at = time.time()
        # Client ids (C-<id> in logs, SHOW CLIENTS' id), shared with the fast path's engine,
        # which numbers the clients it logs in alone from the same sequence.
        self.client_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[asyncio.AbstractServer] = []
        self._janitor: asyncio.Task[None] | None = None
        self.stopped = asyncio.Event()
        # Hooks for the traffic observers (stats, hazards, admin console); set by their modules.
        self.query_observers: list[Callable[[ClientConnection, bytes], None]] = []
        self.parse_observers: list[Callable[[ClientConnection, bytes], None]] = []
        self.ssl_context: ssl.SSLContext | None = None  # client side (client_tls_*)
        self.server_ssl_context: ssl.SSLContext | None = None  # server side (server_tls_*)
        self.admin_handler: Callable[[ClientConnection], None] | None = None
        # -- admin console, hazard detection, metrics (admin.py, hazards.py, metrics.py) --
        from pgpilot.proxy.admin import AdminConsole
        from pgpilot.proxy.dbstatements import DatabaseStatements
        from pgpilot.proxy.hazards import HazardTracker

        self.paused_databases: set[str] = set()  # PAUSE db / KILL db until RESUME
        self.hazards = HazardTracker(self)
        DatabaseStatements(self)  # DROP / ALTER / CREATE ... TEMPLATE: idle servers step aside
        # Clients pinned to their server, counted by kind of state (session.PINS): metrics.
        self.pins_total: dict[str, int] = {}
        self.admin_console = AdminConsole(self)
        from pgpilot.proxy.stats import QueryStats

        self.query_stats = QueryStats(self)  # per-query statistics (SHOW QUERIES)
        from pgpilot.proxy.auth_query import AuthQuery

        self.auth_query = AuthQuery(self)  # auth_user / auth_query lookups and their cache
        self._metrics_server: asyncio.AbstractServer | None = None
        # The compiled fast path (fastpath.py), started with the pooler when enabled and built.
        self.fast: FastPath | None = None
        # Read/write split per [databases] entry naming replicas= (routing.py), by name.
        self.routers: dict[str, Any] = {}
        # Clients admitted only while servers still fit in ulimit -n (fdlimit.py); at start.
        self.fd_budget: DescriptorBudget | None = None
        # Online restart (takeover.py): the listening sockets taken over from the process
        # this one replaces (served instead of binding), and whether this one has handed
        # its own over (then the unix socket file and the pidfile are the new one's).
        self.inherited_sockets: list[socket.socket] = []
        self.handed_over = False

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        from pgpilot.proxy.janitor import Janitor
        from pgpilot.proxy.listener import start_listeners
        from pgpilot.proxy.tls import client_ssl_context, server_ssl_context

        # An unusable key or certificate stops the start (ssl.SSLError / OSError).
        self.ssl_context = client_ssl_context(self.config)
        self.server_ssl_context = server_ssl_context(self.config)
        from pgpilot.proxy import fastpath
        from pgpilot.proxy.fdlimit import DescriptorBudget

        self.fd_budget = DescriptorBudget(self)
        if self.config.fast_path and fastpath.available() and self.fast is None:
            self.fast = fastpath.FastPath(self, asyncio.get_running_loop())
        self._listeners = await start_listeners(self)
        self._janitor = asyncio.get_running_loop().create_task(Janitor(self).run())
        from pgpilot.proxy.routing import start_routers

        self.routers = start_routers(self)
        self.admin_console.start()
        self.query_stats.start()
        if self.config.metrics_port:  # Prometheus /metrics (metrics.py)
            from pgpilot.proxy.metrics import start_metrics_server

            self._metrics_server = await start_metrics_server(self)
        # min_pool_size: pools with a fixed server user can be warmed before any client.
        for name, db in self.config.databases.items():
            if name != "*" and db.user and self.config.min_pool_size_for(db):
                self.get_pool(db, name, db.user)
        if self.fast is not None and self.worker is not None:
            # Last: clients handed over by siblings need the whole pooler ready.
            self.fast.balance(self.worker, self._listeners)

    @property
    def listen_addresses(self) -> list[tuple[str, int] | str]:
        out: list[tuple[str, int] | str] = []
        for server in self._listeners:
            for sock in cast(asyncio.Server, server).sockets:
                name = sock.getsockname()
                out.append((name[0], name[1]) if isinstance(name, tuple) else str(name))
        return out

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let linked clients finish their transactions, then close all."""
        if self.stopping:
            await self.stopped.wait()
            return
        self.stopping = True
        if self.fast is not None:
            self.fast.forget_routes()
            self.fast.settle(everyone=True)
        self.stop_listening()
        self.admin_console.stop()
        self.query_stats.stop()
        self.stop_metrics()
        if timeout is None:
            timeout = self.config.shutdown_timeout
        # As PgBouncer's safe shutdown (PAUSE, then exit): running transactions finish, but
        # a client between transactions gets no server any more, so the drain ends.
        for pool in self.pools.values():
            pool.paused = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop_now and any(
                c.server is not None for c in self.all_clients()):
            await asyncio.sleep(0.05)
        if self.fast is not None:
            self.fast.settle(everyone=True)
        for client in list(self.all_clients()):
            client.fail("57P01", "pgpilot is shutting down")
        for pool in self.pools.values():
            pool.close_all("pooler shutting down")
        if self._janitor is not None:
            self._janitor.cancel()
        for task in list(self._tasks):
            task.cancel()
        for listener in self._listeners:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.wait_closed(), 2)
        await asyncio.sleep(0)
        if self.fast is not None:
            self.fast.close()
        for router in self.routers.values():
            await router.stop()
        self.stopped.set()

    def hurry_stop(self) -> None:
        """A second stop signal: stop waiting for running transactions (as PgBouncer)."""
        self._stop_now = True

    def listening_sockets(self) -> list[socket.socket]:
        """Duplicates of the sockets clients connect to (TCP and the unix socket), for a
        takeover; the caller closes them."""
        return [socket.socket(fileno=os.dup(sock.fileno()))
                for server in self._listeners
                for sock in cast(asyncio.Server, server).sockets]

    def stop_metrics(self) -> None:
        """Serve ``/metrics`` no more (an online restart's new process serves it now)."""
        if self._metrics_server is not None:
            self._metrics_server.close()

    def stop_listening(self) -> None:
        """Accept no new connections (SHUTDOWN WAIT_FOR_CLIENTS, then stop)."""
        for listener in self._listeners:
            listener.close()

    def _listeners_to_asyncio(self) -> None:
        """Client TLS is on now: the fast path's listeners (which serve no TLS) hand their
        sockets to asyncio servers, which can upgrade a connection after SSLRequest. The
        listening sockets stay open throughout: no client is refused meanwhile."""
        from pgpilot.proxy.fastpath import Listener
        from pgpilot.proxy.listener import serve_socket

        for index, listener in enumerate(self._listeners):
            if isinstance(listener, Listener):
                sock = listener.detach()
                task = asyncio.get_running_loop().create_task(serve_socket(self, sock))
                self.track_task(task)
                task.add_done_callback(functools.partial(self._listener_replaced, index))

    def _listener_replaced(self, index: int, task: asyncio.Task[asyncio.AbstractServer]) -> None:
        if task.cancelled() or task.exception() is not None:
            log.error("could not serve a listening socket with TLS: %s",
                      "cancelled" if task.cancelled() else task.exception())
            return
        self._listeners[index] = task.result()

    def reload(self, config: Config) -> None:
        """Apply a new configuration without dropping anyone (SIGHUP / RELOAD)."""
        from pgpilot.proxy.tls import client_ssl_context, server_ssl_context, server_tls_settings

        old = self.config
        if self.fast is not None:
            # Where a StartupMessage leads may change: the engine's routes go, and the
            # clients it logged in alone become ordinary ones first.
            self.fast.forget_routes()
            self.fast.claim_all()
        try:
            client_ctx, server_ctx = client_ssl_context(config), server_ssl_context(config)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            # New clients keep the TLS context that works (and the modes); the rest of the
            # reload applies. The files named stay set: a key and its certificate changed
            # by two console SETs, one at a time, make a context at the second (as
            # PgBouncer), instead of the first one being undone before the second comes.
            log.error("reload: TLS settings not applied, keeping the previous TLS context "
                      "until they make one: %s", exc)
            client_ctx, server_ctx = self.ssl_context, self.server_ssl_context
            config = dataclasses.replace(config, **{
                name: getattr(old, name) for name in _TLS_MODES})
        tls_changed = server_tls_settings(old) != server_tls_settings(config)
        self.config = config
        self.auth_query.forget()
        self.ssl_context, self.server_ssl_context = client_ctx, server_ctx
        if self.fast is not None:
            self.fast.configure_tls(config)
        if client_ctx is not None and (self.fast is None or self.fast.client_tls is None):
            self._listeners_to_asyncio()
        from pgpilot.proxy.routing import reload_routers, replica_pool_node

        for (db_name, _user), pool in list(self.pools.items()):
            if self.routers and replica_pool_node(self, db_name) is not None:
                continue  # a replica's pool (routing.py): reload_routers below
            new_db = config.database_for(db_name)
            if new_db is None or tls_changed or _server_side(new_db) != _server_side(pool.db):
                # Where (or how) servers are reached changed: existing connections are closed
                # once free, as PgBouncer's RELOAD does; running transactions are not cut.
                for server in pool.all_servers():
                    server.close_needed = True
                for server in list(pool.idle):
                    server.close("database definition changed")
            if new_db is not None:
                pool.db = new_db
                pool.server_dbname = new_db.dbname or db_name
                pool.server_user = new_db.user or pool.user
            pool.config_changed()
            if pool.waiting and not pool.paused:
                pool.launch_if_needed()  # a larger pool_size applies to those waiting now
        reload_routers(self, tls_changed)  # replicas=, read_write_split, lag bounds
        for name, db in config.databases.items():
            if name != "*" and db.user and config.min_pool_size_for(db):
                self.get_pool(db, name, db.user)  # min_pool_size: the janitor warms it
        if self.fast is not None:
            self.fast.client_count_changed()  # max_client_conn may have changed
            self.fast.configure_logins()  # log_connections / log_disconnections may have
        if old.max_prepared_statements != config.max_prepared_statements:
            self._prepared_limit_changed(config.max_prepared_statements)
        if old.tcp_defer_accept != config.tcp_defer_accept:
            from pgpilot.proxy.listener import tune_listeners

            tune_listeners(self._listeners, config.tcp_defer_accept)
        if old.verbose != config.verbose:
            from pgpilot.proxy.logs import verbose_changed

            verbose_changed(config.verbose)
        if (old.listen_addr, old.listen_port) != (config.listen_addr, config.listen_port):
            log.warning("listen_addr/listen_port changes need a restart")
        if config.peer_id != self.peer_id:
            # The keys given out carry the old id: it stays until a restart.
            log.warning("peer_id changes need a restart; keeping peer_id = %d", self.peer_id)
        log.info("configuration reloaded")

    def _prepared_limit_changed(self, limit: int) -> None:
        """max_prepared_statements changed: every connected client's statement router takes
        the new value (prepared.StatementRouter.limit_changed), and a client on the fast path
        the map its engine renames with (none when renaming is off)."""
        for client in self.all_clients():
            router = client.router
            if router is None:
                continue
            router.limit_changed(limit)
            if is_fast_conn(client.transport):
                client.transport.set_statements(  # type: ignore[union-attr]
                    router.statements if router.renaming else None)

    def track_task(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- clients ------------------------------------------------------------------------
    def next_client_id(self) -> int:
        return next(self.client_ids)

    def all_clients(self) -> list[ClientConnection]:
        return [c for state, group in self.clients.items() if state is not ClientState.CLOSED
                for c in group]

    def client_connected(self, client: ClientConnection) -> None:
        self.clients[ClientState.LOGIN].add(client)
        if self.fast is not None:
            self.fast.client_count_changed()

    def client_moved(self, client: ClientConnection, old: ClientState, new: ClientState) -> None:
        self.clients[old].discard(client)
        if new is not ClientState.CLOSED:
            self.clients[new].add(client)
        elif self.fast is not None:
            self.fast.client_count_changed()

    def client_count(self) -> int:
        """Clients with a Python object that are not closed."""
        clients = self.clients
        return (len(clients[ClientState.LOGIN]) + len(clients[ClientState.ACTIVE])
                + len(clients[ClientState.WAITING]))

    def admit(self, client: ClientConnection) -> bool:
        """max_client_conn: refuse a client beyond it, as PgBouncer does (53300)."""
        if self.stopping:
            client.fail("57P03", "pgpilot is shutting down")
            return False
        count = self.client_count()
        if self.fast is not None:
            count += self.fast.engine.phantoms  # logged in by the engine alone
        if count > self.config.max_client_conn:
            log.warning("%r refused: max_client_conn (%d) reached", client,
                        self.config.max_client_conn)
            client.fail("53300", "no more connections allowed (max_client_conn)")
            return False
        budget = self.fd_budget
        if budget is not None and count > budget.client_room():
            log.warning("%r refused: file descriptor limit (ulimit -n = %d) reached",
                        client, budget.limit)
            client.fail("53300", "no more connections allowed (file descriptor limit)")
            return False
        return True

    def client_limit(self) -> int:
        """Clients admitted in all: max_client_conn, or fewer if ulimit -n says so."""
        limit = self.config.max_client_conn
        if self.fd_budget is not None:
            limit = min(limit, self.fd_budget.client_room())
        return limit

    def admit_to_pool(self, client: ClientConnection, db: DatabaseConfig) -> bool:
        """max_db_client_connections / max_user_client_connections, as PgBouncer."""
        cfg = self.config
        max_db = db.max_db_client_connections or cfg.max_db_client_connections
        if max_db:
            count = sum(len(p.clients) for (name, _u), p in self.pools.items()
                        if name == client.database)
            if count >= max_db:
                client.fail("53300", "no more connections allowed (max_db_client_connections)")
                return False
        user_cfg = cfg.users.get(client.user)
        max_user = (user_cfg.max_user_client_connections if user_cfg is not None
                    and user_cfg.max_user_client_connections else
                    cfg.max_user_client_connections)
        if max_user:
            count = sum(len(p.clients) for (_d, user), p in self.pools.items()
                        if user == client.user)
            if count >= max_user:
                client.fail("53300",
                            "no more connections allowed (max_user_client_connections)")
                return False
        return True

    def is_admin_db(self, name: str) -> bool:
        return name in ADMIN_DATABASES

    def admin_login(self, client: ClientConnection) -> None:
        if self.admin_handler is None:
            client.fail("3D000", f'no such database: "{client.database}"')
            return
        self.admin_handler(client)

    def client_secret_for(self, user: str, database: str | None = None) -> str | None:
        """``user``'s secret: auth_file's, else what auth_query read for it (auth_query.py)."""
        secret = self.config.auth_users.get(user)
        if secret is None and database is not None:
            secret = self.auth_query.secret_for(database, user)
        return secret

    def server_password_for(self, user: str) -> str | None:
        secret = self.config.auth_users.get(user)
        if secret is None:
            secret = self.auth_query.last_secrets.get(user)
        return secret

    def handle_ssl_request(self, client: ClientConnection) -> None:
        if client.tls or getattr(client.transport, "tls", False):  # (the engine's TLS)
            client.fail("08P01", "protocol violation: SSLRequest on an encrypted connection")
            return
        if self.ssl_context is None or self.config.client_tls_sslmode == "disable" \
                or client.addr == "unix":
            client.write(b"N")
            return
        if is_fast_conn(client.transport):
            # The engine's socket: its TLS is the engine's (without it, 'N').
            if self.fast is None or not self.fast.start_client_tls(client):
                client.write(b"N")
                return
            client.tls = True  # nothing but the handshake, then encrypted bytes, comes now
            client.restart_startup()
            return
        from pgpilot.proxy.listener import upgrade_client_tls

        client.pause_reading()  # nothing more is read in clear text before the handshake
        self.track_task(asyncio.get_running_loop().create_task(upgrade_client_tls(self, client)))

    # -- traffic observers ----------------------------------------------------------------
    def observe_query(self, client: ClientConnection, body: bytes) -> None:
        for observer in self.query_observers:
            observer(client, body)

    def observe_parse(self, client: ClientConnection, body: bytes) -> None:
        for observer in self.parse_observers:
            observer(client, body)

    # -- pools --------------------------------------------------------------------------
    def get_pool(self, db: DatabaseConfig, db_name: str, user: str) -> Pool:
        # As PgBouncer: the clients of a database with a forced user= share one pool, the
        # forced user's (its pool_size, reserve, pool_mode; min_pool_size warms that pool).
        if db.user:
            user = db.user
        key = (db_name, user)
        pool = self.pools.get(key)
        if pool is None:
            if db.is_fallback and not any(name == db_name for name, _u in self.pools):
                log.info("registered new auto-database: db=%s", db_name)
            pool = self.pools[key] = Pool(self, db, db_name, user)
            pool.paused = self.paused or db_name in self.paused_databases
        return pool

    def release_database(self, dbname: str) -> int:
        """A client is about to drop, rename or copy the upstream database ``dbname``: every
        server of a pool on it closes (the idle ones now, the busy ones when released), as
        after ``RECONNECT``. Returns how many closed now."""
        closed = 0
        for pool in self.pools.values():
            if pool.server_dbname != dbname:
                continue
            for server in pool.all_servers():
                server.close_needed = True  # one idle in the engine is handed back, closes
            for server in list(pool.idle):
                server.close(f"a client needs database {dbname} free")
                closed += 1
        return closed

    def servers_for_db(self, db_name: str) -> int:
        return sum(p.server_count() for (name, _u), p in self.pools.items() if name == db_name)

    def servers_for_user(self, server_user: str) -> int:
        return sum(p.server_count() for p in self.pools.values() if p.server_user == server_user)

    def server_closed(self, server: ServerConnection) -> None:
        """A server of some pool closed: other pools of the same database may now open one."""
        if self.stopping:
            return
        closed_pool = server.pool
        for pool in self.pools.values():
            if pool is not closed_pool and (
                    pool.db_name == closed_pool.db_name  # max_db_connections
                    or pool.server_user == closed_pool.server_user):  # max_user_connections
                if pool.welcome_params is None:
                    pool.open_for_welcome()
                if pool.waiting_count():  # in Python's line or the fast path's
                    pool.launch_if_needed()

    def default_socket_dir(self) -> str:
        for candidate in ("/var/run/postgresql", "/tmp"):
            if os.path.isdir(candidate):
                return candidate
        return "/tmp"

    # -- cancel -------------------------------------------------------------------------
    def cancel_pid_layout(self) -> tuple[int, int, int]:
        """How cancel keys are made, as (the pid's fixed bits, the pid's random bits, the
        key's fixed bits); the engine makes its own keys (engine logins) the same way. With
        workers = N the owning worker's index rides in the pid's top bits, with peer_id the
        peer id in its middle bytes and a time to live in the key (cancel routing)."""
        if self.peer_id:
            from pgpilot.proxy.peering import TTL_MASK, pid_layout

            index = self.worker.index if self.worker is not None else None
            return *pid_layout(self.peer_id, index), TTL_MASK
        if self.worker is None:
            return 0, 0x7FFF_FFFF, 0
        return (self.worker.index << WORKER_SHIFT) | 1, (1 << WORKER_SHIFT) - 1, 0

    def register_cancel_key(self, client: ClientConnection,
                            backend_pid: int = 0) -> tuple[int, int]:
        """A new (pid, key) for ``client``'s BackendKeyData; with ``backend_pid`` (session
        mode, one worker, no peering) the pid is its server's real one and only the key is
        the pooler's."""
        base, mask, key_bits = self.cancel_pid_layout()
        if key_bits:
            backend_pid = 0  # the pid carries the peer id
        while True:
            # One read of the system's CSPRNG for both numbers.
            bits = int.from_bytes(os.urandom(8), "big")
            pid = backend_pid or base | ((bits >> 32) & mask)
            key = (bits & 0x7FFF_FFFF) | key_bits
            if pid and (pid, key) not in self.cancel_keys:
                self.cancel_keys[(pid, key)] = client
                return pid, key

    def unregister_cancel_key(self, client: ClientConnection) -> None:
        self.cancel_keys.pop((client.cancel_pid, client.cancel_key), None)

    def cancel(self, pid: int, key: int, then: Callable[[], None] | None = None) -> None:
        """A CancelRequest with a key we gave out: cancel that client's current query only;
        ``then`` is called once PostgreSQL has taken the request (or there was none to
        send)."""
        if self.peer_id:
            from pgpilot.proxy.peering import own_key, peer_of

            owner = peer_of(pid)
            if owner != self.peer_id:
                # Another pooler behind the same balancer gave this key out (peering.py).
                self.peer_cancels.forward(owner, pid, key, then)
                return
            key = own_key(key)
        worker = self.worker
        if worker is not None and worker.owner_of(pid) != worker.index:
            self._forward_cancel(worker.owner_of(pid), pid, key)
            if then is not None:
                then()
            return
        client = self.cancel_keys.get((pid, key))
        if client is not None and is_fast_conn(client):
            client = client.claim()  # a client the engine logged in alone: Python sees it now
        if client is not None and client.server is None and is_fast_conn(client.transport):
            client.transport.eject()  # type: ignore[union-attr]  # Python holds the pair now
        if client is None or client.server is None:
            log.debug("cancel request for unknown or idle client ignored")
            if then is not None:
                then()
            return
        self.cancel_server(client.server, then)

    def _forward_cancel(self, owner: int, pid: int, key: int) -> None:
        """Pass a CancelRequest to the worker that gave out its key."""
        assert self.worker is not None
        if owner >= self.worker.count:
            return
        path = cancel_socket_path(self.worker.run_dir, owner)

        async def send() -> None:
            try:
                async with asyncio.timeout(5):
                    _r, writer = await asyncio.open_unix_connection(path)
                    writer.write(m.cancel_request(pid, key))
                    await writer.drain()
                    writer.close()
            except (OSError, TimeoutError) as exc:
                log.warning("could not pass a cancel request to worker %d: %s", owner, exc)

        self.track_task(asyncio.get_running_loop().create_task(send()))

    def cancel_server(self, server: ServerConnection,
                      done: Callable[[], None] | None = None) -> None:
        """Send PostgreSQL a CancelRequest for ``server``'s current query (``done`` is
        called once PostgreSQL has taken it).

        Until PostgreSQL has taken the request (it closes the cancel connection once the
        signal is sent, or ``cancel_wait_timeout`` passes), the server is not given to anyone
        else: a cancel that arrives late must find nothing, or its own client's query, to hit.
        """
        host, port = server.address
        if not server.backend_pid or not host:
            if done is not None:
                done()
            return
        packet = m.cancel_request(server.backend_pid, server.backend_key)
        server.cancels_pending += 1
        wait = self.config.cancel_wait_timeout or 10.0

        async def send() -> None:
            try:
                async with asyncio.timeout(wait):
                    await send_cancel_request(host, port, packet)
            except (OSError, TimeoutError) as exc:
                log.warning("could not send cancel request to %s:%s: %s", host, port, exc)
            finally:
                server.cancels_pending -= 1
                then = server.after_cancels
                if not server.cancels_pending and then is not None:
                    server.after_cancels = None
                    then()
                if not server.cancels_pending and server.give_out_after_cancel:
                    server.give_out_after_cancel = False
                    server.pool.give_out(server)
                if done is not None:
                    done()

        self.track_task(asyncio.get_running_loop().create_task(send()))


_TLS_MODES = ("client_tls_sslmode", "server_tls_sslmode")


def _server_side(db: DatabaseConfig) -> tuple[object, ...]:
    return (db.host, db.port, db.dbname, db.user, db.password)
