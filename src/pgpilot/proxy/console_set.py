"""The admin console's ``SET name = value``: pooler settings changed at run time, as PgBouncer.

PgBouncer lets an admin change most ``[pgbouncer]`` settings from the console; the new value
applies as a ``RELOAD`` would apply the same line in the file (the next ``RELOAD`` or SIGHUP
reads the file again, and the file's value wins). pgpilot does the same:

* the value is read exactly as the configuration file's (``config.with_setting``): a bad
  value is an error (22023) and changes nothing, a file setting that names a missing file
  too; the resulting configuration is then applied with :meth:`Pooler.reload`;
* the startup-only settings (``listen_addr``, ``unix_socket_dir`` ...) are refused with
  PostgreSQL's SQLSTATE 55P02 ("cannot be changed without restarting");
* the parameters a driver sends on connect (``client_encoding``, ``DateStyle``,
  ``TimeZone`` ...) are accepted and ignored with a NOTICE, as PgBouncer's "fake" parameters;
* PgBouncer settings pgpilot does not act on (``tcp_user_timeout`` ...) are accepted with a
  NOTICE saying they have no effect, so scripts written for PgBouncer keep running and the
  difference is visible;
* only admins (``admin_users``, or ``pgbouncer`` over the unix socket) may change settings
  (42501 otherwise).

No value is ever logged for a setting whose name speaks of a password or secret.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pgpilot.proxy.config import (
    PGBOUNCER_SETTINGS_NOT_SUPPORTED,
    SETTING_NAMES,
    Config,
    ConfigError,
    with_setting,
)

log = logging.getLogger("pgpilot.proxy")

# Parameters drivers SET on connect: accepted and ignored (PgBouncer's fake_param_list, and
# what pgpilot's console accepted before).
IGNORED_PARAMETERS = frozenset({
    "application_name", "client_encoding", "datestyle", "timezone", "extra_float_digits",
    "standard_conforming_strings", "intervalstyle", "search_path", "statement_timeout",
    "default_transaction_isolation", "server_version",
})
# Settings read only at start: a change needs a restart.
STARTUP_ONLY = frozenset({
    "listen_addr", "listen_port", "unix_socket_dir", "unix_socket_mode", "unix_socket_group",
    "listen_backlog", "so_reuseport", "pidfile", "workers", "metrics_port", "pkt_buf",
    "max_packet_size", "sbuf_loopcnt", "fast_path", "fast_path_tls", "user", "peer_id",
})


class ConsoleSetError(Exception):
    """A refused ``SET``: the SQLSTATE and message the console client is told."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class SetOutcome:
    """What a ``SET`` did: the new configuration (None: nothing to apply), the
    CommandComplete tag, and a NOTICE for the client (or None)."""

    config: Config | None
    tag: str
    notice: str | None = None


def parse_set(args: list[str]) -> tuple[str, str]:
    """``SET name = value`` / ``SET name TO value`` (words as the console tokenizer gives
    them, quotes removed) -> (name, value)."""
    if len(args) >= 2 and (args[1] == "=" or args[1].lower() == "to"):
        return args[0].lower(), " ".join(args[2:])
    raise ConsoleSetError("42601", "syntax error in SET: expected SET name = value",
                          hint="For example: SET default_pool_size = 10")


def console_set(config: Config, name: str, value: str, *, is_admin: bool) -> SetOutcome:
    """Check ``SET name = value`` against ``config``; the outcome to apply and report."""
    if name in IGNORED_PARAMETERS:
        return SetOutcome(None, "SET", "SET ignored")
    if not is_admin:
        raise ConsoleSetError("42501", "admin access needed",
                              hint="SET needs a user in admin_users.")
    if name in STARTUP_ONLY:
        raise ConsoleSetError("55P02", f'parameter "{name}" cannot be changed without '
                              "restarting the pooler")
    if name in PGBOUNCER_SETTINGS_NOT_SUPPORTED:
        return SetOutcome(None, f"SET {name}={value}",
                          f"SET {name} has no effect: pgpilot does not act on this PgBouncer "
                          "setting")
    if name not in SETTING_NAMES:
        raise ConsoleSetError("42704", f'unrecognized configuration parameter "{name}"',
                              hint="SHOW CONFIG lists the settings.")
    try:
        new = with_setting(config, name, value)
    except ConfigError as exc:
        raise ConsoleSetError("22023", f"SET failed: {exc.reason}") from None
    shown = "********" if ("password" in name or "secret" in name) else value
    return SetOutcome(new, f"SET {name}={shown}")
