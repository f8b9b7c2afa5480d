"""TLS for both sides of the pooler: the contexts built from the config, and server negotiation.

Client side (``client_tls_*``, PgBouncer's meanings):

* ``disable``: an SSLRequest is answered ``N``; the client goes on in clear text.
* ``allow`` / ``prefer``: an SSLRequest is answered ``S`` and the connection is upgraded; a
  client that does not ask stays in clear text. A client certificate is not validated.
* ``require``: as ``prefer``, but a client that sends its StartupMessage in clear text is
  refused (28000 "SSL required"). Unix-socket clients are exempt, as in PgBouncer.
* ``verify-ca`` / ``verify-full``: as ``require``, and the client must present a certificate
  signed by ``client_tls_ca_file``.

Server side (``server_tls_*``, libpq's meanings): before its StartupMessage a server
connection sends SSLRequest (except in ``disable`` and ``allow`` modes and over unix sockets).
``S`` upgrades the connection; ``N`` continues in clear text unless the mode needs TLS
(``require``, ``verify-ca``, ``verify-full``), in which case the login fails with a message
saying so. ``verify-ca`` checks the server's certificate against ``server_tls_ca_file`` (or the
system's roots); ``verify-full`` also checks that it names the host connected to. ``allow``
starts in clear text and, when PostgreSQL refuses that login, tries once more with TLS
(``Pool._connect``), as libpq does.
``server_tls_cert_file`` / ``server_tls_key_file`` present a client certificate to PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import TYPE_CHECKING, cast

from pgpilot.proxy.config import Config
from pgpilot.wire import messages as m

if TYPE_CHECKING:
    from pgpilot.proxy.fastpath import FastPath

__all__ = [
    "CLIENT_TLS_REQUIRED",
    "SERVER_TLS_REQUIRED",
    "TLSNegotiationError",
    "client_ssl_context",
    "negotiate_server_tls",
    "server_ssl_context",
    "server_tls_settings",
]

CLIENT_TLS_REQUIRED = frozenset({"require", "verify-ca", "verify-full"})
SERVER_TLS_REQUIRED = frozenset({"require", "verify-ca", "verify-full"})
# Server modes that ask for TLS first (``allow`` starts in clear text, as libpq does).
SERVER_TLS_ATTEMPTED = frozenset({"prefer", "require", "verify-ca", "verify-full"})


class TLSNegotiationError(Exception):
    """The SSLRequest exchange with a server failed or TLS was needed and refused."""


def client_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The context for accepting client TLS, or None when ``client_tls_sslmode`` is disable.

    Raises ``ssl.SSLError`` / ``OSError`` when the key, certificate or CA file is unusable.
    """
    mode = config.client_tls_sslmode
    if mode == "disable":
        return None
    if not config.client_tls_cert_file or not config.client_tls_key_file:
        raise ssl.SSLError(f"client_tls_sslmode = {mode} needs client_tls_cert_file and "
                           "client_tls_key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # PgBouncer's "secure" default
    context.load_cert_chain(config.client_tls_cert_file, config.client_tls_key_file)
    if mode in ("verify-ca", "verify-full"):
        if config.client_tls_ca_file:
            context.load_verify_locations(config.client_tls_ca_file)
        else:
            context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        context.verify_mode = ssl.CERT_REQUIRED
    elif config.client_tls_ca_file:
        # As PgBouncer: with a CA file, a certificate the client sends is asked for and
        # verified in every mode, so that auth_type = cert and hba cert rules work with
        # client_tls_sslmode = require; a client without one still gets in.
        context.load_verify_locations(config.client_tls_ca_file)
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The context for TLS to PostgreSQL, or None when ``server_tls_sslmode`` is disable."""
    mode = config.server_tls_sslmode
    if mode == "disable":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode in ("verify-ca", "verify-full"):
        context.check_hostname = mode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
        if config.server_tls_ca_file:
            context.load_verify_locations(config.server_tls_ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.server_tls_cert_file and config.server_tls_key_file:
        context.load_cert_chain(config.server_tls_cert_file, config.server_tls_key_file)
    return context


def server_tls_settings(config: Config) -> tuple[object, ...]:
    """What decides server connections' TLS: a change makes existing servers reconnect."""
    return (config.server_tls_sslmode, config.server_tls_ca_file, config.server_tls_cert_file,
            config.server_tls_key_file)


class _SSLAnswer(asyncio.Protocol):
    """Sends SSLRequest on connect and waits for the server's one-byte answer."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(m.ssl_request())

    def data_received(self, data: bytes) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(TLSNegotiationError(
                "server closed the connection during SSL negotiation"))


async def negotiate_server_tls(
    protocol: asyncio.Protocol, *, host: str, port: int, config: Config,
    context: ssl.SSLContext | None, mode: str | None = None, fast: FastPath | None = None,
) -> asyncio.BaseTransport:
    """Connect to ``host:port``, do the SSLRequest exchange ``server_tls_sslmode`` asks for,
    and hand the (possibly TLS) transport to ``protocol`` (its ``connection_made`` is called).

    ``mode`` overrides ``server_tls_sslmode`` (``allow``'s second attempt asks for TLS).
    ``fast``: the pooler's fast path; when it has a server-side TLS context, the handshake
    and everything after it run in the engine (``FastPath.start_server_tls``) and the
    returned transport is the engine's ``Conn``.
    Raises ``TLSNegotiationError`` (TLS needed but refused, or a broken answer), ``OSError``
    or ``ssl.SSLError`` (handshake or certificate check failed).
    """
    loop = asyncio.get_running_loop()
    mode = mode or config.server_tls_sslmode
    if context is None or mode not in SERVER_TLS_ATTEMPTED:
        transport, _ = await loop.create_connection(lambda: protocol, host, port)
        return transport
    negotiation = _SSLAnswer()
    raw, _ = await loop.create_connection(lambda: negotiation, host, port)
    try:
        answer = await negotiation.answer
        if answer == b"S":
            if fast is not None and fast.server_tls is not None:
                return cast(asyncio.BaseTransport, await fast.start_server_tls(
                    raw, protocol, host, mode))
            tls = await loop.start_tls(
                raw, protocol, context,
                server_hostname=host,  # SNI (never an address), as libpq; checked in verify-full
                ssl_handshake_timeout=config.server_connect_timeout or None)
            if tls is None:
                raise TLSNegotiationError("TLS handshake with the server did not complete")
            protocol.connection_made(tls)
            return tls
        if answer == b"N":
            if mode in SERVER_TLS_REQUIRED:
                raise TLSNegotiationError(
                    f"server {host}:{port} does not support SSL, but server_tls_sslmode = "
                    f"{mode} requires it")
            raw.set_protocol(protocol)
            protocol.connection_made(raw)
            return raw
        if answer[:1] == b"S":
            # Bytes after 'S' before the handshake: someone in between (CVE-2021-23222).
            raise TLSNegotiationError("server sent unencrypted data after its SSL answer")
        raise TLSNegotiationError(
            f"server {host}:{port} gave an invalid answer to the SSL request")
    except BaseException:
        negotiation.answer.cancel()  # a late connection_lost must not leave an unread error
        with contextlib.suppress(Exception):
            raw.close()
        raise
