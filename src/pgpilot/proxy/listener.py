"""Accepting clients: TCP and unix-socket listeners, and the TLS upgrade after SSLRequest.

Each accepted connection becomes a :class:`ClientConnection`, which handles the startup packet
itself (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage); cancel requests are routed by
the pooler to the one server the named client is using.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING

from pgpilot.proxy.client import ClientConnection
from pgpilot.proxy.workers import cancel_socket_path

if TYPE_CHECKING:
    from pgpilot.proxy.pooler import Pooler

log = logging.getLogger("pgpilot.proxy")


async def start_listeners(pooler: Pooler) -> list[asyncio.AbstractServer]:
    cfg = pooler.config
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []

    def factory() -> ClientConnection:
        return ClientConnection(pooler)

    for addr in cfg.listen_addresses:
        host: str | None = None if addr == "*" else addr
        server = await loop.create_server(
            factory, host=host, port=cfg.listen_port, backlog=cfg.listen_backlog,
            reuse_address=True, reuse_port=cfg.so_reuseport or cfg.workers > 1)
        for sock in server.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        servers.append(server)
        log.info("listening on %s:%d", addr, cfg.listen_port)
    worker = pooler.worker
    if worker is not None:
        if worker.unix_socket is not None:
            servers.append(await loop.create_unix_server(factory, sock=worker.unix_socket))
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
            server = await loop.create_unix_server(factory, path=path, backlog=cfg.listen_backlog)
            os.chmod(path, cfg.unix_socket_mode)
            servers.append(server)
            log.info("listening on unix:%s", path)
        except OSError as exc:
            log.warning("could not listen on unix socket %s: %s", path, exc)
    if not servers:
        raise OSError("no listening socket: set listen_addr or unix_socket_dir")
    return servers


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
        client.close()
        return
    if new_transport is None or client.gone:
        client.close()
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
