"""The bridge between the pooler's Python objects and its compiled fast path (``_fastpath.c``).

The pooler's event loop runs on the engine's epoll set (:class:`EngineSelector`), so traffic
the engine carries alone never turns the Python loop. Plain-TCP clients are accepted by the
engine itself (:class:`Listener`), so their whole login
runs on an engine ``Conn`` and no asyncio transport is ever made for them; servers (and
clients of listeners the engine does not serve) leave their asyncio transports for the engine
after login (:func:`FastPath.adopt`). The ``Conn`` is the protocol's ``transport``, so
everything in ``client.py`` / ``server.py`` works unchanged on it. In transaction and statement
pools a :class:`Lane` lets the engine do the common work itself: forward simple-protocol and
unnamed extended-protocol traffic, lend an idle server at a client's request and take it back
at ReadyForQuery 'I'. Python's objects are not touched on that path; what it does not handle is
handed back ("ejected") with its exact state, through the callbacks below.

While a pair is on the fast path, the Python view lags behind: the client's ``server`` is None
and the server sits in state IDLE. :meth:`FastPath.settle` brings every pair back before
anything that reads that view as a whole (the admin console, /metrics, shutdown), and
:meth:`FastPath.refill` lets them go again. The janitor reads the engine's own timestamps.

Without a compiler (no ``_fastpath`` extension) or with ``fast_path = off``, none of this runs
and the pooler is the pure-Python one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from pgpilot.proxy import prepared
from pgpilot.proxy.auth import ScramSecret, scram_salt_b64
from pgpilot.proxy.logs import direct_target, log_lines
from pgpilot.proxy.states import ServerState
from pgpilot.proxy.stats import client_queries

try:
    from pgpilot.proxy import _fastpath  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - built without a C compiler
    _fastpath = None

if TYPE_CHECKING:
    from pgpilot.proxy.client import ClientConnection
    from pgpilot.proxy.config import Config
    from pgpilot.proxy.pool import Pool
    from pgpilot.proxy.pooler import Pooler
    from pgpilot.proxy.server import ServerConnection
    from pgpilot.proxy.workers import WorkerIdentity

log = logging.getLogger("pgpilot.proxy")

# The engine's letters for requests still owed an answer -> the router's kinds (prepared.py).
# 'b' and 'd': a Bind / Describe the engine renamed (named statements), with its name.
_OWED_KIND = {ord("Q"): prepared.QUERY, ord("P"): prepared.PARSE, ord("B"): prepared.BIND,
              ord("D"): prepared.DESCRIBE, ord("E"): prepared.EXECUTE, ord("C"): prepared.CLOSE,
              ord("S"): prepared.SYNC, ord("b"): prepared.BIND, ord("d"): prepared.DESCRIBE}
_RENAMED = frozenset(b"bd")
EJECT_LINKED = 1
EJECT_ATTACH = 2
# ejected()'s ``passed`` bits: the engine passed the client its server's FATAL; a result
# of the client's request in flight (no ReadyForQuery after it yet).
PASSED_FATAL = 1
PASSED_RESULT = 2


# Distinct (startup parameters, session settings) ids remembered at once (params_id).
MAX_PARAMS_IDS = 10_000


def available() -> bool:
    return _fastpath is not None


def is_fast_conn(transport: object) -> bool:
    return _fastpath is not None and type(transport) is _fastpath.Conn


def tls_available() -> bool:
    """Was the engine built with OpenSSL (``engine/tls.c``)?"""
    return _fastpath is not None and hasattr(_fastpath, "TLSContext")


def engine_tls_contexts(config: Config) -> tuple[Any, Any]:
    """The engine's (client side, server side) TLS contexts for ``config``, made from the
    same settings as tls.py's ``ssl`` contexts; None where TLS is off. Raises OSError when
    a key, certificate or CA file is unusable."""
    assert _fastpath is not None
    client = server = None
    mode = config.client_tls_sslmode
    if mode != "disable" and config.client_tls_cert_file and config.client_tls_key_file:
        # As tls.client_ssl_context: verify-ca/-full need a certificate; with a CA file, one
        # a client sends is asked for and checked in every mode (auth_type = cert).
        verify = 2 if mode in ("verify-ca", "verify-full") \
            else 1 if config.client_tls_ca_file else 0
        client = _fastpath.TLSContext(True, config.client_tls_cert_file,
                                      config.client_tls_key_file, config.client_tls_ca_file,
                                      verify)
    mode = config.server_tls_sslmode
    if mode != "disable":
        have_cert = bool(config.server_tls_cert_file and config.server_tls_key_file)
        server = _fastpath.TLSContext(
            False, config.server_tls_cert_file if have_cert else None,
            config.server_tls_key_file if have_cert else None, config.server_tls_ca_file,
            2 if mode in ("verify-ca", "verify-full") else 0)
    return client, server


class _TLSHandshake:
    """A server socket's protocol while the engine does its TLS handshake."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.early = bytearray()

    def tls_done(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.early += data  # the server spoke before its protocol took over: kept for it

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(tls_error(exc))


def tls_error(exc: BaseException | None) -> Exception:
    """What the engine's failed handshake means, as Python's ssl module says it."""
    if exc is None:
        return ConnectionResetError("the server closed the connection during the TLS handshake")
    verify_code = getattr(exc, "verify_code", 0)
    if verify_code:
        message = str(getattr(exc, "verify_message", "")) or "certificate verify failed"
        err = ssl.SSLCertVerificationError(
            1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
        err.verify_code = verify_code
        err.verify_message = message
        err.reason = "CERTIFICATE_VERIFY_FAILED"
        return err
    reason = getattr(exc, "tls_reason", None)
    if reason is not None:
        tls_err = ssl.SSLError(1, str(reason))
        tls_err.reason = str(reason)
        return tls_err
    return exc if isinstance(exc, Exception) else ConnectionError(str(exc))


class _Detached(asyncio.Protocol):
    """Takes the old transport's last callbacks once the engine owns the socket."""

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class _KeyMap(Mapping[Any, selectors.SelectorKey]):
    """``EngineSelector.get_map()``: the registered keys by file object or descriptor."""

    def __init__(self, selector: EngineSelector) -> None:
        self._selector = selector

    def __len__(self) -> int:
        return len(self._selector.keys)

    def __getitem__(self, fileobj: Any) -> selectors.SelectorKey:
        try:
            return self._selector.keys[_fd_of(fileobj)]
        except (KeyError, ValueError):
            raise KeyError(f"{fileobj!r} is not registered") from None

    def __iter__(self) -> Iterator[int]:
        return iter(self._selector.keys)


def _fd_of(fileobj: Any) -> int:
    fd = fileobj if isinstance(fileobj, int) else int(fileobj.fileno())
    if fd < 0:
        raise ValueError(f"invalid file descriptor: {fd}")
    return fd


class EngineSelector(selectors.BaseSelector):
    """The event loop's selector, on the engine's own epoll set.

    asyncio's descriptors and the engine's sockets wait in one ``epoll_wait``, and the engine
    serves its sockets inside :meth:`select` until something of Python's is due (a watched
    descriptor is ready, a callback into Python was made, the timeout passed). Traffic the
    fast path carries alone then costs no turn of the event loop and no second epoll: the
    loop made by :func:`new_event_loop` is the pooler's default. On any other loop the engine's
    epoll fd is watched with ``add_reader`` instead (:class:`FastPath`)."""

    def __init__(self) -> None:
        assert _fastpath is not None
        self.engine = _fastpath.Engine(None, None)
        self.engine_user: FastPath | None = None  # the one pooler whose engine this is
        self.keys: dict[int, selectors.SelectorKey] = {}
        self._map = _KeyMap(self)

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
            raise ValueError(f"invalid events: {events!r}")
        fd = _fd_of(fileobj)
        if fd in self.keys:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        self.engine.watch(fd, events, True)
        key = self.keys[fd] = selectors.SelectorKey(fileobj, fd, events, data)
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        key = self._map[fileobj]
        del self.keys[key.fd]
        self.engine.unwatch(key.fd)
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = self._map[fileobj]
        if events != key.events:
            if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
                raise ValueError(f"invalid events: {events!r}")
            self.engine.watch(key.fd, events, False)
        if events != key.events or data is not key.data:
            key = self.keys[key.fd] = key._replace(events=events, data=data)
        return key

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout < 0:
            timeout = 0.0
        keys = self.keys
        ready = []
        for fd, mask in self.engine.select(timeout):
            key = keys.get(fd)
            if key is not None:
                ready.append((key, mask & key.events))
        return ready

    def close(self) -> None:
        for fd in list(self.keys):
            self.engine.unwatch(fd)
        self.keys.clear()

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The pooler's event loop: asyncio's, on an :class:`EngineSelector` when the engine is
    built (a plain one otherwise)."""
    if _fastpath is None:
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(EngineSelector())


class FastPath:
    """One per pooler process: the engine and its registration with the event loop."""

    def __init__(self, pooler: Pooler, loop: asyncio.AbstractEventLoop) -> None:
        assert _fastpath is not None
        self.pooler = pooler
        self.loop = loop
        selector = getattr(loop, "_selector", None)
        # One pooler per engine: its login routes and cancel keys are that pooler's. A second
        # pooler on the same loop gets an engine of its own, watched with add_reader.
        self._selector = selector if isinstance(selector, EngineSelector) \
            and selector.engine_user is None else None
        self._watched_by_loop = self._selector is None
        if self._selector is not None:
            self._selector.engine_user = self
            self.engine = self._selector.engine
            self.engine.bind(loop.call_soon, self._callback_failed)
        else:
            self.engine = _fastpath.Engine(loop.call_soon, self._callback_failed)
            loop.add_reader(self.engine.fileno(), self.engine.run)
        # Engine logins (LoginRoute): the routes, by StartupMessage, live in this dict.
        self.routes: dict[bytes, tuple[Any, ...]] = {}
        self._drain_timer: asyncio.TimerHandle | None = None
        self.configure_logins()
        self.client_count_changed()
        self._params_ids: dict[tuple[object, ...], int] = {}
        self._last_params_id = 0
        self._settled: list[ClientConnection] = []  # taken back by settle(), for refill()
        # TLS in the engine (engine/tls.c): contexts for clients and for servers; None:
        # that side's TLS (if any) stays on asyncio's SSL transport.
        self.client_tls: Any = None
        self.server_tls: Any = None
        self._tls_on = pooler.config.fast_path_tls  # read at start, as fast_path
        self.configure_tls(pooler.config)

    def configure_tls(self, config: Config) -> None:
        """Make the engine's TLS contexts for ``config`` (at start, and at RELOAD); when the
        engine cannot use the files, none: TLS stays with Python's contexts (tls.py)."""
        # Login routes (engine logins) serve TLS clients too; never one in clear text when
        # TLS is required (Python refuses those, as it does any client).
        self.engine.client_tls_required = config.client_tls_sslmode in (
            "require", "verify-ca", "verify-full")
        wanted = config.client_tls_sslmode != "disable" or config.server_tls_sslmode != "disable"
        if not self._tls_on or not wanted:
            client = server = None
        elif not tls_available():
            if config.client_tls_sslmode != "disable" or config.server_tls_sslmode not in (
                    "disable", "allow", "prefer"):
                log.info("the fast path was built without OpenSSL: TLS connections stay on "
                         "Python's TLS path (install libssl-dev and rebuild to change that)")
            client = server = None
        else:
            try:
                client, server = engine_tls_contexts(config)
            except OSError as exc:
                # Never the previous contexts: their verification (client certificates
                # required or not, CA, server checks) may be what the new modes no longer
                # allow. TLS goes to Python's path, with the contexts the pooler holds.
                log.error("TLS settings not applied to the fast path (TLS connections stay "
                          "on Python's TLS path): %s", exc)
                client = server = None
        self.client_tls, self.server_tls = client, server
        self.engine.client_tls = client

    async def start_server_tls(self, transport: asyncio.Transport, protocol: asyncio.Protocol,
                               host: str, mode: str) -> Any:
        """After a server's 'S': move its socket into the engine and do the TLS handshake
        there (verify-full: ``host`` must be named by its certificate); then ``protocol``
        gets the engine ``Conn`` (connection_made) and logs in through it. Raises as
        ``loop.start_tls`` would (ssl.SSLCertVerificationError, ssl.SSLError, OSError)."""
        if self.pooler.config.tcp_keepalive:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        waiter = _TLSHandshake(self.loop)
        conn = self._take_socket(transport, waiter, True)
        try:
            conn.start_tls(self.server_tls, host, mode == "verify-full")
            await waiter.done
        except BaseException:
            conn.abort()
            raise
        conn.set_protocol(protocol)
        protocol.connection_made(conn)
        if waiter.early:
            protocol.data_received(bytes(waiter.early))
        return conn

    def start_client_tls(self, client: ClientConnection) -> bool:
        """A client on an engine ``Conn`` whose SSLRequest Python read: answer 'S' and let
        the engine do its handshake. False when the engine has no client TLS."""
        conn: Any = client.transport
        if self.client_tls is None or not is_fast_conn(conn):
            return False
        conn.write(b"S")
        conn.start_tls(self.client_tls)
        return True

    def _take_socket(self, transport: asyncio.BaseTransport, proto: Any, is_server: bool) -> Any:
        """The socket of an asyncio ``transport`` as an engine ``Conn`` (the transport is
        closed, the socket lives on)."""
        sock = transport.get_extra_info("socket")
        if sock is None:
            raise ConnectionError("the connection has no socket to hand to the fast path")
        extra: dict[str, Any] = {name: transport.get_extra_info(name)
                                 for name in ("peername", "sockname")}
        fd = os.dup(sock.fileno())
        transport.pause_reading()  # type: ignore[attr-defined]
        transport.set_protocol(_Detached())
        transport.abort()  # type: ignore[attr-defined]
        try:
            return self.engine.connection(fd, proto, extra, is_server)
        except OSError:
            raise  # epoll refused it (the engine has closed ``fd``)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        self.forget_routes()
        self.engine.claim_all()
        self.drain_log()
        if self._watched_by_loop:
            self.loop.remove_reader(self.engine.fileno())
        elif self._selector is not None and self._selector.engine_user is self:
            self._selector.engine_user = None

    # -- engine logins ------------------------------------------------------------------
    def configure_logins(self) -> None:
        """Tell the engine where its logins' routes and cancel keys live, and whether to log
        its phantoms' logins and departures (log_connections, log_disconnections: only when
        the log would print them). When the log is the CLI's plain files, the engine writes
        those lines itself; otherwise it notes them for ``drain_log``."""
        pooler = self.pooler
        cfg = pooler.config
        shown = log.isEnabledFor(logging.INFO)
        logins, leaves = cfg.log_connections and shown, cfg.log_disconnections and shown
        target = direct_target(log, logging.INFO) if logins or leaves else None
        fds, head = target if target is not None else ([], b"")
        self.engine.log_to(tuple(fds), head)
        pid_base, pid_mask, key_bits = pooler.cancel_pid_layout()
        self.engine.configure_logins(self.routes, pooler.cancel_keys, pid_base, pid_mask,
                                     pooler.client_ids, logins, leaves, self._drain_later,
                                     key_bits)

    def _drain_later(self) -> None:
        # The engine's first event since the last drain: the log gets it, and whatever
        # follows meanwhile, a moment later, in one go (a turn of the event loop per
        # connection would cost more than the log lines).
        if self._drain_timer is None:
            self._drain_timer = self.loop.call_later(LOG_BATCH_DELAY, self.drain_log)

    def drain_log(self) -> None:
        """Log what the engine noted of clients it logged in alone, in the words Python uses
        for any client (ClientConnection: "login ok", "closing because: ...")."""
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        lines = []
        for kind, client_id, route, peer in self.engine.take_log_events():
            host, port = (peer[0], peer[1]) if isinstance(peer, tuple) else ("unix", 0)
            lines.append(f"C-{client_id}({route.database}/{route.user}@{host}:{port}) "
                         + ("login ok" if kind == LOGGED_IN
                            else "closing because: client closed the connection"))
        log_lines(log, logging.INFO, lines)

    def offer_route(self, client: ClientConnection, packet: bytes,
                    secret: ScramSecret | str, welcome: bytes) -> None:
        """``client`` has just logged in through Python after the engine checked its SCRAM
        proof against ``secret`` (a str: no password was asked, auth_type trust): let the
        engine log in later clients that send the same StartupMessage alone (LoginRoute), if
        nothing about such a client needs Python before its first hand-back."""
        pool = client.pool
        conn: Any = client.transport
        if pool is None or len(self.routes) >= MAX_ROUTES or packet in self.routes \
                or not routes_allowed(self.pooler, client) or pool.lane is None \
                or not pool.lane.usable or not is_fast_conn(conn) or not conn.fast:
            return
        route = LoginRoute(self.pooler, pool, client, type(client))
        scram: tuple[Any, ...] = (None, None, None, 0)
        if isinstance(secret, ScramSecret):
            scram = (secret.stored_key, secret.server_key, scram_salt_b64(secret.salt),
                     secret.iterations)
        self.routes[packet] = (route, pool.lane.fp, pool.lane.client_params_id(client),
                               *scram, welcome)

    def forget_routes(self) -> None:
        """After anything that may change where a StartupMessage leads or how it is welcomed
        (RELOAD, an admin command, shutdown): the next login of each kind goes through Python
        again and makes a new route."""
        self.routes.clear()

    def claim_all(self) -> None:
        """Every client the engine logged in alone gets its Python object now."""
        if self.engine.phantoms:
            self.engine.claim_all()

    def client_count_changed(self) -> None:
        """max_client_conn holds for the clients Python knows and the engine's phantoms
        together: the engine may take in as many as are left."""
        self.engine.phantom_cap = self.pooler.client_limit() - self.pooler.client_count()

    def _callback_failed(self, exc: BaseException) -> None:
        log.error("fast path callback failed", exc_info=exc)

    def params_ids_known(self) -> dict[tuple[object, ...], int]:
        """The params ids given out so far, by their key (application_name is item 5)."""
        return self._params_ids

    def params_id(self, params: dict[str, str], settings: dict[str, str] | None = None) -> int:
        """A small number per distinct set of the tracked parameter values and session
        settings (session.py) a pair must share for the engine to link it without a SET
        (attach())."""
        get = params.get
        key: tuple[object, ...] = (
            get("client_encoding"), get("DateStyle"), get("TimeZone"), get("IntervalStyle"),
            get("standard_conforming_strings"), get("application_name"))
        if settings:
            key += (tuple(sorted(settings.items())),)
        ids = self._params_ids
        found = ids.get(key)
        if found is None:
            if len(ids) >= MAX_PARAMS_IDS:
                # Per-request settings (SET app.request_id = ...) must not grow this without
                # bound. Ids are never reused, so a forgotten set only costs a SET on a server
                # that still carries its old id.
                ids.clear()
            self._last_params_id += 1
            found = ids[key] = self._last_params_id
        return found

    def adopt(self, proto: ClientConnection | ServerConnection, is_server: bool) -> bool:
        """Move ``proto``'s socket from its asyncio transport into the engine."""
        transport = proto.transport
        if transport is None or is_fast_conn(transport) or transport.is_closing():
            return False
        if transport.get_extra_info("ssl_object") is not None:
            return False  # TLS stays with asyncio's SSL transport
        if transport.get_write_buffer_size():
            return False  # bytes still queued there: try again later
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        extra: dict[str, Any] = {name: transport.get_extra_info(name)
                                 for name in ("peername", "sockname")}
        fd = os.dup(sock.fileno())
        transport.pause_reading()
        transport.set_protocol(_Detached())
        transport.abort()  # closes the old descriptor only: the socket lives on in ``fd``
        try:
            conn = self.engine.connection(fd, proto, extra, is_server)
        except OSError as exc:  # epoll refused it (the engine has closed ``fd``)
            log.warning("%r could not move to the fast path: %s", proto, exc)
            proto.transport = None
            proto.connection_lost(exc)
            return False
        except BaseException:
            os.close(fd)
            raise
        proto.transport = conn
        return True

    def balance(self, worker: WorkerIdentity, listeners: list[asyncio.AbstractServer]) -> None:
        """workers = N: balance TCP clients with the sibling workers
        (engine/balance.c). Clients handed to this worker are served as the first of ``listeners``
        the engine serves would serve them; with none (client TLS), they are closed, and
        siblings hand none here."""
        balance = worker.balance
        if balance is None:
            return
        engine_listener = next((listener._conn for listener in listeners
                                if isinstance(listener, Listener) and listener.is_serving()),
                               None)
        send_fds = tuple(sock.fileno() for sock in balance.send_ends)
        # The engine owns the duplicate (and closes it, whatever happens).
        self.engine.balance(balance.counters, worker.index, send_fds,
                            os.dup(balance.receive_ends[worker.index].fileno()), engine_listener)

    def listen(self, sock: socket.socket, new_client: Callable[[], ClientConnection],
               keepalive: bool, defer_accept: bool = False) -> Listener:
        """Accept clients on ``sock`` (bound and listening) in the engine; ``defer_accept``:
        TCP_DEFER_ACCEPT is set on it."""
        return Listener(self, sock, new_client, keepalive, defer_accept)

    # -- a consistent Python view -------------------------------------------------------
    def settle(self, everyone: bool = False, claim: bool = True) -> None:
        """Bring back to Python what its view lacks: the pairs the engine has linked, the
        clients it queues, its idle servers; and fold in the counters.

        A client idle in the engine (no server, nothing owed) stays there: Python's view of
        it is already exact, and with thousands of idle clients taking each one back and
        forth would stall every SHOW and /metrics scrape. ``everyone`` (shutdown) takes
        those back too. Clients the engine logged in alone get their Python objects first
        (once: they are ordinary clients after that), unless ``claim`` is False: for readers
        that only count clients (SHOW POOLS, /metrics), which add the engine's counts of
        those still idle in it (``FastPool.phantoms``); the linked and the queued ones are
        claimed as they are taken back.
        """
        if claim or everyone:
            self.claim_all()
        for pool in list(self.pooler.pools.values()):
            lane = pool.lane
            if lane is None:
                continue
            if everyone:
                lane.take_back_clients()
            else:
                while lane.fp.eject_waiter():
                    pass
                # Linked pairs, found from their servers: a pool has few of those.
                for server in pool.all_servers():
                    conn: Any = server.transport
                    if is_fast_conn(conn) and conn.fast:
                        client = conn.peer
                        # (False: mid-way through a streamed Bind, it comes at its end.)
                        if client is not None and conn.eject():
                            self._settled.append(client)
            lane.recall(0.0)
            lane.fold_stats()

    def refill(self) -> None:
        """Let settled pairs go back to the fast path."""
        for pool in list(self.pooler.pools.values()):
            if pool.lane is None:
                continue
            for server in list(pool.idle):
                if pool.waiting:
                    break
                pool.idle.remove(server)
                server.in_idle = False
                if not pool.lane.take_server(server):
                    server.in_idle = True
                    pool.idle.append(server)
        # Clients taken back re-enter on their own after their transaction (_detach); one
        # that was quiet when taken back would otherwise wait for its next request.
        settled, self._settled = self._settled, []
        for client in settled:
            client.enter_fast()


# Login routes kept at most: one per distinct StartupMessage (per application_name, say).
MAX_ROUTES = 256
LOGGED_IN = 0  # take_log_events() kinds; 1: left
# How long the log lines of engine logins may wait, to be written a batch at a time.
LOG_BATCH_DELAY = 0.02


def routes_allowed(pooler: Pooler, client: ClientConnection) -> bool:
    """May clients like ``client`` be logged in by the engine alone? Not when the pooler has
    to see each login or each client on its own: connection logging, per-client timeouts,
    client limits per database or user, host-based rules, the address in application_name."""
    cfg = pooler.config
    if pooler.stopping or client.is_admin \
            or cfg.application_name_add_host or cfg.auth_hba_file \
            or cfg.client_idle_timeout or cfg.idle_transaction_timeout or cfg.query_timeout \
            or cfg.max_db_client_connections or cfg.max_user_client_connections:
        return False
    db = cfg.database_for(client.database)
    if db is None or db.max_db_client_connections:
        return False
    router = pooler.routers.get(client.database) if pooler.routers else None
    if router is not None and router.startup_settings(client):
        return False  # pgpilot.route / pgpilot.min_lsn at connect: each login is Python's
    user = cfg.users.get(client.user) if cfg.users else None
    return user is None or not (user.max_user_client_connections or user.client_idle_timeout
                                or user.idle_transaction_timeout or user.query_timeout)


class LoginRoute:
    """Where one exact StartupMessage leads, learnt from a client Python logged in with it.

    The engine logs in later clients that send the same bytes by itself
    (``engine/logins.c``): the same SCRAM secret, the same pool and parameters, the same
    welcome, a cancel key of its own. Such a client has no Python object until Python has to see it;
    then the engine calls :meth:`materialize` (logged in) or :meth:`claim_login` (its SCRAM
    exchange still under way)."""

    __slots__ = ("application_name", "client_type", "database", "params", "pool", "pooler",
                 "user")

    def __init__(self, pooler: Pooler, pool: Pool, client: ClientConnection,
                 client_type: type[ClientConnection]) -> None:
        self.pooler = pooler
        self.pool = pool
        self.client_type = client_type
        self.user = client.user
        self.database = client.database
        self.application_name = client.application_name
        # As welcomed (the server's values filled in); a client claimed during its login
        # starts with them too: its welcome fills in nothing more, so it ends the same.
        self.params = dict(client.params)

    def materialize(self, conn: Any, pid: int, key: int, accepted: float,
                    client_id: int) -> ClientConnection:
        """``client_id``: the id the engine gave it in the log (0: none)."""
        return self.client_type.engine_claimed(self, conn, accepted, (pid, key), client_id)

    def claim_login(self, conn: Any, accepted: float) -> ClientConnection:
        return self.client_type.engine_claimed(self, conn, accepted, None)


class Listener(asyncio.AbstractServer):
    """A listening socket served by the engine: it accepts, and makes each client's ``Conn``
    and protocol, with no asyncio transport in between. Looks like the asyncio server it
    replaces to the rest of the pooler (``sockets``, ``close``, ``wait_closed``)."""

    # As asyncio's accept_retry_delay: after EMFILE and the like, try again in a second.
    ACCEPT_RETRY_DELAY = 1.0

    def __init__(self, fast: FastPath, sock: socket.socket,
                 new_client: Callable[[], ClientConnection], keepalive: bool,
                 defer_accept: bool = False) -> None:
        self.fast = fast
        self.sock = sock
        self.new_client = new_client
        self._closed = asyncio.Event()
        # The engine owns a duplicate; ``sock`` stays open for getsockname() until close().
        # With TCP_DEFER_ACCEPT a client's first packet is in when it is accepted: the engine
        # reads it then, without waiting for epoll to say so.
        self._conn = fast.engine.listen(os.dup(sock.fileno()), self, keepalive, defer_accept)

    def defer_accept_changed(self, on: bool) -> None:
        """TCP_DEFER_ACCEPT was set on (or taken off) the listening socket."""
        if not self._closed.is_set():
            self._conn.set_read_at_accept(on)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed.is_set() else (self.sock,)

    def claim(self, conn: Any, accepted: float) -> ClientConnection:
        """A client accepted with no Python object (LoginRoute) needs one before its
        StartupMessage was read (it has no route, or the pooler wants to see it)."""
        client = self.new_client()
        client.accepted_by_engine(conn, accepted)
        return client

    def accept_failed(self, err: int) -> None:
        log.error("accept failed: %s; retrying in %.0f s", os.strerror(err),
                  self.ACCEPT_RETRY_DELAY)
        self.fast.loop.call_later(self.ACCEPT_RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        if not self._closed.is_set():
            self._conn.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        # After close() or detach(): the engine closed its copy of the socket. Otherwise
        # epoll reported the listening socket broken, and it is gone.
        if not self._closed.is_set():
            log.error("listening socket %s failed: no more clients are accepted on it",
                      self.sock.getsockname())
            self.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._conn.close()
        self.sock.close()

    def detach(self) -> socket.socket:
        """Stop accepting here and give the listening socket (still open) to the caller."""
        self._closed.set()
        self._conn.close()
        return self.sock

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.fast.loop

    def is_serving(self) -> bool:
        return not self._closed.is_set()

    async def start_serving(self) -> None:
        pass  # serving from the start

    async def serve_forever(self) -> None:
        await self._closed.wait()

    async def wait_closed(self) -> None:
        await self._closed.wait()


class Lane:
    """One pool's side of the fast path: the C pool and the callbacks it makes."""

    def __init__(self, fast: FastPath, pool: Pool, wait_buckets: tuple[float, ...]) -> None:
        """``wait_buckets``: the upper bounds of the pool's wait histogram (pool.py's), which
        the engine fills for the clients it serves."""
        assert _fastpath is not None
        self.fast = fast
        self.pool = pool
        self.fp = fast.engine.pool(self, wait_buckets)
        # A new pool can open servers: the engine asks (starved) for its first waiting
        # client, before any update_assist (else that client waited for a busy server).
        self.fp.assist = 1
        self.configure()
        # False once a server turned out to need TLS (server_tls_sslmode): those stay on
        # asyncio's SSL transport, so this pool's clients stay with Python too.
        self.usable = True

    def configure(self) -> None:
        """Settings the engine applies itself (again after RELOAD)."""
        pool = self.pool
        cfg = pool.pooler.config
        self.fp.statement_mode = int(pool.mode == "statement")
        checked = bool(cfg.server_check_query) and cfg.server_check_delay >= 0
        self.fp.check_after = cfg.server_check_delay if checked else -1.0
        self.fp.qs_on = int(cfg.query_stats)  # time each statement (stats.py)
        # N+1 at the wire (wire_nplusone.py): counted per burst by the engine
        threshold = cfg.nplusone_threshold if cfg.query_stats else 0
        self.fp.burst_threshold = threshold if threshold >= 2 else 0
        self.fp.burst_window = cfg.nplusone_window

    def give_up(self) -> None:
        """This pool's servers cannot go on the engine: everything goes back to Python."""
        self.usable = False
        self.take_back_clients()
        self.recall(0.0)

    def take_back_clients(self) -> None:
        """Every client the engine holds (queued, linked or idle) goes back to Python."""
        if not self.usable:
            self.fast.forget_routes()  # no more clients for this pool's engine side
        self.fast.claim_all()
        while self.fp.eject_waiter():
            pass
        for client in list(self.pool.clients):
            transport = client.transport
            if is_fast_conn(transport) and transport.fast:  # type: ignore[union-attr]
                transport.eject()  # type: ignore[union-attr]

    # -- Python -> engine ------------------------------------------------------------------
    def take_server(self, server: ServerConnection) -> bool:
        """Give a clean server to the engine (idle there, or straight to a waiting client)."""
        pool = self.pool
        if pool.paused or pool.mode == "session" or server.close_needed \
                or server.cancels_pending or pool.pooler.stopping:
            return False  # PAUSE and shutdown close idle servers from Python's list
        conn = server.transport
        if conn is not None and not is_fast_conn(conn) \
                and conn.get_extra_info("ssl_object") is not None:
            self.give_up()
            return False
        if not self.usable:
            return False
        if not is_fast_conn(conn) and not self.fast.adopt(server, True):
            # Lost while moving (it is closed now): nothing more to do with it.
            return server.transport is None
        conn = server.transport
        server.in_engine = True
        server.last_used = time.monotonic()
        if server.state is not ServerState.IDLE:
            server.set_state(ServerState.IDLE)
        expires = server.created_at + self.pool.lifetime
        return bool(conn.set_fast(self.fp,  # type: ignore[union-attr]
                                  self.fast.params_id(server.params, server.settings),
                                  expires, server.prepared))

    def client_params_id(self, client: ClientConnection) -> int:
        return self.fast.params_id(client.params, client.settings)

    def recall(self, idle_for: float) -> None:
        """Servers idle in the engine for ``idle_for`` seconds come back to the idle list."""
        pool = self.pool
        for server, idle_since in self.fp.recall_idle(idle_for):
            server.in_engine = False
            if server.state is ServerState.CLOSED:
                continue
            server.last_used = idle_since or server.last_used
            server.in_idle = True
            pool.idle.append(server)
        self.update_assist()

    def fold_stats(self) -> None:
        """Add the engine's counters to the pool's (SHOW STATS, /metrics)."""
        got = self.fp.take_stats()
        st = self.pool.stats
        st.xact_count += got["xact_count"]
        st.query_count += got["query_count"]
        st.errors += got["errors"]
        st.bytes_received += got["bytes_received"]
        st.bytes_sent += got["bytes_sent"]
        st.server_assignment_count += got["server_assignment_count"]
        st.xact_time += got["xact_time"]
        st.query_time += got["query_time"]
        st.wait_time += got["wait_time"]
        for i, count in enumerate(got["buckets"]):
            st.wait_buckets[i] += count

    def update_assist(self) -> None:
        """The engine asks for help (starved) only when Python can give some."""
        pool = self.pool
        self.fp.assist = int(bool(pool.idle) or pool.can_open())

    def waiting_count(self) -> int:
        return int(self.fp.counts[1])

    # -- engine -> Python ------------------------------------------------------------------
    def ejected(self, client: ClientConnection, server: ServerConnection | None, how: int,
                expected_rfq: int, unsynced: int, txn: str, query_started: float,
                xact_started: float, idle_in_txn_since: float, client_bytes: bytes,
                server_bytes: bytes, owed: bytes | None,
                owed_names: tuple[str | None, ...], passed: int = 0,
                inflight: tuple[Any, ...] | None = None) -> None:
        """The engine hands a client (and its server) back, with their exact state; ``owed``
        names, one letter per request, the answers the server still owes for what the engine
        forwarded (None if it lost count, ``b"!"`` if an error came back before the client's
        Sync: the server skips what comes until then); ``owed_names`` the client's statement
        names of the ones it renamed (``b``, ``d``), in order; ``passed``: what the
        engine passed the client that makes an error of ours on losing the server one too many
        (PASSED_FATAL: its server's FATAL, after which it closes; PASSED_RESULT: a result of
        the request in flight, whose ReadyForQuery has not come);
        ``inflight``: the statements the engine timed that still await their answer
        (stats.ClientQueries.handed_back), None if it timed none or lost count."""
        closing = client.closing or client.gone
        if server is not None:
            server.in_engine = False
        if how == EJECT_LINKED and server is not None and server.state is ServerState.CLOSED:
            # Python closed this server while the engine had it linked (its close is what
            # took the pair back): the client lost its server mid-transaction.
            client.server = server
            client.server_lost(server, server.closed_reason or "server connection closed")
            return
        if how == EJECT_LINKED and server is not None:
            if client.pooler.config.query_stats:  # the engine timed what it forwarded
                queries = client.queries or client_queries(client)
                if queries is not None:
                    queries.handed_back(expected_rfq, inflight)
            client.server = server
            server.client = client
            server.synced_for = client.params
            server.synced_version = client.params_version
            server.link_time = time.monotonic()
            if server.state is not ServerState.ACTIVE:
                server.set_state(ServerState.ACTIVE)
            client.expected_rfq = expected_rfq
            client.unsynced = bool(unsynced)
            if passed & PASSED_FATAL:
                client._server_fatal = True  # server_lost closes it without a second error
            if passed & PASSED_RESULT:
                client._result_passed = True  # (likewise, until the ReadyForQuery comes)
            client.txn_status = server.txn_status = txn
            client.query_started = query_started
            client.xact_started = xact_started
            client.idle_in_txn_since = idle_in_txn_since
            router = client.router
            if router is not None and owed == b"!":
                router.skipping = True  # an error came back, the client's Sync has not
            elif router is not None and owed:
                # The router takes over mid-pipeline: it must know what comes back first.
                # ('b', 'd': renamed by the engine, with the client's name of the statement.)
                names = iter(owed_names)
                statements = router.statements
                for kind in owed:
                    client_name = next(names, None) if kind in _RENAMED else None
                    stmt = statements.get(client_name) if client_name is not None else None
                    router.outstanding.append(
                        (_OWED_KIND[kind], stmt.server_name if stmt is not None else None,
                         client_name))
            if server.closed_reason:
                client._pending += client_bytes
            elif client_bytes and not closing:
                client.data_received(client_bytes)
            if server_bytes and server.state is not ServerState.CLOSED:
                server.data_received(server_bytes)
            return
        if how == EJECT_ATTACH and server is not None:
            if closing or server.closed_reason:
                if not server.closed_reason:
                    self.pool.give_out(server)
                return
            client._pending += client_bytes
            client.wait_started = time.monotonic()
            client.attach(server)
            return
        if client_bytes and not closing:
            client.data_received(client_bytes)

    def server_returned(self, server: ServerConnection, data: bytes,
                        idle_since: float) -> None:
        """A server the engine will not keep: it is Python's again (and idle). One that sat
        idle past server_check_delay gets its check first (Pool.hand_to_lane)."""
        server.in_engine = False
        if server.closed_reason or server.state is ServerState.CLOSED:
            return
        if data:
            server.data_received(data)  # an idle server's notice, or its last error
            if server.state is not ServerState.IDLE:
                return  # it closed
        # Idle in the engine since then, or (0) given back as it was released: just used.
        server.last_used = idle_since or time.monotonic()
        self.pool.hand_to_lane(server)

    def starved(self) -> None:
        """Clients wait in the engine and no server is idle there."""
        pool = self.pool
        pool.python_demand = False  # released servers go to the engine again
        for _ in range(len(pool.idle)):
            if not self.fp.counts[1] or pool.paused:
                break
            server = pool.take_python_idle()
            if server is None:
                break
            pool.hand_to_lane(server)
        pool.launch_if_needed()
        self.update_assist()


def fast_client_overdue(client: ClientConnection, now: float, idle_limit: float,
                        txn_limit: float, query_limit: float) -> bool:
    """Would one of the client timeouts fire, by the engine's own clock of this client?"""
    linked, waiting, expected, _txn, query_started, idle_in_txn, last_activity, _ws = \
        client.transport.fast_state  # type: ignore[union-attr]
    if waiting:
        return False
    if not linked:
        return bool(idle_limit and now - last_activity > idle_limit)
    if txn_limit and idle_in_txn and expected <= 0 and now - idle_in_txn > txn_limit:
        return True
    return bool(query_limit and expected > 0 and query_started
                and now - query_started > query_limit)


__all__ = ["FastPath", "Lane", "Listener", "available", "fast_client_overdue", "is_fast_conn"]
