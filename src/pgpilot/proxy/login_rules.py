"""What decides a login beyond the password: the method (auth_type or an hba rule), the
unix-socket peer, and whether the database may be entered (unknown, disabled).

Kept apart from ``client.py`` so the connection code asks one question per step.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import TYPE_CHECKING

from pgpilot.proxy.config import ConfigError
from pgpilot.proxy.hba import HbaFile, IdentMaps, ident_allows, load_hba, load_ident

if TYPE_CHECKING:
    from pgpilot.proxy.client import ClientConnection
    from pgpilot.proxy.config import DatabaseConfig
    from pgpilot.proxy.pooler import Pooler

# auth_hba_file path -> (mtime, parsed file): read again when the file changes.
_hba_cache: dict[str, tuple[float, HbaFile]] = {}


def hba_file(path: str) -> HbaFile:
    mtime = os.stat(path).st_mtime
    cached = _hba_cache.get(path)
    if cached is None or cached[0] != mtime:
        cached = _hba_cache[path] = (mtime, load_hba(path))
    return cached[1]


# auth_ident_file path -> (mtime, parsed file): read again when the file changes.
_ident_cache: dict[str, tuple[float, IdentMaps]] = {}


def physical_replication(client: ClientConnection) -> bool:
    """Does an hba rule's ``replication`` database match this login? As in PostgreSQL, only
    for physical replication (``replication=true``); a logical one (``database``) matches
    its database's name like any other connection."""
    return getattr(client, "replication", "") == "true"


def ident_map_for(pooler: Pooler, client: ClientConnection) -> str | None:
    """The ``map=`` of the hba rule that decides this login (auth_type = hba), if any."""
    cfg = pooler.config
    if cfg.auth_type != "hba" or not cfg.auth_hba_file:
        return None
    try:
        rule = hba_file(cfg.auth_hba_file).rule_for(
            unix=client.addr == "unix", tls=client.tls, address=client.addr,
            database=client.database, user=client.user,
            replication=physical_replication(client))
    except (OSError, ValueError, ConfigError):
        return None
    return rule.ident_map if rule is not None else None


def ident_map_allows(pooler: Pooler, name: str, system_users: list[str], user: str) -> bool:
    """Does ident map ``name`` (auth_ident_file) let one of ``system_users`` (the peer's OS
    user, a certificate's CommonNames) log in as ``user``? No file, no map: no."""
    path = pooler.config.auth_ident_file
    if not path:
        return False
    try:
        mtime = os.stat(path).st_mtime
        cached = _ident_cache.get(path)
        if cached is None or cached[0] != mtime:
            cached = _ident_cache[path] = (mtime, load_ident(path))
    except (OSError, ValueError, ConfigError):
        return False
    return any(ident_allows(cached[1], name, system, user) for system in system_users)


def login_method(pooler: Pooler, client: ClientConnection) -> str:
    """``auth_type``; with ``auth_type = hba``, the method of the hba file's first rule that
    matches this connection (``reject`` when none does, or the file cannot be read)."""
    cfg = pooler.config
    if cfg.auth_type != "hba":
        return cfg.auth_type
    if not cfg.auth_hba_file:
        return "reject"
    try:
        rules = hba_file(cfg.auth_hba_file)
    except (OSError, ValueError):
        return "reject"
    replication = physical_replication(client)
    return rules.method_for(unix=client.addr == "unix", tls=client.tls, address=client.addr,
                            database=client.database, user=client.user,
                            replication=replication)


def peer_credentials(client: ClientConnection) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of a unix-socket client."""
    if client.addr != "unix" or client.transport is None:
        return None
    sock = client.transport.get_extra_info("socket")
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return None
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


def peer_user_name(client: ClientConnection) -> str | None:
    """The OS user name of a unix-socket client's process (hba ``peer``)."""
    creds = peer_credentials(client)
    if creds is None:
        return None
    import pwd

    try:
        return pwd.getpwuid(creds[1]).pw_name
    except KeyError:
        return None


def database_refusal(pooler: Pooler, name: str, db: DatabaseConfig | None) -> str | None:
    """Why an authenticated client may not enter database ``name`` (None: it may)."""
    if db is None:
        return f"no such database: {name}"
    if name in pooler.admin_console.disabled_databases:
        return f'database "{name}" is disabled'
    return None
