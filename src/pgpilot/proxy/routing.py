"""Read/write split for ``[databases]`` entries with ``replicas=``: which server a client's
next transaction goes to, the replicas' health, and read-your-writes by LSN.

The decision is made once per transaction, when a client with no server sends its first
bytes (``client._query_data``), from those bytes alone (:func:`first_sql`) and the client's
:class:`ClientRoute`:

* an autocommit statement that only reads (``pgpilot.replication.classify``: no write, no
  lock, no data-modifying CTE, no function not known safe on a standby), or a
  ``BEGIN READ ONLY`` / ``START TRANSACTION READ ONLY`` transaction: a replica, the eligible one
  with the least outstanding work;
* anything else, a read-write ``BEGIN`` included (what the transaction will do is not known
  yet), extended-protocol batches that run a statement prepared earlier, and bytes that do not
  hold a whole first message: the primary; so do ``/* pgpilot:primary */`` hints;
* eligible: up, a standby, within ``replica_max_lag_bytes`` / ``replica_max_lag_ms``, and
  replayed at least up to the client's ``min_lsn``.

**Read-your-writes.** When a transaction the primary ran ends (ReadyForQuery ``I``) and it may
have written, the router notes the moment. The health check asks the primary its
``pg_current_wal_insert_lsn()`` every interval; a sample whose query was sent after that moment
is at or past the commit's record (the commit was done before its ReadyForQuery came, and the
position only grows), and becomes the client's ``min_lsn``. Until such a sample exists, the
client's reads go to the primary; then only to replicas whose polled
``pg_last_wal_replay_lsn()`` has reached ``min_lsn``. No query per transaction, no client
change.

**Health.** Every ``replica_check_interval`` each node is asked ``HEALTH_SQL`` (asyncpg, with
the credentials of the database's pools): a replica that does not answer, is promoted, or lags
beyond the bounds leaves the read set and comes back when it is healthy again. When the
configured primary does not answer and a replica reports ``pg_is_in_recovery()`` false, that
replica becomes the primary: the primary pools of the database are pointed at it (their old
servers closed), and writes go there. A client mid-transaction on a server that dies gets
08006 from the pooler, as any client does; nothing is retried for it.

**The compiled fast path** (``_fastpath.c``, ``FastPool.route_reads``) serves, in C, the
transactions that surely go to the primary (a first statement beginning with INSERT, UPDATE,
DELETE, MERGE or a read-write BEGIN) and hands every other one to Python, which decides here;
it notes when such a transaction ended (``Conn.route_ended``), the moment read-your-writes
counts from. A client goes back to the engine after a transaction on the primary.

**Session pools** are not split per transaction: a session-mode client's server is chosen once,
at connect (:meth:`DatabaseRouter.session_pool`): the primary, or a replica when it asked for
one with the pooler's own ``route`` setting (a startup parameter, or in ``options``).

**RELOAD** (:func:`reload_routers`) applies a changed ``replicas=`` list, ``read_write_split``
and lag bounds without dropping a client. **SHOW ROUTES** (:func:`show_routes`) and the
metrics show the decisions, with why those sent to the primary went there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import struct
import time
import weakref
from typing import TYPE_CHECKING, Any

from pgpilot.replication import (
    HEALTH_SQL,
    SAFE_FUNCTIONS_SQL,
    FunctionSafety,
    ReplicaSet,
    ReplicaState,
    Route,
    classify,
    format_lsn,
    parse_lsn,
)
from pgpilot.wire import messages as m

if TYPE_CHECKING:
    from pgpilot.proxy.client import ClientConnection
    from pgpilot.proxy.config import Config, DatabaseConfig
    from pgpilot.proxy.pool import Pool
    from pgpilot.proxy.pooler import Pooler
    from pgpilot.proxy.server import ServerConnection

log = logging.getLogger("pgpilot.proxy")

__all__ = ["ClientRoute", "DatabaseRouter", "first_sql", "metric_families", "own_command",
           "reload_routers", "replica_pool_node", "show_routes", "start_routers"]

_LEN = struct.Struct("!i")
# An engine client's route_flags (engine/client.c): the engine sent a transaction of it to the
# primary (a pool with route_reads serves only those in C).
ROUTE_WROTE = 1


def first_sql(pending: bytes | bytearray,
              prepared: dict[bytes, str] | None = None) -> list[str] | None:
    """The SQL of a transaction's first round from the client's bytes: the simple Query's text,
    or the texts of the Parses of an extended-protocol batch up to its Sync or Flush, and of the
    statements it binds (``prepared``: name -> text, what the client parsed before). None when
    that cannot be known (an incomplete message, a Bind of a statement whose text is not known,
    a function call, COPY data)."""
    view = memoryview(pending)
    pos = 0
    texts: list[str] = []
    parsed: set[bytes] = set()
    while pos + 5 <= len(view):
        mtype = view[pos]
        length = _LEN.unpack_from(view, pos + 1)[0]
        end = pos + 1 + length
        if length < 4 or end > len(view):
            return None
        body = bytes(view[pos + 5:end])
        pos = end
        if mtype == 0x51:  # Query
            return [body.rstrip(b"\x00").decode("utf-8", "replace")]
        if mtype == 0x50:  # Parse: name, text
            name, _, rest = body.partition(b"\x00")
            texts.append(rest.partition(b"\x00")[0].decode("utf-8", "replace"))
            parsed.add(name)
        elif mtype == 0x42:  # Bind: portal, statement
            statement = body.partition(b"\x00")[2].partition(b"\x00")[0]
            if statement not in parsed:
                known = prepared.get(statement) if prepared else None
                if known is None:
                    return None
                texts.append(known)
        elif mtype in (0x53, 0x48):  # Sync; Flush (asyncpg: Parse, Describe, Flush, then it
            return texts or None  # binds what it parsed, on the same server, and Syncs)
        elif mtype not in (0x44, 0x45, 0x43):  # Describe, Execute, Close
            return None
    return None


# The pooler's own settings, answered by the pooler (never sent to a server):
# SET pgpilot.route = primary | replica | auto, RESET pgpilot.route, SET pgpilot.min_lsn = 'X/Y',
# SHOW pgpilot.route, SHOW pgpilot.min_lsn.
_OWN = re.compile(
    r"^\s*(?:(?P<set>SET)\s+(?:SESSION\s+)?pgpilot\.(?P<sname>route|min_lsn)\s*(?:=|TO)\s*"
    r"'?(?P<value>[\w/]+)'?|(?P<reset>RESET)\s+pgpilot\.(?P<rname>route|min_lsn)"
    r"|(?P<show>SHOW)\s+pgpilot\.(?P<wname>route|min_lsn))\s*;?\s*$",
    re.IGNORECASE,
)


def own_command(pending: bytes | bytearray) -> tuple[re.Match[str], bytes] | None:
    """A round that is only one of the pooler's own commands: its match and the message
    types sent (``b"Q"``, or extended ``b"PBDES"``-like), else None."""
    view = memoryview(pending)
    pos = 0
    types = bytearray()
    text = None
    while pos + 5 <= len(view):
        mtype = view[pos]
        length = _LEN.unpack_from(view, pos + 1)[0]
        end = pos + 1 + length
        if length < 4 or end > len(view):
            return None
        body = bytes(view[pos + 5:end])
        pos = end
        types.append(mtype)
        if mtype == 0x51:  # Query
            text = body.rstrip(b"\x00").decode("utf-8", "replace")
            break
        if mtype == 0x50:  # Parse of the unnamed statement
            name, _, rest = body.partition(b"\x00")
            if name or text is not None:
                return None
            text = rest.partition(b"\x00")[0].decode("utf-8", "replace")
        elif mtype == 0x53:  # Sync
            break
        elif mtype not in (0x42, 0x44, 0x45):  # Bind, Describe, Execute
            return None
    if text is None or pos != len(view) or not text.lower().lstrip().startswith(
            ("set", "reset", "show")):
        return None
    match = _OWN.match(text)
    return (match, bytes(types)) if match else None


@dataclasses.dataclass
class ClientRoute:
    """What the router keeps per client: the WAL position its reads must see, whether its
    current transaction runs on the primary and may write, and the replica it holds."""

    min_lsn: int = 0
    # when its last transaction that may have written ended (time.monotonic()), until a
    # sample of the primary's position taken after it is known: 0 = none pending
    wrote_at: float = 0.0
    may_write: bool = False
    replica: str | None = None
    last: str = "primary"  # where its last transaction went
    # SET pgpilot.route: "primary" or "replica" (a replica when one is eligible), "" = auto
    override: str = ""
    # the text of each named statement the client parsed (Pooler.parse_observers)
    prepared: dict[bytes, str] = dataclasses.field(default_factory=dict)


class DatabaseRouter:
    """One ``[databases]`` entry with replicas: its nodes, their health, the choice per
    transaction, and the client routes."""

    def __init__(self, pooler: Pooler, name: str, db: DatabaseConfig) -> None:
        self.pooler = pooler
        self.name = name
        self.db = db
        self.nodes: dict[str, DatabaseConfig] = _nodes(name, db)
        self.primary_name = "primary"
        cfg = pooler.config
        self.split = _setting(db, cfg, "read_write_split")
        self.read_your_writes = True
        self.replica_set = ReplicaSet(
            [n for n in self.nodes if n != "primary"],
            max_lag_bytes=_setting(db, cfg, "replica_max_lag_bytes") or None,
            max_lag_ms=_setting(db, cfg, "replica_max_lag_ms") or None)
        self.interval = float(cfg.replica_check_interval)
        self.functions = FunctionSafety()
        self.routes: weakref.WeakKeyDictionary[ClientConnection, ClientRoute] = (
            weakref.WeakKeyDictionary())
        # transactions sent per target (SHOW ROUTES, metrics, and what the tests read), why
        # those that went to the primary did, and the session-mode sessions pinned per target
        self.counts: dict[str, int] = dict.fromkeys(self.nodes, 0)
        self.reasons: dict[str, int] = {}
        self.sessions: dict[str, int] = {}
        self.primary_up = True
        # (when the query was sent, the primary's insert position it returned)
        self.lsn_sample: tuple[float, int] | None = None
        self.deferred: list[tuple[ClientConnection, ClientRoute, re.Match[str], bytes]] = []
        self._conns: dict[str, Any] = {}
        self._task: asyncio.Task[None] | None = None
        self.checked = asyncio.Event()

    # -- the decision --------------------------------------------------------------------
    def route_of(self, client: ClientConnection) -> ClientRoute:
        route = self.routes.get(client)
        if route is None:
            route = self.routes[client] = ClientRoute()
        return route

    def decide(self, client: ClientConnection, pending: bytes | bytearray) -> str:
        """The node (``"primary"``, ``"replica1"`` ...) for ``client``'s next transaction."""
        route = self.route_of(client)
        route.may_write = False
        if route.replica is not None:  # chosen before, never used (its replica went away)
            self._release(route.replica)
            route.replica = None
        texts = first_sql(pending, route.prepared) if self.split else None
        if texts is None:
            route.may_write = True
            self._why("unparsed" if self.split else "split_off")
            return self.primary_name
        readable = True
        why = "may_write"
        for text in texts:
            statement = classify(text)
            if statement.hint is Route.PRIMARY or statement.sets_route:
                readable, why = False, "hinted"
            elif statement.begin:
                readable = readable and statement.begin_read_only
            elif statement.route(self.functions) is Route.PRIMARY:
                readable = False
        if route.override == "primary":
            readable, why = False, "hinted"
        elif route.override == "replica":
            readable = True
        if not readable:
            route.may_write = True
            self._why(why)
            return self.primary_name
        if not self._settled(route):
            self._why("read_your_writes")  # its last write's position is not known yet
            return self.primary_name
        chosen = self.replica_set.choose(route.min_lsn if self.read_your_writes else 0)
        if chosen is None:
            self._why("read_your_writes" if route.min_lsn and any(
                self.replica_set.eligible(n) for n in self.replica_set.names)
                else "no_replica")
            return self.primary_name
        route.replica = chosen
        return chosen

    def _why(self, reason: str) -> None:
        """Count why a transaction went to the primary (SHOW ROUTES, metrics)."""
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def session_pool(self, client: ClientConnection) -> Pool:
        """The pool a session-mode client's server comes from, chosen once, at its first
        query, for the whole session: a replica when the client asked for one at connect
        (``pgpilot.route=replica``, a startup parameter or in ``options``), the eligible one
        with the least outstanding work that replayed its ``pgpilot.min_lsn``, else (and by
        default) the primary. The session keeps that server: nothing is split per
        transaction."""
        assert client.pool is not None
        route = self.route_of(client)
        target = self.primary_name
        if route.replica is not None:
            self._release(route.replica)
            route.replica = None
        if self.split and route.override == "replica":
            chosen = self.replica_set.choose(route.min_lsn)
            if chosen is not None:
                target = route.replica = chosen  # held until the session ends
        self.counts[target] = self.counts.get(target, 0) + 1
        self.sessions[target] = self.sessions.get(target, 0) + 1
        if target == "primary":
            return client.pool
        return self.pooler.get_pool(self.nodes[target], f"{self.name}@{target}", client.user)

    def startup_setting(self, client: ClientConnection, name: str, value: str) -> str | None:
        """``pgpilot.route`` / ``pgpilot.min_lsn`` given at connect (a startup parameter, or
        ``-c`` in ``options``): as ``SET`` at the session's start; the error text if the
        value is not one."""
        return self._set(self.route_of(client), name.lower().partition(".")[2],
                         value.strip().lower())

    def engine_routed(self) -> int:
        """Transactions the compiled fast path sent to the primary itself (they may write)."""
        return sum(pool.lane.fp.routed_primary for (pool_name, _user), pool
                   in self.pooler.pools.items() if pool_name == self.name and pool.lane)

    def counted(self) -> tuple[dict[str, int], dict[str, int]]:
        """Transactions per target and why those to the primary went there, the engine's
        included (SHOW ROUTES, metrics)."""
        engine = self.engine_routed()
        counts, reasons = dict(self.counts), dict(self.reasons)
        counts[self.primary_name] = counts.get(self.primary_name, 0) + engine
        reasons["may_write"] = reasons.get("may_write", 0) + engine
        return counts, reasons

    def startup_settings(self, client: ClientConnection) -> bool:
        """Did ``client`` give pgpilot.route / pgpilot.min_lsn (or SET them already)?"""
        route = self.routes.get(client)
        return route is not None and bool(route.override or route.min_lsn)

    def client_gone(self, client: ClientConnection) -> None:
        """``client`` disconnected (a transaction or session on a replica may be cut off):
        its replica's outstanding work goes down, and it waits for no replica's server."""
        route = self.routes.pop(client, None)
        if route is not None and route.replica is not None:
            self._release(route.replica)
            for node in self.replica_set.names:
                user = self.nodes[node].user or client.user
                pool = self.pooler.pools.get((f"{self.name}@{node}", user))
                if pool is not None:
                    pool.cancel_wait(client)

    def _release(self, name: str) -> None:
        if name in self.replica_set.states:  # (a RELOAD may have removed it)
            self.replica_set.release(name)

    def engine_may_take(self, client: ClientConnection) -> bool:
        """May ``client`` go back to the compiled fast path between transactions? There the
        engine serves, in C, only transactions that surely go to the primary (route_reads)
        and hands any other back. Not after a transaction on a replica (it is likely to read
        again: handing it back each time would cost more than staying), nor while it routes
        everything to a replica (SET pgpilot.route = replica sends its writes there too)."""
        route = self.routes.get(client)
        return route is None or (route.override != "replica" and route.last == "primary")

    def observe_parse(self, client: ClientConnection, body: bytes) -> None:
        """A Parse from a client of this database (wherever it runs): remember the text of the
        statement (named or the unnamed one), so that a later Bind of it alone can be routed
        by it."""
        if client.database != self.name:
            return
        name, _, rest = body.partition(b"\x00")
        prepared = self.route_of(client).prepared
        if len(prepared) >= 1000:
            prepared.clear()  # unknown names go to the primary: safe
        prepared[name] = rest.partition(b"\x00")[0].decode("utf-8", "replace")

    def pool_for(self, client: ClientConnection, pending: bytes | bytearray) -> Pool | None:
        """The pool ``client``'s next transaction takes its server from; None when the round
        was one of the pooler's own commands, answered here."""
        assert client.pool is not None
        transport: Any = client.transport
        if getattr(transport, "route_flags", 0) & ROUTE_WROTE:
            # The engine sent transactions of it to the primary and they are over: its reads
            # wait for a position sampled after the last one ended (monotonic clock).
            ended = transport.route_ended or time.monotonic()
            transport.route_flags = 0
            if self.read_your_writes:
                route = self.route_of(client)
                route.wrote_at = max(route.wrote_at, ended)
        own = own_command(pending) if pending[:1] in (b"Q", b"P") else None
        if own is not None:
            if isinstance(pending, bytearray):
                pending.clear()
            route = self.route_of(client)
            if own[0]["show"] and not self._settled(route):
                self.deferred.append((client, route, *own))  # answered at the next sample
                client.pause_reading()
            else:
                client.write(self._answer(route, *own))
            return None
        target = self.decide(client, pending)
        self.route_of(client).last = target
        self.counts[target] = self.counts.get(target, 0) + 1
        if target == "primary":
            return client.pool
        return self.pooler.get_pool(self.nodes[target], f"{self.name}@{target}", client.user)

    def transaction_over(self, client: ClientConnection, server: ServerConnection,
                         release: Any) -> None:
        """``client``'s transaction on ``server`` ended (the server is detached): learn the
        primary's WAL position if it may have written, then ``release(server)``."""
        route = self.route_of(client)
        if route.replica is not None:
            self._release(route.replica)
            route.replica = None
        transport: Any = client.transport
        if getattr(transport, "route_flags", 0) & ROUTE_WROTE:
            route.may_write = True  # the engine began it on the primary, Python ends it
            transport.route_flags = 0
        if not (route.may_write and self.read_your_writes and self.split) \
                or server.txn_status != "I":
            release(server)
            return
        route.may_write = False
        # Its commit (if any) is done: the primary's insert position sampled by a health
        # check sent after this moment is at or past it. No query of its own is needed.
        route.wrote_at = time.monotonic()
        release(server)

    def _settled(self, route: ClientRoute) -> bool:
        """Is the position of the client's last write known? (Raises its min_lsn if so.)"""
        if not route.wrote_at:
            return True
        sample = self.lsn_sample
        if sample is None or sample[0] <= route.wrote_at:
            return False
        route.min_lsn = max(route.min_lsn, sample[1])
        route.wrote_at = 0.0
        return True

    def _answer(self, route: ClientRoute, match: re.Match[str], types: bytes) -> bytes:
        """The replies to one of the pooler's own commands (simple or extended protocol)."""
        rows: list[bytes] = []
        described = b""
        if match["show"]:
            name = match["wname"].lower()
            value = (route.override or "auto") if name == "route" else format_lsn(route.min_lsn)
            described = m.row_description([(name, 25)])
            rows = [m.data_row([value]), m.command_complete("SHOW")]
        else:
            name = (match["sname"] or match["rname"]).lower()
            value = (match["value"] or "").lower() if match["set"] else ""
            error = self._set(route, name, value)
            if error is not None:
                return m.error_response("22023", error) + m.ready_for_query("I")
            rows = [m.command_complete("SET" if match["set"] else "RESET")]
        if types == b"Q":
            return described + b"".join(rows) + m.ready_for_query("I")
        out = bytearray()
        for t in types:
            if t == 0x50:
                out += m.message(ord("1"))  # ParseComplete
            elif t == 0x42:
                out += m.message(ord("2"))  # BindComplete
            elif t == 0x44:
                out += described or m.message(ord("n"))  # RowDescription or NoData
            elif t == 0x45:
                out += b"".join(rows)
            elif t == 0x53:
                out += m.ready_for_query("I")
        return bytes(out)

    @staticmethod
    def _set(route: ClientRoute, name: str, value: str) -> str | None:
        """Apply ``pgpilot.<name> = value`` ("" = RESET) to ``route``; the error, if any."""
        if name == "route":
            if value not in ("", "primary", "replica", "auto", "default"):
                return f'invalid value for parameter "pgpilot.route": "{value}"'
            route.override = "" if value in ("auto", "default") else value
        elif name == "min_lsn":
            if value:
                try:
                    route.min_lsn = max(route.min_lsn, parse_lsn(value))
                except ValueError:
                    return f'invalid value for parameter "pgpilot.min_lsn": "{value}"'
        else:
            return f'unrecognized configuration parameter "pgpilot.{name}"'
        return None

    # -- health ----------------------------------------------------------------------------
    def _credentials(self) -> tuple[str, str | None] | None:
        if self.db.user:
            return self.db.user, self.db.password or self.pooler.server_password_for(
                self.db.user)
        for (name, _user), pool in self.pooler.pools.items():
            if name == self.name:
                return pool.server_credentials()
        return None

    async def _query(self, node: str, sql: str) -> list[Any]:
        import asyncpg

        conn = self._conns.get(node)
        if conn is None or conn.is_closed():
            creds = self._credentials()
            if creds is None:
                raise ConnectionError("no credentials yet (no pool of this database)")
            cfg = self.nodes[node]
            conn = await asyncpg.connect(
                host=cfg.host or self.pooler.default_socket_dir(), port=cfg.port,
                user=creds[0], password=creds[1], database=cfg.dbname or self.name,
                timeout=max(1.0, self.interval * 4), ssl=False)
            self._conns[node] = conn
        try:
            return list(await conn.fetch(sql, timeout=max(1.0, self.interval * 4)))
        except BaseException:
            self._conns.pop(node, None)
            with contextlib.suppress(Exception):
                conn.terminate()
            raise

    async def check(self) -> None:
        """One health round: the primary's position, then each replica; failover."""
        primary_lsn: int | None = None
        try:
            if not self.functions.loaded:
                self.functions.load(r[0] for r in await self._query(self.primary_name,
                                                                    SAFE_FUNCTIONS_SQL))
            sent = time.monotonic()
            rows = await self._query(self.primary_name, HEALTH_SQL)
            self.primary_up = not rows[0][0]
            primary_lsn = parse_lsn(rows[0][1]) if self.primary_up else None
            if primary_lsn is not None:
                self.lsn_sample = (sent, primary_lsn)
        except Exception:
            self.primary_up = False
        if self.deferred:  # SHOW pgpilot.min_lsn waiting for a sample after a write
            still = []
            for waiting, route, match, types in self.deferred:
                if waiting.gone:
                    continue
                if not self._settled(route):
                    still.append((waiting, route, match, types))
                    continue
                waiting.write(self._answer(route, match, types))
                waiting.resume_reading()
            self.deferred = still
        for name in self.replica_set.names:
            state = self.replica_set.states[name]
            try:
                row = (await self._query(name, HEALTH_SQL))[0]
            except Exception as exc:
                state.record(None, primary_lsn, error=str(exc)[:200])
            else:
                state.record(tuple(row), primary_lsn)
        if not self.primary_up:
            promoted = [n for n in self.replica_set.names
                        if self.replica_set.states[n].up and not self.replica_set.states[n]
                        .in_recovery]
            if promoted:
                self._fail_over(promoted[0])
        for name in self.replica_set.names:
            if not self.replica_set.eligible(name):
                self._reroute_waiting(name)
        self.checked.set()

    def replica_login_failed(self, pool: Pool, error: str) -> None:
        """A server login to a replica failed (it is shutting down, say): out of the read set
        until a health check finds it well, and its waiting clients are routed again."""
        name = pool.db_name.partition("@")[2]
        if pool.db_name.partition("@")[0] != self.name or name not in self.replica_set.states:
            return
        self.replica_set.states[name].record(None, None, error=error[:200])
        self._reroute_waiting(name)

    def _reroute_waiting(self, name: str) -> None:
        """Clients waiting for a server of replica ``name``, which left the read set (down,
        promoted, too far behind), are routed again: another replica, or the primary. They
        sent nothing to it yet, so nothing is retried."""
        pool_name = f"{self.name}@{name}"
        for (db_name, _user), pool in list(self.pooler.pools.items()):
            if db_name == pool_name:
                self._reroute_pool(pool)

    def _reroute_pool(self, pool: Pool) -> None:
        if not pool.waiting:
            return
        waiting = list(pool.waiting)
        pool.waiting.clear()
        pool._waiting_changed()
        for client in waiting:
            if not client.gone and client.server is None:
                target = (self.pool_for(client, client._pending)
                          if client.pool is not None and client.pool.mode != "session"
                          else self.session_pool(client))
                if target is not None:
                    target.request(client)

    def _fail_over(self, name: str) -> None:
        """Replica ``name`` was promoted while the primary is gone: writes go there."""
        new = self.nodes[name]
        log.warning("database %s: primary %s:%s is gone and replica %s (%s:%s) was promoted; "
                    "sending writes there", self.name, self.nodes[self.primary_name].host,
                    self.nodes[self.primary_name].port, name, new.host, new.port)
        primary_db = dataclasses.replace(self.db, host=new.host, port=new.port)
        # pools made from now on (a client's first login) use the new primary too; a RELOAD
        # reads the file again (point it at the new primary there)
        cfg = self.pooler.config
        self.pooler.config = dataclasses.replace(
            cfg, databases={**cfg.databases, self.name: primary_db})
        self.db = primary_db
        for (db_name, _user), pool in self.pooler.pools.items():
            if db_name == self.name:
                pool.db = primary_db
                pool.catalog = self.pooler.catalogs.setdefault(
                    (new.host, new.port, pool.server_dbname), type(pool.catalog)())
                pool.login_failed_until = 0.0  # the old primary's login errors are history
                pool.last_login_error = None
                pool.close_all("primary changed (failover)")
                if pool.waiting:
                    pool.launch_if_needed()
        old = self.nodes.pop(self.primary_name)
        self.nodes[self.primary_name] = primary_db
        self.nodes[name] = old
        conn = self._conns.pop("primary", None)
        if conn is not None:
            conn.terminate()
        self._conns["primary"] = self._conns.pop(name, None)
        self.primary_up = True
        # the old primary is not a replica of the new one: out of the read set until a
        # health check finds it a standby
        self.replica_set.states[name].up = False

    # -- RELOAD ----------------------------------------------------------------------------
    def reconfigure(self, db: DatabaseConfig, tls_changed: bool = False) -> None:
        """The entry changed on RELOAD: new settings, and the new ``replicas=`` list. Replicas
        keep their names by position (``replica1`` is the first listed); one whose address
        changed is a new server, down until a health check finds it a standby."""
        cfg = self.pooler.config
        self.split = _setting(db, cfg, "read_write_split")
        self.interval = float(cfg.replica_check_interval)
        replica_set = self.replica_set
        replica_set.max_lag_bytes = _setting(db, cfg, "replica_max_lag_bytes") or None
        replica_set.max_lag_ms = _setting(db, cfg, "replica_max_lag_ms") or None
        old_nodes, nodes = self.nodes, _nodes(self.name, db)
        states: dict[str, ReplicaState] = {}
        for node, new in nodes.items():
            old = old_nodes.get(node)
            # another server (or TLS settings): its health connection goes
            if tls_changed or (old is not None and _server_side(old) != _server_side(new)):
                conn = self._conns.pop(node, None)
                if conn is not None:
                    conn.terminate()
            if node == "primary":
                continue
            state = replica_set.states.get(node)
            if state is None or old is None or (old.host, old.port) != (new.host, new.port):
                states[node] = ReplicaState(node, outstanding=state.outstanding if state else 0)
            else:
                states[node] = state
        with replica_set._lock:
            replica_set.names = [n for n in nodes if n != "primary"]
            replica_set.states = states
        self.db, self.nodes, self.primary_name = db, nodes, "primary"
        for node in nodes:
            self.counts.setdefault(node, 0)
        for (pool_name, _user), pool in list(self.pooler.pools.items()):
            base, at, node = pool_name.partition("@")
            if not at or base != self.name:
                continue
            new_db = nodes.get(node)
            if new_db is None or tls_changed or _server_side(new_db) != _server_side(pool.db):
                _close_when_free(pool, "replica definition changed")
            if new_db is not None:
                pool.db = new_db
                pool.server_dbname = new_db.dbname or self.name
                pool.server_user = new_db.user or pool.user
                pool.config_changed()
            if new_db is None or node not in states or not replica_set.eligible(node):
                self._reroute_pool(pool)
        log.info("database %s: routing reloaded (split %s, %d replicas)", self.name,
                 "on" if self.split else "off", len(states))

    def retire(self) -> None:
        """The entry names no replicas any more (RELOAD): the router stops; clients waiting
        for a replica's server go to the primary; the replicas' servers close once free."""
        with contextlib.suppress(ValueError):
            self.pooler.parse_observers.remove(self.observe_parse)
        for (pool_name, _user), pool in list(self.pooler.pools.items()):
            base, at, _node = pool_name.partition("@")
            if at and base == self.name:
                _close_when_free(pool, "replicas removed from the configuration")
                waiting = list(pool.waiting)
                pool.waiting.clear()
                pool._waiting_changed()
                for client in waiting:
                    if not client.gone and client.server is None and client.pool is not None:
                        client.pool.request(client)
        self.pooler.track_task(asyncio.get_running_loop().create_task(self.stop()))
        log.info("database %s: no replicas any more, read/write split stopped", self.name)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.check()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        for conn in self._conns.values():
            if conn is not None:
                conn.terminate()
        self._conns.clear()


def _nodes(name: str, db: DatabaseConfig) -> dict[str, DatabaseConfig]:
    """``primary`` and ``replica1``, ``replica2`` ... of a ``[databases]`` entry, in the order
    of its ``replicas=`` list."""
    nodes = {"primary": db}
    for i, (host, port) in enumerate(db.replicas, 1):
        # (a node's config keeps a replicas list: its pools never get a fast-path lane)
        nodes[f"replica{i}"] = dataclasses.replace(
            db, host=host, port=port, dbname=db.dbname or name, replicas=((host, port),))
    return nodes


def _server_side(db: DatabaseConfig) -> tuple[object, ...]:
    return (db.host, db.port, db.dbname, db.user, db.password)


def replica_pool_node(pooler: Pooler, pool_name: str) -> str | None:
    """The node (``replica1`` ...) whose pool ``pool_name`` (``app@replica1``) is, when a
    router made it; else None (an ordinary pool)."""
    base, at, node = pool_name.partition("@")
    return node if at and base in pooler.routers else None


def _close_when_free(pool: Pool, reason: str) -> None:
    """The servers of ``pool`` close: idle ones now, busy ones when their client is done (as
    RELOAD does for a database whose host changed); no running transaction is cut."""
    for server in pool.all_servers():
        server.close_needed = True
    for server in list(pool.idle):
        server.close(reason)


def reload_routers(pooler: Pooler, tls_changed: bool = False) -> None:
    """After a RELOAD (``pooler.config`` is the new file): each ``[databases]`` entry's
    topology and split settings apply without dropping a client. A changed replica address
    closes that replica's servers once free (its health is checked afresh before it serves a
    read); a removed replica's waiting clients are routed again; an entry that no longer names
    replicas loses its router (its clients go to the primary from their next transaction);
    a new one gets one."""
    cfg = pooler.config
    for name, router in list(pooler.routers.items()):
        db = cfg.databases.get(name)
        if db is None or not db.replicas:
            del pooler.routers[name]
            router.retire()
        else:
            router.reconfigure(db, tls_changed)
    for name, db in cfg.databases.items():
        if db.replicas and name not in pooler.routers:
            router = pooler.routers[name] = DatabaseRouter(pooler, name, db)
            pooler.parse_observers.append(router.observe_parse)
            router.start()
    for (pool_name, _user), pool in pooler.pools.items():
        if pool.lane is not None and "@" not in pool_name:
            # the engine serves only transactions that surely go to the primary
            router = pooler.routers.get(pool_name)
            pool.lane.fp.route_reads = int(router is not None and bool(router.split))


# Why a transaction went to the primary (SHOW ROUTES' columns, the metrics' reason label).
REASONS = ("may_write", "read_your_writes", "no_replica", "hinted", "unparsed", "split_off")


def show_routes(pooler: Pooler) -> tuple[list[tuple[str, int]], list[list[Any]]]:
    """``SHOW ROUTES`` (admin.py): one row per database with replicas and node (its primary,
    then its replicas): where it is, its health as last checked, the transactions the split
    sent there and, for the primary, why (``REASONS``). Columns as (name, type oid)."""
    text, int8 = 25, 20
    columns = [("database", text), ("node", text), ("role", text), ("host", text),
               ("port", int8), ("state", text), ("replay_lsn", text), ("lag_bytes", int8),
               ("lag_ms", int8), ("outstanding", int8), ("transactions", int8),
               ("sessions", int8), *((reason, int8) for reason in REASONS)]
    rows: list[list[Any]] = []
    for name, router in sorted(pooler.routers.items()):
        counts, reasons = router.counted()
        for node, cfg in router.nodes.items():
            state = router.replica_set.states.get(node)
            if node == router.primary_name:
                role, health = "primary", "up" if router.primary_up else "down"
                lsn = format_lsn(router.lsn_sample[1]) if router.lsn_sample else ""
                lag: tuple[int, int, int] = (0, 0, 0)
                why = [reasons.get(reason, 0) for reason in REASONS]
            elif state is not None:
                role = "replica"
                health = ("down" if not state.up else "promoted" if not state.in_recovery
                          else "eligible" if router.replica_set.eligible(node) else "lagging")
                lsn = format_lsn(state.replay_lsn) if state.checks else ""
                lag = (state.lag_bytes, round(state.lag_ms), state.outstanding)
                why = [0] * len(REASONS)
            else:
                continue  # the old primary after a failover, until a RELOAD names it again
            rows.append([name, node, role, cfg.host or "", cfg.port or 5432, health, lsn, *lag,
                         counts.get(node, 0), router.sessions.get(node, 0), *why])
    return columns, rows


def metric_families(pooler: Pooler) -> list[Any]:
    """Prometheus families for metrics.py: transactions routed per target, and each replica's
    health as last checked."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    routed = CounterMetricFamily(
        "pgpilot_routed_transactions", "Transactions the read/write split sent, by target",
        labels=("database", "target"))
    up = GaugeMetricFamily("pgpilot_replica_up", "1 while the replica answers health checks "
                           "as a standby", labels=("database", "replica"))
    eligible = GaugeMetricFamily("pgpilot_replica_eligible", "1 while the replica is in the "
                                 "read set (up, a standby, within the lag bounds)",
                                 labels=("database", "replica"))
    lag_bytes = GaugeMetricFamily("pgpilot_replica_lag_bytes", "Primary insert position minus "
                                  "the replica's replay position", labels=("database", "replica"))
    lag_seconds = GaugeMetricFamily("pgpilot_replica_lag_seconds", "Age of the replica's last "
                                    "replayed transaction while it has WAL to replay",
                                    labels=("database", "replica"))
    primary = CounterMetricFamily(
        "pgpilot_routed_to_primary", "Transactions the read/write split sent to the primary, "
        "by why (may_write, read_your_writes, no_replica, hinted, unparsed, split_off)",
        labels=("database", "reason"))
    for name, router in sorted(pooler.routers.items()):
        counts, reasons = router.counted()
        for target, count in sorted(counts.items()):
            routed.add_metric([name, target], count)
        for reason in REASONS:
            primary.add_metric([name, reason], reasons.get(reason, 0))
        for replica, state in sorted(router.replica_set.states.items()):
            up.add_metric([name, replica], int(state.up and state.in_recovery))
            eligible.add_metric([name, replica], int(router.replica_set.eligible(replica)))
            lag_bytes.add_metric([name, replica], state.lag_bytes)
            lag_seconds.add_metric([name, replica], state.lag_ms / 1000)
    return [routed, primary, up, eligible, lag_bytes, lag_seconds]


def _setting(db: DatabaseConfig, cfg: Config, name: str) -> Any:
    value = getattr(db, name, None)
    return getattr(cfg, name) if value is None else value


def start_routers(pooler: Pooler) -> dict[str, DatabaseRouter]:
    """A started :class:`DatabaseRouter` per ``[databases]`` entry naming replicas."""
    routers: dict[str, DatabaseRouter] = {}
    for name, db in pooler.config.databases.items():
        if getattr(db, "replicas", ()):
            router = routers[name] = DatabaseRouter(pooler, name, db)
            pooler.parse_observers.append(router.observe_parse)
            router.start()
    return routers
