"""The admin console: the virtual database ``pgbouncer`` (alias ``pgpilot``).

A client that connects to it is authenticated exactly as any other (``auth_type``, auth_file),
then admitted only if its user is in ``admin_users`` (every command) or ``stats_users`` (the
``SHOW`` commands; with ``auth_type = any`` every user counts as a stats user, as in
PgBouncer). Anybody else is refused with SQLSTATE 42501.

It speaks the simple query protocol (as PgBouncer's console does): each ``Query`` may hold one
or more commands separated by ``;``; each gets its rows and CommandComplete, an error stops the
rest of that Query, and the connection stays usable. Commands, with PgBouncer's columns and
meanings so pgbouncer_exporter and existing dashboards read them:

``SHOW POOLS | STATS | STATS_TOTALS | STATS_AVERAGES | TOTALS | CLIENTS | SERVERS | DATABASES |
USERS | CONFIG | LISTS | VERSION | STATE | HAZARDS | WORKERS | QUERIES | NPLUSONE | SLOW |
ADVICE | HELP`` (QUERIES: per-query statistics, stats.py; NPLUSONE: wire_nplusone.py; SLOW:
slow.py; ADVICE: advisor.py);
``PAUSE [db]``, ``RESUME [db]``, ``RELOAD``, ``KILL [db]``, ``KILL_CLIENT id``,
``RECONNECT [db]``, ``SHUTDOWN [WAIT_FOR_CLIENTS | WAIT_FOR_SERVERS]``.

Commands run one after another per connection in a task of their own, so ``PAUSE`` (which
waits for running transactions to finish) holds only the console connection that asked, never
the pooler. ``SHOW STATS``' averages are computed every ``stats_period`` by
:class:`AdminConsole`, from the same running totals the metrics read.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pgpilot
from pgpilot.proxy.config import Config, ConfigError, load_config
from pgpilot.proxy.console_set import STARTUP_ONLY, ConsoleSetError, console_set, parse_set
from pgpilot.proxy.hazards import HINTS
from pgpilot.proxy.login_rules import peer_credentials
from pgpilot.proxy.poolstats import PoolStats
from pgpilot.proxy.states import CLIENT_CLOSED, ClientState, ServerState
from pgpilot.wire import messages as m
from pgpilot.wire.errors import ProtocolError

if TYPE_CHECKING:
    from pgpilot.proxy.client import ClientConnection
    from pgpilot.proxy.pool import Pool
    from pgpilot.proxy.pooler import Pooler
    from pgpilot.proxy.server import ServerConnection

log = logging.getLogger("pgpilot.proxy")

F = m.F

# Type oids of the columns the console returns (text format throughout).
TEXT = 25
INT4 = 23
INT8 = 20

PGBOUNCER_COMPAT_VERSION = pgpilot.PGBOUNCER_COMPATIBLE  # whose console columns these are
VERSION_STRING = pgpilot.VERSION_LINE  # as `pgpilot --version` prints it

PAUSE_POLL = 0.05  # seconds between checks while PAUSE / SHUTDOWN wait for servers
MAX_QUEUED_MESSAGES = 64  # per console connection, before its socket stops being read
PAUSE_KEEPER_TICK = 0.2  # seconds between sweeps of paused pools' idle servers
# Config fields SHOW CONFIG leaves out: the contents of other sections and files.
_CONFIG_NOT_SHOWN = frozenset({"databases", "users", "auth_users", "warnings", "path"})
# Settings that only take effect at start (SHOW CONFIG's "changeable" = no; SET refuses them).
_NOT_CHANGEABLE = STARTUP_ONLY
_SECRET_WORDS = ("password", "secret", "token")
MASK = "********"

HELP_TEXT = """Console usage
  SHOW HELP|POOLS|STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS|CLIENTS|SERVERS|DATABASES|USERS
  SHOW CONFIG|LISTS|VERSION|STATE|HAZARDS|WORKERS|SOCKETS|ACTIVE_SOCKETS|MEM
  SHOW QUERIES|NPLUSONE|SLOW|ADVICE|WORKER_POOLS
  SHOW PEERS|PEER_POOLS|DNS_HOSTS|DNS_ZONES|FDS
  SHOW ROUTES
  PAUSE [<db>]
  RESUME [<db>]
  DISABLE <db>
  ENABLE <db>
  SUSPEND
  WAIT_CLOSE [<db>]
  KILL [<db>]
  KILL_CLIENT <client id>
  RECONNECT [<db>]
  RELOAD
  SHUTDOWN [WAIT_FOR_CLIENTS|WAIT_FOR_SERVERS]"""


class AdminError(Exception):
    """A console command failed: reported to the console client as an ErrorResponse."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint


Column = tuple[str, int]
Value = str | int | float | None


@dataclass
class Result:
    """What one command answers: rows (optional) and the CommandComplete tag."""

    tag: str
    columns: Sequence[Column] = ()
    rows: Iterable[Sequence[Value]] = ()
    notice: str | None = None

    def encode(self) -> bytes:
        out = bytearray()
        if self.notice:
            out += m.notice_response(self.notice)
        if self.columns:
            out += m.row_description(list(self.columns))
            for row in self.rows:
                out += m.data_row([_text(v) for v in row])
        out += m.command_complete(self.tag)
        return bytes(out)


def _text(value: Value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _timestamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _ptr(obj: object | None) -> str | None:
    return None if obj is None else f"0x{id(obj):x}"


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


# ---------------------------------------------------------------------------------------
# Statistics: totals per database and averages per stats_period
# ---------------------------------------------------------------------------------------

# SHOW STATS' totals, in PgBouncer's order: (column suffix, how to read it off PoolStats).
_TOTALS: tuple[tuple[str, Callable[[PoolStats], float]], ...] = (
    ("server_assignment_count", lambda s: s.server_assignment_count),
    ("xact_count", lambda s: s.xact_count),
    ("query_count", lambda s: s.query_count),
    ("received", lambda s: s.bytes_received),
    ("sent", lambda s: s.bytes_sent),
    ("xact_time", lambda s: _us(s.xact_time)),
    ("query_time", lambda s: _us(s.query_time)),
    ("wait_time", lambda s: _us(s.wait_time)),
    # Counted by the prepared-statement tracking, where it keeps them (0 otherwise).
    ("client_parse_count", lambda s: getattr(s, "client_parse_count", 0)),
    ("server_parse_count", lambda s: getattr(s, "server_parse_count", 0)),
    ("bind_count", lambda s: getattr(s, "bind_count", 0)),
)
_AVERAGE_NAMES = ("server_assignment_count", "xact_count", "query_count", "recv", "sent",
                  "xact_time", "query_time", "wait_time", "client_parse_count",
                  "server_parse_count", "bind_count")


# SHOW STATS_TOTALS and STATS_AVERAGES name the figures without a prefix, and the bytes so.
_BARE_NAMES = {"received": "bytes_received", "sent": "bytes_sent"}


ADMIN_STATS_DATABASE = "pgbouncer"  # the console's row in SHOW STATS, as PgBouncer's


def database_totals(pools: Iterable[Pool]) -> dict[str, dict[str, int]]:
    """Running totals per database (summed over its users), SHOW STATS' total_* columns."""
    out: dict[str, dict[str, int]] = {}
    for pool in pools:
        totals = out.setdefault(pool.db_name, dict.fromkeys((n for n, _ in _TOTALS), 0))
        for name, read in _TOTALS:
            totals[name] += int(read(pool.stats))
    return out


def averages_between(before: dict[str, int], after: dict[str, int],
                     seconds: float) -> dict[str, int]:
    """SHOW STATS' avg_* over one period: rates per second, durations per event (µs)."""
    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    seconds = max(seconds, 1e-9)
    xacts, queries, assignments = (delta("xact_count"), delta("query_count"),
                                   delta("server_assignment_count"))
    return {
        "server_assignment_count": round(assignments / seconds),
        "xact_count": round(xacts / seconds),
        "query_count": round(queries / seconds),
        "recv": round(delta("received") / seconds),
        "sent": round(delta("sent") / seconds),
        "xact_time": delta("xact_time") // xacts if xacts > 0 else 0,
        "query_time": delta("query_time") // queries if queries > 0 else 0,
        "wait_time": delta("wait_time") // assignments if assignments > 0 else 0,
        "client_parse_count": round(delta("client_parse_count") / seconds),
        "server_parse_count": round(delta("server_parse_count") / seconds),
        "bind_count": round(delta("bind_count") / seconds),
    }


# ---------------------------------------------------------------------------------------
# The console as a whole
# ---------------------------------------------------------------------------------------

class AdminConsole:
    """Owns the console's shared state: the averages task and the background commands."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self.averages: dict[str, dict[str, int]] = {}
        self._last_totals: dict[str, dict[str, int]] = {}
        self._last_time = time.monotonic()
        self._stats_task: asyncio.Task[None] | None = None
        # Console command runners and shutdowns; kept apart from the pooler's tasks, which
        # Pooler.stop cancels (a SHUTDOWN must not cancel itself).
        self.tasks: set[asyncio.Task[Any]] = set()
        self._pause_keeper: asyncio.Task[None] | None = None
        # DISABLE db: new clients of these databases are refused until ENABLE.
        self.disabled_databases: set[str] = set()
        self.suspended = False  # SUSPEND until RESUME: no server is handed out
        # The console's own queries, as PgBouncer counts them: SHOW STATS has a row for
        # its database, and SHOW TOTALS adds them in.
        self.stats = PoolStats()
        pooler.admin_handler = self.login

    def totals(self) -> dict[str, dict[str, int]]:
        """database_totals of every pool, and the console's own row."""
        out = database_totals(self.pooler.pools.values())
        own = out.setdefault(ADMIN_STATS_DATABASE, dict.fromkeys((n for n, _ in _TOTALS), 0))
        for name, read in _TOTALS:
            own[name] += int(read(self.stats))
        return out

    def start(self) -> None:
        self._stats_task = asyncio.get_running_loop().create_task(self._stats_loop())

    def stop(self) -> None:
        for task in (self._stats_task, self._pause_keeper):
            if task is not None:
                task.cancel()
        self._stats_task = self._pause_keeper = None

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def keep_paused_pools_empty(self) -> None:
        """After PAUSE / KILL: servers a paused pool opens anyway (a new pool's first login)
        are closed once idle, until RESUME."""
        if self._pause_keeper is None or self._pause_keeper.done():
            self._pause_keeper = self.spawn(self._pause_keeper_loop())

    async def _pause_keeper_loop(self) -> None:
        while not self.pooler.stopping:
            paused = [p for p in self.pooler.pools.values() if p.paused]
            if not paused and not self.pooler.paused and not self.pooler.paused_databases:
                return
            for pool in paused:
                for server in list(pool.idle):
                    server.close("paused")
            await asyncio.sleep(PAUSE_KEEPER_TICK)

    def login(self, client: ClientConnection) -> None:
        """Pooler.admin_handler: authenticate as usual; AdminSession.logged_in follows.

        As PgBouncer: user ``pgbouncer`` coming over the unix socket from a process of the
        pooler's own OS user (SO_PEERCRED) is an admin without a password."""
        client.is_admin = True
        session = client.admin = AdminSession(self, client)
        if client.user == "pgbouncer" and unix_peer_is_own_user(client):
            session.own_user = True
            if self.pooler.config.log_connections:
                log.info("%r pgbouncer access from unix socket", client)
            client.logged_in()
            return
        client.authenticate()

    # -- averages (every stats_period) --------------------------------------------------
    async def _stats_loop(self) -> None:
        self._last_totals = self.totals()
        self._last_time = time.monotonic()
        while True:
            period = self.pooler.config.stats_period or 60.0
            await asyncio.sleep(max(period, 0.1))
            try:
                self.update_averages()
            except Exception:  # a bad round must not end the statistics
                log.exception("stats round failed")

    def update_averages(self) -> None:
        now = time.monotonic()
        totals = self.totals()
        seconds = now - self._last_time
        self.averages = {db: averages_between(self._last_totals.get(db, {}), after, seconds)
                         for db, after in totals.items()}
        self._last_totals, self._last_time = totals, now
        if self.pooler.config.log_stats:
            for db, avg in sorted(self.averages.items()):
                if avg["xact_count"] or avg["query_count"]:
                    log.info("stats: %s: %d xacts/s, %d queries/s, in %d B/s, out %d B/s, "
                             "xact %d us, query %d us, wait %d us", db, avg["xact_count"],
                             avg["query_count"], avg["recv"], avg["sent"], avg["xact_time"],
                             avg["query_time"], avg["wait_time"])


# ---------------------------------------------------------------------------------------
# One console connection
# ---------------------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:"((?:[^"]|"")*)"|\'((?:[^\']|\'\')*)\'|([^\s=;"\']+)|(=))')


def split_commands(sql: str) -> list[str]:
    """``;``-separated commands (a ``;`` inside quotes does not split); blanks dropped."""
    parts: list[str] = []
    current: list[str] = []
    quote = ""
    for char in sql:
        if quote:
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == ";":
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def tokenize(command: str) -> list[str]:
    """Words of a command; quoted words keep their case and lose their quotes."""
    out: list[str] = []
    pos = 0
    while pos < len(command):
        match = _TOKEN.match(command, pos)
        if match is None:
            if command[pos:].strip():
                raise AdminError("42601", f'syntax error at or near "{command[pos:].strip()}"')
            break
        dq, sq, word, eq = match.groups()
        if dq is not None:
            out.append(dq.replace('""', '"'))
        elif sq is not None:
            out.append(sq.replace("''", "'"))
        else:
            out.append(word if word is not None else eq)
        pos = match.end()
    return out


class AdminSession:
    """The console side of one admin ClientConnection: welcome, then commands."""

    def __init__(self, console: AdminConsole, client: ClientConnection) -> None:
        self.console = console
        self.pooler = console.pooler
        self.client = client
        self.is_admin = False  # may run every command (else SHOW only)
        self._queue: collections.deque[tuple[int, bytes | None]] = collections.deque()
        self._runner: asyncio.Task[None] | None = None
        self._skip_to_sync = False  # an extended-protocol message was refused
        self.own_user = False  # "pgbouncer" over the unix socket from the pooler's OS user

    # -- login ------------------------------------------------------------------------------
    def logged_in(self) -> None:
        """Credentials were good: check the console roles, then welcome the client."""
        client = self.client
        cfg = self.pooler.config
        self.is_admin = self.own_user or client.user in cfg.admin_users
        is_stats = client.user in cfg.stats_users or cfg.auth_type == "any"
        if not (self.is_admin or is_stats):
            log.warning("%r refused: not in admin_users or stats_users", client)
            client.fail("42501", f'permission denied for the admin console: user "{client.user}"'
                        " is not in admin_users or stats_users")
            return
        out = bytearray()
        params = {
            "server_version": pgpilot.__version__ + "/pgpilot",
            "server_encoding": "UTF8",
            "client_encoding": "UTF8",
            "DateStyle": "ISO",
            "TimeZone": "UTC",
            "IntervalStyle": "postgres",
            "integer_datetimes": "on",
            "standard_conforming_strings": "on",
            "application_name": client.application_name,
        }
        for name, value in params.items():
            out += m.parameter_status(name, value)
        client.cancel_pid, client.cancel_key = self.pooler.register_cancel_key(client)
        out += m.backend_key_data(client.cancel_pid, client.cancel_key)
        out += m.READY_IDLE
        client.write(out)
        client.set_state(ClientState.ACTIVE)
        log.info("%r admin console login ok (%s)", client, "admin" if self.is_admin else "stats")

    # -- messages ---------------------------------------------------------------------------
    def handle(self, msgs: list[tuple[int, bytes | None]]) -> None:
        """Frontend messages from the client reader, in order; commands run in a task."""
        for mtype, body in msgs:
            if mtype == F.TERMINATE:
                self._queue.clear()
                self.client.close(CLIENT_CLOSED)
                return
            if mtype == F.FLUSH:
                continue
            self._queue.append((mtype, body))
        if len(self._queue) > MAX_QUEUED_MESSAGES:
            self.client.pause_reading()  # a command (PAUSE) is waiting: read no more for now
        if self._queue and self._runner is None and not self.client.gone:
            self._runner = self.console.spawn(self._run())

    async def _run(self) -> None:
        try:
            while self._queue and not self.client.gone:
                mtype, body = self._queue.popleft()
                await self._message(mtype, body)
        finally:
            self._runner = None
            if not self.client.gone:
                self.client.resume_reading()

    async def _message(self, mtype: int, body: bytes | None) -> None:
        client = self.client
        if mtype == F.SYNC:
            self._skip_to_sync = False
            client.write(m.READY_IDLE)  # every Sync is answered, as PostgreSQL does
            return
        if self._skip_to_sync:
            return
        if mtype != F.QUERY:
            # Parse/Bind/Execute/Describe/Close, FunctionCall, COPY messages.
            client.write(m.error_response(
                "0A000", "the admin console supports only the simple query protocol",
                hint="Send the command as a plain query (psql, or psycopg without parameters "
                     "and with autocommit)."))
            if mtype == F.FUNCTION_CALL:
                client.write(m.READY_IDLE)
            else:
                self._skip_to_sync = True
            return
        if body is None:
            client.fail("54000", "admin console command too long")
            return
        stats = self.console.stats
        stats.query_count += 1  # counted as it arrives, as PgBouncer (SHOW TOTALS too)
        stats.xact_count += 1
        stats.bytes_received += len(body) + 5
        try:
            sql = m.parse_query(body)
        except ProtocolError as exc:
            client.fail("08P01", f"protocol violation: {exc}")
            return
        await self._query(sql)

    async def _query(self, sql: str) -> None:
        client = self.client
        commands = split_commands(sql)
        if not commands:
            client.write(m.empty_query_response() + m.READY_IDLE)
            return
        for command in commands:
            try:
                result = await self.execute(command)
            except AdminError as exc:
                client.write(m.error_response(exc.sqlstate, exc.message, hint=exc.hint))
                break
            except Exception as exc:
                log.exception("admin command failed: %s", command[:200])
                client.write(m.error_response("XX000", f"admin command failed: {exc}"))
                break
            if client.gone:
                return
            client.write(result.encode())
        client.write(m.READY_IDLE)

    # -- commands ---------------------------------------------------------------------------
    async def execute(self, command: str) -> Result:
        # The console reads and changes the pooler as a whole: pairs on the compiled fast path
        # come back to Python first, so what it prints and does is exact.
        fast = self.pooler.fast
        if fast is None:
            return await self._execute(command)
        if not command.lstrip().upper().startswith("SHOW"):
            fast.forget_routes()  # PAUSE, KILL, RELOAD ... may change where logins lead
        words = command.replace(";", " ").split()
        counts_only = (len(words) == 2 and words[0].upper() == "SHOW"
                       and words[1].lower() in _COUNTING_SHOWS)
        fast.settle(claim=not counts_only)
        try:
            return await self._execute(command)
        finally:
            fast.refill()

    async def _execute(self, command: str) -> Result:
        words = tokenize(command)
        if not words:
            raise AdminError("42601", "empty command")
        verb = words[0].upper()
        args = words[1:]
        if verb == "SHOW":
            if len(args) != 1:
                raise AdminError("42601", "SHOW needs exactly one argument, e.g. SHOW POOLS",
                                 hint="SHOW HELP lists the commands.")
            return self.show(args[0].lower())
        if verb == "SET":
            return self._set(args)
        if verb not in _CONTROL_COMMANDS:
            raise AdminError("42601", f'unknown admin console command: "{command[:80]}"',
                             hint="SHOW HELP lists the commands.")
        if not self.is_admin:
            raise AdminError("42501", f'permission denied: "{verb}" needs a user in admin_users '
                             f'("{self.client.user}" is a stats user)')
        handler, max_args = _CONTROL_COMMANDS[verb]
        if len(args) > max_args:
            raise AdminError("42601", f"too many arguments for {verb}")
        log.info("%r admin command: %s", self.client, " ".join(words))
        result: Result = await handler(self, args)
        return result

    def show(self, what: str) -> Result:
        handler = _SHOW_COMMANDS.get(what)
        if handler is None:
            raise AdminError("42601", f'unknown SHOW argument: "{what}"',
                             hint="SHOW HELP lists the commands.")
        return handler(self)

    def _set(self, args: list[str]) -> Result:
        """SET name = value: a pooler setting changed as RELOAD would (console_set.py); the
        parameters drivers send on connect are accepted and ignored."""
        try:
            name, value = parse_set(args)
            outcome = console_set(self.pooler.config, name, value, is_admin=self.is_admin)
        except ConsoleSetError as exc:
            raise AdminError(exc.sqlstate, exc.message, exc.hint) from None
        if outcome.config is not None:
            log.info("%r admin command: %s", self.client, outcome.tag)
            self.pooler.reload(outcome.config)
        return Result(outcome.tag, notice=outcome.notice)

    # -- lookups -------------------------------------------------------------------------
    def _pools_of(self, db: str | None) -> list[Pool]:
        return [p for p in self.pooler.pools.values() if db is None or p.db_name == db]

    def _database_arg(self, args: list[str]) -> str | None:
        """The optional database argument, checked to exist (3D000 if not)."""
        if not args:
            return None
        name = args[0]
        # Configured, or served by the "*" fallback and in use (as PgBouncer's auto-databases).
        if name != "*" and (name in self.pooler.config.databases or any(
                p.db_name == name for p in self.pooler.pools.values())):
            return name
        raise AdminError("3D000", f'no such database: "{name}"')

    # -- SHOW ---------------------------------------------------------------------------------
    def show_pools(self) -> Result:
        now = time.monotonic()
        columns = [("database", TEXT), ("user", TEXT), ("cl_active", INT4), ("cl_waiting", INT4),
                   ("cl_active_cancel_req", INT4), ("cl_waiting_cancel_req", INT4),
                   ("sv_active", INT4), ("sv_active_cancel", INT4), ("sv_being_canceled", INT4),
                   ("sv_idle", INT4), ("sv_used", INT4), ("sv_tested", INT4), ("sv_login", INT4),
                   ("maxwait", INT8), ("maxwait_us", INT8), ("pool_mode", TEXT),
                   ("load_balance_hosts", TEXT), ("sv_pinned", INT4)]
        rows: list[list[Value]] = []
        for pool in sorted(self.pooler.pools.values(), key=lambda p: (p.db_name, p.user)):
            active, waiting = pool.client_counts()
            wait = max_wait(pool, now)
            sv = pool.servers
            rows.append([pool.db_name, pool.user, active, waiting, 0, 0,
                         len(sv[ServerState.ACTIVE]), 0, 0, len(sv[ServerState.IDLE]),
                         len(sv[ServerState.USED]), len(sv[ServerState.TESTED]),
                         len(sv[ServerState.LOGIN]), int(wait), _us(wait % 1), pool.mode, None,
                         pool.pinned_count()])
        return Result("SHOW", columns, rows)

    def _stats(self, *, totals: bool, averages: bool) -> Result:
        columns: list[Column] = [("database", TEXT)]
        if totals and averages:  # SHOW STATS: total_* and avg_* (avg_recv, avg_sent)
            columns += [(f"total_{name}", INT8) for name, _ in _TOTALS]
            columns += [(f"avg_{name}", INT8) for name in _AVERAGE_NAMES]
        else:  # STATS_TOTALS / STATS_AVERAGES: PgBouncer 1.23's bare names
            columns += [(_BARE_NAMES.get(name, name), INT8) for name, _ in _TOTALS]
        rows: list[list[Value]] = []
        for db, total in sorted(self.console.totals().items()):
            row: list[Value] = [db]
            if totals:
                row += [total[name] for name, _ in _TOTALS]
            if averages:
                avg = self.console.averages.get(db, {})
                row += [avg.get(name, 0) for name in _AVERAGE_NAMES]
            rows.append(row)
        return Result("SHOW", columns, rows)

    def show_stats(self) -> Result:
        return self._stats(totals=True, averages=True)

    def show_stats_totals(self) -> Result:
        return self._stats(totals=True, averages=False)

    def show_stats_averages(self) -> Result:
        return self._stats(totals=False, averages=True)

    def show_totals(self) -> Result:
        """SHOW STATS summed over all databases, one (name, value) row per figure."""
        total = dict.fromkeys((n for n, _ in _TOTALS), 0)
        for per_db in self.console.totals().values():
            for name in total:
                total[name] += per_db[name]
        avg = dict.fromkeys(_AVERAGE_NAMES, 0)
        for per_db_avg in self.console.averages.values():
            for name in avg:
                avg[name] += per_db_avg.get(name, 0)
        rows: list[list[Value]] = [[f"total_{k}", v] for k, v in total.items()]
        rows += [[f"avg_{k}", v] for k, v in avg.items()]
        return Result("SHOW", [("name", TEXT), ("value", INT8)], rows)

    _CONN_COLUMNS: Sequence[Column] = (
        ("type", TEXT), ("user", TEXT), ("database", TEXT), ("replication", TEXT),
        ("state", TEXT), ("addr", TEXT), ("port", INT4), ("local_addr", TEXT),
        ("local_port", INT4), ("connect_time", TEXT), ("request_time", TEXT), ("wait", INT4),
        ("wait_us", INT4), ("close_needed", INT4), ("ptr", TEXT), ("link", TEXT),
        ("remote_pid", INT4), ("tls", TEXT), ("application_name", TEXT),
        ("prepared_statements", INT4), ("id", INT8), ("pinned", TEXT))

    def show_clients(self) -> Result:
        now = time.monotonic()
        rows: list[list[Value]] = []
        for client in sorted(self.pooler.all_clients(), key=lambda c: c.id):
            if client.state is ClientState.LOGIN:
                state = "login"
            elif client.state is ClientState.WAITING:
                state = "waiting"
            else:
                state = "active" if client.server is not None else "idle"
            wait = now - client.wait_started if client.state is ClientState.WAITING else 0.0
            rows.append(["C", client.user, client.database,
                         _REPLICATION.get(getattr(client, "replication", ""), "none"), state,
                         client.addr,
                         client.port, client.local_addr, client.local_port,
                         _timestamp(client.connect_time), _timestamp(client.request_time),
                         int(wait), _us(wait % 1), 0, _ptr(client), _ptr(client.server), 0,
                         _tls_info(client.transport),
                         client.params.get("application_name", client.application_name),
                         _prepared_count(client), client.id, _pinned_text(client)])
        return Result("SHOW", self._CONN_COLUMNS, rows)

    def show_servers(self) -> Result:
        now_wall, now = time.time(), time.monotonic()
        default_host = self.pooler.default_socket_dir()
        rows: list[list[Value]] = []
        servers = [s for pool in self.pooler.pools.values() for s in pool.all_servers()]
        for server in sorted(servers, key=lambda s: s.id):
            pool = server.pool
            client = server.client
            state = "new" if server.state is ServerState.LOGIN else server.state.value
            if client is not None:
                request_time = client.request_time
            else:
                request_time = now_wall - (now - server.last_used)
            owner = getattr(server, "owner", None)  # a replication client's (walsender.py)
            rows.append(["S", pool.server_user, pool.db_name,
                         _REPLICATION.get(getattr(owner, "replication", ""), "none"), state,
                         # the host it was opened to (one of a host list's)
                         server.address[0] or pool.db.host or default_host,
                         pool.db.port, server.local_addr,
                         server.local_port, _timestamp(server.connect_time),
                         _timestamp(request_time), 0, 0, int(server.close_needed),
                         _ptr(server), _ptr(client), server.backend_pid,
                         _tls_info(server.transport),
                         client.params.get("application_name", client.application_name)
                         if client is not None else "",
                         _prepared_count(server), server.id,
                         _pinned_text(client) if client is not None else ""])
        return Result("SHOW", self._CONN_COLUMNS, rows)

    def show_databases(self) -> Result:
        cfg = self.pooler.config
        columns = [("name", TEXT), ("host", TEXT), ("port", INT4), ("database", TEXT),
                   ("force_user", TEXT), ("pool_size", INT4), ("min_pool_size", INT4),
                   ("reserve_pool_size", INT4), ("server_lifetime", INT4), ("pool_mode", TEXT),
                   ("load_balance_hosts", TEXT), ("max_connections", INT4),
                   ("current_connections", INT4), ("max_client_connections", INT4),
                   ("current_client_connections", INT4), ("paused", INT4), ("disabled", INT4)]
        names = [n for n in cfg.databases if n != "*"]
        names += sorted({p.db_name for p in self.pooler.pools.values()} - set(names))
        client_counts_by_db = collections.Counter(c.database for c in self.pooler.all_clients())
        default_host = self.pooler.default_socket_dir()
        rows: list[list[Value]] = []
        for name in names:
            db = cfg.database_for(name)
            if db is None:
                continue
            paused = self.pooler.paused or name in self.pooler.paused_databases
            rows.append([name, db.host or default_host, db.port, db.dbname or name, db.user,
                         cfg.pool_size_for(db), cfg.min_pool_size_for(db),
                         cfg.reserve_pool_size_for(db), int(cfg.server_lifetime_for(db)),
                         db.pool_mode, None, cfg.max_db_connections_for(db),
                         self.pooler.servers_for_db(name),
                         db.max_db_client_connections or cfg.max_db_client_connections,
                         client_counts_by_db.get(name, 0), int(paused),
                         int(name in self.console.disabled_databases)])
        admin_clients = sum(n for db, n in client_counts_by_db.items()
                            if self.pooler.is_admin_db(db))
        rows.append(["pgbouncer", None, cfg.listen_port, "pgbouncer", "pgbouncer", 2, 0, 0, 0,
                     "statement", None, 0, 0, 0, admin_clients, 0, 0])
        return Result("SHOW", columns, rows)

    def show_users(self) -> Result:
        cfg = self.pooler.config
        columns = [("name", TEXT), ("pool_size", INT4), ("reserve_pool_size", INT4),
                   ("pool_mode", TEXT), ("max_user_connections", INT4),
                   ("current_connections", INT4), ("max_user_client_connections", INT4),
                   ("current_client_connections", INT4)]
        names = set(cfg.users) | set(cfg.auth_users) | {p.user for p in self.pooler.pools.values()}
        names |= set(cfg.admin_users) | set(cfg.stats_users)
        client_counts_by_user = collections.Counter(c.user for c in self.pooler.all_clients())
        rows: list[list[Value]] = []
        for name in sorted(names):
            user = cfg.users.get(name)
            rows.append([name, user.pool_size if user else None,
                         user.reserve_pool_size if user else None,
                         user.pool_mode if user else None, cfg.max_user_connections_for(name),
                         self.pooler.servers_for_user(name),
                         (user.max_user_client_connections if user else None)
                         or cfg.max_user_client_connections,
                         client_counts_by_user.get(name, 0)])
        return Result("SHOW", columns, rows)

    def show_config(self) -> Result:
        cfg = self.pooler.config
        defaults = Config()
        rows: list[list[Value]] = []
        for config_field in dataclasses.fields(Config):
            key = config_field.name
            if key in _CONFIG_NOT_SHOWN:
                continue
            value, default = getattr(cfg, key), getattr(defaults, key)
            if any(word in key for word in _SECRET_WORDS):
                value = MASK if value else ""
                default = MASK if default else ""
            rows.append([key, _config_text(key, value), _config_text(key, default),
                         "no" if key in _NOT_CHANGEABLE else "yes"])
        rows.append(["conffile", cfg.path or "", "", "yes"])
        rows.sort(key=lambda r: str(r[0]))
        return Result("SHOW", [("key", TEXT), ("value", TEXT), ("default", TEXT),
                               ("changeable", TEXT)], rows)

    def show_lists(self) -> Result:
        cfg = self.pooler.config
        clients = self.pooler.clients
        users = set(cfg.users) | set(cfg.auth_users) | {p.user for p in self.pooler.pools.values()}
        databases = {n for n in cfg.databases if n != "*"} | {
            p.db_name for p in self.pooler.pools.values()}
        used_clients = sum(len(g) for s, g in clients.items() if s is not ClientState.CLOSED)
        login_clients = len(clients[ClientState.LOGIN])
        if self.pooler.fast is not None:  # clients the engine holds with no object yet
            used_clients += self.pooler.fast.engine.phantoms
            login_clients += self.pooler.fast.engine.phantoms_logging_in
        used_servers = sum(p.server_count() for p in self.pooler.pools.values())
        rows: list[list[Value]] = [
            ["databases", len(databases)], ["users", len(users)],
            ["peers", len(cfg.peers)], ["pools", len(self.pooler.pools)],
            ["peer_pools", len(self.pooler.peer_cancels.counts)], ["free_clients", 0],
            ["used_clients", used_clients], ["login_clients", login_clients],
            ["free_servers", 0], ["used_servers", used_servers], ["dns_names", 0],
            ["dns_zones", 0], ["dns_queries", 0], ["dns_pending", 0]]
        return Result("SHOW", [("list", TEXT), ("items", INT4)], rows)

    def show_version(self) -> Result:
        return Result("SHOW", [("version", TEXT)], [[VERSION_STRING]])

    def show_state(self) -> Result:
        paused = self.pooler.paused
        rows = [["active", "no" if paused or self.pooler.stopping else "yes"],
                ["paused", "yes" if paused else "no"],
                ["paused_databases", ",".join(sorted(self.pooler.paused_databases))],
                ["suspended", "yes" if self.console.suspended else "no"],
                ["shutting_down", "yes" if self.pooler.stopping else "no"]]
        return Result("SHOW", [("key", TEXT), ("value", TEXT)], rows)

    def show_hazards(self) -> Result:
        columns = [("database", TEXT), ("user", TEXT), ("application_name", TEXT),
                   ("hazard", TEXT), ("count", INT8), ("first_seen", TEXT), ("last_seen", TEXT),
                   ("example", TEXT), ("hint", TEXT)]
        rows: list[list[Value]] = [[db, user, app, kind, entry.count, _timestamp(entry.first_seen),
                 _timestamp(entry.last_seen), entry.example, HINTS[kind]]
                for (db, user, app, kind), entry in sorted(self.pooler.hazards.counts.items())]
        return Result("SHOW", columns, rows)

    def show_workers(self) -> Result:
        """pgpilot's own: with ``workers = N``, every worker's share of the TCP clients (the
        counters they balance by, shared between them: any worker's console shows all).
        With one process, no rows."""
        columns = [("worker", INT4), ("pid", INT4), ("clients", INT8), ("accepting", TEXT),
                   ("handed_off", INT8), ("handed_in", INT8)]
        worker = self.pooler.worker
        balance = worker.balance if worker is not None else None
        slots = balance.slots() if balance is not None else []
        rows: list[list[Value]] = [
            [slot.index, slot.pid, slot.clients, "yes" if slot.accepting else "no",
             slot.handed_off, slot.handed_in] for slot in slots]
        return Result("SHOW", columns, rows)

    def show_sockets(self) -> Result:
        """SHOW SOCKETS / ACTIVE_SOCKETS: PgBouncer's low-level buffer view. pgpilot's
        sockets are asyncio's or the engine's; one row per connection with the columns
        PgBouncer prints, buffer figures 0."""
        columns: list[Column] = [
            ("type", TEXT), ("user", TEXT), ("database", TEXT), ("state", TEXT),
            ("addr", TEXT), ("port", INT4), ("local_addr", TEXT), ("local_port", INT4),
            ("connect_time", TEXT), ("request_time", TEXT), ("wait", INT4),
            ("wait_us", INT4), ("close_needed", INT4), ("ptr", TEXT), ("link", TEXT),
            ("remote_pid", INT4), ("tls", TEXT), ("recv_pos", INT4), ("pkt_pos", INT4),
            ("pkt_remain", INT4), ("send_pos", INT4), ("send_remain", INT4),
            ("pkt_avail", INT4), ("send_avail", INT4)]
        rows: list[list[Value]] = []
        for row in [*self.show_clients().rows, *self.show_servers().rows]:
            r = list(row)
            rows.append([r[0], r[1], r[2], r[4], r[5], r[6], r[7], r[8], r[9], r[10],
                         r[11], r[12], r[13], r[14], r[15], r[16], r[17], 0, 0, 0, 0, 0, 0,
                         0])
        return Result("SHOW", columns, rows)

    def show_mem(self) -> Result:
        """SHOW MEM: PgBouncer's slab caches; pgpilot has none (Python objects), so the
        view is there with its columns and no rows."""
        return Result("SHOW", [("name", TEXT), ("size", INT4), ("used", INT4),
                               ("free", INT4), ("memtotal", INT4)], [])

    def show_peers(self) -> Result:
        """SHOW PEERS: the [peers] entries (peering.py), with the address and pool_size in
        use (no host: this pooler's unix_socket_dir; no pool_size: default_pool_size)."""
        cfg = self.pooler.config
        forwarder = self.pooler.peer_cancels
        rows: list[list[Value]] = []
        for peer_id, peer in sorted(cfg.peers.items()):
            host, port = forwarder.address(peer)
            rows.append([peer_id, host, port, peer.pool_size or cfg.default_pool_size])
        return Result("SHOW", [("peer_id", INT4), ("host", TEXT), ("port", INT4),
                               ("pool_size", INT4)], rows)

    def show_peer_pools(self) -> Result:
        """SHOW PEER_POOLS: per peer a cancel request was passed on to, those waiting for a
        slot or a connection (cl_waiting_cancel_req), those sent and not yet answered
        (cl_active_cancel_req). As PgBouncer, ``database`` is the peer's id."""
        rows: list[list[Value]] = []
        for peer_id, counts in sorted(self.pooler.peer_cancels.counts.items()):
            rows.append([str(peer_id), counts.active, counts.waiting + counts.connecting,
                         counts.active, counts.connecting])
        return Result("SHOW", [("database", TEXT), ("cl_active_cancel_req", INT4),
                               ("cl_waiting_cancel_req", INT4), ("sv_active_cancel", INT4),
                               ("sv_login", INT4)], rows)

    def show_dns_hosts(self) -> Result:
        """SHOW DNS_HOSTS / DNS_ZONES: pgpilot resolves through the system resolver at each
        connect and keeps no DNS cache, so no rows."""
        return Result("SHOW", [("hostname", TEXT), ("ttl", INT8), ("addrs", TEXT)], [])

    def show_dns_zones(self) -> Result:
        return Result("SHOW", [("zonename", TEXT), ("serial", INT8), ("count", INT4)], [])

    def show_fds(self) -> Result:
        """SHOW FDS: PgBouncer's takeover view (file descriptors and their state for -R);
        pgpilot's online restart hands over listening sockets only, so no rows."""
        return Result("SHOW", [("fd", INT4), ("task", TEXT), ("user", TEXT),
                               ("database", TEXT), ("addr", TEXT), ("port", INT4),
                               ("cancel", INT8), ("link", INT4), ("client_encoding", TEXT),
                               ("std_strings", TEXT), ("datestyle", TEXT), ("timezone", TEXT),
                               ("password", TEXT), ("scram_client_key", TEXT),
                               ("scram_server_key", TEXT)], [])

    def show_routes(self) -> Result:
        """pgpilot's own: the read/write split's nodes, their health and the transactions
        sent to each, with why those sent to the primary went there (routing.py)."""
        from pgpilot.proxy.routing import show_routes

        columns, rows = show_routes(self.pooler)
        return Result("SHOW", columns, rows)

    def show_help(self) -> Result:
        return Result("SHOW", notice=HELP_TEXT)

    # -- control ------------------------------------------------------------------------------
    async def pause(self, args: list[str]) -> Result:
        """Stop handing out servers, wait for the running transactions, close the servers."""
        db = self._database_arg(args)
        if db is None:
            self.pooler.paused = True
        else:
            self.pooler.paused_databases.add(db)
        for pool in self._pools_of(db):
            pool.paused = True
        await self._drain(db, lambda: self.pooler.paused if db is None
                          else db in self.pooler.paused_databases)
        self.console.keep_paused_pools_empty()
        return Result("PAUSE")

    async def _drain(self, db: str | None, still_wanted: Callable[[], bool]) -> None:
        """Close every server of ``db`` (all if None) as soon as its client lets it go."""
        while still_wanted() and not self.client.gone:
            busy = False
            for pool in self._pools_of(db):
                for server in list(pool.idle):
                    server.close("paused")
                busy = busy or pool.server_count() > 0
            if not busy:
                return
            await asyncio.sleep(PAUSE_POLL)

    async def resume(self, args: list[str]) -> Result:
        if self.pooler.shutdown_mode or self.pooler.stopping:
            raise AdminError("08P01", "pooler is shutting down")  # PgBouncer's words
        db = self._database_arg(args)
        if db is None:
            self.console.suspended = False
            self.pooler.paused = False
            self.pooler.paused_databases.clear()
        else:
            if self.pooler.paused:
                raise AdminError("55000", "the whole pooler is paused: RESUME without a "
                                 "database resumes it")
            self.pooler.paused_databases.discard(db)
        for pool in self._pools_of(db):
            resume_pool(pool)
        return Result("RESUME")

    async def kill(self, args: list[str]) -> Result:
        """Drop every client and server of ``db`` (all if none); new clients wait for RESUME."""
        db = self._database_arg(args)
        if db is None:
            self.pooler.paused = True
        else:
            self.pooler.paused_databases.add(db)
        for client in self.pooler.all_clients():
            if client.is_admin or (db is not None and client.database != db):
                continue
            client.fail("57P01", "terminating connection due to administrator command (KILL)")
        for pool in self._pools_of(db):
            pool.paused = True
            pool.close_all("KILL")
        self.console.keep_paused_pools_empty()
        return Result("KILL")

    async def kill_client(self, args: list[str]) -> Result:
        if len(args) != 1 or not args[0].isdigit():
            raise AdminError("42601", "KILL_CLIENT needs a client id (the id column of "
                             "SHOW CLIENTS)")
        client_id = int(args[0])
        target = next((c for c in self.pooler.all_clients() if c.id == client_id), None)
        if target is None:
            raise AdminError("42704", f"no such client: {client_id}")
        server = target.server
        target.fail("57P01", "terminating connection due to administrator command (KILL_CLIENT)")
        if server is not None:
            server.close("KILL_CLIENT")
        return Result("KILL_CLIENT")

    async def reconnect(self, args: list[str]) -> Result:
        """Close each server of ``db`` (all if none) once released; idle ones at once."""
        db = self._database_arg(args)
        for pool in self._pools_of(db):
            for server in pool.all_servers():
                server.close_needed = True
            for server in list(pool.idle):
                server.close("RECONNECT")
        return Result("RECONNECT")

    async def reload(self, args: list[str]) -> Result:
        path = self.pooler.config.path
        if not path:
            raise AdminError("55000", "no configuration file to reload (pgpilot was started "
                             "without --config)")
        try:
            config = load_config(path)
        except ConfigError as exc:
            raise AdminError("F0000", f"reload failed, keeping the running configuration: "
                             f"{exc}") from None
        self.pooler.reload(config)
        for warning in config.warnings:
            log.warning("%s", warning)
        return Result("RELOAD")

    async def disable(self, args: list[str]) -> Result:
        """DISABLE db: new clients of ``db`` are refused; those connected carry on."""
        if not args:
            raise AdminError("42601", "DISABLE needs a database name")
        db = self._database_arg(args)
        assert db is not None
        self.console.disabled_databases.add(db)
        return Result("DISABLE")

    async def enable(self, args: list[str]) -> Result:
        if not args:
            raise AdminError("42601", "ENABLE needs a database name")
        db = self._database_arg(args)
        assert db is not None
        self.console.disabled_databases.discard(db)
        return Result("ENABLE")

    async def suspend(self, args: list[str]) -> Result:
        """SUSPEND: no server is handed out until RESUME; running transactions carry on.
        (PgBouncer's SUSPEND also flushes socket buffers for its online restart, which
        pgpilot does differently: docs/operations.md.)"""
        self.console.suspended = True
        self.pooler.paused = True
        for pool in self.pooler.pools.values():
            pool.paused = True
        return Result("SUSPEND")

    async def wait_close(self, args: list[str]) -> Result:
        """WAIT_CLOSE [db]: wait until the servers RECONNECT / RELOAD marked are closed."""
        db = self._database_arg(args)
        while not self.client.gone and any(
                server.close_needed for pool in self._pools_of(db)
                for server in pool.all_servers()):
            await asyncio.sleep(PAUSE_POLL)
        return Result("WAIT_CLOSE")

    async def shutdown(self, args: list[str]) -> Result:
        mode = args[0].upper() if args else ""
        if mode not in ("", "WAIT_FOR_CLIENTS", "WAIT_FOR_SERVERS"):
            raise AdminError("42601", f"unknown SHUTDOWN mode: {args[0]}",
                             hint="SHUTDOWN, SHUTDOWN WAIT_FOR_CLIENTS or SHUTDOWN "
                                  "WAIT_FOR_SERVERS")
        pooler = self.pooler
        log.info("SHUTDOWN%s requested from the admin console", f" {mode}" if mode else "")
        if mode:
            pooler.stop_listening()
            pooler.shutdown_mode = mode
        if mode == "WAIT_FOR_SERVERS":
            pooler.paused = True
            for pool in pooler.pools.values():
                pool.paused = True
            # Clients waiting for a server, or starting a transaction from now on, are
            # closed at the janitor's next round, as PgBouncer's: "server shutting down".

        async def shut_down() -> None:
            if mode == "WAIT_FOR_CLIENTS":
                while any(not c.is_admin for c in pooler.all_clients()):
                    await asyncio.sleep(PAUSE_POLL)
            elif mode == "WAIT_FOR_SERVERS":
                while any(p.server_count() - len(p.idle) > 0 for p in pooler.pools.values()):
                    await asyncio.sleep(PAUSE_POLL)
            await asyncio.sleep(0.01)  # let this command's answer go out first
            await pooler.stop(timeout=0)

        self.console.spawn(shut_down())
        return Result("SHUTDOWN")


# ---------------------------------------------------------------------------------------
# Helpers shared with the metrics
# ---------------------------------------------------------------------------------------

def unix_peer_is_own_user(client: ClientConnection) -> bool:
    """Is ``client`` on the unix socket, from a process running as this process's OS user
    (SO_PEERCRED; PgBouncer's getpeereid check)?"""
    creds = peer_credentials(client)
    return creds is not None and creds[1] == os.getuid()


def _pinned_text(client: ClientConnection) -> str:
    """Why a client keeps its server (pin_session_state), with the statement that did it:
    "listen: LISTEN jobs; temp_table: CREATE TEMP TABLE t"; "" if it does not."""
    return "; ".join(f"{kind}: {what}" for kind, what in client.pins.items())


WORKER_POOL_FIELDS = ("size", "cl_active", "cl_waiting", "sv_active", "sv_idle", "pinned")
SIBLING_POOLS_FRESH = 5.0  # seconds: an older snapshot's pools are a worker gone, not shown


def worker_pools(pooler: Pooler) -> list[tuple[int, dict[str, Any]]]:
    """Every worker's pools as (worker index, Pool.summary): this worker's exact (the caller
    settled the fast path), its siblings' from their last snapshots (stats.py, about once a
    second; those older than SIBLING_POOLS_FRESH are left out)."""
    index = pooler.worker.index if pooler.worker is not None else 0
    rows = [(index, pool.summary(settled=True)) for pool in pooler.pools.values()]
    now = time.time()
    for document in pooler.query_stats._sibling_snapshots():
        written = document.get("written_at")
        if not isinstance(written, (int, float)) or now - written > SIBLING_POOLS_FRESH:
            continue
        worker = document.get("worker")
        for row in document.get("pools", ()):
            if isinstance(row, dict) and isinstance(worker, int) and all(
                    isinstance(row.get(name), int) for name in WORKER_POOL_FIELDS):
                rows.append((worker, row))
    rows.sort(key=lambda item: (str(item[1].get("database")), str(item[1].get("user")),
                                item[0]))
    return rows


def all_pools(pooler: Pooler) -> list[dict[str, Any]]:
    """The pools of the pooler as a whole: every worker's share added up per (database,
    user); ``workers`` says how many workers hold that pool."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for _worker, row in worker_pools(pooler):
        key = (str(row["database"]), str(row["user"]))
        total = merged.get(key)
        if total is None:
            merged[key] = {**row, "workers": 1}
        else:
            for name in WORKER_POOL_FIELDS:
                total[name] += row[name]
            total["workers"] += 1
    return [merged[key] for key in sorted(merged)]


def max_wait(pool: Pool, now: float) -> float:
    """Seconds the oldest client in the pool's line has waited (the line is FIFO)."""
    for client in pool.waiting:
        if not client.gone:
            return max(0.0, now - client.wait_started)
    return 0.0


def resume_pool(pool: Pool) -> None:
    """Un-pause a pool and serve the clients that queued meanwhile."""
    if pool.pooler.paused or pool.db_name in pool.pooler.paused_databases:
        return
    pool.paused = False
    while pool.waiting and pool.idle:
        pool.give_out(pool.idle[-1])
    if pool.waiting:
        pool.launch_if_needed()


def _config_text(key: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if key == "unix_socket_mode" and isinstance(value, int):
        return f"0{value:o}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _tls_info(transport: Any) -> str:
    if transport is None:
        return ""
    # An engine connection says its TLS itself (engine/tls.c; "" in clear text); asyncio's
    # transports have no such attribute.
    engine_tls = getattr(transport, "tls_info", None)
    if engine_tls is not None:
        return str(engine_tls)
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()}/{cipher[0] if cipher else ''}"


# SHOW CLIENTS / SERVERS' replication column, in PgBouncer's words.
_REPLICATION = {"true": "physical", "database": "logical"}


def _prepared_count(conn: ClientConnection | ServerConnection) -> int:
    """Prepared statements the connection holds, where prepared-statement tracking keeps them."""
    for name in ("prepared_statements", "prepared"):
        value = getattr(conn, name, None)
        if value is not None and hasattr(value, "__len__"):
            return len(value)
    return 0


def _show_queries(session: AdminSession) -> Result:
    """SHOW QUERIES: per-query statistics of every worker (stats.py)."""
    from pgpilot.proxy.stats import show_queries

    columns, rows = show_queries(session.pooler)
    return Result("SHOW", columns, rows)


def _show_worker_pools(session: AdminSession) -> Result:
    """SHOW WORKER_POOLS: every worker's pools, one row per (worker, pool)."""
    columns: list[Column] = [("worker", INT4), ("database", TEXT), ("user", TEXT),
                             ("pool_mode", TEXT), ("pool_size", INT4), ("cl_active", INT4),
                             ("cl_waiting", INT4), ("sv_active", INT4), ("sv_idle", INT4),
                             ("sv_pinned", INT4)]
    rows: list[list[Value]] = [
        [worker, row["database"], row["user"], row["mode"], row["size"], row["cl_active"],
         row["cl_waiting"], row["sv_active"], row["sv_idle"], row["pinned"]]
        for worker, row in worker_pools(session.pooler)]
    return Result("SHOW", columns, rows)


def _show_advice(session: AdminSession) -> Result:
    """SHOW ADVICE: a pool size recommended per pool, with its reasons (advisor.py)."""
    from pgpilot.proxy.stats import show_advice

    columns, rows = show_advice(session.pooler)
    return Result("SHOW", columns, rows)


def _show_slow(session: AdminSession) -> Result:
    """SHOW SLOW: slow statements and what their plans say, every worker's (slow.py)."""
    from pgpilot.proxy.stats import show_slow

    columns, rows = show_slow(session.pooler)
    return Result("SHOW", columns, rows)


def _show_nplusone(session: AdminSession) -> Result:
    """SHOW NPLUSONE: N+1 loops seen at the wire, every worker's (wire_nplusone.py)."""
    from pgpilot.proxy.stats import show_nplusone

    columns, rows = show_nplusone(session.pooler)
    return Result("SHOW", columns, rows)


_SHOW_COMMANDS: dict[str, Callable[[AdminSession], Result]] = {
    "pools": AdminSession.show_pools,
    "stats": AdminSession.show_stats,
    "stats_totals": AdminSession.show_stats_totals,
    "stats_averages": AdminSession.show_stats_averages,
    "totals": AdminSession.show_totals,
    "clients": AdminSession.show_clients,
    "servers": AdminSession.show_servers,
    "databases": AdminSession.show_databases,
    "users": AdminSession.show_users,
    "config": AdminSession.show_config,
    "lists": AdminSession.show_lists,
    "version": AdminSession.show_version,
    "state": AdminSession.show_state,
    "hazards": AdminSession.show_hazards,
    "workers": AdminSession.show_workers,
    "help": AdminSession.show_help,
    "sockets": AdminSession.show_sockets,
    "active_sockets": AdminSession.show_sockets,
    "mem": AdminSession.show_mem,
    "peers": AdminSession.show_peers,
    "peer_pools": AdminSession.show_peer_pools,
    "dns_hosts": AdminSession.show_dns_hosts,
    "dns_zones": AdminSession.show_dns_zones,
    "fds": AdminSession.show_fds,
    "routes": AdminSession.show_routes,
    "queries": _show_queries,
    "nplusone": _show_nplusone,
    "slow": _show_slow,
    "advice": _show_advice,
    "worker_pools": _show_worker_pools,
}

# SHOW commands that list no clients, only count them (client_counts, show_lists): clients
# the engine logged in alone and that idle there are counted in place, not given objects.
_COUNTING_SHOWS = frozenset({"pools", "stats", "stats_totals", "stats_averages", "totals",
                             "lists", "servers", "config", "version", "workers", "help",
                             "queries", "nplusone", "slow", "advice", "worker_pools"})

_ControlHandler = Callable[[AdminSession, list[str]], Any]
# verb -> (handler, how many arguments it takes at most)
_CONTROL_COMMANDS: dict[str, tuple[_ControlHandler, int]] = {
    "PAUSE": (AdminSession.pause, 1),
    "RESUME": (AdminSession.resume, 1),
    "KILL": (AdminSession.kill, 1),
    "KILL_CLIENT": (AdminSession.kill_client, 1),
    "RECONNECT": (AdminSession.reconnect, 1),
    "RELOAD": (AdminSession.reload, 0),
    "SHUTDOWN": (AdminSession.shutdown, 1),
    "DISABLE": (AdminSession.disable, 1),
    "ENABLE": (AdminSession.enable, 1),
    "SUSPEND": (AdminSession.suspend, 0),
    "WAIT_CLOSE": (AdminSession.wait_close, 1),
}

__all__ = ["AdminConsole", "AdminError", "AdminSession", "Result"]
