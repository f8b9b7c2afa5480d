"""pgbouncer.ini-compatible settings -> typed, frozen dataclasses.

This module reads PgBouncer's configuration files as PgBouncer does and turns them into
immutable objects the proxy runtime can share without copying:

* ``pgbouncer.ini``: sections ``[pgbouncer]`` (alias ``[pgpilot]``), ``[databases]``,
  ``[users]``, ``[peers]``; ``key = value`` lines; a line whose first non-blank character is
  ``;`` or ``#`` is a comment; ``%include FILE``; setting names are case-insensitive; database
  and user names are keys that may be quoted: ``'my db'``, or in double quotes where two double
  quotes stand for one.
* Inline comments, a pgpilot extension (PgBouncer's parser, libusual's cfparser.c, has none:
  it takes the rest of the line as the value): a ``;`` or ``#`` that starts a value or follows
  a blank starts a comment to the end of the line; not inside a quoted connection-string
  value, and not in the SQL settings (``server_reset_query``, ``server_check_query``,
  ``auth_query``), whose text stays whole as in PgBouncer (``;`` separates statements there).
  PgBouncer refuses the values this changes (a number followed by text, a connection-string
  parameter named ``;``), except a path, address or name list with `` ;`` or `` #`` in it.
* ``[databases]`` / ``[users]`` / ``[peers]`` values are connection strings: ``key=value``
  pairs separated by blanks, a value may be single-quoted with ``''`` standing for one quote
  (PgBouncer's rule; a backslash is an ordinary character).
* ``userlist.txt`` (``auth_file``): ``"user" "secret"`` lines, ``""`` escapes a double quote;
  the secret is a plain password, ``md5`` + 32 hex digits, or a SCRAM-SHA-256 secret.

Rules kept throughout:

* An invalid value raises :class:`ConfigError` naming the file, the line and the reason.
* A setting pgpilot does not know is a warning (``Config.warnings``, with a "did you mean"
  when a known name is close), never an error; ``Config.unknown_settings`` holds those
  warnings apart (unknown settings, connection-string parameters and sections) for
  ``pgpilot proxy --check --strict``.
* No password or secret ever appears in an error, a warning or a ``repr``.
* Time settings are seconds as PgBouncer reads them: a non-negative decimal number, fractions
  allowed, no unit suffix (PgBouncer rejects ``10s`` too).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import difflib
import enum
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pgpilot.proxy.errors import ConfigError

__all__ = [
    "AUTH_TYPES",
    "CLIENT_TLS_SSLMODES",
    "DEFAULT_AUTH_QUERY",
    "POOL_MODES",
    "RESERVED_DATABASE_NAMES",
    "SERVER_TLS_SSLMODES",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "PeerConfig",
    "ScramSecret",
    "SecretKind",
    "UserConfig",
    "default_config",
    "load_auth_file",
    "load_config",
    "parse_auth_file",
    "parse_config",
    "parse_scram_secret",
    "secret_kind",
]

POOL_MODES = ("session", "transaction", "statement")
AUTH_TYPES = ("scram-sha-256", "md5", "plain", "trust", "any", "cert", "hba", "pam", "ldap")
# auth_type values for which clients are checked against auth_file.
AUTH_TYPES_NEEDING_AUTH_FILE = ("scram-sha-256", "md5", "plain", "trust")
CLIENT_TLS_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
SERVER_TLS_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# "pgbouncer" is PgBouncer's admin console; "pgpilot" is our alias for it.
RESERVED_DATABASE_NAMES = ("pgbouncer", "pgpilot")
DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
    "FROM pg_authid WHERE rolname=$1 AND rolcanlogin"
)
MAX_INCLUDE_DEPTH = 10
# PgBouncer's bound on peer_id: it rides in two bytes of the cancel key (proxy/peering.py).
MAX_PEER_ID = 16383

_MAIN_SECTIONS = ("pgbouncer", "pgpilot")


class _BadValue(Exception):
    """A value converter's complaint; turned into a ConfigError with file and line."""


# --------------------------------------------------------------------------------------------
# The typed result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """One ``[databases]`` entry: where clients asking for ``name`` are sent."""

    name: str
    host: str | None = None  # None -> unix socket default; "/..." = socket dir; "a,b" = list
    port: int = 5432
    dbname: str | None = None  # None -> the database name the client asked for
    user: str | None = None  # forced server user (None -> the client's user)
    password: str | None = field(default=None, repr=False)
    pool_mode: str | None = None
    pool_size: int | None = None
    min_pool_size: int | None = None
    reserve_pool: int | None = None  # per-db reserve_pool_size (PgBouncer key: reserve_pool)
    max_db_connections: int | None = None
    connect_query: str | None = None
    application_name: str | None = None
    client_encoding: str | None = None
    datestyle: str | None = None
    timezone: str | None = None
    auth_user: str | None = None
    # additions beyond the lead's interface
    auth_query: str | None = None
    auth_dbname: str | None = None
    max_db_client_connections: int | None = None
    server_lifetime: float | None = None
    is_fallback: bool = False  # built from the "*" entry for a name not listed
    # read replicas (proxy/routing.py): (host, port) each; None = the [pgbouncer] value
    replicas: tuple[tuple[str, int], ...] = ()
    read_write_split: bool | None = None
    replica_max_lag_bytes: int | None = None
    replica_max_lag_ms: int | None = None

    def server_dbname(self, client_dbname: str) -> str:
        """The database name to ask the server for when a client asked for ``client_dbname``."""
        return self.dbname if self.dbname else client_dbname

    def server_user(self, client_user: str) -> str:
        """The user name to log into the server as for a client logged in as ``client_user``."""
        return self.user if self.user else client_user


@dataclass(frozen=True, slots=True)
class UserConfig:
    """One ``[users]`` entry: per-user overrides."""

    name: str
    pool_mode: str | None = None
    max_user_connections: int | None = None
    # additions (PgBouncer [users] keys)
    pool_size: int | None = None
    reserve_pool_size: int | None = None
    max_user_client_connections: int | None = None
    client_idle_timeout: float | None = None
    query_timeout: float | None = None
    idle_transaction_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One ``[peers]`` entry: another pooler, behind the same balancer, whose cancel keys
    carry ``peer_id``; a cancel request for one of its keys is passed on to it."""

    peer_id: int
    host: str | None = None  # None -> unix_socket_dir; "/..." = a unix socket directory
    port: int = 6432
    pool_size: int | None = None  # cancels in flight to it at once; None -> default_pool_size


def _empty_mapping() -> Mapping[Any, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. Defaults are PgBouncer's documented ones unless noted."""

    path: str | None = None
    # where to listen
    listen_addr: str = "127.0.0.1"  # PgBouncer: not set (unix socket only); "" = no TCP
    listen_port: int = 6432
    unix_socket_dir: str = "/tmp"  # "" disables the unix socket
    unix_socket_mode: int = 0o777
    unix_socket_group: str | None = None
    listen_backlog: int = 128
    so_reuseport: bool = False
    # authentication
    auth_type: str = "md5"
    auth_file: str | None = None
    auth_hba_file: str | None = None
    auth_ident_file: str | None = None  # the map= of hba peer / cert rules
    auth_query: str = DEFAULT_AUTH_QUERY
    auth_user: str | None = None
    auth_dbname: str | None = None
    # pooling
    pool_mode: str = "session"
    max_client_conn: int = 100
    default_pool_size: int = 20
    min_pool_size: int = 0
    reserve_pool_size: int = 0
    reserve_pool_timeout: float = 5.0
    max_db_connections: int = 0
    max_user_connections: int = 0
    max_db_client_connections: int = 0
    max_user_client_connections: int = 0
    server_round_robin: bool = False
    # server connection upkeep
    server_reset_query: str = "DISCARD ALL"
    server_reset_query_always: bool = False
    server_check_query: str = "select 1"  # "" disables; "<empty>" = send an empty query
    server_check_delay: float = 30.0
    server_fast_close: bool = False
    server_lifetime: float = 3600.0
    server_idle_timeout: float = 600.0
    server_connect_timeout: float = 15.0
    server_login_retry: float = 15.0
    autodb_idle_timeout: float = 3600.0
    # client-side timeouts
    query_timeout: float = 0.0
    query_wait_timeout: float = 120.0
    cancel_wait_timeout: float = 10.0
    client_idle_timeout: float = 0.0
    client_login_timeout: float = 60.0
    client_message_timeout: float = 60.0  # pgpilot: a client silent mid-message (issue 26)
    idle_transaction_timeout: float = 0.0
    transaction_timeout: float = 0.0
    # startup parameters
    ignore_startup_parameters: tuple[str, ...] = ()
    track_extra_parameters: tuple[str, ...] = ("IntervalStyle",)
    application_name_add_host: bool = False
    # console access
    admin_users: tuple[str, ...] = ()
    stats_users: tuple[str, ...] = ()
    # files and logging
    logfile: str | None = None
    pidfile: str | None = None
    stats_period: float = 60.0
    log_connections: bool = True
    log_disconnections: bool = True
    log_pooler_errors: bool = True
    log_stats: bool = True
    verbose: int = 0
    # TLS
    client_tls_sslmode: str = "disable"
    client_tls_key_file: str | None = None
    client_tls_cert_file: str | None = None
    client_tls_ca_file: str | None = None
    server_tls_sslmode: str = "prefer"
    server_tls_ca_file: str | None = None
    server_tls_key_file: str | None = None
    server_tls_cert_file: str | None = None
    # low level
    tcp_keepalive: bool = True
    # TCP_DEFER_ACCEPT on the listening sockets: on by default where it exists, as PgBouncer
    tcp_defer_accept: bool = sys.platform.startswith("linux")
    pkt_buf: int = 4096
    max_packet_size: int = 2147483647
    sbuf_loopcnt: int = 5
    # prepared statements
    max_prepared_statements: int = 200
    scram_iterations: int = 4096
    # transparent transaction pooling: a client with LISTEN, a temp table, a session advisory
    # lock, a WITH HOLD cursor or an SQL PREPARE keeps its server until that state is gone
    pin_session_state: bool = True
    # pgpilot extensions
    metrics_port: int = 0  # 0 = no Prometheus exporter
    workers: int = 1
    shutdown_timeout: float = 30.0
    # per-query statistics (proxy/stats.py): SHOW QUERIES, pgpilot_query_*, /queries
    query_stats: bool = True
    query_stats_max: int = 1000  # shapes kept per process (most total time); the rest "other"
    query_stats_metrics: int = 20  # shapes exported as Prometheus series (top by total time)
    # N+1 at the wire (proxy/wire_nplusone.py): one shape this many times in one burst (0 = off)
    nplusone_threshold: int = 5
    nplusone_window: float = 0.1  # seconds between two statements of one client's burst
    # slow queries, explained (proxy/slow.py)
    slow_query_threshold: float = 0.0  # seconds; 0 = off
    slow_query_sample_rate: float = 1.0
    slow_query_explain_analyze: bool = False
    slow_query_explain_timeout: float = 5.0
    slow_query_max_concurrent: int = 1
    slow_query_keep: int = 5
    log_parameters: bool = False  # parameter values in slow-query reports
    # pool sizing advisor (proxy/advisor.py): the database's cores (0 = unknown), p95 wait goal
    advisor_db_cores: int = 0
    advisor_wait_target: float = 0.01
    # the dashboard on the metrics port (proxy/dashboard/): needed when that port is exposed
    dashboard_token: str = field(default="", repr=False)
    # the compiled fast path (proxy/_fastpath.c) for transaction and statement pools; off =
    # the pure-Python pooler (also what runs when the extension was not built)
    fast_path: bool = True
    # TLS inside the fast path (engine/tls.c, OpenSSL): off = TLS connections stay on
    # asyncio's SSL transport in Python, as without OpenSSL's headers at build time
    fast_path_tls: bool = True
    # read replicas (proxy/routing.py), for [databases] entries naming replicas=
    read_write_split: bool = True
    replica_max_lag_bytes: int = 0  # 0 = no bound
    replica_max_lag_ms: int = 0  # 0 = no bound
    replica_check_interval: float = 1.0
    # peering (proxy/peering.py): this pooler's id among those in [peers]; 0 = no peering
    peer_id: int = 0
    # sections
    databases: Mapping[str, DatabaseConfig] = field(default_factory=_empty_mapping)
    users: Mapping[str, UserConfig] = field(default_factory=_empty_mapping)
    peers: Mapping[int, PeerConfig] = field(default_factory=_empty_mapping)
    # auth_file's contents (user -> secret), loaded and checked with the config
    auth_users: Mapping[str, str] = field(default_factory=_empty_mapping, repr=False)
    warnings: tuple[str, ...] = ()
    # the warnings about names pgpilot does not know (a setting, a [databases] / [users]
    # parameter, a section): likely typos, which --strict refuses
    unknown_settings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept plain dicts / lists from default_config(**overrides) and freeze them.
        for name in ("databases", "users", "peers", "auth_users"):
            value = getattr(self, name)
            if not isinstance(value, MappingProxyType):
                object.__setattr__(self, name, MappingProxyType(dict(value)))
        for name in (
            "ignore_startup_parameters",
            "track_extra_parameters",
            "admin_users",
            "stats_users",
            "warnings",
            "unknown_settings",
        ):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    # -- lookups the runtime asks for ---------------------------------------------------------

    @property
    def listen_addresses(self) -> tuple[str, ...]:
        """``listen_addr`` split on commas; () means no TCP listener; "*" means all."""
        return tuple(part.strip() for part in self.listen_addr.split(",") if part.strip())

    def database_for(self, name: str) -> DatabaseConfig | None:
        """The entry for ``name``; else the ``*`` fallback renamed to ``name``; else None."""
        exact = self.databases.get(name)
        if exact is not None:
            return exact
        fallback = self.databases.get("*")
        if fallback is None or name in RESERVED_DATABASE_NAMES:
            return None
        return dataclasses.replace(fallback, name=name, is_fallback=True)

    def pool_mode_for(self, db: DatabaseConfig, user: str) -> str:
        """``[users]`` pool_mode, else the database's, else the global one (as PgBouncer)."""
        user_config = self.users.get(user)
        if user_config is not None and user_config.pool_mode is not None:
            return user_config.pool_mode
        if db.pool_mode is not None:
            return db.pool_mode
        return self.pool_mode

    def pool_size_for(self, db: DatabaseConfig, user: str | None = None) -> int:
        """``[users]`` pool_size (when ``user`` given), else the database's, else default."""
        if user is not None:
            user_config = self.users.get(user)
            if user_config is not None and user_config.pool_size is not None:
                return user_config.pool_size
        if db.pool_size is not None:
            return db.pool_size
        return self.default_pool_size

    def min_pool_size_for(self, db: DatabaseConfig) -> int:
        """The database's min_pool_size, else the global one (capped at the pool size)."""
        wanted = db.min_pool_size if db.min_pool_size is not None else self.min_pool_size
        return min(wanted, self.pool_size_for(db))

    def reserve_pool_size_for(self, db: DatabaseConfig, user: str | None = None) -> int:
        """``[users]`` reserve_pool_size, else the database's reserve_pool, else global."""
        if user is not None:
            user_config = self.users.get(user)
            if user_config is not None and user_config.reserve_pool_size is not None:
                return user_config.reserve_pool_size
        if db.reserve_pool is not None:
            return db.reserve_pool
        return self.reserve_pool_size

    def max_db_connections_for(self, db: DatabaseConfig) -> int:
        """The database's max_db_connections if > 0, else the global one (0 = unlimited)."""
        if db.max_db_connections:
            return db.max_db_connections
        return self.max_db_connections

    def max_user_connections_for(self, user: str) -> int:
        """The user's max_user_connections if > 0, else the global one (0 = unlimited)."""
        user_config = self.users.get(user)
        if user_config is not None and user_config.max_user_connections:
            return user_config.max_user_connections
        return self.max_user_connections

    def server_lifetime_for(self, db: DatabaseConfig) -> float:
        """The database's server_lifetime if set and > 0, else the global one."""
        if db.server_lifetime:
            return db.server_lifetime
        return self.server_lifetime


# --------------------------------------------------------------------------------------------
# Value converters: str -> typed value, or _BadValue(reason)
# --------------------------------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?[0-9]+")
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TRUE_WORDS = frozenset({"1", "yes", "on", "true"})
_FALSE_WORDS = frozenset({"0", "no", "off", "false"})


def _int_converter(minimum: int = 0, maximum: int | None = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        if not _INT_RE.fullmatch(text):
            raise _BadValue(_expected_int(minimum, maximum))
        number = int(text)
        if number < minimum or (maximum is not None and number > maximum):
            raise _BadValue(_expected_int(minimum, maximum))
        return number

    return convert


def _expected_int(minimum: int, maximum: int | None) -> str:
    if maximum is not None:
        return f"expected an integer from {minimum} to {maximum}"
    if minimum == 0:
        return "expected a non-negative integer"
    return f"expected an integer >= {minimum}"


def _octal_int(text: str) -> int:
    if not re.fullmatch(r"[0-7]+", text):
        raise _BadValue("expected an octal file mode such as 0777")
    return int(text, 8)


def _seconds(text: str) -> float:
    if not _NUMBER_RE.fullmatch(text):
        raise _BadValue("expected a number of seconds, such as 30 or 0.5 (no unit suffix)")
    seconds = float(text)
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise _BadValue("expected a non-negative number of seconds")
    return seconds


def _fraction(text: str) -> float:
    if not _NUMBER_RE.fullmatch(text) or not 0.0 <= float(text) <= 1.0:
        raise _BadValue("expected a fraction between 0 and 1, such as 0.1")
    return float(text)


def _bool(text: str) -> bool:
    word = text.lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise _BadValue("expected a boolean: 1/0, yes/no, on/off or true/false")


def _int_flag(text: str) -> bool:
    """A boolean PgBouncer reads as an integer (any non-zero number is on), e.g.
    tcp_defer_accept = 45."""
    with contextlib.suppress(_BadValue):
        return _count(text) != 0
    try:
        return _bool(text)
    except _BadValue:
        raise _BadValue("expected a boolean (1/0, yes/no, on/off, true/false) or a "
                        "number of seconds (0 is off)") from None


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def convert(text: str) -> str:
        word = text.lower()
        if word not in choices:
            raise _BadValue("expected one of " + ", ".join(choices))
        return word

    return convert


def _text(text: str) -> str:
    return text


def _optional_text(text: str) -> str | None:
    return text if text else None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


_port = _int_converter(0, 65535)
_server_port = _int_converter(1, 65535)
_count = _int_converter(0)
_positive = _int_converter(1)


@dataclass(frozen=True, slots=True)
class _Setting:
    convert: Callable[[str], object]
    is_path: bool = False  # resolve relative to the config file's directory
    is_sql: bool = False  # SQL text: ';' and '#' in it are SQL, never an inline comment


# [pgbouncer] settings pgpilot reads; the key is the Config field name.
_SETTINGS: dict[str, _Setting] = {
    "listen_addr": _Setting(_text),
    "listen_port": _Setting(_port),
    "unix_socket_dir": _Setting(_text),
    "unix_socket_mode": _Setting(_octal_int),
    "unix_socket_group": _Setting(_optional_text),
    "listen_backlog": _Setting(_positive),
    "so_reuseport": _Setting(_bool),
    "auth_type": _Setting(_choice(AUTH_TYPES)),
    "auth_file": _Setting(_optional_text, is_path=True),
    "auth_hba_file": _Setting(_optional_text, is_path=True),
    "auth_ident_file": _Setting(_optional_text, is_path=True),
    "auth_query": _Setting(_text, is_sql=True),
    "auth_user": _Setting(_optional_text),
    "auth_dbname": _Setting(_optional_text),
    "pool_mode": _Setting(_choice(POOL_MODES)),
    "max_client_conn": _Setting(_count),
    "default_pool_size": _Setting(_count),
    "min_pool_size": _Setting(_count),
    "reserve_pool_size": _Setting(_count),
    "reserve_pool_timeout": _Setting(_seconds),
    "max_db_connections": _Setting(_count),
    "max_user_connections": _Setting(_count),
    "max_db_client_connections": _Setting(_count),
    "max_user_client_connections": _Setting(_count),
    "server_round_robin": _Setting(_bool),
    "server_reset_query": _Setting(_text, is_sql=True),
    "server_reset_query_always": _Setting(_bool),
    "server_check_query": _Setting(_text, is_sql=True),
    "server_check_delay": _Setting(_seconds),
    "server_fast_close": _Setting(_bool),
    "server_lifetime": _Setting(_seconds),
    "server_idle_timeout": _Setting(_seconds),
    "server_connect_timeout": _Setting(_seconds),
    "server_login_retry": _Setting(_seconds),
    "autodb_idle_timeout": _Setting(_seconds),
    "query_timeout": _Setting(_seconds),
    "query_wait_timeout": _Setting(_seconds),
    "cancel_wait_timeout": _Setting(_seconds),
    "client_idle_timeout": _Setting(_seconds),
    "client_login_timeout": _Setting(_seconds),
    "client_message_timeout": _Setting(_seconds),
    "idle_transaction_timeout": _Setting(_seconds),
    "transaction_timeout": _Setting(_seconds),
    "ignore_startup_parameters": _Setting(_name_list),
    "track_extra_parameters": _Setting(_name_list),
    "application_name_add_host": _Setting(_bool),
    "admin_users": _Setting(_name_list),
    "stats_users": _Setting(_name_list),
    "logfile": _Setting(_optional_text, is_path=True),
    "pidfile": _Setting(_optional_text, is_path=True),
    "stats_period": _Setting(_seconds),
    "log_connections": _Setting(_bool),
    "log_disconnections": _Setting(_bool),
    "log_pooler_errors": _Setting(_bool),
    "log_stats": _Setting(_bool),
    "verbose": _Setting(_count),
    "client_tls_sslmode": _Setting(_choice(CLIENT_TLS_SSLMODES)),
    "client_tls_key_file": _Setting(_optional_text, is_path=True),
    "client_tls_cert_file": _Setting(_optional_text, is_path=True),
    "client_tls_ca_file": _Setting(_optional_text, is_path=True),
    "server_tls_sslmode": _Setting(_choice(SERVER_TLS_SSLMODES)),
    "server_tls_ca_file": _Setting(_optional_text, is_path=True),
    "server_tls_key_file": _Setting(_optional_text, is_path=True),
    "server_tls_cert_file": _Setting(_optional_text, is_path=True),
    "tcp_keepalive": _Setting(_bool),
    "tcp_defer_accept": _Setting(_int_flag),
    "pkt_buf": _Setting(_positive),
    "max_packet_size": _Setting(_positive),
    "sbuf_loopcnt": _Setting(_count),
    "max_prepared_statements": _Setting(_count),
    "pin_session_state": _Setting(_bool),
    "scram_iterations": _Setting(_positive),
    "metrics_port": _Setting(_port),
    "workers": _Setting(_positive),
    "shutdown_timeout": _Setting(_seconds),
    "query_stats": _Setting(_bool),
    "query_stats_max": _Setting(_positive),
    "query_stats_metrics": _Setting(_count),
    "nplusone_threshold": _Setting(_count),
    "nplusone_window": _Setting(_seconds),
    "slow_query_threshold": _Setting(_seconds),
    "slow_query_sample_rate": _Setting(_fraction),
    "slow_query_explain_analyze": _Setting(_bool),
    "slow_query_explain_timeout": _Setting(_seconds),
    "slow_query_max_concurrent": _Setting(_positive),
    "slow_query_keep": _Setting(_positive),
    "log_parameters": _Setting(_bool),
    "advisor_db_cores": _Setting(_count),
    "advisor_wait_target": _Setting(_seconds),
    "dashboard_token": _Setting(_text),
    "fast_path": _Setting(_bool),
    "fast_path_tls": _Setting(_bool),
    "read_write_split": _Setting(_bool),
    "replica_max_lag_bytes": _Setting(_count),
    "replica_max_lag_ms": _Setting(_count),
    "replica_check_interval": _Setting(_seconds),
    "peer_id": _Setting(_int_converter(0, MAX_PEER_ID)),
}

# PgBouncer settings pgpilot accepts but does not act on: a warning says so.
_PGBOUNCER_SETTINGS_NOT_SUPPORTED = frozenset(
    {
        "user",
        "syslog",
        "syslog_ident",
        "syslog_facility",
        "service_name",
        "job_name",
        "conffile",
        "disable_pqexec",
        "auth_ldap_options",
        "dns_max_ttl",
        "dns_nxdomain_ttl",
        "dns_zone_check_period",
        "resolv_conf",
        "query_wait_notify",
        "login_notify_message",
        "pool_idle_timeout",
        "client_tls_protocols",
        "client_tls_ciphers",
        "client_tls13_ciphers",
        "client_tls_ecdhcurve",
        "client_tls_dheparams",
        "server_tls_protocols",
        "server_tls_ciphers",
        "server_tls13_ciphers",
        "tcp_socket_buffer",
        "tcp_keepcnt",
        "tcp_keepidle",
        "tcp_keepintvl",
        "tcp_user_timeout",
    }
)

# Public views of the two lists above (the admin console's SET reads them).
SETTING_NAMES = frozenset(_SETTINGS)
PGBOUNCER_SETTINGS_NOT_SUPPORTED = _PGBOUNCER_SETTINGS_NOT_SUPPORTED
def _field_default(name: str, fallback: object) -> object:
    """Config's default for setting ``name`` (``fallback`` if it has none)."""
    for each in dataclasses.fields(Config):
        if each.name == name:
            return each.default
    return fallback


# Settings parsed and shown by SHOW CONFIG that nothing acts on: a value other than the
# default is a warning (docs/configuration.md says so per row).
SETTINGS_WITHOUT_EFFECT = frozenset({
    "unix_socket_group", "scram_iterations", "autodb_idle_timeout", "transaction_timeout",
    "pkt_buf", "max_packet_size", "sbuf_loopcnt",
})

# Settings whose values are never echoed (they may carry credentials).
_SECRET_KEYS = frozenset({"password", "auth_ldap_options"})


def _convert_setting(key: str, raw: str, convert: Callable[[str], object]) -> object:
    try:
        return convert(raw)
    except _BadValue as bad:
        shown = "(value hidden)" if key in _SECRET_KEYS else repr(raw)
        raise _BadValue(f"invalid value for {key}: {shown} ({bad})") from None


_INLINE_COMMENT_RE = re.compile(r"(?:^|\s)[;#]")


def _strip_inline_comment(value: str) -> str:
    """``value`` without an inline comment: from a ``;`` or ``#`` that starts the value or
    follows a blank, to the end of the line."""
    match = _INLINE_COMMENT_RE.search(value)
    return value if match is None else value[: match.start()].rstrip()


def _did_you_mean(name: str, known: Iterable[str], shown: str = "{}") -> str:
    """``"; did you mean pool_mode?"`` when a known name is close to ``name`` (written as
    ``shown`` formats it), else ``""``."""
    # 0.75, not difflib's 0.6: "hots" -> host yes, but "sslmode" -> pool_mode no
    close = difflib.get_close_matches(name.lower(), list(known), n=1, cutoff=0.75)
    return f"; did you mean {shown.format(close[0])}?" if close else ""


# --------------------------------------------------------------------------------------------
# INI reading: lines -> (section, key, value) entries, following %include
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    path: str | None
    line: int
    section: str
    key: str  # as written (unquoted); lower-cased later where names are case-insensitive
    value: str


def _resolve_path(value: str, base_dir: str | None) -> str:
    """A relative path is taken against the config file's directory.

    PgBouncer takes it against the working directory; if only that one exists we use it, so
    configs written for PgBouncer keep working.
    """
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded) or base_dir is None:
        return expanded
    beside_config = os.path.normpath(os.path.join(base_dir, expanded))
    if not os.path.exists(beside_config) and os.path.exists(expanded):
        return os.path.abspath(expanded)
    return beside_config


def _read_text(path: str, *, what: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found", path) from None
    except OSError as err:
        raise ConfigError(f"cannot read {what}: {err.strerror or err}", path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError("not valid UTF-8", path, line) from None


def _parse_ini_key(text: str, path: str | None, line: int) -> tuple[str, str]:
    """Split ``key = value``; the key may be '...' or "..." quoted. Returns (key, value)."""
    if text[0] == "'":
        end = text.find("'", 1)
        if end <= 1:
            raise ConfigError("syntax error: unterminated or empty quoted name", path, line)
        key, rest = text[1:end], text[end + 1 :]
    elif text[0] == '"':
        chars: list[str] = []
        position = 1
        while True:
            if position >= len(text):
                raise ConfigError("syntax error: unterminated quoted name", path, line)
            if text[position] == '"':
                if text.startswith('""', position):
                    chars.append('"')
                    position += 2
                    continue
                break
            chars.append(text[position])
            position += 1
        key, rest = "".join(chars), text[position + 1 :]
        if not key:
            raise ConfigError("syntax error: empty quoted name", path, line)
    else:
        match = re.match(r"[^\s=]+", text)
        if match is None:
            raise ConfigError("syntax error: expected 'name = value'", path, line)
        key, rest = match.group(), text[match.end() :]
    rest = rest.lstrip(" \t")
    if not rest.startswith("="):
        raise ConfigError("syntax error: expected 'name = value'", path, line)
    return key, rest[1:].strip()


class _IniReader:
    """Collects entries from a file and what it includes, in order."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.section: str | None = None
        self.warnings: list[str] = []
        self.unknown: list[str] = []  # the warnings about unknown names
        self.unknown_sections: set[str] = set()

    def read_text(self, text: str, path: str | None, depth: int = 0) -> None:
        base_dir = os.path.dirname(os.path.abspath(path)) if path is not None else None
        for line_number, raw_line in enumerate(text.splitlines(), start=1):
            line = raw_line.strip()
            if not line or line[0] in ";#":
                continue
            if line.startswith("%include") and line[8:9] in (" ", "\t"):
                target = _strip_inline_comment(line[9:].strip())
                self._include(target, base_dir, path, line_number, depth)
                continue
            if line.startswith("%"):
                raise ConfigError("syntax error: unknown directive", path, line_number)
            if line.startswith("["):
                end = line.find("]")
                if end < 0:
                    raise ConfigError("syntax error: section header without ']'", path, line_number)
                self.section = line[1:end].strip().lower()
                if self.section in _MAIN_SECTIONS:
                    self.section = "pgbouncer"
                elif self.section not in ("databases", "users", "peers"):
                    hint = _did_you_mean(
                        self.section, (*_MAIN_SECTIONS, "databases", "users", "peers"), "[{}]"
                    )
                    warning = (
                        f"{path or '<string>'}:{line_number}: unknown section "
                        f"[{line[1:end].strip()}] ignored{hint}"
                    )
                    self.warnings.append(warning)
                    self.unknown.append(warning)
                continue
            key, value = _parse_ini_key(line, path, line_number)
            if self.section is None:
                raise ConfigError(f"setting '{key}' outside of any section", path, line_number)
            self.entries.append(_Entry(path, line_number, self.section, key, value))

    def _include(
        self, target: str, base_dir: str | None, path: str | None, line: int, depth: int
    ) -> None:
        if not target:
            raise ConfigError("%include needs a file name", path, line)
        if depth >= MAX_INCLUDE_DEPTH:
            raise ConfigError(
                f"%include nested more than {MAX_INCLUDE_DEPTH} deep (a cycle?)", path, line
            )
        included = _resolve_path(target, base_dir)
        try:
            text = _read_text(included, what="included file")
        except ConfigError as err:
            if err.line is None:  # the include itself failed: point at the %include line
                raise ConfigError(f"%include {target}: {err.reason}", path, line) from None
            raise
        self.read_text(text, included, depth + 1)


# --------------------------------------------------------------------------------------------
# Connection strings of [databases] and [users]
# --------------------------------------------------------------------------------------------


def _split_connstring(text: str) -> list[tuple[str, str]]:
    """``key=value key='quoted '' value'`` -> [(key, value)] as PgBouncer reads it.

    Raises _BadValue without ever echoing a value (it may be a password).
    """
    pairs: list[tuple[str, str]] = []
    position = 0
    length = len(text)
    while True:
        while position < length and text[position].isspace():
            position += 1
        if position >= length or text[position] in ";#":
            # the end, or an inline comment: a key never starts with ';' or '#'
            return pairs
        key_start = position
        while position < length and text[position] != "=" and not text[position].isspace():
            position += 1
        key = text[key_start:position]
        while position < length and text[position].isspace():
            position += 1
        if not key or position >= length or text[position] != "=":
            shown = f" after '{pairs[-1][0]}'" if pairs else ""
            raise _BadValue(f"malformed connection string: expected key=value{shown}")
        position += 1
        while position < length and text[position].isspace():
            position += 1
        if position < length and text[position] == "'":
            position += 1
            chars: list[str] = []
            while True:
                if position >= length:
                    raise _BadValue(f"malformed connection string: unterminated quote in '{key}'")
                char = text[position]
                if char == "'":
                    if text.startswith("''", position):
                        chars.append("'")
                        position += 2
                        continue
                    position += 1
                    break
                chars.append(char)
                position += 1
            value = "".join(chars)
            if position < length and not text[position].isspace():
                raise _BadValue(
                    f"malformed connection string: text right after the quoted value of '{key}'"
                )
        else:
            value_start = position
            while position < length and not text[position].isspace():
                position += 1
            value = text[value_start:position]
        if not value:
            raise _BadValue(f"malformed connection string: empty value for '{key}'")
        pairs.append((key.lower(), value))


def _host_ports(text: str) -> tuple[tuple[str, int], ...]:
    """``replicas=HOST:PORT,HOST:PORT`` (a missing port is 5432)."""
    out: list[tuple[str, int]] = []
    for part in text.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep:
            host, port = part.strip(), "5432"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _BadValue("expected HOST:PORT[,HOST:PORT ...]")
        out.append((host, int(port)))
    return tuple(out)


# [databases] connstring keys -> (DatabaseConfig field, converter)
_DATABASE_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "host": ("host", _text),
    "port": ("port", _server_port),
    "dbname": ("dbname", _text),
    "user": ("user", _text),
    "password": ("password", _text),
    "pool_mode": ("pool_mode", _choice(POOL_MODES)),
    "pool_size": ("pool_size", _count),
    "min_pool_size": ("min_pool_size", _count),
    "reserve_pool": ("reserve_pool", _count),
    "reserve_pool_size": ("reserve_pool", _count),  # newer PgBouncer name
    "max_db_connections": ("max_db_connections", _count),
    "max_db_client_connections": ("max_db_client_connections", _count),
    "connect_query": ("connect_query", _text),
    "application_name": ("application_name", _text),
    "client_encoding": ("client_encoding", _text),
    "datestyle": ("datestyle", _text),
    "timezone": ("timezone", _text),
    "auth_user": ("auth_user", _text),
    "auth_query": ("auth_query", _text),
    "auth_dbname": ("auth_dbname", _text),
    "server_lifetime": ("server_lifetime", _seconds),
    "replicas": ("replicas", _host_ports),
    "read_write_split": ("read_write_split", _bool),
    "replica_max_lag_bytes": ("replica_max_lag_bytes", _count),
    "replica_max_lag_ms": ("replica_max_lag_ms", _count),
}
_DATABASE_KEYS_NOT_SUPPORTED = frozenset(
    {"load_balance_hosts", "target_session_attrs", "query_wait_timeout"}
)

# [users] connstring keys -> (UserConfig field, converter)
_USER_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "pool_mode": ("pool_mode", _choice(POOL_MODES)),
    "max_user_connections": ("max_user_connections", _count),
    "pool_size": ("pool_size", _count),
    "reserve_pool_size": ("reserve_pool_size", _count),
    "max_user_client_connections": ("max_user_client_connections", _count),
    "client_idle_timeout": ("client_idle_timeout", _seconds),
    "query_timeout": ("query_timeout", _seconds),
    "idle_transaction_timeout": ("idle_transaction_timeout", _seconds),
}
_USER_KEYS_NOT_SUPPORTED = frozenset({"query_wait_timeout", "transaction_timeout"})

# [peers] connstring keys -> (PeerConfig field, converter)
_PEER_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "host": ("host", _text),
    "port": ("port", _server_port),
    "pool_size": ("pool_size", _count),
}


def _peer_id_key(entry: _Entry) -> int:
    """A [peers] key: the peer's id, 1 to MAX_PEER_ID (PgBouncer's rule)."""
    key = entry.key.strip()
    # isascii: str.isdigit() is also true of '²', which int() refuses.
    if not (key.isascii() and key.isdigit()) or not 1 <= int(key) <= MAX_PEER_ID:
        raise ConfigError(f"peer '{entry.key}': a [peers] key is a peer_id, an integer from 1 "
                          f"to {MAX_PEER_ID}", entry.path, entry.line)
    return int(key)


def _parse_entry_connstring(
    entry: _Entry,
    what: str,
    known: Mapping[str, tuple[str, Callable[[str], object]]],
    not_supported: frozenset[str],
    warnings: list[str],
    unknown: list[str],
) -> dict[str, object]:
    where = f"{entry.path or '<string>'}:{entry.line}"
    try:
        pairs = _split_connstring(entry.value)
    except _BadValue as bad:
        raise ConfigError(f"{what} '{entry.key}': {bad}", entry.path, entry.line) from None
    values: dict[str, object] = {}
    for key, raw in pairs:
        spec = known.get(key)
        if spec is None:
            if key in not_supported:
                warnings.append(
                    f"{where}: {what} '{entry.key}': parameter '{key}' is not supported "
                    "by pgpilot; ignored"
                )
            else:
                hint = _did_you_mean(key, (*known, *not_supported))
                warning = f"{where}: {what} '{entry.key}': unknown parameter '{key}' ignored{hint}"
                warnings.append(warning)
                unknown.append(warning)
            continue
        field_name, convert = spec
        try:
            values[field_name] = _convert_setting(key, raw, convert)
        except _BadValue as bad:
            raise ConfigError(f"{what} '{entry.key}': {bad}", entry.path, entry.line) from None
    return values


# --------------------------------------------------------------------------------------------
# Building the Config
# --------------------------------------------------------------------------------------------


def parse_config(text: str, path: str | None = None) -> Config:
    """Parse pgbouncer.ini text. ``path`` names it in messages and anchors relative paths."""
    reader = _IniReader()
    reader.read_text(text.removeprefix("\ufeff"), path)
    warnings = reader.warnings
    unknown = reader.unknown
    settings: dict[str, object] = {}
    setting_lines: dict[str, tuple[str | None, int]] = {}
    databases: dict[str, DatabaseConfig] = {}
    users: dict[str, UserConfig] = {}
    peers: dict[int, PeerConfig] = {}

    for entry in reader.entries:
        where = f"{entry.path or '<string>'}:{entry.line}"
        if entry.section == "pgbouncer":
            key = entry.key.lower()
            setting = _SETTINGS.get(key)
            if setting is None:
                if key in _PGBOUNCER_SETTINGS_NOT_SUPPORTED:
                    warnings.append(
                        f"{where}: PgBouncer setting '{key}' is not supported by pgpilot; ignored"
                    )
                else:
                    hint = _did_you_mean(key, (*_SETTINGS, *_PGBOUNCER_SETTINGS_NOT_SUPPORTED))
                    warning = f"{where}: unknown setting '{entry.key}' ignored{hint}"
                    warnings.append(warning)
                    unknown.append(warning)
                continue
            raw = entry.value if setting.is_sql else _strip_inline_comment(entry.value)
            try:
                value = _convert_setting(key, raw, setting.convert)
            except _BadValue as bad:
                raise ConfigError(str(bad), entry.path, entry.line) from None
            if setting.is_path and isinstance(value, str):
                base_dir = (
                    os.path.dirname(os.path.abspath(entry.path)) if entry.path is not None else None
                )
                value = _resolve_path(value, base_dir)
            settings[key] = value
            setting_lines[key] = (entry.path, entry.line)
            if key in SETTINGS_WITHOUT_EFFECT and value != _field_default(key, value):
                # Parsed and shown by SHOW CONFIG, but nothing in pgpilot acts on it: say so
                # (--check prints it), rather than accept it silently.
                warnings.append(f"{where}: '{key}' has no effect in pgpilot (accepted for "
                                "PgBouncer compatibility, shown by SHOW CONFIG)")
        elif entry.section == "databases":
            if entry.key.lower() in RESERVED_DATABASE_NAMES:
                raise ConfigError(
                    f"database name '{entry.key}' is reserved for the admin console",
                    entry.path,
                    entry.line,
                )
            values = _parse_entry_connstring(
                entry, "database", _DATABASE_KEYS, _DATABASE_KEYS_NOT_SUPPORTED, warnings, unknown
            )
            databases[entry.key] = DatabaseConfig(name=entry.key, **values)  # type: ignore[arg-type]
        elif entry.section == "users":
            values = _parse_entry_connstring(
                entry, "user", _USER_KEYS, _USER_KEYS_NOT_SUPPORTED, warnings, unknown
            )
            users[entry.key] = UserConfig(name=entry.key, **values)  # type: ignore[arg-type]
        elif entry.section == "peers":
            peer_id = _peer_id_key(entry)
            values = _parse_entry_connstring(entry, "peer", _PEER_KEYS, frozenset(), warnings,
                                             unknown)
            peers[peer_id] = PeerConfig(peer_id=peer_id, **values)  # type: ignore[arg-type]
        # entries of unknown sections were warned about at their header

    auth_dbname = settings.get("auth_dbname")
    if isinstance(auth_dbname, str) and auth_dbname.lower() in RESERVED_DATABASE_NAMES:
        # PgBouncer's words, at load as PgBouncer says them; logins that need auth_query
        # then fail with "bouncer config error" (auth_query.py).
        file, line = setting_lines.get("auth_dbname", (path, 0))
        warnings.append(f'{file or "<string>"}:{line}: cannot use the reserved '
                        f'"{auth_dbname}" database as an auth_dbname')
    config = Config(
        path=path,
        databases=MappingProxyType(databases),
        users=MappingProxyType(users),
        peers=MappingProxyType(peers),
        warnings=tuple(warnings),
        unknown_settings=tuple(unknown),
        **settings,  # type: ignore[arg-type]
    )
    return _check_files(config, setting_lines)


def with_setting(config: Config, key: str, raw: str) -> Config:
    """``config`` with the ``[pgbouncer]`` setting ``key`` set to the text ``raw``, checked as
    the file's value would be (the admin console's ``SET key = value``). Raises ConfigError
    (bad value, a file that is missing ...) or KeyError (a name pgpilot does not read)."""
    key = key.lower()
    setting = _SETTINGS[key]
    try:
        value = _convert_setting(key, raw, setting.convert)
    except _BadValue as bad:
        raise ConfigError(str(bad)) from None
    if setting.is_path and isinstance(value, str):
        base_dir = os.path.dirname(os.path.abspath(config.path)) if config.path else None
        value = _resolve_path(value, base_dir)
    changes: dict[str, Any] = {key: value, "auth_users": MappingProxyType({})}
    changed = dataclasses.replace(config, **changes)
    return _check_files(changed, {})


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a pgbouncer.ini file; raises ConfigError."""
    path_text = os.fspath(path)
    return parse_config(_read_text(path_text, what="config file"), path_text)


def default_config(**overrides: object) -> Config:
    """All defaults (no config file), with typed ``overrides`` checked like parsed values."""
    try:
        config = Config(**overrides)  # type: ignore[arg-type]
    except TypeError as err:
        raise ConfigError(f"bad override: {err}") from None
    for name, choices in (
        ("pool_mode", POOL_MODES),
        ("auth_type", AUTH_TYPES),
        ("client_tls_sslmode", CLIENT_TLS_SSLMODES),
        ("server_tls_sslmode", SERVER_TLS_SSLMODES),
    ):
        if getattr(config, name) not in choices:
            raise ConfigError(f"invalid value for {name}: {getattr(config, name)!r}")
    for config_field in dataclasses.fields(Config):
        value = getattr(config, config_field.name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"invalid value for {config_field.name}: {value!r} (negative)")
    return config


def _check_files(config: Config, setting_lines: Mapping[str, tuple[str | None, int]]) -> Config:
    """Cross-setting checks that need the whole file: auth_file, TLS files."""

    def fail(reason: str, setting: str | None) -> ConfigError:
        if setting is not None and setting in setting_lines:
            where_path, where_line = setting_lines[setting]
            return ConfigError(reason, where_path, where_line)
        return ConfigError(reason, config.path)

    auth_users: dict[str, str] = {}
    if config.auth_file is not None:
        if not os.path.isfile(config.auth_file):
            raise fail(f"auth_file '{config.auth_file}' not found", "auth_file")
        auth_users = load_auth_file(config.auth_file)
    elif config.auth_type in AUTH_TYPES_NEEDING_AUTH_FILE and config.auth_user is None:
        raise fail(
            f"auth_type = {config.auth_type} needs auth_file (or auth_user for auth_query)",
            "auth_type",
        )
    if config.auth_type in ("pam", "ldap"):
        # Refused rather than accepted and ignored: a login method pgpilot does not run.
        raise fail(f"auth_type = {config.auth_type} is not supported by pgpilot (use hba, "
                   "scram-sha-256, md5, plain, cert, trust or auth_query)", "auth_type")
    if config.auth_type == "hba" and config.auth_hba_file is None:
        raise fail("auth_type = hba needs auth_hba_file", "auth_type")
    if config.auth_hba_file is not None and not os.path.isfile(config.auth_hba_file):
        raise fail(f"auth_hba_file '{config.auth_hba_file}' not found", "auth_hba_file")
    if config.auth_type == "hba" and config.auth_hba_file is not None:
        from pgpilot.proxy.hba import load_hba

        load_hba(config.auth_hba_file)  # a line pgpilot cannot follow: ConfigError, with its line
    if config.auth_ident_file is not None and os.path.isfile(config.auth_ident_file):
        from pgpilot.proxy.hba import load_ident

        load_ident(config.auth_ident_file)  # checked as the hba file is

    if config.client_tls_sslmode != "disable":
        for name in ("client_tls_key_file", "client_tls_cert_file"):
            if getattr(config, name) is None:
                raise fail(
                    f"client_tls_sslmode = {config.client_tls_sslmode} needs {name}",
                    "client_tls_sslmode",
                )
        _check_exists(config, fail, "client_tls_key_file", "client_tls_cert_file")
        _check_exists(config, fail, "client_tls_ca_file")
    if config.server_tls_sslmode != "disable":
        _check_exists(
            config, fail, "server_tls_ca_file", "server_tls_key_file", "server_tls_cert_file"
        )
    if auth_users:
        config = dataclasses.replace(config, auth_users=MappingProxyType(auth_users))
    return config


def _check_exists(
    config: Config, fail: Callable[[str, str | None], ConfigError], *names: str
) -> None:
    for name in names:
        file_path = getattr(config, name)
        if file_path is not None and not os.path.isfile(file_path):
            raise fail(f"{name} '{file_path}' not found", name)


# --------------------------------------------------------------------------------------------
# auth_file (userlist.txt)
# --------------------------------------------------------------------------------------------


class SecretKind(enum.StrEnum):
    """What an auth_file secret is."""

    PLAIN = "plain"
    MD5 = "md5"
    SCRAM_SHA_256 = "scram-sha-256"


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` decoded."""

    iterations: int
    salt: bytes = field(repr=False)
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


_MD5_SECRET_RE = re.compile(r"md5[0-9a-fA-F]{32}")
_SCRAM_PREFIX = "SCRAM-SHA-256$"


def secret_kind(secret: str) -> SecretKind:
    """Classify an auth_file secret (as PostgreSQL and PgBouncer do, by its shape)."""
    if _MD5_SECRET_RE.fullmatch(secret):
        return SecretKind.MD5
    if secret.startswith(_SCRAM_PREFIX):
        return SecretKind.SCRAM_SHA_256
    return SecretKind.PLAIN


def parse_scram_secret(secret: str) -> ScramSecret:
    """Decode a SCRAM-SHA-256 secret; ValueError (saying what, never the secret) if malformed."""
    match = re.fullmatch(r"SCRAM-SHA-256\$([0-9]+):([^$]+)\$([^:]+):(.+)", secret)
    if match is None:
        raise ValueError(
            "malformed SCRAM secret: expected SCRAM-SHA-256$<iterations>:<salt>$"
            "<StoredKey>:<ServerKey>"
        )
    iterations = int(match.group(1))
    if iterations <= 0:
        raise ValueError("malformed SCRAM secret: iteration count must be positive")
    try:
        salt, stored_key, server_key = (
            base64.b64decode(match.group(index), validate=True) for index in (2, 3, 4)
        )
    except (binascii.Error, ValueError):
        raise ValueError("malformed SCRAM secret: salt or keys are not valid base64") from None
    if not salt or len(stored_key) != 32 or len(server_key) != 32:
        raise ValueError("malformed SCRAM secret: StoredKey and ServerKey must be 32 bytes")
    return ScramSecret(iterations, salt, stored_key, server_key)


def _read_quoted(line: str, position: int) -> tuple[str, int] | None:
    """Read a "..." field ("" = one quote) starting at ``position``; None if malformed."""
    if position >= len(line) or line[position] != '"':
        return None
    chars: list[str] = []
    position += 1
    while position < len(line):
        char = line[position]
        if char == '"':
            if line.startswith('""', position):
                chars.append('"')
                position += 2
                continue
            return "".join(chars), position + 1
        chars.append(char)
        position += 1
    return None


def parse_auth_file(text: str, path: str | None = None) -> dict[str, str]:
    """Parse userlist.txt text into {user: secret}; ConfigError with file:line if malformed."""
    users: dict[str, str] = {}
    for line_number, raw_line in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = raw_line.strip()
        if not line or line[0] in ";#":
            continue
        user_field = _read_quoted(line, 0)
        if user_field is None:
            raise ConfigError('malformed line: expected "user" "password"', path, line_number)
        user, position = user_field
        while position < len(line) and line[position] in " \t":
            position += 1
        secret_field = _read_quoted(line, position)
        if secret_field is None:
            raise ConfigError(
                f'malformed line for user "{user}": expected "user" "password"',
                path,
                line_number,
            )
        secret = secret_field[0]
        if not user:
            raise ConfigError("empty user name", path, line_number)
        if secret_kind(secret) is SecretKind.SCRAM_SHA_256:
            try:
                parse_scram_secret(secret)
            except ValueError as err:
                raise ConfigError(f'user "{user}": {err}', path, line_number) from None
        users[user] = secret  # the rest of the line is ignored, as in PgBouncer
    return users


def load_auth_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read PgBouncer's userlist.txt into {user: secret}; raises ConfigError."""
    path_text = os.fspath(path)
    return parse_auth_file(_read_text(path_text, what="auth_file"), path_text)
