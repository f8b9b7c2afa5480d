"""Accepting clients: TCP and unix-socket listeners, and the TLS upgrade after SSLRequest.

Each accepted connection becomes a :class:`ClientConnection`, which handles the startup packet
itself (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage); cancel requests are routed by
the pooler to the one server the named client is using.

With the compiled fast path and no client TLS, the TCP sockets are served by the fast path's
engine (:class:`pgpilot.proxy.fastpath.Listener`): a client then never gets an asyncio
transport, which makes a new connection much cheaper (``pgbench -C``). With client TLS the
asyncio servers stay, since the TLS upgrade needs an asyncio transport.

With ``workers = N``, only the engine's TCP listeners balance clients between the workers (a
worker holding more than its share hands a new client to a sibling: workers.py,
``engine/balance.c``); the unix socket and asyncio's servers keep the kernel's choice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import sys
from asyncio.trsock import TransportSocket
from typing import TYPE_CHECKING, Any

from pgpilot.proxy.client import ClientConnection
from pgpilot.proxy.workers import cancel_socket_path

if TYPE_CHECKING:
    from pgpilot.proxy.pooler import Pooler

log = logging.getLogger("pgpilot.proxy")

# PgBouncer's value when tcp_defer_accept is on: a connection that sends nothing for this long
# is handed over anyway (its client_login_timeout counts from then).
DEFER_ACCEPT_SECONDS = 45


def address_text(address: tuple[str, int] | str, port: int | None = None) -> str:
    """``host:port`` as a person writes it: ``127.0.0.1:6432``, ``[::1]:6432``; a unix
    socket's path as ``unix:PATH``. ``address`` is a (host, port) pair, or a host and
    ``port``, or a path."""
    if isinstance(address, tuple):
        host, port = address[0], int(address[1])
    else:
        host = address
    if port is None:
        return f"unix:{host}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# The clients' unix socket file outlives the listener that closes it: from Python 3.13 asyncio
# (and uvloop) unlink it at close by default, which at an online restart (takeover.py) removed
# the file the new process serves, and with workers = N the file all the workers share.
KEEP_SOCKET_FILE: dict[str, Any] = {"cleanup_socket": False} if sys.version_info >= (3, 13) \
    else {}


async def start_listeners(pooler: Pooler) -> list[asyncio.AbstractServer]:
    cfg = pooler.config
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []

    factory = functools.partial(ClientConnection, pooler)
    if pooler.inherited_sockets:
        return await _serve_inherited(pooler, pooler.inherited_sockets)
    reuse_port = cfg.so_reuseport or cfg.workers > 1
    for addr in cfg.listen_addresses:
        host: str | None = None if addr == "*" else addr
        # Client TLS is served by the engine's listener when the engine has it (fastpath.py,
        # engine/tls.c); otherwise by asyncio's, with Python's ssl.
        if pooler.fast is not None and (pooler.ssl_context is None
                                        or pooler.fast.client_tls is not None):
            for sock in await bind_tcp(host, cfg.listen_port, cfg.listen_backlog, reuse_port):
                deferred = tune_accept(sock, cfg.tcp_defer_accept)
                servers.append(pooler.fast.listen(sock, factory, cfg.tcp_keepalive, deferred))
            log.info("listening on %s", address_text(addr, cfg.listen_port))
            continue
        server = await loop.create_server(
            factory, host=host, port=cfg.listen_port, backlog=cfg.listen_backlog,
            reuse_address=True, reuse_port=reuse_port)
        for sock in server.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tune_accept(sock, cfg.tcp_defer_accept)
        servers.append(server)
        log.info("listening on %s", address_text(addr, cfg.listen_port))
    worker = pooler.worker
    if worker is not None:
        if worker.unix_socket is not None:
            servers.append(await loop.create_unix_server(factory, sock=worker.unix_socket,
                                                         **KEEP_SOCKET_FILE))
        # Cancel requests other workers pass on to this one.
        cancel_path = cancel_socket_path(worker.run_dir, worker.index)
        if os.path.exists(cancel_path):
            os.unlink(cancel_path)
        servers.append(await loop.create_unix_server(factory, path=cancel_path))
        os.chmod(cancel_path, 0o600)
    elif cfg.unix_socket_dir:
        path = os.path.join(cfg.unix_socket_dir, f".s.PGSQL.{cfg.listen_port}")
        try:
            if os.path.exists(path):
                os.unlink(path)
            server = await loop.create_unix_server(factory, path=path, backlog=cfg.listen_backlog,
                                                   **KEEP_SOCKET_FILE)
            os.chmod(path, cfg.unix_socket_mode)
            servers.append(server)
            log.info("listening on unix:%s", path)
        except OSError as exc:
            log.warning("could not listen on unix socket %s: %s", path, exc)
    if not servers:
        raise OSError("no listening socket: set listen_addr or unix_socket_dir")
    return servers


async def _serve_inherited(pooler: Pooler,
                           sockets: list[socket.socket]) -> list[asyncio.AbstractServer]:
    """Serve listening sockets taken over from the pooler this one replaces (takeover.py):
    the same addresses, whatever listen_addr says now (a change needs a full restart)."""
    loop = asyncio.get_running_loop()
    factory = functools.partial(ClientConnection, pooler)
    cfg = pooler.config
    servers: list[asyncio.AbstractServer] = []
    for sock in sockets:
        if sock.family == socket.AF_UNIX:
            servers.append(await loop.create_unix_server(factory, sock=sock,
                                                         **KEEP_SOCKET_FILE))
            log.info("listening on unix:%s (taken over)", sock.getsockname())
            continue
        deferred = tune_accept(sock, cfg.tcp_defer_accept)
        if pooler.fast is not None and (pooler.ssl_context is None
                                        or pooler.fast.client_tls is not None):
            servers.append(pooler.fast.listen(sock, factory, cfg.tcp_keepalive, deferred))
        else:
            servers.append(await loop.create_server(factory, sock=sock))
        log.info("listening on %s (taken over)", address_text(sock.getsockname()))
    return servers


def tune_accept(sock: socket.socket | TransportSocket, on: bool) -> bool:
    """Set (or clear) TCP_DEFER_ACCEPT on a listening TCP socket, as PgBouncer's
    tcp_defer_accept does: the kernel hands over a connection once its first packet (the
    SSLRequest or StartupMessage) is in, so accepting it and reading it take one wake-up, not
    two. Returns whether it is on now; where the system has no such option, nothing is set."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, DEFER_ACCEPT_SECONDS if on else 0)
    except OSError as exc:
        log.warning("could not %s TCP_DEFER_ACCEPT: %s", "set" if on else "clear", exc)
        return False
    return on


def tune_listeners(listeners: list[asyncio.AbstractServer], on: bool) -> None:
    """tcp_defer_accept changed at a reload: apply it to every listening TCP socket."""
    from pgpilot.proxy.fastpath import Listener

    for listener in listeners:
        if not isinstance(listener, asyncio.Server | Listener):
            continue
        for sock in listener.sockets:
            deferred = tune_accept(sock, on)
            if isinstance(listener, Listener):
                listener.defer_accept_changed(deferred)


async def serve_socket(pooler: Pooler, sock: socket.socket) -> asyncio.AbstractServer:
    """An asyncio server on a listening socket the fast path's engine served until now."""
    return await asyncio.get_running_loop().create_server(
        functools.partial(ClientConnection, pooler), sock=sock)


async def bind_tcp(host: str | None, port: int, backlog: int,
                   reuse_port: bool) -> list[socket.socket]:
    """Listening TCP sockets for ``host`` (None: every interface), as loop.create_server
    binds them: one per address family, IPv6 sockets IPv6-only, non-blocking."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=socket.AF_UNSPEC,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _name, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address "
                              f"{address!r}: {exc.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _HeldDuringHandshake(asyncio.Protocol):
    """Takes what arrives over TLS until the client's protocol is switched to the new
    transport, so nothing it answers can go out on the old, clear-text one."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = False
        self.error: Exception | None = None

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc


async def upgrade_client_tls(pooler: Pooler, client: ClientConnection) -> None:
    """Answer 'S' to an SSLRequest and switch the client's transport to TLS."""
    transport = client.transport
    context = pooler.ssl_context
    if transport is None or context is None:
        return
    client.pause_reading()
    transport.write(b"S")
    loop = asyncio.get_running_loop()
    held = _HeldDuringHandshake()
    try:
        new_transport = await loop.start_tls(transport, held, context, server_side=True,
                                             ssl_handshake_timeout=10)
    except (TimeoutError, OSError, ConnectionError) as exc:
        log.warning("%r TLS handshake failed: %s", client, exc)
        client.close("TLS handshake failed")
        return
    if new_transport is None or client.gone:
        client.close("TLS handshake failed")
        return
    client.transport = new_transport  # type: ignore[assignment]
    client.tls = True
    client.restart_startup()
    client._paused = False
    new_transport.set_protocol(client)
    if held.data:
        client.data_received(bytes(held.data))
    if held.lost:
        client.connection_lost(held.error)
