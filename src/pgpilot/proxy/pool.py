"""One pool per (database, user): its servers by state, its waiting clients, its limits.

A client that needs a server asks :meth:`Pool.request`. An idle server is handed over at once
(after a health check if it sat idle longer than ``server_check_delay``); otherwise the client
joins the FIFO wait list and, if the limits allow, a new server is opened. A server given back
with :meth:`Pool.release` is reset if the pooling mode asks for it, then goes to the first
waiting client or to the idle list. Servers live in explicit per-state lists, which is what the
admin console prints and the metrics count.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any

from pgpilot.proxy.poolstats import WAIT_BUCKETS, PoolStats
from pgpilot.proxy.prepared import Catalog
from pgpilot.proxy.server import ServerConnection, ServerError
from pgpilot.proxy.states import ClientState, ServerState
from pgpilot.proxy.tls import TLSNegotiationError, negotiate_server_tls
from pgpilot.wire import messages as m

if TYPE_CHECKING:
    from pgpilot.proxy.client import ClientConnection
    from pgpilot.proxy.config import DatabaseConfig
    from pgpilot.proxy.fastpath import Lane
    from pgpilot.proxy.pooler import Pooler

log = logging.getLogger("pgpilot.proxy")


# The first retry after a failed server login (then doubled, up to server_login_retry).
LOGIN_RETRY_FIRST = 0.05
class Pool:
    def __init__(self, pooler: Pooler, db: DatabaseConfig, db_name: str, user: str) -> None:
        self.pooler = pooler
        self.db = db
        self.db_name = db_name  # the name clients use
        self.user = user  # the client's user name
        self.name = f"{db_name}/{user}"
        self.server_dbname = db.dbname or db_name
        self.server_user = db.user or user
        self.catalog = pooler.catalogs.setdefault((db.host, db.port, self.server_dbname),
                                                  Catalog())
        self.servers: dict[ServerState, set[ServerConnection]] = {
            s: set() for s in ServerState if s is not ServerState.CLOSED}
        self.idle: collections.deque[ServerConnection] = collections.deque()
        self.waiting: collections.deque[ClientConnection] = collections.deque()
        self.clients: set[ClientConnection] = set()
        # Servers running their reset after their client left (release): free in a moment.
        self.resetting: set[ServerConnection] = set()
        # Idle servers on their way to the fast path, under their server_check_query: each
        # is as good as a server logging in for the clients waiting meanwhile.
        self.checking: set[ServerConnection] = set()
        # Replication clients waiting for room to open their own server (walsender.py):
        # woken when a server closes or goes idle.
        self.slot_waiters: list[asyncio.Future[None]] = []
        self.welcome_params: dict[str, str] | None = None
        self._welcome_bytes: dict[tuple[object, ...], tuple[dict[str, str], bytes]] = {}
        self._welcome_waiters: list[asyncio.Future[None]] = []
        # (parameter, value as a client spelled it) -> as the server reports it.
        self.canonical_values: dict[tuple[str, str], str] = {}
        self._paused = False
        self._mode: str | None = None  # derived from the configuration, until RELOAD
        self._lifetime: float | None = None
        self.login_failed_until = 0.0
        # Failed server logins in a row: the next try waits LOGIN_RETRY_FIRST doubled for
        # each, at most server_login_retry (_login_failed).
        self.login_failures = 0
        self.next_host = 0  # host=a,b: the next new server goes to hosts[next_host % n]
        self.last_lifetime_close = 0.0  # server_lifetime closes are spread out (_too_old)
        self.last_login_error: ServerError | None = None
        self.stats = PoolStats()
        self.max_wait_started: float | None = None
        # The compiled fast path's side of this pool (fastpath.Lane), for transaction and
        # statement pools when the engine runs; servers it holds are IDLE with in_engine set.
        self.lane: Lane | None = None
        # The last request for a server came from Python rather than the engine (give_out).
        self.python_demand = False
        fast = pooler.fast
        # (a database with replicas: the engine serves its primary's pools only for the
        # transactions that surely go to the primary, route_reads, set by proxy/routing.py;
        # the replicas' pools are Python's)
        if fast is not None and self.mode != "session" and not (db.replicas and "@" in db_name):
            from pgpilot.proxy.fastpath import Lane

            self.lane = Lane(fast, self, WAIT_BUCKETS)
            split = db.read_write_split if db.read_write_split is not None \
                else pooler.config.read_write_split
            self.lane.fp.route_reads = int(bool(db.replicas and split))

    def __repr__(self) -> str:
        return f"Pool({self.name})"

    # -- settings, read live so RELOAD applies ---------------------------------------
    @property
    def mode(self) -> str:
        mode = self._mode
        if mode is None:
            mode = self._mode = self.pooler.config.pool_mode_for(self.db, self.user)
        return mode

    @property
    def lifetime(self) -> float:
        lifetime = self._lifetime
        if lifetime is None:
            lifetime = self._lifetime = self.pooler.config.server_lifetime_for(self.db)
        return lifetime

    def config_changed(self) -> None:
        """Forget what was derived from the configuration (RELOAD)."""
        self._mode = None
        self._lifetime = None
        if self.lane is not None:
            self.lane.configure()

    @property
    def paused(self) -> bool:
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self._paused = value
        if not value and self.slot_waiters:
            self.wake_slot_waiters()
        lane = self.lane
        if lane is not None:
            lane.fp.paused = int(value)
            if not value:
                lane.fp.kick()

    def waiting_count(self) -> int:
        """Clients waiting for a server, in Python's line and the fast path's."""
        lane = self.lane
        return len(self.waiting) + (lane.waiting_count() if lane is not None else 0)

    def _waiting_changed(self) -> None:
        lane = self.lane
        if lane is not None:
            lane.fp.py_waiters = len(self.waiting)

    @property
    def size(self) -> int:
        # As PgBouncer: [users] pool_size is the server user's (a forced user=, if any).
        return self.pooler.config.pool_size_for(self.db, self.server_user)

    @property
    def min_size(self) -> int:
        return self.pooler.config.min_pool_size_for(self.db)

    @property
    def reserve_size(self) -> int:
        return self.pooler.config.reserve_pool_size_for(self.db, self.server_user)

    def parameter_statuses(self, server_params: dict[str, str],
                           client_params: dict[str, str]) -> bytes:
        """The ParameterStatus messages of a welcome: the server's values, except what the
        client asked for itself. Clients mostly ask the same, so the bytes are kept."""
        # (A server's params change as it reports new values: keyed by the values.)
        key = (tuple(server_params.items()), tuple(client_params.items()))
        cached = self._welcome_bytes.get(key)
        if cached is not None:
            return cached[1]
        out = bytearray()
        for name, value in server_params.items():
            out += m.parameter_status(name, client_params.get(name, value))
        for name, value in client_params.items():
            if name not in server_params:
                out += m.parameter_status(name, value)
        if len(self._welcome_bytes) >= 64:  # per-client application names: stay bounded
            self._welcome_bytes.clear()
        self._welcome_bytes[key] = (server_params, bytes(out))
        return bytes(out)

    def server_credentials(self) -> tuple[str, str | None]:
        password = self.db.password
        if password is None:
            password = self.pooler.server_password_for(self.server_user)
        return self.server_user, password

    def server_startup_params(self) -> dict[str, str]:
        params: dict[str, str] = {}
        if self.db.application_name:
            params["application_name"] = self.db.application_name
        if self.db.client_encoding:
            params["client_encoding"] = self.db.client_encoding
        if self.db.datestyle:
            params["DateStyle"] = self.db.datestyle
        if self.db.timezone:
            params["TimeZone"] = self.db.timezone
        return params

    # -- counting -------------------------------------------------------------------
    def server_count(self) -> int:
        return sum(len(s) for s in self.servers.values())

    def server_moved(self, server: ServerConnection, old: ServerState,
                     new: ServerState) -> None:
        self.servers[old].discard(server)
        if old is ServerState.IDLE and server.in_idle:
            # Only servers closed while idle are still in the list (handing out pops them).
            server.in_idle = False
            self.idle.remove(server)
        if self.slot_waiters and new in (ServerState.CLOSED, ServerState.IDLE):
            self.wake_slot_waiters()
        if new is ServerState.CLOSED:
            self.pooler.server_closed(server)
            # Capacity freed: a waiting client may now get a new server.
            if self.waiting_count() and not self.pooler.stopping:
                self.launch_if_needed()
            if self.lane is not None:
                self.lane.update_assist()
            return
        self.servers[new].add(server)
        if new is ServerState.IDLE and not server.in_engine:
            server.in_idle = True
            self.idle.append(server)

    def wake_slot_waiters(self) -> None:
        waiters, self.slot_waiters = self.slot_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def take_any_idle(self) -> ServerConnection | None:
        """An idle server of this pool, Python's or the fast path's (to close it)."""
        server = self._take_idle()
        if server is None and self.lane is not None:
            server = self._take_lane_idle()
        return server

    def evict_for_limit(self) -> None:
        self._evict_for_limit()

    def add_server(self, server: ServerConnection) -> None:
        self.servers[ServerState.LOGIN].add(server)

    # -- opening servers ------------------------------------------------------------
    def can_open(self, use_reserve: bool = False) -> bool:
        limit = self.size + (self.reserve_size if use_reserve else 0)
        if self.server_count() >= limit:
            return False
        cfg = self.pooler.config
        max_db = cfg.max_db_connections_for(self.db)
        if max_db and self.pooler.servers_for_db(self.db_name) >= max_db:
            return False
        max_user = cfg.max_user_connections_for(self.server_user)
        return not (max_user and self.pooler.servers_for_user(self.server_user) >= max_user)

    def launch_if_needed(self, use_reserve: bool = False) -> None:
        """Open servers for waiting clients, as far as the limits allow (none while paused)."""
        if self.paused or time.monotonic() < self.login_failed_until:
            return
        logging_in = len(self.servers[ServerState.LOGIN]) + len(self.checking)
        waiting = self.waiting_count()
        while waiting > logging_in and self.can_open(use_reserve):
            if self.server_count() >= self.size:  # PgBouncer's words
                log.warning("%s: taking connection from reserve_pool", self.name)
            self.open_server()
            logging_in += 1
        if waiting > logging_in and self.server_count() < self.size:
            self._evict_for_limit()

    def _evict_for_limit(self) -> None:
        """This pool's clients wait, below its pool_size, because max_db_connections or
        max_user_connections is reached: as PgBouncer (evict_connection), an idle server of
        another pool of the same database (or server user) is closed, so that this pool can
        open one (Pooler.server_closed calls launch_if_needed again)."""
        cfg = self.pooler.config
        max_db = cfg.max_db_connections_for(self.db)
        at_db = bool(max_db) and self.pooler.servers_for_db(self.db_name) >= max_db
        max_user = cfg.max_user_connections_for(self.server_user)
        at_user = bool(max_user) and \
            self.pooler.servers_for_user(self.server_user) >= max_user
        if not (at_db or at_user):
            return
        for pool in list(self.pooler.pools.values()):
            if pool is self or not ((at_db and pool.db_name == self.db_name) or (
                    at_user and pool.server_user == self.server_user)):
                continue
            server = pool._take_idle()
            if server is None and pool.lane is not None:
                server = pool._take_lane_idle()
            if server is not None:
                log.info("%r closing because: evicted (%s reached, pool %s waits)", server,
                         "max_db_connections" if at_db else "max_user_connections", self.name)
                server.close("evicted")
                return

    def open_server(self, tls_retry: bool = False) -> None:
        # Counted in LOGIN at once, so limits hold while the connection is being made.
        server = ServerConnection(self)
        self.add_server(server)
        task = asyncio.get_running_loop().create_task(self._connect(server, tls_retry))
        self.pooler.track_task(task)

    async def _connect(self, server: ServerConnection, tls_retry: bool = False) -> None:
        """Connect ``server`` and log it in. ``tls_retry``: the second attempt of
        server_tls_sslmode = allow, with TLS, after PostgreSQL refused the clear-text one."""
        cfg = self.pooler.config
        host = self.db.host or self.pooler.default_socket_dir()
        if "," in host:
            # A host list, as PgBouncer's load_balance_hosts = round-robin (its default):
            # each new server connection goes to the next host.
            hosts = [h.strip() for h in host.split(",") if h.strip()]
            host = hosts[self.next_host % len(hosts)]
            self.next_host += 1
        server.address = (host, self.db.port)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(cfg.server_connect_timeout or None):
                if host.startswith("/"):
                    await loop.create_unix_connection(
                        lambda: server, path=f"{host}/.s.PGSQL.{self.db.port}")
                else:
                    await negotiate_server_tls(server, host=host, port=self.db.port, config=cfg,
                                               context=self.pooler.server_ssl_context,
                                               mode="require" if tls_retry else None,
                                               fast=self.pooler.fast)
                await server.login_done
                if cfg.log_connections:  # PgBouncer's words
                    local = server.local_addr
                    log.info("%r new connection to server (from %s)", server,
                             "unix socket" if local == "unix" else
                             f"[{local}]:{server.local_port}" if ":" in local else
                             f"{local}:{server.local_port}")
                if self.db.connect_query:
                    await self._connect_query(server, self.db.connect_query)
        except (OSError, TimeoutError, ServerError, TLSNegotiationError) as exc:
            if isinstance(exc, ServerError):
                error = exc
            elif isinstance(exc, TLSNegotiationError):
                error = ServerError(str(exc))
            elif isinstance(exc, ssl.SSLCertVerificationError):
                error = ServerError(f"TLS with server {host}:{self.db.port} failed: "
                                    f"certificate verify failed: {exc.verify_message} "
                                    f"(server_tls_sslmode = {cfg.server_tls_sslmode})")
            elif isinstance(exc, ssl.SSLError):
                error = ServerError(f"TLS with server {host}:{self.db.port} failed: "
                                    f"{exc.reason or exc}")
            elif isinstance(exc, TimeoutError):
                error = ServerError(f"server_connect_timeout: could not connect to "
                                    f"{host}:{self.db.port} within "
                                    f"{cfg.server_connect_timeout:g} s")
            else:
                error = ServerError(f"could not connect to server {host}:{self.db.port}: "
                                    f"{exc.strerror or exc}")
            if not error.from_server:
                # PgBouncer's words for a server it could not reach, which alerts grep.
                log.warning("%r closing because: %s (age=%ds)", server, "connect timeout"
                            if isinstance(exc, TimeoutError) else "connect failed",
                            time.monotonic() - server.created_at)
            retry_tls = (cfg.server_tls_sslmode == "allow" and not tls_retry
                         and error.from_server and not host.startswith("/")
                         and self.pooler.server_ssl_context is not None)
            if not retry_tls:
                # The backoff first: closing the server frees its place, and nothing may
                # open another one for the waiting clients before the next try is due.
                self.start_backoff()
            server.close(str(error), terminate=False)
            if retry_tls:
                # As libpq's sslmode=allow: refused in clear text, try once more with TLS.
                log.info("%s: server %s:%d refused a clear-text login (%s); retrying with TLS "
                         "(server_tls_sslmode = allow)", self.name, host, self.db.port, error)
                self.open_server(tls_retry=True)
                return
            self._login_failed(error)
            return
        self.last_login_error = None
        self.login_failed_until = 0.0
        self.login_failures = 0
        if self.welcome_params is None:
            self.welcome_params = dict(server.params)
        for fut in self._welcome_waiters:
            if not fut.done():
                fut.set_result(None)
        self._welcome_waiters.clear()
        log.debug("%r logged in to %s as %s", server, self.server_dbname, self.server_user)
        fast = self.pooler.fast
        if fast is not None:
            # Into the engine's epoll set now, even if the fast path never lends it (session
            # pools, clients with named statements): its Conn is a cheaper transport than
            # asyncio's selector one, whose Python write/read ran on every message.
            fast.adopt(server, True)
        self.give_out(server)

    @staticmethod
    async def _connect_query(server: ServerConnection, sql: str) -> None:
        """The database's connect_query, run once on each new server before its first use
        (as PgBouncer); an error fails the login with PostgreSQL's message."""
        done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

        def finished(_server: ServerConnection, error: str | None) -> None:
            if not done.done():
                done.set_result(error)

        server.run_internal(sql, finished)
        error = await done
        if error is not None:
            raise ServerError(f"connect_query failed: {error}", "08006",
                              from_server=server.state is not ServerState.CLOSED)

    def start_backoff(self) -> None:
        """A server login failed: no new one before the next try is due. Unlike PgBouncer
        (server_login_retry at once), a short growing backoff: PostgreSQL back from a
        restart is used within a fraction of a second, and one that stays down is tried at
        most every server_login_retry. (Logins that fail together, several servers opened at
        once, count as one try.)"""
        now = time.monotonic()
        if now >= self.login_failed_until:
            self.login_failures += 1
        backoff = LOGIN_RETRY_FIRST * 2.0 ** min(self.login_failures - 1, 30)
        self.login_failed_until = max(self.login_failed_until, now + min(
            backoff, self.pooler.config.server_login_retry))

    def _login_failed(self, error: ServerError) -> None:
        # PgBouncer's words: "server login failed: FATAL <PostgreSQL's message>".
        log.warning("%s: server login failed: %s%s", self.name,
                    "FATAL " if error.from_server else "", error)
        self.last_login_error = error
        router = self.pooler.routers.get(self.db_name.partition("@")[0]) \
            if self.pooler.routers and "@" in self.db_name else None
        if router is not None:  # a replica's pool (routing.py): its waiting clients are
            router.replica_login_failed(self, str(error))  # routed again, elsewhere
        if not error.from_server:
            # The server could not be reached (refused, timed out, TLS failed): as PgBouncer,
            # the clients keep waiting and the pool tries again after server_login_retry
            # (retry_login); query_timeout, query_wait_timeout and client_login_timeout end
            # their wait. An error PostgreSQL itself sent is told to them at once, below.
            return
        for fut in self._welcome_waiters:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()
        self._welcome_waiters.clear()
        # Clients waiting for a server get the server's own error rather than a long wait,
        # unless a server of the pool may still serve them (not one RECONNECT or RELOAD
        # marked to close, nor a replication client's), as PgBouncer's kill_pool_logins.
        if not any(s.pooled and not s.close_needed for s in self.all_servers()):
            while self.waiting:
                self.waiting.popleft().fail(error.sqlstate, str(error))
            self._waiting_changed()
            if self.lane is not None:
                for client in self.lane.fp.drop_waiters(0.0):
                    client.fail(error.sqlstate, str(error))

    async def welcome(self) -> dict[str, str]:
        """The server's ParameterStatus values, opening a first server if none is known."""
        if self.welcome_params is not None:
            return self.welcome_params
        # During server_login_retry after a failure the client waits for the next try (the
        # janitor's retry_login), as PgBouncer: only those waiting when a login fails get
        # its error.
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._welcome_waiters.append(fut)
        self.open_for_welcome()
        await fut
        assert self.welcome_params is not None
        return self.welcome_params

    def retry_login(self) -> None:
        """The janitor's round: the clients still waiting (to log in, or for a server) get
        servers opened for them if the limits allow, or an idle server of another pool is
        evicted for them (after server_login_retry, if a login failed)."""
        if self.paused or self.pooler.stopping or self.servers[ServerState.LOGIN]:
            return
        self.open_for_welcome()
        self.launch_if_needed()

    def open_for_welcome(self) -> None:
        """Clients logging in need a first server's parameters: open it if the limits allow
        (max_db_connections / max_user_connections may hold it back until a server of
        another pool closes: Pooler.server_closed calls again; an idle one is evicted)."""
        if self.servers[ServerState.LOGIN] or time.monotonic() < self.login_failed_until \
                or not any(not fut.done() for fut in self._welcome_waiters):
            return
        if self.can_open(use_reserve=True):
            self.open_server()
        elif self.server_count() == 0:
            self._evict_for_limit()

    # -- handing out and taking back ------------------------------------------------
    def request(self, client: ClientConnection) -> None:
        """``client`` needs a server: it gets one now (client.attach) or waits in line."""
        client.wait_started = time.monotonic()
        self.python_demand = True
        if not self.paused and not self.waiting:
            server = self._take_idle()
            if server is None and self.lane is not None:
                server = self._take_lane_idle()
            if server is not None:
                self._hand_to(server, client)
                return
        self.waiting.append(client)
        self._waiting_changed()
        client.start_waiting()
        if not self.paused:
            self.launch_if_needed()

    def cancel_wait(self, client: ClientConnection) -> None:
        if not self.waiting:
            return  # (deque.remove of a missing client would build an error, repr and all)
        try:
            self.waiting.remove(client)
        except ValueError:
            return
        self._waiting_changed()

    def _take_lane_idle(self) -> ServerConnection | None:
        """An idle server the fast path holds, taken back for a client Python serves."""
        assert self.lane is not None
        while True:
            server = self.lane.fp.take_idle()
            if server is None:
                return None
            server.in_engine = False
            if server.close_needed:
                server.close("reconnect requested")
                continue
            return server  # type: ignore[no-any-return]

    def take_python_idle(self) -> ServerConnection | None:
        """An idle server from Python's own list (the fast path asks: Lane.starved)."""
        return self._take_idle()

    def hand_to_lane(self, server: ServerConnection) -> None:
        """Give an idle server to the fast path, after a health check if it sat too long."""
        cfg = self.pooler.config
        check = cfg.server_check_query
        if (check and cfg.server_check_delay >= 0
                and time.monotonic() - server.last_used > cfg.server_check_delay):
            server.set_state(ServerState.TESTED)
            self.checking.add(server)

            def checked(srv: ServerConnection, error: str | None) -> None:
                self.checking.discard(srv)
                if error is not None or srv.state is ServerState.CLOSED:
                    srv.close(f"server_check_query failed: {error}")
                    self.launch_if_needed()  # for the clients that counted on it
                    return
                srv.last_used = time.monotonic()
                self.give_out(srv)

            server.run_internal("" if check == "<empty>" else check, checked)
            return
        self.give_out(server)

    def _take_idle(self) -> ServerConnection | None:
        idle = self.idle
        while idle:
            # LIFO by default: the most recently used connection is the warmest;
            # server_round_robin spreads the load evenly instead (FIFO).
            server = idle.popleft() if self.pooler.config.server_round_robin else idle.pop()
            server.in_idle = False
            if server.close_needed:
                server.close("reconnect requested")
                continue
            return server
        return None

    def _hand_to(self, server: ServerConnection, client: ClientConnection) -> None:
        cfg = self.pooler.config
        check = cfg.server_check_query
        if (check and cfg.server_check_delay >= 0
                and time.monotonic() - server.last_used > cfg.server_check_delay):
            server.set_state(ServerState.TESTED)
            client.start_waiting()

            def checked(srv: ServerConnection, error: str | None) -> None:
                if client.gone:
                    self.give_out(srv) if error is None else srv.close(error)
                    return
                if error is not None or srv.state is ServerState.CLOSED:
                    srv.close(f"server_check_query failed: {error}")
                    self.request_front(client)
                    return
                srv.last_used = time.monotonic()
                self.stats.server_assignment_count += 1
                client.attach(srv)

            # "<empty>" (PgBouncer's default) sends an empty query: the cheapest round trip.
            server.run_internal("" if check == "<empty>" else check, checked)
            return
        self.stats.server_assignment_count += 1
        client.attach(server)

    def request_front(self, client: ClientConnection) -> None:
        """Put a client back at the head of the line (its server failed a check)."""
        server = self._take_idle()
        if server is not None:
            self._hand_to(server, client)
            return
        self.waiting.appendleft(client)
        self._waiting_changed()
        client.start_waiting()
        self.launch_if_needed()

    def give_out(self, server: ServerConnection) -> None:
        """A clean server: to the first waiting client, else to the idle list."""
        if server.state is ServerState.CLOSED:
            return
        transport = server.transport
        if transport is not None and transport.is_closing():
            # its end is known (the engine marks a connection it saw end as closing before
            # handing it back) and connection_lost is on its way: lending it would fail the
            # next client with 08006 although nothing of its request was sent
            return
        if server.cancels_pending:
            server.give_out_after_cancel = True  # Pooler.cancel_server gives it out later
            return
        if server.close_needed or self._too_old(server):
            server.close("server_lifetime reached" if not server.close_needed
                         else "reconnect requested")
            return
        while self.waiting and not self.paused:
            client = self.waiting.popleft()
            self._waiting_changed()
            if client.gone:
                continue
            self._hand_to(server, client)
            return
        lane = self.lane
        # A server goes to the fast path's engine unless Python asked for servers last: then
        # the next request is likely Python's again (clients with named statements, say), and
        # a trip into the engine and back would cost two hand-overs for nothing. The engine
        # asks when it runs short (Lane.starved), which turns this the other way.
        if lane is not None and not (self.python_demand and not lane.waiting_count()) \
                and lane.take_server(server):
            return
        server.last_used = time.monotonic()
        if server.state is ServerState.IDLE:
            if not server.in_idle:  # back from the fast path: already IDLE, not listed
                server.in_idle = True
                self.idle.append(server)
        else:
            server.set_state(ServerState.IDLE)
        if lane is not None:
            if lane.waiting_count() and not self.paused:
                # A server the engine cannot carry (TLS, say): the engine's first waiting
                # client comes to Python, whose request finds this server idle.
                lane.fp.eject_waiter()
            lane.update_assist()  # an idle server here: the engine may ask for it

    def _too_old(self, server: ServerConnection) -> bool:
        """server_lifetime as PgBouncer's life_over: reached (0 = use once), and not within
        lifetime / pool_size of the pool's last such close, so old servers are not all
        replaced at once. A True answer counts as a close."""
        now = time.monotonic()
        lifetime = self.lifetime
        if now - server.created_at < lifetime:
            return False
        size = self.size
        if size and now - self.last_lifetime_close < lifetime / size:
            return False
        self.last_lifetime_close = now
        return True

    def release(self, server: ServerConnection, *, client_closed: bool) -> None:
        """A client is done with ``server``; reset it if needed and give it out again."""
        if server.state is ServerState.CLOSED:
            return
        cfg = self.pooler.config
        reset = cfg.server_reset_query
        need_reset = bool(reset) and (
            self.mode == "session" or cfg.server_reset_query_always) and client_closed
        statements = []
        if server.txn_status != "I":
            # Never hand on a server inside a transaction: roll it back first.
            statements.append("ROLLBACK")
        if need_reset:
            statements.append(reset)
        if server.discard_needed and not (need_reset and reset.strip().upper() == "DISCARD ALL"):
            # A pinned client's LISTEN, temp tables, locks ... (session.py): nobody inherits.
            statements.append("DISCARD ALL")
        if not statements:
            self.give_out(server)
            return
        sql = "; ".join(statements)
        if server.state is not ServerState.TESTED:
            server.set_state(ServerState.USED)

        def done(srv: ServerConnection, error: str | None) -> None:
            self.resetting.discard(srv)
            if srv.state is ServerState.CLOSED:
                return
            if error is not None or srv.txn_status != "I":
                srv.close(f"reset failed: {error or 'still in a transaction'}")
                return
            self.give_out(srv)

        server.set_state(ServerState.TESTED)
        self.resetting.add(server)
        server.run_internal(sql, done)

    def client_counts(self) -> tuple[int, int]:
        """(cl_active, cl_waiting): logged-in clients with or without a server, those idle in
        the engine with no Python object yet included (FastPath.settle(claim=False))."""
        active = self.lane.fp.phantoms if self.lane is not None else 0
        waiting = 0
        for client in self.clients:
            if client.state is ClientState.ACTIVE:
                active += 1
            elif client.state is ClientState.WAITING:
                waiting += 1
        return active, waiting

    def summary(self, settled: bool) -> dict[str, Any]:
        """Sizes and states as the dashboard and SHOW WORKER_POOLS print them.

        ``settled``: the fast path's pairs are back in Python (FastPath.settle), so its view is
        exact. Otherwise (a worker's snapshot, once a second, which must not take pairs off the
        fast path that often) the engine's own counts correct it: a pair linked in the engine
        is a client ACTIVE with a server that Python sees IDLE, and a client queued in the
        engine is one Python sees ACTIVE."""
        active, waiting = self.client_counts()
        sv_active = len(self.servers[ServerState.ACTIVE])
        sv_idle = len(self.servers[ServerState.IDLE])
        if not settled and self.lane is not None:
            linked, queued, _idle = self.lane.fp.counts
            moved = min(linked, sv_idle)
            sv_active, sv_idle = sv_active + moved, sv_idle - moved
            queued = min(queued, active)
            active, waiting = active - queued, waiting + queued
        return {"database": self.db_name, "user": self.user, "mode": self.mode,
                "size": self.size, "cl_active": active, "cl_waiting": waiting,
                "sv_active": sv_active, "sv_idle": sv_idle, "pinned": self.pinned_count()}

    def pinned_count(self) -> int:
        """Clients of this pool holding their server for state that cannot follow them."""
        return sum(1 for client in self.clients if client.pins)

    def pinned_clients_text(self) -> str:
        """The pinned clients and why, for the log line of a client that waited in vain."""
        return ", ".join(f"{c!r} ({', '.join(c.pins.values())})"
                         for c in self.clients if c.pins)

    # -- ending ----------------------------------------------------------------------
    def all_servers(self) -> list[ServerConnection]:
        return [s for group in self.servers.values() for s in group]

    def close_all(self, reason: str) -> None:
        for server in self.all_servers():
            server.close(reason)
