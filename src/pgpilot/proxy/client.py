"""One client connection: login, then its queries, carried to whichever server it is lent.

States (see :mod:`pgpilot.proxy.states`): LOGIN until authenticated and welcomed; then ACTIVE,
with or without a server; WAITING while its pool finds it one. What the client sends is read
only for message boundaries and the few types that decide pooling (Query, Sync, the extended
protocol's Parse/Bind/Execute, Terminate); the bytes themselves go to the server unchanged.

A server goes back to the pool when the pooling mode allows it (``transaction`` and
``statement``: at ReadyForQuery 'I' with nothing outstanding; ``session``: when the client
leaves), and never with work in flight: a client that leaves mid-query or mid-transaction has
its server rolled back, or cancelled and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from typing import TYPE_CHECKING

from pgpilot.proxy import walsender
from pgpilot.proxy.auth import (
    AuthFailed,
    ClientAuth,
    ScramAuth,
    ScramSecret,
    client_auth_for,
    mock_scram_secret,
    scram_salt_b64,
    scram_secret_for,
)
from pgpilot.proxy.fastpath import is_fast_conn
from pgpilot.proxy.hazards import classify, might_be_hazard
from pgpilot.proxy.login_rules import (
    database_refusal,
    ident_map_allows,
    ident_map_for,
    login_method,
    peer_user_name,
)
from pgpilot.proxy.prepared import (
    DDL_TAG_PREFIXES,
    ClientStatement,
    StatementRouter,
    server_statement_name,
)
from pgpilot.proxy.server import (
    TRACKED_BY_LOWER,
    TRACKED_PARAMS,
    ServerConnection,
    ServerError,
    own_notifier_pid,
)
from pgpilot.proxy.session import (
    ALL,
    DO_BLOCK,
    PARAM,
    PINS,
    UNKNOWN,
    UNLISTED,
    UNPIN_RUN_WORDS,
    UNPIN_WORDS,
    apply_sql,
    bound_setting_name,
    might_change_settings,
    pins_from_rows,
    setting_changes,
    settings_from_rows,
    snapshot_sql,
    sql_literal,
)
from pgpilot.proxy.startup_options import OptionsError, parse_options
from pgpilot.proxy.states import CLIENT_CLOSED, ClientState, ServerState, check_client_move
from pgpilot.proxy.stats import ClientQueries, client_queries
from pgpilot.proxy.tls import CLIENT_TLS_REQUIRED
from pgpilot.wire import messages as m
from pgpilot.wire.errors import ProtocolError
from pgpilot.wire.framing import (
    CancelRequest,
    GSSENCRequest,
    MessageReader,
    SSLRequest,
    StartupMessage,
    StartupReader,
)

# Startup parameters (or ``options`` settings) a database with replicas takes (routing.py).
ROUTING_STARTUP = frozenset({"pgpilot.route", "pgpilot.min_lsn"})

if TYPE_CHECKING:
    from pgpilot.proxy.admin import AdminSession
    from pgpilot.proxy.fastpath import LoginRoute
    from pgpilot.proxy.pool import Pool
    from pgpilot.proxy.pooler import Pooler

log = logging.getLogger("pgpilot.proxy")

F = m.F
# What the pooler reads of a client's traffic.
CLIENT_TYPES = frozenset({F.QUERY, F.SYNC, F.PARSE, F.BIND, F.EXECUTE, F.DESCRIBE, F.CLOSE,
                          F.FLUSH, F.TERMINATE, F.FUNCTION_CALL, F.COPY_DONE, F.COPY_FAIL})
# Messages of the extended protocol that leave work pending until the next Sync.
UNSYNCED_TYPES = frozenset({F.PARSE, F.BIND, F.EXECUTE, F.DESCRIBE, F.CLOSE})
TERMINATE = m.terminate()
AUTH_OK = m.auth_ok()
NO_PASSWORD = "no password"  # a login route's secret when auth_type asks for none (trust)
# Any secret: a ScramAuth made only to word the refusal of a malformed message.
_REFUSAL_SECRET = mock_scram_secret("")
# Functions a FunctionCall may run without changing the session (_note_function_call): the
# large-object ones libpq calls that way (pg_proc oids, fixed since PostgreSQL 9.4).
LARGE_OBJECT_FUNCTIONS = frozenset({715, 952, 953, 954, 955, 956, 957, 958, 964, 1004, 3170,
                                    3171, 3172})
SET_CONFIG_OID = 2078  # set_config(text, text, boolean)
COMPUTED_SETTING = "computed_setting"  # a pin's kind: set_config of a computed name
# Startup parameters every client may send without the pooler rejecting it.
ALWAYS_ACCEPTED = frozenset({"user", "database"})
# Startup parameters that are not settings a session could carry (a walsender connection):
# refused. Any other the pooler does not track is the client's session setting (session.py).
NOT_SETTINGS = frozenset({"replication"})


def names_a_statement(mtype: int, body: bytes) -> bool:
    """Does this Parse, Bind, Describe or Close name a prepared statement (not the unnamed
    one)? Only those may need the statement router's renaming."""
    if mtype == F.PARSE:
        return body[:1] != b"\x00"
    if mtype == F.BIND:
        end = body.find(b"\x00")  # after the portal's name comes the statement's
        return end >= 0 and body[end + 1:end + 2] not in (b"\x00", b"")
    if mtype in (F.DESCRIBE, F.CLOSE):
        return body[:1] == b"S" and body[1:2] not in (b"\x00", b"")
    return False


def set_keepalive(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class ClientConnection(asyncio.Protocol):
    # Slots: with 10,000 mostly idle clients, a per-instance dict (past CPython's shared-key
    # limit) would cost about 1.5 KB each. __weakref__: the hazard tracker holds weak ones.
    __slots__ = (
        "__weakref__",
        "_auth",
        "_auth_known_user",
        "_auth_reader",
        "_cork",
        "_engine_auth",
        "_held",
        "_login_task",
        "_paused",
        "_pending",
        "_reader",
        "_result_passed",
        "_route_packet",
        "_route_secret",
        "_server_fatal",
        "_session_welcome",
        "_startup",
        "addr",
        "admin",
        "application_name",
        "cancel_key",
        "cancel_pid",
        "closing",
        "connect_time",
        "database",
        "expected_rfq",
        "gone",
        "id",
        "idle_in_txn_since",
        "is_admin",
        "last_activity",
        "local_addr",
        "local_port",
        "params",
        "params_version",
        "pin_candidates",
        "pin_check",
        "pins",
        "pool",
        "pooler",
        "port",
        "queries",
        "query_started",
        "replication",
        "request_time",
        "router",
        "server",
        "setting_names",
        "settings",
        "settings_dirty",
        "settling",
        "startup_options",
        "startup_settings",
        "state",
        "tls",
        "transport",
        "txn_status",
        "unknown_setting",
        "unsynced",
        "user",
        "wait_started",  # hazards keeps weak references
        "xact_started",
    )

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self.id = pooler.next_client_id()
        self.state = ClientState.LOGIN
        self.transport: asyncio.Transport | None = None
        self.addr = ""
        self.port = 0
        self.local_addr = ""
        self.local_port = 0
        self.user = ""
        self.database = ""
        self.application_name = ""
        self.params: dict[str, str] = {}  # tracked parameters, canonical names
        self.params_version = 0  # bumped when a tracked parameter changes
        # Session settings beyond those (session.py): what the client's session carries, as
        # the server last reported it; the unlisted names it touched (role, app.*); True
        # when a statement since may have changed them; True while they are being read.
        self.settings: dict[str, str] = {}
        self.setting_names: set[str] = set()
        # Startup parameters beyond the tracked ones (client_min_messages, search_path,
        # -c settings in options ...): the session's values when it has set nothing else,
        # as RESET and RESET ALL go back to them on a direct connection.
        self.startup_settings: dict[str, str] = {}
        self.settings_dirty = False
        self.settling = False
        # Pinned state (session.PINS): what the session holds, by kind, with the statement
        # that made it; the statements seen that may have made some; True when the end of
        # the transaction must count it again.
        self.pins: dict[str, str] = {}
        self.pin_candidates: dict[str, str] = {}
        self.pin_check = False
        # set_config of a name the statement computes (session.UNKNOWN): its text, which
        # pins the client (COMPUTED_SETTING) until RESET ALL / DISCARD ALL.
        self.unknown_setting = ""
        self.pool: Pool | None = None
        self.server: ServerConnection | None = None
        self.cancel_pid = 0
        self.cancel_key = 0
        now = time.time()
        self.connect_time = now
        self.request_time = now
        self.wait_started = 0.0
        self.last_activity = time.monotonic()
        self.idle_in_txn_since = 0.0
        self.query_started = 0.0  # when the oldest unanswered request was sent (query_timeout)
        self.xact_started = 0.0  # when the current transaction's first request was sent
        self.expected_rfq = 0  # ReadyForQuery messages still owed by the server
        self.unsynced = False  # extended-protocol messages sent since the last Sync
        self.txn_status = "I"
        self.gone = False
        self.closing = False  # fail() / close() under way: bytes handed back are dropped
        self.is_admin = False
        self.tls = False  # upgraded after an SSLRequest (listener.upgrade_client_tls)
        # A replication connection (walsender.py): "true" (physical) or "database"
        # (logical), with its options string as sent (passed to its server unread).
        self.replication = ""
        self.startup_options = ""
        self._startup: StartupReader | None = StartupReader()
        self._reader = MessageReader(CLIENT_TYPES)
        self._auth: ClientAuth | None = None
        self._auth_known_user = False
        self._engine_auth = False  # the fast path's engine runs this client's SCRAM exchange
        # For a login route (fastpath.LoginRoute): the StartupMessage as the engine read it,
        # and the SCRAM secret the engine checked (NO_PASSWORD: none was asked); dropped
        # once the welcome is out.
        self._route_packet: bytes | None = None
        self._route_secret: ScramSecret | str | None = None
        # b"" while the welcome waits for a server (_welcome), finished in _link.
        self._session_welcome: bytes | None = None
        self._server_fatal = False  # the linked server sent a FATAL error (server_lost)
        # A result (CommandComplete, ErrorResponse, EmptyQueryResponse) of the request in
        # flight went to the client, and its ReadyForQuery has not: losing the server now is
        # told by the close alone, as directly (libpq would read an error of ours as a second
        # result).
        self._result_passed = False
        self._auth_reader: MessageReader | None = None  # made when Python runs the exchange
        self._pending = bytearray()  # bytes waiting for a server
        self._held = b""  # start of a message that may need rewriting once complete
        self.router: StatementRouter | None = None
        self._paused = False
        # While a login step runs, its answers are gathered and sent in one write (SASL final,
        # AuthenticationOk, ParameterStatus ..., ReadyForQuery: one packet, not five).
        self._cork: bytearray | None = None
        self._login_task: asyncio.Task[None] | None = None
        self.admin: AdminSession | None = None  # set for admin console connections
        self.queries: ClientQueries | None = None  # per-query statistics (stats.py)

    def __repr__(self) -> str:
        return f"C-{self.id}({self.database}/{self.user}@{self.addr}:{self.port})"

    # -- state --------------------------------------------------------------------------
    def set_state(self, new: ClientState) -> None:
        old = self.state
        check_client_move(old, new)
        if old is not new:
            self.state = new
            self.pooler.client_moved(self, old, new)

    # -- asyncio protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.addr, self.port = str(peer[0]), int(peer[1])
        else:
            self.addr = "unix"
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, tuple):
            self.local_addr, self.local_port = str(sock[0]), int(sock[1])
        if self.pooler.config.tcp_keepalive and isinstance(peer, tuple):
            set_keepalive(transport)
        self.pooler.client_connected(self)

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        try:
            if self.state is ClientState.LOGIN:
                if self._cork is not None:
                    # Within a login step (bytes that came behind the startup packet): the
                    # outer call sends what both gather, in order.
                    self._login_data(data)
                    return
                self._cork = bytearray()
                try:
                    self._login_data(data)
                finally:
                    self._uncork()
            elif self.replication:
                # Its server is its own (walsender.py): bytes pass unread, both ways.
                if self.server is not None:
                    self.server.write(data)
                    self._count_bytes(len(data), 0)
                else:
                    self._pending += data
            else:
                self._query_data(data)
        except ProtocolError as exc:
            self._protocol_violation(exc)

    def _protocol_violation(self, exc: ProtocolError) -> None:
        log.warning("%r protocol violation: %s", self, exc)
        self.fail(exc.sqlstate, f"protocol violation: {exc.message}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._disconnect(CLIENT_CLOSED)

    def pause_writing(self) -> None:
        # The client reads slower than its server sends: hold the server back.
        if self.server is not None:
            self.server.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None:
            self.server.resume_reading()

    def pause_reading(self) -> None:
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            self.transport.resume_reading()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        cork = self._cork
        if cork is not None:
            cork += data
        elif self.transport is not None:
            self.transport.write(data)

    def _uncork(self) -> None:
        cork, self._cork = self._cork, None
        if cork and self.transport is not None:
            self.transport.write(cork)

    # -- login ------------------------------------------------------------------------------
    def _login_data(self, data: bytes) -> None:
        if self._engine_auth:
            # Sent behind the StartupMessage, so Python read them: the engine's exchange.
            self._uncork()  # its AuthenticationSASL goes first
            self.transport.scram_feed(data)  # type: ignore[union-attr]
            return
        if self._auth is not None:
            self._auth_data(data)
            return
        if self._login_task is not None or self._startup is None:
            # Bytes while the welcome is being prepared: keep them for after it.
            self._pending += data
            return
        self._startup.feed(data)
        packet = self._startup.next_packet()
        if packet is None:
            return
        if isinstance(packet, SSLRequest | GSSENCRequest):
            if self._startup.take_rest():
                # Bytes sent before our answer could have been injected by someone in between
                # (CVE-2021-23214): refuse, as PostgreSQL does.
                what = "SSL" if isinstance(packet, SSLRequest) else "GSSAPI encryption"
                self.fail("08P01", f"received unencrypted data after {what} request")
                return
            if isinstance(packet, SSLRequest):
                self.pooler.handle_ssl_request(self)
            else:
                self.write(b"N")
            return
        if isinstance(packet, CancelRequest):
            # Closed once PostgreSQL has taken the request on (it closes our cancel
            # connection then), as a direct cancel connection is: a driver that waits for
            # that before its next query (asyncpg) cannot have the cancel hit the next one.
            self.pause_reading()
            self.pooler.cancel(packet.pid, packet.key, then=self.close)
            return
        assert isinstance(packet, StartupMessage)
        rest = self._startup.take_rest()
        self._startup = None
        if self._tls_refused():
            return
        self._startup_message(packet)
        if rest:
            self.data_received(rest)

    def _tls_refused(self) -> bool:
        """client_tls_sslmode requires TLS and this client came without: refuse it."""
        tls_mode = self.pooler.config.client_tls_sslmode
        if not self.tls and is_fast_conn(self.transport) \
                and self.transport.tls:  # type: ignore[union-attr]
            self.tls = True  # the engine answered its SSLRequest and did the handshake
        if not self.tls and self.addr != "unix" and tls_mode in CLIENT_TLS_REQUIRED:
            self.fail("28000", "SSL required", hint=f"The pooler has client_tls_sslmode = "
                      f"{tls_mode}: connect with sslmode=require (or verify-ca/verify-full).")
            return True
        return False

    def startup_received(self, protocol: int, params: dict[str, str],
                         packet: bytes | None = None) -> None:
        """The fast path's engine read this client's StartupMessage (``packet``), whole and
        with nothing behind it, and checked it as ``parse_startup_packet`` does."""
        self.last_activity = time.monotonic()
        self._startup = None
        self._route_packet = packet
        self._cork = bytearray()
        try:
            if not self._tls_refused():
                self._startup_message(StartupMessage(protocol, params))
        except ProtocolError as exc:
            self._protocol_violation(exc)
        finally:
            self._uncork()

    @property
    def waits_for_welcome(self) -> bool:
        """Logging in and waiting on a server: a first server's parameters (Pool.welcome)
        or the auth_query lookup (the janitor applies query_timeout to the wait)."""
        return self._login_task is not None

    def tls_done(self) -> None:
        """The engine finished this client's TLS handshake (Python answered its SSLRequest:
        ``FastPath.start_client_tls``); its StartupMessage comes next, encrypted."""

    def restart_startup(self) -> None:
        """After a TLS upgrade, the startup packet comes again over the encrypted stream."""
        self._startup = StartupReader()

    def _startup_message(self, msg: StartupMessage) -> None:
        cfg = self.pooler.config
        self.user = msg.user
        self.database = msg.database
        params = self.params
        ignored = {p.lower() for p in cfg.ignore_startup_parameters}
        if "replication" in msg.params:
            try:
                self.replication = walsender.replication_kind(msg.params["replication"])
            except ValueError as exc:
                self.fail("22023", str(exc))
                return
        for name, value in msg.params.items():
            if name in ALWAYS_ACCEPTED or name == "replication":
                continue
            key = name.lower()
            canonical = TRACKED_BY_LOWER.get(key)
            if canonical is not None:
                params[canonical] = value
            elif key == "options":
                if not self._startup_options(value):
                    return
            elif key in ignored:
                continue
            elif key in ROUTING_STARTUP and self.pooler.routers.get(self.database):
                if not self._routing_startup(key, value):
                    return
            elif key in NOT_SETTINGS or key.startswith("_pq_."):
                self.fail("08P01", f"unsupported startup parameter: {name}")
                return
            else:
                # Carried as the client's session setting (session.py), as a SET would be.
                self.startup_settings[key] = value
        if self.startup_settings:
            self.settings = dict(self.startup_settings)
        if cfg.application_name_add_host:
            # As PgBouncer: make the client's address visible in pg_stat_activity.
            app = self.params.get("application_name", "")
            self.params["application_name"] = f"{app} - {self.addr}:{self.port}"
        self.application_name = self.params.get("application_name", "")
        if not self.pooler.admit(self):
            return
        if self.pooler.is_admin_db(self.database):
            self.pooler.admin_login(self)
            return
        # An unknown database is told only after authentication (logged_in), as PgBouncer:
        # answering it to anyone would tell strangers which databases exist.
        self.authenticate()

    def _startup_options(self, text: str) -> bool:
        """Take the settings of the ``options`` startup parameter as PgBouncer does
        (startup_options.py); False: the client was refused. A replication connection's
        server is its own: its options go to it as sent (any setting, as PgBouncer)."""
        if self.replication:
            self.startup_options = text
            return True
        ignored = {p.lower() for p in self.pooler.config.ignore_startup_parameters}
        try:
            settings = parse_options(text)
        except OptionsError as exc:
            self.fail("08P01", str(exc))
            return False
        for name, value in settings:
            key = name.lower()
            canonical = TRACKED_BY_LOWER.get(key)
            if canonical is not None:
                self.params[canonical] = value
            elif key in ROUTING_STARTUP and self.pooler.routers.get(self.database):
                if not self._routing_startup(name, value):
                    return False
            elif key not in ignored and "options" not in ignored:
                # Carried as the client's session setting (session.py), as a SET would be.
                self.startup_settings[key] = value
        return True

    def _routing_startup(self, name: str, value: str) -> bool:
        """``pgpilot.route`` / ``pgpilot.min_lsn`` at connect, for a database with replicas
        (routing.py); False: a bad value, the client was refused."""
        error = self.pooler.routers[self.database].startup_setting(self, name, value)
        if error is not None:
            self.fail("22023", error)
            return False
        return True

    def authenticate(self) -> None:
        """Check credentials as ``auth_type`` says (admin logins too); then ``logged_in``."""
        cfg = self.pooler.config
        if self._login_task is None and self.pooler.auth_query.wanted(self):
            # Not in auth_file, and the database has an auth_user: read the secret with
            # auth_query first (auth_query.py), which calls authenticate() again.
            self._login_task = self.pooler.auth_query.start(self)
            return
        auth_type = login_method(self.pooler, self)  # auth_type, or the hba file's rule
        if auth_type == "reject":
            self._auth_failed("28000", "login rejected")
            return
        if auth_type == "peer":
            self._peer_login()
            return
        secret = self.pooler.client_secret_for(self.user, self.database)
        # Secrets from auth_query or an hba rule are decided per login: no engine route.
        routable = cfg.auth_type != "hba" and self.user in cfg.auth_users
        if auth_type == "any" or (auth_type == "trust" and (
                secret is not None or not (cfg.auth_file or cfg.auth_user))):
            # As PgBouncer: with an auth_file, trust still needs the user to be listed.
            self._route_secret = NO_PASSWORD if routable or not cfg.auth_file else None
            self.logged_in()
            return
        if auth_type == "trust":
            db = cfg.database_for(self.database)
            auth_user = db is not None and self.pooler.auth_query.auth_user_for(db)
            self._auth_failed("28000", "no such user" if auth_user
                              else '"trust" authentication failed')
            return
        if auth_type == "cert":
            self._cert_login()
            return
        known = secret is not None
        if secret is None:
            # Run the same exchange against a made-up secret so an unknown user looks just
            # like a wrong password (no user enumeration).
            secret = (mock_scram_secret(self.user) if auth_type == "scram-sha-256"
                      else secrets.token_hex(16))
        transport = self.transport
        if is_fast_conn(transport):
            key = scram_secret_for(auth_type, secret)
            if key is not None:
                # The engine runs the two SCRAM round trips itself (engine/scram.c), then calls
                # scram_passed() or scram_failed().
                self.write(transport.scram_login(  # type: ignore[union-attr]
                    key.stored_key, key.server_key, scram_salt_b64(key.salt), key.iterations,
                    known))
                self._engine_auth = True
                if known and routable:
                    self._route_secret = key
                return
        try:
            auth = client_auth_for(auth_type, self.user, secret)
        except ValueError:
            self.fail("28000", f"auth_type {auth_type} is not supported")
            return
        self._auth = auth
        self._auth_known_user = known
        self.write(auth.start())

    def _sasl_failed(self) -> None:
        """A wrong SCRAM proof (or an unknown user's mock exchange): PostgreSQL's message to
        the client, with PgBouncer's "SASL authentication failed" as its detail and in the
        log line, which operators' alerts grep."""
        text = f'password authentication failed for user "{self.user}"'
        log.warning("%r login failed: SASL authentication failed (%s)", self, text)
        self.pooler.auth_failures += 1
        self.closing = True
        self.write(m.error_response("28P01", text, severity="FATAL",
                                    detail="SASL authentication failed"))
        self.close("SASL authentication failed")

    def _auth_failed(self, sqlstate: str, text: str) -> None:
        """A login refused before or without a password exchange."""
        log.warning("%r login failed: %s", self, text)
        self.pooler.auth_failures += 1
        self.fail(sqlstate, text)

    def _peer_login(self) -> None:
        """An hba ``peer`` rule: a unix-socket client whose OS user has the login's name, or
        one its ``map=`` (auth_ident_file) lets log in as it."""
        system_user = peer_user_name(self)
        ident = ident_map_for(self.pooler, self)
        if ident is not None:
            if system_user is None or not ident_map_allows(self.pooler, ident, [system_user],
                                                           self.user):
                log.warning("%r ident map %s cannot be matched", self, ident)  # PgBouncer's
                self._auth_failed("28000", "unix socket login rejected")
                return
        elif system_user != self.user:
            self._auth_failed("28000", "unix socket login rejected")
            return
        self.logged_in()

    def _cert_login(self) -> None:
        """auth_type = cert: a verified TLS client certificate whose CommonName is the user
        name (as PgBouncer; client_tls_sslmode verify-ca/verify-full asks for the cert)."""
        cert = self.transport.get_extra_info("peercert") if self.tls and self.transport else None
        if not cert:
            self.fail("28000", f'certificate authentication failed for user "{self.user}": '
                      "no verified client certificate",
                      hint="auth_type = cert needs TLS with a client certificate "
                      "(client_tls_sslmode = verify-ca or verify-full).")
            return
        names = [value for rdn in cert.get("subject", ()) for key, value in rdn
                 if key == "commonName"]
        ident = ident_map_for(self.pooler, self)
        if ident is not None:  # an hba cert rule's map=: the CommonName maps to users
            if not ident_map_allows(self.pooler, ident, names, self.user):
                log.warning("%r ident map %s cannot be matched", self, ident)  # PgBouncer's
                self.pooler.auth_failures += 1
                self.fail("28000", f'certificate authentication failed for user '
                          f'"{self.user}": ident map {ident} does not allow it')
                return
        elif self.user not in names:
            self.pooler.auth_failures += 1
            self.fail("28000", f'certificate authentication failed for user "{self.user}": '
                      "the certificate's CommonName does not match")
            return
        self.logged_in()

    def _auth_data(self, data: bytes) -> None:
        assert self._auth is not None
        if self._auth_reader is None:
            # Password messages are small; PostgreSQL caps SASL tokens at 64 kB.
            self._auth_reader = MessageReader(max_body=65_536)
        reader = self._auth_reader
        for index, (mtype, body) in enumerate(reader.feed(data)):
            if mtype != F.PASSWORD or body is None:
                self.fail("08P01", "expected a password message during authentication")
                return
            try:
                reply, done = self._auth.step(body)
                if done and not self._auth_known_user:
                    raise AuthFailed(f'password authentication failed for user "{self.user}"')
            except AuthFailed as exc:
                if isinstance(self._auth, ScramAuth):
                    self._sasl_failed()
                    return
                log.warning("%r login failed: %s", self, exc)
                self.pooler.auth_failures += 1
                self.fail("28P01", str(exc), fatal=True)
                return
            if reply:
                self.write(reply)
            if done:
                client_key = getattr(self._auth, "client_key", None)
                if client_key is not None:
                    self.pooler.scram_client_keys[self.user] = client_key
                self._auth = None
                # What came behind the last password message is the first query: kept for
                # after the welcome, not dropped with the reader.
                self._pending += data[reader.ends[index]:]
                self.logged_in()
                return

    def scram_passed(self, final_message: bytes, client_key: bytes, rest: bytes) -> None:
        """The engine checked this client's SCRAM proof: log it in. ``rest``: what the client
        sent behind its proof, served after the welcome."""
        self._engine_auth = False
        self._cork = bytearray(final_message)
        self._pending += rest
        try:
            # The proof gave away ClientKey (SCRAM pass-through, see ScramAuth).
            self.pooler.scram_client_keys[self.user] = client_key
            self.logged_in()
        finally:
            self._uncork()

    def scram_failed(self, kind: int, text: str | None) -> None:
        """The engine's SCRAM exchange ended in a wrong proof (kind 0), a malformed message
        (1: a protocol violation, 2: told as it is) or an error of its own (3)."""
        self._engine_auth = False
        if kind == 0:
            self._sasl_failed()
        elif kind == 3:
            log.error("%r login failed in the fast path: %s", self, text)
            self.fail("XX000", f"internal error during authentication: {text}")
        else:
            if kind == 1:
                text = f"protocol violation: {text}"
            log.warning("%r %s", self, text)
            self.fail("08P01", text or "protocol violation")

    def scram_first_refused(self, body: bytes) -> None:
        """The engine will not take this SASLInitialResponse: Python's parser reads it again
        to say why, in the words of the Python path."""
        try:
            ScramAuth(self.user, _REFUSAL_SECRET).step(body)
        except ProtocolError as exc:
            text = exc.message
        else:  # the two parsers disagree: refuse, as the engine did
            text = "malformed SCRAM message"
        self.scram_failed(1, text)

    def logged_in(self, auth_ok_sent: bool = False) -> None:
        """Credentials are good: tell the client and prepare its welcome."""
        if not auth_ok_sent:
            self.write(AUTH_OK)
        if self.is_admin:
            if self.admin is not None:
                self.admin.logged_in()
            return
        cfg = self.pooler.config
        db = cfg.database_for(self.database)
        refusal = database_refusal(self.pooler, self.database, db)
        if refusal is not None:
            log.warning("%r login failed: %s", self, refusal)
            self.fail("3D000" if db is None else "08P01", refusal)
            return
        assert db is not None
        if not self.pooler.admit_to_pool(self, db):
            return
        self.pool = self.pooler.get_pool(db, self.database, self.user)
        self.pool.clients.add(self)
        if self.replication:
            self._login_task = walsender.start(self, self.pool)
            return
        if self.pool.mode != "session":
            self.router = StatementRouter(cfg.max_prepared_statements)
        if self.pool.welcome_params is not None:
            self._welcome(self.pool.welcome_params)
            return
        self._login_task = asyncio.get_running_loop().create_task(self._await_welcome())

    async def _await_welcome(self) -> None:
        assert self.pool is not None
        try:
            params = await self.pool.welcome()
        except ServerError as exc:
            self.fail(exc.sqlstate, str(exc))
            return
        except asyncio.CancelledError:
            return
        if not self.gone:
            self._welcome(params)

    def _welcome(self, server_params: dict[str, str]) -> None:
        # The client sees the server's values, except what it asked for itself.
        params = self.params
        for name in TRACKED_PARAMS:
            if name not in params:
                value = server_params.get(name)
                if value is not None:
                    params[name] = value
        assert self.pool is not None
        # The values the client asked for, as the server spells them (client_encoding
        # 'euc-jp' is reported as EUC_JP): known once a server has been SET to them.
        canonical = self.pool.canonical_values
        unknown = False
        for name, value in list(params.items()):
            if server_params.get(name, value) != value:
                spelled = canonical.get((name, value))
                if spelled is None:
                    unknown = True
                else:
                    params[name] = spelled
        self._login_task = None
        pool = self.pool
        if pool.mode == "session":
            # A server free now or in a moment (idle, to be opened, or running the reset of a
            # client that left, unless those ahead in line take them). All servers taken:
            # the client waits at its first query, as with PgBouncer.
            soon = bool(pool.idle or pool.can_open()) or len(pool.resetting) > len(pool.waiting)
            hold = soon and (self.pooler.worker is None or unknown)
        else:
            hold = unknown
        if self.startup_settings:
            hold = True
            if self.router is not None:
                self.router.search_path = self._names_context()
        if hold:
            # The welcome waits for a server: in session mode the client's server for life,
            # so that BackendKeyData can carry its real process id (pg_backend_pid(), a
            # notification's pid; the cancel key stays the pooler's; with workers = N
            # cancels are routed by the pooler's pid); to learn how the server spells
            # values it has not been SET to yet; and to apply the startup parameters it
            # carries as session settings, whose errors (an unknown name, a bad value) the
            # client reads at its login, as directly.
            self._session_welcome = b""
            routing = self.pooler.routers.get(self.database) \
                if self.pooler.routers and pool.mode == "session" else None
            # (with replicas: the server chosen at connect, routing.py)
            (pool if routing is None else routing.session_pool(self)).request(self)
            return
        statuses = self.pool.parameter_statuses(server_params, self.params)
        self._finish_welcome(statuses)
        if self._pending:
            pending = bytes(self._pending)
            self._pending.clear()
            self.data_received(pending)
        self.enter_fast()
        packet, secret = self._route_packet, self._route_secret
        self._route_packet = self._route_secret = None
        fast = self.pooler.fast
        if packet is not None and secret is not None and fast is not None:
            fast.offer_route(self, packet, secret, AUTH_OK + statuses)

    def link_replication(self, server: ServerConnection) -> None:
        """walsender.py: ``server`` logged in for this replication client and is its own
        until one of them leaves: welcome the client with the server's parameters."""
        self._login_task = None
        self.server = server
        server.client = self
        server.link_time = time.monotonic()
        server.set_state(ServerState.ACTIVE)
        if self.pool is not None:
            self.pool.stats.record_wait(time.monotonic() - self.wait_started)
        self._finish_welcome(walsender.welcome(server),
                             server.backend_pid if self.pooler.worker is None else 0)
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            server.write(data)

    def _finish_welcome(self, statuses: bytes, backend_pid: int = 0) -> None:
        """The end of the login: ParameterStatus, BackendKeyData, ReadyForQuery."""
        out = bytearray(statuses)
        self.cancel_pid, self.cancel_key = self.pooler.register_cancel_key(self, backend_pid)
        out += m.backend_key_data(self.cancel_pid, self.cancel_key)
        out += m.READY_IDLE
        self.write(out)
        self.set_state(ClientState.ACTIVE)
        if self.pooler.config.log_connections:
            log.info("%r login ok", self)

    def accepted_by_engine(self, conn: asyncio.BaseTransport, accepted: float) -> None:
        """connection_made() for a client the engine accepted at ``accepted``
        (time.monotonic()) and held with no Python object until now: its times count from
        the accept (client_login_timeout, SHOW CLIENTS' connect_time)."""
        self.connection_made(conn)
        if getattr(conn, "tls", False):
            self.tls = True  # the engine did its TLS handshake
        self.last_activity = accepted
        self.connect_time = self.request_time = time.time() - (time.monotonic() - accepted)

    @classmethod
    def engine_claimed(cls, route: LoginRoute, conn: asyncio.BaseTransport, accepted: float,
                       cancel: tuple[int, int] | None, client_id: int = 0) -> ClientConnection:
        """The object of a client the engine took in alone along ``route`` (fastpath.py,
        "engine logins"): logged in, with the cancel key the engine gave it, or (``cancel``
        None) still in the SCRAM exchange the engine runs. ``accepted``: time.monotonic()
        when its connection was accepted; ``client_id``: the id the engine logged it under
        (0: none)."""
        fast = route.pooler.fast
        if fast is not None:
            fast.drain_log()  # its "login ok" before anything Python logs of it
        client = cls(route.pooler)
        if client_id:
            client.id = client_id
        client.accepted_by_engine(conn, accepted)
        client._startup = None
        client.user, client.database = route.user, route.database
        client.application_name = route.application_name
        client.params = dict(route.params)
        if cancel is None:
            client._engine_auth = True
            return client
        client.last_activity = time.monotonic()
        pool = client.pool = route.pool
        pool.clients.add(client)
        if pool.mode != "session":
            client.router = StatementRouter(route.pooler.config.max_prepared_statements)
        client.cancel_pid, client.cancel_key = cancel
        route.pooler.cancel_keys[cancel] = client
        client.set_state(ClientState.ACTIVE)
        return client

    def enter_fast(self) -> None:
        """Between transactions, hand this client to the compiled fast path if it can take it
        (fastpath.py): a transaction or statement pool, no bytes half-read, nothing owed by
        the statement router (the engine renames the client's named statements with the
        router's map, and gives back whatever needs more), no TLS."""
        pool = self.pool
        lane = pool.lane if pool is not None else None
        if pool is None or lane is None or not lane.usable or self.server is not None or self.gone \
                or self.closing or self.settling or self.state is not ClientState.ACTIVE \
                or self._pending \
                or self._held or self._reader.mid_message or pool.mode == "session":
            return
        router = self.router
        if router is not None and (router.outstanding or router.held or router.skipping):
            return
        transport = self.transport
        if transport is None or (self.tls and not is_fast_conn(transport)):
            return  # asyncio's SSL transport stays in Python
        # What login gathered goes out now, on this transport: a write on the fast path
        # would hand the client straight back to Python.
        self._uncork()
        if not is_fast_conn(transport):
            if not lane.fast.adopt(self, False):
                return
            transport = self.transport
        if transport.fast:  # type: ignore[union-attr]
            return
        if self.queries is not None:
            self.queries.pending.clear()  # nothing is owed: the engine times what comes
        transport.set_fast(lane.fp, lane.client_params_id(self), 0.0,  # type: ignore[union-attr]
                           router.statements if router is not None and router.renaming
                           else None)

    # -- queries ----------------------------------------------------------------------------
    def _query_data(self, data: bytes) -> None:
        if self.server is None and self.admin is None:
            # Nothing is read until a server is there to take it (the bytes are kept);
            # a lone Terminate needs no server at all.
            if not self._pending and data == TERMINATE:
                self.close(CLIENT_CLOSED)
                return
            self._pending += data
            if self.settling:
                return  # asked for once the session's settings are read (_settle)
            if self.state is ClientState.ACTIVE:
                assert self.pool is not None
                # Usually a server is free and linked at once; reading pauses only when the
                # client really has to wait (start_waiting), saving two epoll calls a turn.
                routing = self.pooler.routers.get(self.database) if self.pooler.routers \
                    else None
                if routing is None and self._prepare_without_server():
                    return
                if routing is not None:  # read/write split (routing.py): the primary's pool
                    target = (routing.pool_for(self, self._pending)  # or a replica's, or
                              if self.pool.mode != "session"  # (session mode: chosen once)
                              else routing.session_pool(self))
                    if target is not None:  # None: the pooler's own SET / SHOW, answered
                        target.request(self)
                    return
                self.pool.request(self)
            return
        self._forward(data)

    def _prepare_without_server(self) -> bool:
        """Between transactions, a request of nothing but named Parses and a Sync (libpq's
        PQprepare, as pgbench -M prepared sends before a statement's first run) whose
        statements some server of this upstream database has already parsed in today's
        catalog: answered here (ParseComplete each, ReadyForQuery), without waiting for a
        server. Each statement is parsed on a server when first bound there, as after any
        Parse the pooler answers itself. Waiting would deadlock a client program that prepares
        synchronously while its other connections hold every server in open transactions
        (pgbench with more clients than servers: its thread blocks in PQprepare, so those
        transactions never go on). A statement not known to parse still goes to a server, so
        that its errors come at its Parse, as directly."""
        router = self.router
        pool = self.pool
        if router is None or not router.renaming or pool is None or pool.mode == "session" \
                or router.outstanding or router.skipping or self.pins or self._held \
                or self._reader.mid_message or self.expected_rfq:
            return False
        parsed = pool.catalog.parsed
        if not parsed:
            return False
        data = self._pending
        size = len(data)
        pos = 0
        found: list[tuple[m.Parse, bytes, str]] = []
        while pos + 5 <= size:
            mtype = data[pos]
            length = int.from_bytes(data[pos + 1:pos + 5], "big")
            end = pos + 1 + length
            if length < 4 or end > size:
                return False
            if mtype == F.SYNC:
                if end != size or not found or length != 4:
                    return False
                break
            if mtype != F.PARSE:
                return False
            body = bytes(data[pos + 5:end])
            try:
                parse = m.parse_parse(body)
            except (ValueError, IndexError, ProtocolError):
                return False
            if not parse.name or parse.name in router.statements:
                return False  # (a name in use: the server path refuses it, 42P05)
            sql = parse.sql.encode()
            low = parse.sql.lower()
            if might_change_settings(low) or might_be_hazard(sql) \
                    or any(word in low for word in UNPIN_RUN_WORDS) \
                    or any(word in low for word in UNPIN_WORDS):
                return False  # its runs are noted (_note_session): a server reads them
            server_name = server_statement_name(parse, pool.catalog.generation,
                                                router.search_path)
            if server_name not in parsed:
                return False
            found.append((parse, body, server_name))
            pos = end
        else:
            return False
        for parse, body, server_name in found:
            self.pooler.observe_parse(self, body)
            router.session_sql.pop(parse.name, None)
            router.statements[parse.name] = ClientStatement(
                server_name, m.parse_message(server_name, parse.sql, parse.param_types))
        self._pending.clear()
        pool.stats.query_count += 1
        self._count_bytes(size, 0)
        self.write(m.parse_complete() * len(found) + m.ready_for_query("I"))
        if pool.lane is not None:
            self.enter_fast()
        return True

    def _forward(self, data: bytes) -> None:
        """Read what matters of the client's bytes and send them to its server."""
        msgs = self._reader.feed(data)
        terminate = False
        renamable = False  # a Parse, Bind, Describe or Close the statement router may rename
        for mtype, body in msgs:
            if mtype == F.SYNC:
                if not self.expected_rfq:
                    self.query_started = time.monotonic()
                    if not self.xact_started:
                        self.xact_started = self.query_started
                self.expected_rfq += 1
                self.unsynced = False
            elif mtype == F.QUERY:
                if not self.expected_rfq:
                    self.query_started = time.monotonic()
                    if not self.xact_started:
                        self.xact_started = self.query_started
                self.expected_rfq += 1
                self.request_time = time.time()
                if body is not None:
                    self.pooler.observe_query(self, body)
                    self._note_session(body)
            elif mtype in UNSYNCED_TYPES:
                self.unsynced = True
                if not renamable and body is not None and names_a_statement(mtype, body):
                    renamable = True
                if mtype == F.PARSE and body is not None:
                    self.pooler.observe_parse(self, body)
                    start = body.find(b"\x00") + 1
                    end = body.find(b"\x00", start)
                    sql = body[start:end] if end >= 0 else body[start:]
                    if self._note_session(sql, parse=True):
                        if self.router is not None:  # its runs are noted too (Bind)
                            self.router.session_sql[body[:start - 1].decode(
                                errors="replace")] = sql
                    elif self.router is not None and self.router.session_sql:
                        self.router.session_sql.pop(body[:start - 1].decode(errors="replace"),
                                                    None)
                elif body is not None and self.router is not None and self.router.session_sql:
                    if mtype == F.BIND:
                        self._note_bind(body)
                    elif mtype == F.CLOSE and body[:1] == b"S":
                        self.router.session_sql.pop(body[1:-1].decode(errors="replace"), None)
            elif mtype == F.FUNCTION_CALL:
                self.expected_rfq += 1
                if body is not None:
                    self._note_function_call(body)
            elif mtype == F.TERMINATE:
                terminate = True
        if self.admin is not None:
            self.admin.handle(msgs)  # type: ignore[attr-defined]
            return
        queries = self.queries
        if queries is not None or (self.pooler.config.query_stats
                                   and (queries := client_queries(self)) is not None):
            queries.sent(msgs)
        server = self.server
        assert server is not None
        if terminate:
            # Terminate ends the stream: what came before it still goes to the server.
            msgs = msgs[:-1]
            data = data[:self._reader.ends[-2]] if len(self._reader.ends) > 1 else b""
            self._reader.ends = self._reader.ends[:-1]
        router = self.router
        if router is None:
            if data:
                server.write(data)
        else:
            transport = self.transport
            if is_fast_conn(transport) and transport.take_unnamed_parsed():  # type: ignore[union-attr]
                router.unnamed_parse = None  # the engine carried a newer one: not known here
            continued = self._held
            out, tail = router.client_chunk(data, msgs, self._reader.ends, continued, server,
                                            renamable)
            if not msgs:
                tail = continued + tail
            if tail and self._reader.skipping:
                out += tail  # the body of a message nobody rewrites: let it stream
                tail = b""
            self._held = tail
            if out:
                server.write(out)
            due = router.replies_due()
            if due:
                self.write(due)
            self.expected_rfq -= router.take_skipped_queries()
        self._count_bytes(len(data), 0)
        if terminate:
            self.close(CLIENT_CLOSED)

    def start_waiting(self) -> None:
        if self.state is ClientState.ACTIVE:
            self.set_state(ClientState.WAITING)
        self.pause_reading()

    def attach(self, server: ServerConnection, *, session: bool = False) -> None:
        """The pool lends us ``server``: bring its parameters in line, then use it.
        ``session``: it is our own, carrying our session (session mode, after _settle)."""
        assert self.pool is not None
        if self.gone:
            server.pool.give_out(server)
            return
        waited = time.monotonic() - self.wait_started
        self.pool.stats.record_wait(waited)
        if self.queries is not None:
            self.queries.wait += waited
        params = self.params
        if server.synced_for is params and server.synced_version == self.params_version:
            diff = None  # this server last ran for us, with these values
        else:
            server_params = server.params
            diff = [(k, v) for k, v in params.items() if server_params.get(k) != v]
        settings_sql = apply_sql(server.settings, self.settings) \
            if server.settings or self.settings else ""
        if diff or settings_sql:
            if diff and log.isEnabledFor(logging.DEBUG):  # PgBouncer's words (verbose = 2)
                log.debug("%r varcache_apply: %s", server,
                          " ".join(f"SET {k}={sql_literal(v)};" for k, v in diff))
            server.set_state(ServerState.TESTED)
            sql = "; ".join([f"SET {k} TO {sql_literal(v)}" for k, v in diff or ()]
                            + ([settings_sql] if settings_sql else []))
            server.settings = dict(self.settings)

            def synced(srv: ServerConnection, error: str | None) -> None:
                if srv.state is ServerState.CLOSED:
                    if self.gone:
                        return
                    if session:
                        # Our session (its temporary tables, locks, prepared statements)
                        # ended with it: we cannot go on, on another backend, as if nothing
                        # happened. Directly, the connection would be lost.
                        self.fail("08006", f"server connection lost: {error}")
                        return
                    # The server ended before it was ours (PostgreSQL restarted, the
                    # network reset): nothing of ours reached it, so we wait for the
                    # next one, first in line, as after a failed check (Pool._hand_to).
                    # Returning alone left us with no server and in no line, forever.
                    srv.pool.request_front(self)
                    return
                if error is not None:
                    code = srv.internal_error_code
                    srv.close(f"could not apply client parameters: {error}")
                    if not self.gone:
                        if self._session_welcome is not None and code:
                            # At the login: the server's own refusal of a startup parameter
                            # (unknown name, bad value), as a direct login reads it.
                            self.fail(code, error, hint=None if code != "55P02" else
                                      "pgpilot carries startup parameters as session "
                                      "settings; this one can only be set at a backend's "
                                      "start.")
                        else:
                            self.fail("08P01", f"could not apply startup parameters: {error}")
                    return
                if self.gone:
                    srv.pool.give_out(srv)
                    return
                self._learn_spellings(srv, diff)
                self._link(srv)

            server.run_internal(sql, synced)
            return
        self._link(server)

    def _link(self, server: ServerConnection) -> None:
        server.synced_for = self.params
        server.synced_version = self.params_version
        self.server = server
        server.client = self
        server.link_time = time.monotonic()
        server.set_state(ServerState.ACTIVE)
        welcomed = self._session_welcome is not None
        if welcomed:
            assert self.pool is not None
            self._session_welcome = None
            session = self.pool.mode == "session" and self.pooler.worker is None
            self._finish_welcome(self.pool.parameter_statuses(server.params, self.params),
                                 server.backend_pid if session else 0)
        elif self.state is ClientState.WAITING:
            self.set_state(ClientState.ACTIVE)
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            try:
                self._forward(data)
            except ProtocolError as exc:  # as in data_received: this client alone is done
                self._protocol_violation(exc)
                return
        elif welcomed:
            self._maybe_release(server)  # transaction and statement mode: back to the pool
        self.resume_reading()

    def _learn_spellings(self, server: ServerConnection,
                         applied: list[tuple[str, str]] | None) -> None:
        """Parameters just SET on ``server``: where it reports a value otherwise spelled
        (euc-jp -> EUC_JP), the client holds the server's spelling from now on, and the pool
        remembers it for the welcome of later clients."""
        assert self.pool is not None
        canonical = self.pool.canonical_values
        for name, value in applied or ():
            spelled = server.params.get(name)
            if spelled is not None and spelled != value:
                log.debug("%r varcache_set_canonical: setting %s to its canonical version "
                          "%s -> %s", self, name, value, spelled)  # PgBouncer's words
                if len(canonical) >= 1000:
                    canonical.clear()
                canonical[(name, value)] = spelled
                if self.params.get(name) == value:
                    self.params[name] = spelled
                    self.params_version += 1
                    server.synced_version = self.params_version

    def _count_bytes(self, received: int, sent: int) -> None:
        if self.pool is not None:
            st = self.pool.stats
            st.bytes_received += received
            st.bytes_sent += sent

    def server_data(self, server: ServerConnection, data: bytes,
                    msgs: list[tuple[int, bytes | None]]) -> None:
        """Bytes from our server: read what matters, forward them all."""
        release = False
        error_seen = False
        saw_rfq = False
        stats = self.pool.stats if self.pool is not None else None
        if self.queries is not None:
            self.queries.received(msgs)
        for mtype, body in msgs:
            if mtype == m.B.READY_FOR_QUERY and body:
                saw_rfq = True
                self._result_passed = False
                self.expected_rfq -= 1
                status = chr(body[0])
                self.txn_status = server.txn_status = status
                if stats is not None:
                    # SHOW STATS: a query is a request answered by a ReadyForQuery, as
                    # PgBouncer counts them (a Parse + Sync too, "SELECT 1; SELECT 2" once);
                    # time from a request to its ReadyForQuery, and from the first request
                    # of a transaction to the ReadyForQuery that ends it.
                    stats.query_count += 1
                    now = time.monotonic()
                    if self.query_started:
                        stats.query_time += now - self.query_started
                        self.query_started = now if self.expected_rfq > 0 else 0.0
                    if status == "I":
                        stats.xact_count += 1
                        if self.xact_started:
                            stats.xact_time += now - self.xact_started
                            self.xact_started = 0.0
                if status == "I" and server.schema_changed:
                    # Committed (or rolled back): others see the change from now on.
                    server.schema_changed = False
                    server.pool.catalog.changed()
                release = self.expected_rfq <= 0
            elif mtype == m.B.COMMAND_COMPLETE:
                self._result_passed = True
                if body is not None and body.startswith(DDL_TAG_PREFIXES):
                    server.schema_changed = True
                    server.pool.catalog.changed()
            elif mtype == m.B.PARAMETER_STATUS and body is not None:
                name, value = m.parse_parameter_status(body)
                server.params[name] = value
                if name in TRACKED_PARAMS:
                    if self.params.get(name) != value:
                        self.params[name] = value
                        self.params_version += 1
                else:
                    # A reported setting changed (default_transaction_read_only, a role ...),
                    # by whatever statement: the session's settings are read at the end.
                    self.settings_dirty = True
            elif mtype == m.B.NOTIFICATION and body is not None:
                if own_notifier_pid(body, server.backend_pid, self.cancel_pid) is not body:
                    data = self._own_notifications(data, msgs, server)
            elif mtype == m.B.ERROR_RESPONSE:
                error_seen = True
                self._result_passed = True
                if stats is not None:
                    stats.errors += 1
                if body is not None and (b"VFATAL\x00" in body or b"VPANIC\x00" in body):
                    # The server says why it ends the connection: that is what the client
                    # reads as the reason (server_lost adds no error of the pooler's).
                    self._server_fatal = True
            elif mtype == m.B.EMPTY_QUERY:
                self._result_passed = True  # a result too (as the engine: server.c)
        if release and self.txn_status != "I" and self.pool is not None \
                and self.pool.mode == "statement" and data[-6:-5] == b"Z":
            # Refuse the transaction in place of the server's answer, so the client shows why.
            self.expected_rfq = 0
            self.fail("08P01", "transaction blocks not allowed in statement pooling mode",
                      hint="Use autocommit statements, or a pool in transaction mode.")
            return
        router = self.router
        if router is not None:
            reader = server.reader
            self.write(router.server_chunk(data, msgs, reader.ends, server, reader.skipping,
                                           error_seen))
            if router.resume_due:
                # A statement parsed again here was checked: the requests that waited go on.
                resumed = router.resume(server)
                if resumed:
                    server.write(resumed)
                due = router.replies_due()
                if due:
                    self.write(due)
            skipped = router.take_skipped_queries()
            if skipped:
                self.expected_rfq -= skipped
                release = release or (saw_rfq and self.expected_rfq <= 0)
        else:
            self.write(data)
        if stats is not None:
            stats.bytes_sent += len(data)
        if release:
            self.expected_rfq = 0
            self._maybe_release(server)

    def _own_notifications(self, data: bytes, msgs: list[tuple[int, bytes | None]],
                           server: ServerConnection) -> bytes:
        """``data`` with the notifications the client's own session sent carrying the pid
        it was given (server.own_notifier_pid); the same length, so the reader's message
        ends stay true."""
        out = bytearray(data)
        for (mtype, body), end in zip(msgs, server.reader.ends, strict=True):
            if mtype == m.B.NOTIFICATION and body is not None:
                start = end - len(body) - 5
                if start >= 0:
                    out[start + 5:start + 5 + len(body)] = own_notifier_pid(
                        body, server.backend_pid, self.cancel_pid)
        return bytes(out)

    def _maybe_release(self, server: ServerConnection) -> None:
        assert self.pool is not None
        mode = self.pool.mode
        if self.txn_status == "I":
            self.idle_in_txn_since = 0.0
        elif not self.idle_in_txn_since:
            self.idle_in_txn_since = time.monotonic()
        if mode == "session":
            if self.settings_dirty and self.startup_settings and self.txn_status == "I" \
                    and not self.unsynced and not self._reader.mid_message:
                # A RESET (ALL) may have dropped a startup parameter's value, which
                # directly is what RESET goes back to: read the session, put it back.
                self._settle(server)
            return
        if self.unsynced or self._reader.mid_message:
            return
        if self.txn_status != "I":
            if mode == "statement":
                self.fail("08P01", "transaction blocks not allowed in statement pooling mode",
                          hint="Use autocommit statements, or a pool in transaction mode.")
            return
        if self.settings_dirty or self.pin_check:
            self._settle(server)
            return
        if self.pins:
            return  # pinned: the server stays this client's
        self._detach(client_closed=False)

    # -- session settings (session.py) ------------------------------------------------------
    def _note_session(self, sql: bytes, bind: bytes | None = None, parse: bool = False) -> bool:
        """Does ``sql`` change session settings, or make or end state that pins the client
        to its server? Then the session is read at the transaction's end (transaction and
        statement pools; in session mode the server stays the client's anyway). ``bind``:
        the Bind that runs it (names of settings bound as parameters are read from it).
        True if runs of ``sql`` may do so (``parse``: it is a Parse's): each Bind of it is
        noted too."""
        pool = self.pool
        if pool is None or self.is_admin:
            return False
        session_mode = pool.mode == "session"
        if session_mode and not self.startup_settings:
            return False
        relevant = False
        low = sql.decode("latin-1").lower()
        if might_change_settings(low):
            names = setting_changes(sql.decode("utf-8", errors="replace"))
            if names is not None:
                relevant = True
                self.settings_dirty = True
                for name in names:
                    if name == ALL:
                        self.setting_names.clear()
                        if self.unknown_setting:  # gone too: the pins are counted again
                            self.unknown_setting = ""
                            self.pin_check = True
                    elif name == DO_BLOCK:
                        if self.pooler.config.pin_session_state and not session_mode:
                            self.pin_check = True  # its pins are counted too
                    elif name.startswith(PARAM):
                        bound = bound_setting_name(bind, int(name[1:])) if bind else None
                        if bound is not None:
                            self.setting_names.add(bound)
                    elif name != UNKNOWN:
                        self.setting_names.add(name)
                    elif self.pooler.config.pin_session_state and not session_mode:
                        # A name the statement computes: not known, so not readable by name
                        # (custom settings are not in pg_settings). The client keeps its
                        # server, as for state that cannot follow it, until RESET ALL.
                        self.unknown_setting = sql.decode("utf-8", errors="replace")[:200]
                        self.pin_check = True
        if session_mode or not self.pooler.config.pin_session_state:
            return relevant
        if self.pins and any(word in low for word in UNPIN_WORDS):
            self.pin_check = True
        if parse and not relevant and any(word in low for word in UNPIN_RUN_WORDS):
            relevant = True
        if might_be_hazard(sql):
            for kind, what in classify(sql.decode("utf-8", errors="replace")):
                if kind in PINS:
                    relevant = True
                    self.pin_check = True
                    self.pin_candidates.setdefault(kind, what)
        return relevant

    def _names_context(self) -> str:
        """What a statement's names mean beyond its text: the search_path, and the role and
        session authorization its "$user" stands for (part of shared statement names)."""
        settings = self.settings
        return "\x00".join(settings.get(n, "") for n in ("search_path", "role",
                                                         "session_authorization")).rstrip("\x00")

    def _note_function_call(self, body: bytes) -> None:
        """A FunctionCall (libpq's PQfn) may run set_config, an advisory lock or any function
        that changes the session: read it at the transaction's end, as for a query that may
        (but for the large-object functions, PQfn's usual use)."""
        pool = self.pool
        if pool is None or pool.mode == "session" or self.is_admin:
            return
        oid = int.from_bytes(body[:4], "big")
        if oid in LARGE_OBJECT_FUNCTIONS:
            return
        self.settings_dirty = True
        if oid == SET_CONFIG_OID:  # its name: the first argument, as a Bind's parameter
            name = bound_setting_name(b"\x00\x00" + body[4:], 1)
            if name is not None:
                self.setting_names.add(name)
        if self.pooler.config.pin_session_state:
            self.pin_check = True

    def _note_bind(self, body: bytes) -> None:
        """A Bind: if it runs one of the client's statements that may change its session
        (router.session_sql), the run is noted as the Parse was."""
        assert self.router is not None
        start = body.find(b"\x00") + 1
        end = body.find(b"\x00", start)
        if start and end >= 0:
            sql = self.router.session_sql.get(body[start:end].decode(errors="replace"))
            if sql is not None:
                self._note_session(sql, body)

    def _settle(self, server: ServerConnection) -> None:
        """The transaction that changed settings is over: read what the session carries now
        from the server, as the client's settings and the server's, then let the server go.
        Requests the client sends meanwhile wait for it."""
        assert self.pool is not None
        self.settings_dirty = False
        self.settling = True
        self.server = None
        server.client = None
        server.resume_reading()
        server.set_state(ServerState.USED)
        server.set_state(ServerState.TESTED)
        rows: list[list[bytes | None]] = []
        names = set(self.setting_names) | set(UNLISTED)
        login_user = self.pool.server_user
        count_pins = self.pin_check or bool(self.pins)
        self.pin_check = False

        def read(srv: ServerConnection, error: str | None) -> None:
            self.settling = False
            srv.notify_to = None
            pool = self.pool
            assert pool is not None
            if srv.state is ServerState.CLOSED:
                pass
            elif error is not None or srv.txn_status != "I":
                srv.close(f"could not read session settings: {error or 'in a transaction'}")
            else:
                settings = settings_from_rows(rows, login_user)
                srv.settings = dict(settings)
                self.setting_names = {n for n in self.setting_names if n in settings}
                if self.startup_settings:
                    # What the session has not set (or RESET) is its startup value, as
                    # directly; the server gets it again before the client's next use.
                    settings = {**self.startup_settings, **settings}
                self.settings = settings
                if self.router is not None:
                    self.router.search_path = self._names_context()
                if count_pins:
                    self._pins_counted(srv, pins_from_rows(rows))
                if self.pins:
                    srv.discard_needed = True  # whoever gets it next must not inherit them
                    if self.gone:
                        pool.release(srv, client_closed=True)
                    else:
                        self._link(srv)  # pinned: it stays this client's
                    return
                if pool.mode == "session":
                    if self.gone:
                        pool.release(srv, client_closed=True)
                    else:  # its server for life: startup values the session lost, put back
                        self.wait_started = time.monotonic()
                        self.attach(srv, session=True)
                    return
                pool.give_out(srv)
            if self.gone:
                return
            if srv.state is ServerState.CLOSED and error is not None:
                self.fail("08006", f"server connection lost: {error}")
                return
            if self._pending:
                self.wait_started = time.monotonic()
                pool.request(self)
            elif pool.lane is not None:
                self.enter_fast()

        sql = snapshot_sql(names, count_pins)
        server.notify_to = self  # (a LISTEN of its session: what comes meanwhile is its own)
        if not server.cancels_pending:
            server.run_internal(sql, read, rows)
            return

        def cancels_done() -> None:
            # The client cancelled its query as it ended: once PostgreSQL has the cancel,
            # it cannot hit the read (Pooler.cancel_server).
            if server.state is ServerState.CLOSED:
                read(server, server.closed_reason or "server closed")
            else:
                server.run_internal(sql, read, rows)

        server.after_cancels = cancels_done

    def _pins_counted(self, server: ServerConnection, found: dict[str, int]) -> None:
        """The session's pinned state, as the server counted it: pin or unpin the client."""
        before = self.pins
        self.pins = {kind: before.get(kind) or self.pin_candidates.get(kind, kind)
                     for kind in found}
        if self.unknown_setting:
            self.pins[COMPUTED_SETTING] = self.unknown_setting
        self.pin_candidates = {}
        for kind in self.pins.keys() - before.keys():
            self.pooler.pins_total[kind] = self.pooler.pins_total.get(kind, 0) + 1
            log.info("%r pinned to %r: %s (%s)", self, server, kind, self.pins[kind])
        if before and not self.pins:
            log.info("%r unpinned from %r", self, server)

    def _detach(self, *, client_closed: bool) -> None:
        server = self.server
        if server is None:
            return
        self.server = None
        server.client = None
        server.resume_reading()
        assert self.pool is not None
        routing = self.pooler.routers.get(self.database) if self.pooler.routers else None
        if routing is not None:
            routing.transaction_over(  # read-your-writes: the commit's WAL position first
                self, server, lambda srv: srv.pool.release(srv, client_closed=client_closed))
        else:  # (a replica's pool, when a RELOAD removed the replicas meanwhile)
            server.pool.release(server, client_closed=client_closed)
        if not client_closed and self.pool.lane is not None \
                and (routing is None or routing.engine_may_take(self)):
            self.enter_fast()

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        """Our server went away under us: the client cannot continue its session."""
        if self.server is server:
            self.server = None
            if self._server_fatal or self._result_passed:
                # PostgreSQL's own FATAL, or a result of the request in flight, went to the
                # client: the close says the rest, as directly. (An ErrorResponse of ours
                # would be a second result: psycopg's COMMIT raised "received 2 results".)
                self.close(f"server connection lost: {reason}")
                return
            self.fail("08006", f"server connection lost: {reason}")

    # -- ending ---------------------------------------------------------------------------
    def fail(self, sqlstate: str, text: str, *, fatal: bool = True,
             hint: str | None = None, reason: str | None = None) -> None:
        """Tell the client what went wrong (as PostgreSQL would) and close; ``reason``: the
        log's words for it, if not ``text``."""
        self.closing = True
        if self._cork is None:
            self._cork = bytearray()  # sent by close(), after the log line
        self.write(m.error_response(sqlstate, text, severity="FATAL" if fatal else "ERROR",
                                    hint=hint))
        self.close(reason or text)

    def close(self, reason: str = "closed by pooler") -> None:
        self.closing = True
        transport, self.transport = self.transport, None
        cork, self._cork = self._cork, None
        # The log line ("closing because: ...") is written before the client can read its
        # error, as PgBouncer does: whoever reacts to the error finds the line there.
        self._disconnect(reason)
        if transport is not None:
            if cork:
                transport.write(cork)
            transport.close()

    def _disconnect(self, reason: str) -> None:
        if self.gone:
            return
        self.gone = True
        if self._login_task is not None:
            self._login_task.cancel()
        pool = self.pool
        if pool is not None:
            pool.cancel_wait(self)
            pool.clients.discard(self)
            routing = self.pooler.routers.get(self.database) if self.pooler.routers else None
            if routing is not None:  # its replica's work ends; it waits for none (routing.py)
                routing.client_gone(self)
        server = self.server
        if server is not None and self.replication:
            self.server = None  # a replication server is its client's alone (walsender.py)
            server.client = None
            server.close("replication client disconnected")
        elif server is not None:
            clean = (self.expected_rfq <= 0 and not self.unsynced
                     and not self._reader.mid_message)
            if clean:
                self._detach(client_closed=True)
            else:
                # Work in flight: stop it, and never lend this connection again.
                self.server = None
                server.client = None
                self.pooler.cancel_server(server)
                server.close("client disconnected with a query in progress")
        self.pooler.unregister_cancel_key(self)
        self.set_state(ClientState.CLOSED)
        if self.pooler.config.log_disconnections and self.state is not ClientState.LOGIN:
            # PgBouncer's words, which operators' alerts grep.
            log.info("%r closing because: %s (age=%ds)", self, reason,
                     time.time() - self.connect_time)
        else:
            log.debug("%r disconnected: %s", self, reason)
