"""One server connection: login to PostgreSQL, parameter tracking, forwarding, reset.

A :class:`ServerConnection` is an asyncio protocol. After login it is either idle in its pool,
linked to exactly one client (everything it receives is forwarded to that client as the same
bytes; only ReadyForQuery, ParameterStatus and ErrorResponse are read), or running a query of
the pooler's own (reset, health check, parameter sync, rollback) whose results nobody else sees.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pgpilot.proxy.auth import AuthFailed, ServerLogin
from pgpilot.proxy.states import ServerState, check_server_move
from pgpilot.wire import messages as m
from pgpilot.wire.errors import ProtocolError
from pgpilot.wire.framing import MessageReader

if TYPE_CHECKING:
    from pgpilot.proxy.client import ClientConnection
    from pgpilot.proxy.pool import Pool

log = logging.getLogger("pgpilot.proxy")

# What the pooler reads of a linked server's traffic; all else passes as bytes.
# (Parameter and row descriptions: what a client was told its prepared statement is, which
# prepared.py checks a copy parsed on another server against.)
LINKED_TYPES = frozenset({m.B.READY_FOR_QUERY, m.B.PARAMETER_STATUS, m.B.ERROR_RESPONSE,
                          m.B.COMMAND_COMPLETE, m.B.NOTIFICATION, m.B.ROW_DESCRIPTION,
                          m.B.PARAMETER_DESCRIPTION})
# Startup parameters whose value PostgreSQL reports (ParameterStatus) and the pooler keeps in step
# between a client and whichever server it lands on, by their canonical names.
TRACKED_PARAMS = ("client_encoding", "DateStyle", "TimeZone", "IntervalStyle",
                  "standard_conforming_strings", "application_name")
TRACKED_BY_LOWER = {p.lower(): p for p in TRACKED_PARAMS}
# What an internal query that returns rows reads (run_internal's ``rows``).
# (and notifications: those that come during the read of a client's session are its own)
ROW_READING_TYPES = LINKED_TYPES | {m.B.DATA_ROW, m.B.NOTIFICATION}

_ids = itertools.count(1)


def own_notifier_pid(body: bytes, backend_pid: int, client_pid: int) -> bytes:
    """A NotificationResponse body for the client whose server is ``backend_pid``: a
    notification its own session sent (the notifier's pid is its server's) carries the pid
    the client was given in BackendKeyData, as directly its own pid."""
    if body[:4] == (backend_pid & 0xFFFFFFFF).to_bytes(4, "big") and client_pid != backend_pid:
        return (client_pid & 0xFFFFFFFF).to_bytes(4, "big") + body[4:]
    return body


class ServerError(Exception):
    """A server failed to log in or broke off; ``sqlstate`` is what the client is told;
    ``from_server``: PostgreSQL itself refused the login (an ErrorResponse)."""

    def __init__(self, message: str, sqlstate: str = "08006", from_server: bool = False) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.from_server = from_server


InternalCallback = Callable[["ServerConnection", "str | None"], None]


class ServerConnection(asyncio.Protocol):
    # A server of the pool's own (not a replication client's: walsender.py): a refused
    # login of one holds the pool's next logins back (Pool.start_backoff).
    pooled = True

    def __init__(self, pool: Pool) -> None:
        self.id = next(_ids)
        self.pool = pool
        self.state = ServerState.LOGIN
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_key = 0
        now = time.monotonic()
        self.created_at = now
        self.last_used = now  # when it last went idle (server_idle_timeout, check delay)
        self.connect_time = time.time()
        self.request_time = time.time()
        self.txn_status = "I"
        self.closed_reason = ""
        self.link_time = 0.0
        self.local_addr = ""
        self.local_port = 0
        self._close_needed = False
        self.in_idle = False  # in its pool's idle list right now
        self.in_engine = False  # held by the compiled fast path (fastpath.Lane): idle or lent
        self.address: tuple[str, int] = ("", 0)  # host (or socket dir) and port it went to
        # Cancel requests sent for it and not yet done: it is not lent again until they are,
        # so a late cancel cannot hit the next client's query (PgBouncer's being_canceled).
        self.cancels_pending = 0
        self.give_out_after_cancel = False
        # What waits for those cancels to be done before the pooler's own query runs on it
        # (client._settle: a late cancel of the client's query must not hit it).
        self.after_cancels: Callable[[], None] | None = None
        # The client whose session an internal query reads (client._settle): notifications
        # that reach the server meanwhile are its own.
        self.notify_to: ClientConnection | None = None
        # Whose parameters this server last carried (a client's params dict and version):
        # when the same client comes back unchanged, no comparison is needed.
        self.synced_for: dict[str, str] | None = None
        self.synced_version = -1
        # Server-side prepared statements (pgpilot_<hash> names), least recently used first:
        # True once the server has answered their Parse, False while it is on its way (or
        # their state is not known); and those to close before the next use (their table
        # changed under them).
        self.prepared: collections.OrderedDict[str, bool] = collections.OrderedDict()
        self.stale_statements: set[str] = set()
        # A schema change ran in the transaction now open: the catalog generation moves on
        # again when it ends (prepared.Catalog).
        self.schema_changed = False
        # Session settings beyond the startup parameters, as the pooler last applied or read
        # them (session.py): empty for a server no client SET anything on.
        self.settings: dict[str, str] = {}
        # A pinned client's server (session.py): DISCARD ALL before anyone else gets it.
        self.discard_needed = False
        self.reader = MessageReader()  # every body is read during login
        self._login: ServerLogin | None = None
        self.login_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._internal_cb: InternalCallback | None = None
        self._internal_error: str | None = None
        self.internal_error_code = ""  # the SQLSTATE of the last internal query's error
        self._internal_pending = 0
        self._internal_rows: list[list[bytes | None]] | None = None
        self._paused_by_client = False

    def __repr__(self) -> str:
        return f"S-{self.id}({self.pool.name} {self.state.name})"

    @property
    def close_needed(self) -> bool:
        """RECONNECT / reload: close instead of reuse."""
        return self._close_needed

    @close_needed.setter
    def close_needed(self, value: bool) -> None:
        self._close_needed = value
        if value and self.in_engine and self.transport is not None:
            # The fast path must not lend it again: hold it, and take it back now if idle.
            self.transport.set_hold(True)  # type: ignore[attr-defined]
            if self.client is None and self.transport.peer is None:  # type: ignore[attr-defined]
                self.transport.eject()  # type: ignore[attr-defined]

    # -- state ----------------------------------------------------------------------
    def set_state(self, new: ServerState) -> None:
        old = self.state
        check_server_move(old, new)
        if old is new:
            return
        self.state = new
        self.pool.server_moved(self, old, new)

    # -- asyncio protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sockname = transport.get_extra_info("sockname")
        if isinstance(sockname, tuple):
            self.local_addr, self.local_port = str(sockname[0]), int(sockname[1])
            if self.pool.pooler.config.tcp_keepalive:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        else:
            self.local_addr = "unix"
        login_user, password = self.pool.server_credentials()
        self._login = ServerLogin(login_user, password,
                                  self.pool.pooler.scram_client_keys.get(login_user))
        params = {"user": login_user, "database": self.pool.server_dbname}
        params.update(self.startup_params())
        self.transport.write(m.startup_message(params))  # type: ignore[union-attr]

    def startup_params(self) -> dict[str, str]:
        """What the StartupMessage carries beside user and database (the database's
        settings; a replication server adds its client's: walsender.py)."""
        return self.pool.server_startup_params()

    def data_received(self, data: bytes) -> None:
        try:
            msgs = self.reader.feed(data)
        except ProtocolError as exc:
            self.fail(f"server sent invalid data: {exc}")
            return
        if self._internal_cb is not None and self.login_done.done():
            self._internal_messages(msgs)  # a query after the login (connect_query) included
        elif self.state is ServerState.LOGIN:
            self._login_messages(msgs, data)
        elif self.client is not None:
            self.client.server_data(self, data, msgs)
        else:
            # An idle server may get a ParameterStatus or notice; an error means it is going away.
            for mtype, body in msgs:
                if mtype == m.B.ERROR_RESPONSE and body is not None:
                    fields = m.parse_error_fields(body)
                    self.fail(f"idle server sent error: {fields.get('M', '')}")
                    return
                if mtype == m.B.PARAMETER_STATUS and body is not None:
                    name, value = m.parse_parameter_status(body)
                    self.params[name] = value

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.in_engine = False  # (the engine lets go of a server whose connection ended)
        if self.state is not ServerState.CLOSED:
            self._closed(self.closed_reason or "server closed the connection unexpectedly")

    def pause_writing(self) -> None:
        # The server cannot take more: stop reading from the client that feeds it.
        if self.client is not None:
            self.client.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading()

    # -- login ------------------------------------------------------------------------
    def _login_messages(self, msgs: list[tuple[int, bytes | None]], data: bytes) -> None:
        assert self._login is not None and self.transport is not None
        for i, (mtype, body) in enumerate(msgs):
            assert body is not None
            try:
                if mtype == m.B.AUTHENTICATION:
                    reply = self._login.answer(m.parse_auth_request(body))
                    if reply:
                        self.transport.write(reply)
                elif mtype == m.B.PARAMETER_STATUS:
                    name, value = m.parse_parameter_status(body)
                    self.params[name] = value
                elif mtype == m.B.BACKEND_KEY_DATA:
                    self.backend_pid, self.backend_key = m.parse_backend_key_data(body)
                elif mtype == m.B.ERROR_RESPONSE:
                    fields = m.parse_error_fields(body)
                    self.fail(fields.get("M", "login failed"), fields.get("C", "08006"),
                              from_server=True)
                    return
                elif mtype == m.B.READY_FOR_QUERY:
                    self.reader = MessageReader(LINKED_TYPES)
                    rest = msgs[i + 1:]
                    if rest:
                        self.fail("server sent data after ReadyForQuery during login")
                        return
                    self.last_used = time.monotonic()
                    if not self.login_done.done():
                        self.login_done.set_result(None)
                    return
                # NoticeResponse and NegotiateProtocolVersion need no answer.
            except AuthFailed as exc:
                # The pooler cannot answer what PostgreSQL asks (wrong password type, none
                # configured): as a refusal by PostgreSQL, the waiting clients are told at once.
                self.fail(f"server login failed: {exc}", "28000", from_server=True)
                return
            except (ProtocolError, ValueError) as exc:
                self.fail(f"server login failed: {exc}")
                return

    # -- internal queries (reset, check, parameter sync, rollback) --------------------
    def run_internal(self, sql: str, callback: InternalCallback,
                     rows: list[list[bytes | None]] | None = None) -> None:
        """Send ``sql`` (simple protocol); call ``callback(self, error_or_None)`` at its end;
        the values of the rows it returns are added to ``rows``, if given."""
        assert self.transport is not None and self.client is None
        self.synced_for = None  # a reset or SET may change what the server carries
        self._internal_cb = callback
        self._internal_error = None
        self.internal_error_code = ""
        self._internal_pending = 1
        self._internal_rows = rows
        if rows is not None and not self.reader.mid_message:
            self.reader = MessageReader(ROW_READING_TYPES)
        lowered = sql.lower()
        if "discard all" in lowered or "deallocate" in lowered:
            self.prepared.clear()
            self.stale_statements.clear()
        if "discard all" in lowered or "reset all" in lowered:
            self.settings = {}
        if "discard all" in lowered:
            self.discard_needed = False
        self.transport.write(m.query(sql))

    def _internal_messages(self, msgs: list[tuple[int, bytes | None]]) -> None:
        for mtype, body in msgs:
            if mtype == m.B.ERROR_RESPONSE and body is not None:
                fields = m.parse_error_fields(body)
                self._internal_error = fields.get("M", "error")
                self.internal_error_code = fields.get("C", "")
            elif mtype == m.B.PARAMETER_STATUS and body is not None:
                name, value = m.parse_parameter_status(body)
                self.params[name] = value
            elif mtype == m.B.NOTIFICATION and body is not None:
                # (behind the read's end in the same chunk: the pinned client it is lent to)
                target = self.notify_to or self.client
                if target is not None:
                    target.write(m.message(mtype, own_notifier_pid(body, self.backend_pid,
                                                                   target.cancel_pid)))
            elif mtype == m.B.DATA_ROW and body is not None and self._internal_rows is not None:
                self._internal_rows.append(m.parse_data_row(body))
            elif mtype == m.B.READY_FOR_QUERY and body is not None:
                self._internal_pending -= 1
                self.txn_status = chr(body[0])
                if self._internal_pending == 0:
                    if self._internal_rows is not None:
                        self._internal_rows = None
                        if not self.reader.mid_message:
                            self.reader = MessageReader(LINKED_TYPES)
                    cb, self._internal_cb = self._internal_cb, None
                    if cb is not None:
                        cb(self, self._internal_error)

    @property
    def busy_internal(self) -> bool:
        return self._internal_cb is not None

    # -- linking ------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self._paused_by_client:
            self._paused_by_client = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._paused_by_client:
            self._paused_by_client = False
            self.transport.resume_reading()

    # -- ending -------------------------------------------------------------------------
    def fail(self, reason: str, sqlstate: str = "08006", from_server: bool = False) -> None:
        """Close because something went wrong; a waiting login or linked client is told."""
        if not self.login_done.done():
            if from_server and self.pooled:
                # Before this server's place is freed (close), which would let the waiting
                # clients open the next one at once: the pool's backoff comes first.
                self.pool.start_backoff()
            self.login_done.set_exception(ServerError(reason, sqlstate, from_server))
            # Nobody may await it (e.g. a warm-up connection): mark the exception retrieved.
            self.login_done.exception()
        self.close(reason)

    def close(self, reason: str, *, terminate: bool = True) -> None:
        if self.state is ServerState.CLOSED:
            return
        self.closed_reason = reason
        if self.transport is not None:
            if terminate and self.state is not ServerState.LOGIN:
                with contextlib.suppress(Exception):
                    self.transport.write(m.terminate())
            self.transport.close()
        self._closed(reason)

    def _closed(self, reason: str) -> None:
        if self.state is ServerState.CLOSED:
            return
        if not self.login_done.done():
            self.login_done.set_exception(ServerError(reason))
            self.login_done.exception()
        client = self.client
        self.client = None
        cb, self._internal_cb = self._internal_cb, None
        self.set_state(ServerState.CLOSED)
        log.debug("%r closed: %s", self, reason)
        if client is not None:
            client.server_lost(self, reason)
        if cb is not None:
            cb(self, reason or "server closed")
