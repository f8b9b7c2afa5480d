"""Generate docs/pgbouncer-compat.md: PgBouncer's settings, console commands and SHOW columns,
each marked supported / differs / ignored / refused by pgpilot, with why.

The list of PgBouncer's names is ``tools/pgbouncer-names.json`` (from PgBouncer's manual); what
pgpilot does with each is read from pgpilot itself (the configuration parser's tables, the
admin console's commands, the columns its SHOW commands return), so the page cannot drift
from the code: ``tests/docs`` runs this script with ``--check``.

    python tools/pgbouncer_table.py            # rewrite docs/pgbouncer-compat.md
    python tools/pgbouncer_table.py --check    # exit 1 if the page is not up to date
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NAMES = ROOT / "tools" / "pgbouncer-names.json"
PAGE = ROOT / "docs" / "pgbouncer-compat.md"
sys.path.insert(0, str(ROOT / "src"))

from pgpilot.proxy import config as cfg  # noqa: E402
from pgpilot.proxy.admin import _CONTROL_COMMANDS, _SHOW_COMMANDS, AdminSession  # noqa: E402
from pgpilot.proxy.pooler import Pooler  # noqa: E402

# Why, for what pgpilot does differently from PgBouncer or not at all (pgpilot's own notes).
WHY: dict[str, str] = {
    "user": "pgpilot does not switch OS users from the file; `pgpilot-pgbouncer -u` does",
    "syslog": "the log goes to stderr and `logfile`",
    "syslog_ident": "the log goes to stderr and `logfile`",
    "syslog_facility": "the log goes to stderr and `logfile`",
    "service_name": "a Windows service name",
    "job_name": "a Windows service name",
    "conffile": "the file given on the command line is the one RELOAD reads",
    "peer_id": "read at start only (a change needs a restart); PgBouncer's cancel-key layout, "
               "so pgpilot and PgBouncer processes can be peered together",
    "disable_pqexec": "the simple protocol is always allowed",
    "auth_ldap_options": "no LDAP login (`auth_type = ldap` is refused)",
    "dns_max_ttl": "no DNS cache of pgpilot's own: the resolver is asked at each connect",
    "dns_nxdomain_ttl": "no DNS cache of pgpilot's own",
    "dns_zone_check_period": "no DNS cache of pgpilot's own",
    "resolv_conf": "the system resolver is used",
    "query_wait_notify": "no notice to waiting clients",
    "login_notify_message": "no notice to new clients",
    "pool_idle_timeout": "pools are kept; `server_idle_timeout` closes their servers",
    "client_tls_protocols": "TLS 1.2 and 1.3 (PgBouncer's `secure`)",
    "client_tls_ciphers": "Python's default ciphers",
    "client_tls13_ciphers": "Python's default ciphers",
    "client_tls_ecdhcurve": "Python's defaults",
    "client_tls_dheparams": "Python's defaults",
    "server_tls_protocols": "TLS 1.2 and 1.3 (PgBouncer's `secure`)",
    "server_tls_ciphers": "Python's default ciphers",
    "server_tls13_ciphers": "Python's default ciphers",
    "tcp_socket_buffer": "the kernel's defaults apply",
    "tcp_keepcnt": "the kernel's defaults apply",
    "tcp_keepidle": "the kernel's defaults apply",
    "tcp_keepintvl": "the kernel's defaults apply",
    "tcp_user_timeout": "the kernel's defaults apply",
    "autodb_idle_timeout": "automatic databases' pools are kept",
    "unix_socket_group": "the socket keeps the process's group",
    "scram_iterations": "pgpilot stores no SCRAM secrets of its own",
    "transaction_timeout": "not enforced; `query_timeout` and `idle_transaction_timeout` are",
    "pkt_buf": "buffers are sized per message",
    "max_packet_size": "messages are bounded per type (a startup packet, a password)",
    "sbuf_loopcnt": "the event loop is fair per read",
    "auth_type": "`pam` and `ldap` are refused at load (pgpilot runs neither); every other "
                 "method as PgBouncer, `hba` with `auth_hba_file` and `auth_ident_file`",
    "server_login_retry": "the longest wait: pgpilot retries after 50 ms, doubling per "
                          "failed round up to it",
    "so_reuseport": "also what `workers = N` uses for pgpilot's own processes",
    "verbose": "any value above 0 logs debug lines",
}
# Settings pgpilot acts on, but not quite as PgBouncer does (the rest of WHY for a
# supported name is a note only).
DIFFERS = frozenset({"auth_type", "server_login_retry", "verbose"})
# Notes on [databases] / [users] keys.
KEY_WHY: dict[str, str] = {
    "load_balance_hosts": "a host list is always served round-robin (PgBouncer's default)",
    "target_session_attrs": "no server-role check; `replicas=` routes reads instead",
    "query_wait_timeout": "the global `query_wait_timeout` applies",
    "transaction_timeout": "not enforced (as the global one)",
}


def status_of_setting(name: str) -> tuple[str, str]:
    if name in cfg.PGBOUNCER_SETTINGS_NOT_SUPPORTED:
        return "ignored (warns)", WHY.get(name, "")
    if name in cfg.SETTINGS_WITHOUT_EFFECT:
        return "no effect (warns when set)", WHY.get(name, "")
    if name in cfg._SETTINGS:
        return ("differs" if name in DIFFERS else "supported"), WHY.get(name, "")
    return "refused (unknown setting)", WHY.get(name, "not read by pgpilot")


def status_of_key(name: str, known: frozenset[str] | Any, ignored: frozenset[str]) -> tuple[
        str, str]:
    if name in ignored:
        return "ignored (warns)", KEY_WHY.get(name, "")
    if name in known:
        return "supported", ""
    return "refused (unknown key)", ""


def show_columns() -> dict[str, list[str]]:
    """The columns each of pgpilot's SHOW commands returns (an idle pooler, in-process)."""
    async def read() -> dict[str, list[str]]:
        config = cfg.parse_config("[databases]\nx = host=127.0.0.1\n[pgbouncer]\n"
                                  "auth_type = any\n")
        session = AdminSession(Pooler(config).admin_console, None)  # type: ignore[arg-type]
        return {name.upper(): [c[0] for c in fn(session).columns]
                for name, fn in _SHOW_COMMANDS.items()}
    return asyncio.run(read())


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(out)


def render() -> str:
    names = json.loads(NAMES.read_text())
    parts = [
        "# PgBouncer compatibility, name by name",
        "",
        "<!-- Generated by tools/pgbouncer_table.py from tools/pgbouncer-names.json; "
        "do not edit by hand. -->",
        "",
        f"Every name in {names['source']}, and what pgpilot does with "
        "it. *supported*: as PgBouncer; *differs*: acted on, in the way the note says; "
        "*ignored (warns)*: accepted so a PgBouncer file loads, a warning names it and "
        "`--check` prints it; *no effect (warns when set)*: parsed and shown by `SHOW "
        "CONFIG`, a warning when it holds anything but its default; *refused*: the "
        "configuration does not load (`--strict`), or the command is an error. The "
        "behaviour differences that PgBouncer's own test suite shows are in "
        "[Differences from PgBouncer](pooler.md#differences-from-pgbouncer).",
        "",
        "## [pgbouncer] settings",
        "",
    ]
    rows = []
    for name in names["settings"]:
        status, why = status_of_setting(name)
        rows.append([f"`{name}`", status, why])
    parts += [table(["setting", "pgpilot", "why"], rows), ""]
    for title, key, known, ignored in (
            ("[databases] keys", "database_keys", cfg._DATABASE_KEYS,
             cfg._DATABASE_KEYS_NOT_SUPPORTED),
            ("[users] keys", "user_keys", cfg._USER_KEYS, cfg._USER_KEYS_NOT_SUPPORTED)):
        rows = []
        for name in names[key]:
            status, why = status_of_key(name, known, ignored)
            rows.append([f"`{name}`", status, why])
        parts += [f"## {title}", "", table(["key", "pgpilot", "why"], rows), ""]
    rows = []
    control = {verb.upper() for verb in _CONTROL_COMMANDS}
    for verb in names["commands"]:
        ok = verb in control or verb in ("SHOW", "SET")
        why = {"SET": "pooler settings, applied as RELOAD applies them; a PgBouncer setting "
                      "pgpilot does not act on is accepted with a NOTICE",
               "SHUTDOWN": "also `WAIT_FOR_SERVERS` and `WAIT_FOR_CLIENTS`"}.get(verb, "")
        rows.append([f"`{verb}`", "supported" if ok else "refused", why])
    parts += ["## Console commands", "", table(["command", "pgpilot", "note"], rows), ""]
    ours = show_columns()
    rows = []
    for what, columns in names["show"].items():
        have = ours.get(what)
        if have is None:
            rows.append([f"`SHOW {what}`", "refused", ""])
            continue
        if columns is None:
            rows.append([f"`SHOW {what}`", "supported", "columns not fixed by PgBouncer's "
                         "manual; pgpilot's: " + ", ".join(have) if have else ""])
            continue
        missing = [c for c in columns if c not in have]
        extra = [c for c in have if c not in columns]
        note = []
        if missing:
            note.append("lacks " + ", ".join(f"`{c}`" for c in missing))
        if extra:
            note.append("adds " + ", ".join(f"`{c}`" for c in extra))
        rows.append([f"`SHOW {what}`", "differs" if missing else "supported",
                     "; ".join(note)])
    for what in sorted(set(ours) - set(names["show"])):
        rows.append([f"`SHOW {what}`", "pgpilot's own", ", ".join(ours[what])])
    parts += ["## SHOW commands and their columns", "",
              table(["command", "pgpilot", "columns"], rows), ""]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if docs/pgbouncer-compat.md is not what it would write")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run python tools/pgbouncer_table.py",
                  file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
