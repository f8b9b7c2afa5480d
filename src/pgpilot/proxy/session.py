"""Session settings that follow their client under transaction and statement pooling.

A client that runs ``SET search_path = app`` (or ``SET ROLE``, ``SET SESSION AUTHORIZATION``,
``set_config(name, value, false)``, ``RESET``, ``RESET ALL``, ``DISCARD ALL``) expects the
setting on every later transaction, and nobody else should get it. The pooler therefore:

1. notices statements that may change session settings (a cheap test on every Query and
   Parse text, then pglast on the few that pass it, cached per text; a ParameterStatus from
   the server outside the startup parameters the pooler tracks says so too);
2. at the end of such a transaction, before the server goes back to the pool, reads what the
   session really carries from the server itself (``pg_settings`` rows whose source is
   ``session``, plus the settings ``pg_settings`` does not list: role, session authorization
   and custom ``app.*`` names the client touched). Rolled-back SETs, savepoints and SETs
   inside functions are all as PostgreSQL says, not as the pooler guesses;
3. records that as the client's settings and as the server's, and before any transaction of
   the client runs on a server whose settings differ, brings that server to the client's
   (``RESET`` what the client lacks, ``set_config`` what it has). A server carrying settings
   is brought back the same way before a client without them uses it.

Clients that never SET cost nothing: their settings are empty, as are the servers'.

State that cannot be carried to another server (``LISTEN``, temporary tables, session advisory
locks, ``WITH HOLD`` cursors, SQL ``PREPARE``) is counted on the server by the same read, at the
end of a transaction that may have made or ended it; while any is there the client keeps its
server ("pinned", ``pin_session_state``), and a server a pinned client leaves is cleaned with
``DISCARD ALL`` before anyone else gets it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from pgpilot.proxy.server import TRACKED_BY_LOWER

# Settings pg_settings does not list (GUC_NO_SHOW_ALL) that a client may still set.
UNLISTED = ("role", "session_authorization")
# Listed with source 'session' once a transaction SET them (SET TRANSACTION, BEGIN ISOLATION
# LEVEL ...), but each transaction's own, from the defaults: never a client's setting (and
# transaction_isolation cannot be set once the pooler's own statement has run a query).
PER_TRANSACTION = ("transaction_deferrable", "transaction_isolation", "transaction_read_only")
ALL = "*"  # RESET ALL / DISCARD ALL: every setting the client had is gone
UNKNOWN = "?"  # set_config of a name computed by the statement: not known to the pooler
PARAM = "$"  # "$2": set_config of a name bound as parameter 2 (read from the Bind)
# A DO block: it may change any setting and make or end any pinned state (its body is code
# the pooler does not run through): the session is read, and its pins counted, afterwards.
DO_BLOCK = "!"
# Custom settings a DO block's body names where it may set them (set_config('app.x', ...),
# SET app.x, SET SESSION app.x): asked for by name as those set by a statement are.
_DO_CUSTOM_NAMES = re.compile(
    r"set_config\s*\(\s*'([^']+)'|\bset\s+(?:session\s+)?\"?([a-z_][\w$]*\.[\w$.]+)",
    re.IGNORECASE)
_BLANKS = " \t\r\n\f\v"  # PostgreSQL's whitespace (scan.l; \v since 16)
_MAX_STATEMENT_STARTS = 64
_CACHE_MAX_TEXT = 8192


def might_change_settings(low: str) -> bool:
    """The cheap test, on lower-cased text: False means it certainly changes no setting."""
    if "set_config" in low or 'u&"' in low:  # U&"...": escapes may spell set_config
        return True
    if ";" not in low.rstrip(_BLANKS + ";"):
        return _starts_with_word(low)
    pieces = low.split(";", _MAX_STATEMENT_STARTS)
    return len(pieces) > _MAX_STATEMENT_STARTS or any(_starts_with_word(p) for p in pieces)


def _starts_with_word(low: str) -> bool:
    """Does the text begin (after blanks and comments) with SET, RESET or DISCARD?"""
    while True:
        low = low.lstrip(_BLANKS)
        if low.startswith("/*"):
            end = low.find("*/")
            if end < 0:
                return False
            low = low[end + 2:]
        elif low.startswith("--"):
            end = low.find("\n")
            if end < 0:
                return False
            low = low[end + 1:]
        else:
            for word in ("set", "reset", "discard", "do"):
                if low.startswith(word):
                    after = low[len(word):len(word) + 1]
                    return not (after.isalnum() or after == "_")
            return False


def setting_changes(sql: str) -> tuple[str, ...] | None:
    """The settings ``sql`` may change for the session: names (lower case) that pg_settings
    does not list and the pooler must ask for by name, ``ALL`` for RESET ALL / DISCARD ALL;
    () when it changes only listed ones; None when it changes none (or does not parse:
    PostgreSQL then refuses it)."""
    if len(sql) > _CACHE_MAX_TEXT:
        return _setting_changes(sql)
    return _setting_changes_cached(sql)


@lru_cache(maxsize=2048)
def _setting_changes_cached(sql: str) -> tuple[str, ...] | None:
    return _setting_changes(sql)


def _setting_changes(sql: str) -> tuple[str, ...] | None:
    from pglast import parse_sql
    from pglast.parser import ParseError

    try:
        statements = parse_sql(sql)
    except (ParseError, ValueError, RecursionError):
        return None
    names: list[str] = []
    changed = False
    for raw in statements:
        found = _statement_changes(raw.stmt)
        if found is not None:
            changed = True
            names.extend(found)
    return tuple(dict.fromkeys(names)) if changed else None


def _statement_changes(stmt: Any) -> list[str] | None:
    from pglast import ast
    from pglast.enums import DiscardMode, VariableSetKind

    if isinstance(stmt, ast.VariableSetStmt):
        if stmt.is_local:
            return None  # SET LOCAL ends with the transaction
        name = (stmt.name or "").lower()
        if stmt.kind == VariableSetKind.VAR_RESET_ALL:
            return [ALL]
        if stmt.kind == VariableSetKind.VAR_SET_MULTI and name.startswith("transaction"):
            return None  # SET TRANSACTION: this transaction only
        if name in TRACKED_BY_LOWER:
            return None  # startup parameters: tracked through ParameterStatus
        return [name] if name in UNLISTED or "." in name else []
    if isinstance(stmt, ast.DiscardStmt) and stmt.target == DiscardMode.DISCARD_ALL:
        return [ALL]
    if isinstance(stmt, ast.DoStmt):
        body = " ".join(str(arg.arg.sval) for arg in stmt.args or ()
                        if arg.defname == "as" and isinstance(arg.arg, ast.String))
        names = [(a or b).lower() for a, b in _DO_CUSTOM_NAMES.findall(body)]
        return [DO_BLOCK] + [n for n in names if "." in n or n in UNLISTED]
    return _set_config_calls(stmt)


def _set_config_calls(stmt: Any) -> list[str] | None:
    """set_config(name, value, false) anywhere in the statement: the names it sets (a name
    bound as a parameter: PARAM and its number, read from each Bind; another name that is
    not a constant: UNKNOWN)."""
    from pglast import ast
    from pglast.visitors import Visitor

    found: list[str] = []
    seen = [False]

    class Calls(Visitor):  # type: ignore[misc]
        def visit_FuncCall(self, _ancestors: Any, node: Any) -> None:
            name = str(node.funcname[-1].sval or "").lower() if node.funcname else ""
            if name != "set_config" or not node.args or len(node.args) != 3:
                return
            is_local = node.args[2]
            if isinstance(is_local, ast.A_Const) and isinstance(is_local.val, ast.Boolean) \
                    and is_local.val.boolval:
                return
            seen[0] = True
            setting = node.args[0]
            while isinstance(setting, ast.TypeCast):
                setting = setting.arg
            if isinstance(setting, ast.A_Const) and isinstance(setting.val, ast.String):
                param = str(setting.val.sval).lower()
                if param in UNLISTED or "." in param:
                    found.append(param)
            elif isinstance(setting, ast.ParamRef) and setting.number:
                found.append(f"{PARAM}{setting.number}")
            else:
                found.append(UNKNOWN)

    Calls()(stmt)
    return found if seen[0] else None


def bound_setting_name(bind: bytes, number: int) -> str | None:
    """The name of a setting a Bind gives as parameter ``number`` (set_config's first
    argument, text: its bytes are the same in the text and the binary format), lower case,
    if the pooler must ask for it by name; None otherwise or if the Bind is malformed."""
    try:
        pos = bind.index(b"\x00") + 1
        pos = bind.index(b"\x00", pos) + 1
        pos += 2 + 2 * int.from_bytes(bind[pos:pos + 2], "big")
        count = int.from_bytes(bind[pos:pos + 2], "big")
        pos += 2
    except ValueError:
        return None
    if not 0 < number <= count:
        return None
    for i in range(number):
        size = int.from_bytes(bind[pos:pos + 4], "big", signed=True)
        pos += 4
        if i == number - 1:
            if size < 0 or pos + size > len(bind):
                return None
            name = bind[pos:pos + size].decode("utf-8", errors="replace").lower()
            return name if name in UNLISTED or "." in name else None
        pos += max(size, 0)
    return None


# State that cannot follow a client to another server, and how to count it on the server.
# A client whose session holds any of it keeps its server ("pinned", pin_session_state).
PINS: dict[str, str] = {
    "listen": "SELECT count(*) FROM pg_catalog.pg_listening_channels()",
    "temp_table": ("SELECT count(*) FROM pg_catalog.pg_class"
                   " WHERE relnamespace = pg_catalog.pg_my_temp_schema()"),
    "advisory_lock": ("SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory'"
                      " AND pid = pg_catalog.pg_backend_pid()"),
    "with_hold_cursor": "SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable",
    "sql_prepare": "SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql",
}
_PIN_ROW = " pin:"  # pins' rows in the snapshot (no setting's name starts with a blank)
# Words of statements that may end pinned state (UNLISTEN, pg_advisory_unlock, DROP TABLE,
# DISCARD TEMP, CLOSE, DEALLOCATE): a pinned client's transaction with one is checked again.
UNPIN_WORDS = ("unlisten", "unlock", "drop", "discard", "close", "deallocate")
# Those of them rare enough in prepared statements that every run of one is noted too
# (client._note_bind; "drop" and "close" are common in names: a pinned client may stay
# pinned after running such a prepared statement again).
UNPIN_RUN_WORDS = ("unlisten", "unlock", "discard", "deallocate")


def snapshot_sql(names: set[str], pins: bool = False) -> str:
    """What reads a session's settings: pg_settings' session rows, and by name those it
    does not list (their values, or NULL / '' when unset); with ``pins``, one more row per
    kind of state in PINS, with its count. Each row comes back as the hex of its UTF-8
    bytes (:func:`_utf8_rows`): the server connection's client_encoding is whichever
    client's it last carried, and a value must read the same whatever that is."""
    sql = ("SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session'"
           " AND lower(name) <> ALL (ARRAY[" + ", ".join(
               _literal(n) for n in sorted(TRACKED_BY_LOWER) + list(PER_TRANSACTION))
           + "])")
    for name in sorted(names):
        sql += (f" UNION ALL SELECT {_literal(name)},"
                f" pg_catalog.current_setting({_literal(name)}, true)")
    if pins:
        for kind, count in PINS.items():
            sql += f" UNION ALL SELECT {_literal(_PIN_ROW + kind)}, ({count})::text"
    return ("SELECT pg_catalog.encode(pg_catalog.convert_to(n, 'UTF8'), 'hex'),"
            " pg_catalog.encode(pg_catalog.convert_to(v, 'UTF8'), 'hex')"
            f" FROM ({sql}) AS s (n, v)")


def _utf8_rows(rows: list[list[bytes | None]]) -> list[list[bytes | None]]:
    """The snapshot's rows as UTF-8 bytes (they come as hex: snapshot_sql)."""
    try:
        return [[None if v is None else bytes.fromhex(v.decode("ascii")) for v in row]
                for row in rows]
    except ValueError:
        return []


def pins_from_rows(rows: list[list[bytes | None]]) -> dict[str, int]:
    """The kinds of pinned state the snapshot found (those with a count above 0)."""
    found: dict[str, int] = {}
    for row in _utf8_rows(rows):
        if len(row) == 2 and row[0] is not None and row[0].startswith(_PIN_ROW.encode()):
            count = int(row[1] or b"0")
            if count:
                found[row[0][len(_PIN_ROW):].decode()] = count
    return found


def settings_from_rows(rows: list[list[bytes | None]], login_user: str) -> dict[str, str]:
    """The client's settings from the snapshot's rows: what is set, with defaults left out."""
    settings: dict[str, str] = {}
    for row in _utf8_rows(rows):
        if len(row) != 2 or row[0] is None or row[1] is None or row[0].startswith(b" "):
            continue
        name, value = row[0].decode(errors="replace"), row[1].decode(errors="replace")
        if name == "role" and value == "none":
            continue
        if name == "session_authorization" and value == login_user:
            continue
        if "." in name and value == "":
            continue
        settings[name] = value
    return settings


IDENTITY = ("session_authorization", "role")  # in the order they are set


def apply_sql(current: dict[str, str], wanted: dict[str, str]) -> str:
    """Statements that bring a session carrying ``current`` to ``wanted`` ('' if equal).

    The other settings are applied as the login user, the identity the client set last: a
    client may have SET a superuser-only setting before SET ROLE to a role that may not, and
    a session carrying another client's role may not set them either. So a session with a
    role or session authorization goes back to the login user first; then the settings;
    then the session authorization, then the role (changing the session authorization
    resets the role)."""
    names = sorted((set(current) | set(wanted)) - set(IDENTITY))
    changed = [n for n in names if current.get(n) != wanted.get(n)]
    same_identity = all(current.get(n) == wanted.get(n) for n in IDENTITY)
    if not changed and same_identity:
        return ""
    parts: list[str] = []
    held = {n: current[n] for n in IDENTITY if n in current}
    if held:
        if "session_authorization" in held:
            parts.append("RESET SESSION AUTHORIZATION")  # the role too
        parts.append("RESET ROLE")
    for name in changed:
        want = wanted.get(name)
        parts.append(_reset(name) if want is None else _set(name, want))
    for name in IDENTITY:
        want = wanted.get(name)
        if want is not None:
            parts.append(_set(name, want))
    return "; ".join(parts)


def _set(name: str, value: str) -> str:
    return f"SELECT pg_catalog.set_config({_literal(name)}, {_literal(value)}, false)"


def _reset(name: str) -> str:
    if name == "session_authorization":
        return "RESET SESSION AUTHORIZATION"
    if name == "role":
        return "RESET ROLE"
    return "RESET " + ".".join(_ident(part) for part in name.split("."))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    """``value`` as an SQL string literal in ASCII, which reads the same whatever the server
    connection's standard_conforming_strings and client_encoding are (a client may have
    changed both, and the server keeps them): else a backslash before a quote would end the
    literal and run the rest of a client's value as SQL, and a value outside ASCII would be
    read in another client's encoding."""
    if value.isascii() and "\\" not in value:
        return "'" + value.replace("'", "''") + "'"
    out = []
    for ch in value:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("''")
        elif code < 128:
            out.append(ch)
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return "E'" + "".join(out) + "'"


sql_literal = _literal
