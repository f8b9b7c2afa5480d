"""``auth_type = hba``: the login method per connection, from an ``auth_hba_file``.

The file has pg_hba.conf's format, as PgBouncer reads it (its subset of PostgreSQL's):

    local      DATABASE  USER            METHOD  [OPTIONS]
    host       DATABASE  USER  ADDRESS   METHOD  [OPTIONS]
    hostssl    DATABASE  USER  ADDRESS   METHOD  [OPTIONS]
    hostnossl  DATABASE  USER  ADDRESS   METHOD  [OPTIONS]

* DATABASE: ``all``, ``sameuser``, ``replication``, or a comma-separated list of names
  (double quotes keep a name literal: ``"all"`` is the database named all); ``@file``
  reads names from a file beside the hba file;
* USER: ``all``, a comma-separated list of names, ``@file``; ``+group`` is refused (the
  pooler cannot know PostgreSQL's role membership);
* ADDRESS: ``all``, ``samehost``/``samenet`` are refused, an address with a CIDR mask
  (``10.0.0.0/8``, ``::1/128``) or an address followed by a separate netmask column;
* METHOD: ``trust``, ``reject``, ``md5``, ``password``, ``scram-sha-256``, ``cert``,
  ``peer``. ``md5`` with a SCRAM secret runs SCRAM, as PostgreSQL does. ``ident``, ``ldap``,
  ``pam``, ``gss``, ``sspi``, ``radius`` are refused (PgBouncer has no such methods either,
  except through its own pam/ldap builds); ``map=`` (ident maps, auth_ident_file) is read
  for peer and cert rules.

The first line that matches the connection's kind, database, user and address decides; no
match means ``reject``, as in PostgreSQL. A file that cannot be read or has a line pgpilot
does not understand makes the configuration invalid (``--check`` names the file and line),
never a silently weaker rule.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from pgpilot.proxy.errors import ConfigError

METHODS = {"trust": "trust", "reject": "reject", "md5": "md5", "password": "plain",
           "scram-sha-256": "scram-sha-256", "cert": "cert", "peer": "peer"}
KINDS = ("local", "host", "hostssl", "hostnossl")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class HbaRule:
    kind: str
    databases: frozenset[str] | None  # None: all
    sameuser: bool
    replication: bool
    users: frozenset[str] | None  # None: all
    network: Network | None  # None: all (or a local rule)
    method: str  # pgpilot's auth_type word (password -> plain)
    line: int
    ident_map: str | None = None  # map=NAME (peer, cert): auth_ident_file's map

    def matches(self, *, unix: bool, tls: bool, address: str, database: str, user: str,
                replication: bool = False) -> bool:
        if self.kind == "local":
            if not unix:
                return False
        else:
            if unix or (self.kind == "hostssl" and not tls) or (
                    self.kind == "hostnossl" and tls):
                return False
            if self.network is not None:
                try:
                    ip = ipaddress.ip_address(address.split("%", 1)[0])
                except ValueError:
                    return False
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None \
                        and self.network.version == 4:
                    ip = ip.ipv4_mapped
                if ip.version != self.network.version or ip not in self.network:
                    return False
        if self.replication:
            if not replication:
                return False
        elif replication:
            return False
        elif self.sameuser:
            if database != user:
                return False
        elif self.databases is not None and database not in self.databases:
            return False
        return self.users is None or user in self.users


@dataclass(frozen=True, slots=True)
class HbaFile:
    path: str
    rules: tuple[HbaRule, ...]

    def method_for(self, *, unix: bool, tls: bool, address: str, database: str, user: str,
                   replication: bool = False) -> str:
        """The auth method of the first matching rule, else ``reject``."""
        rule = self.rule_for(unix=unix, tls=tls, address=address, database=database,
                             user=user, replication=replication)
        return rule.method if rule is not None else "reject"

    def rule_for(self, *, unix: bool, tls: bool, address: str, database: str, user: str,
                 replication: bool = False) -> HbaRule | None:
        """The first matching rule (None: none matches, the login is rejected)."""
        for rule in self.rules:
            if rule.matches(unix=unix, tls=tls, address=address, database=database, user=user,
                            replication=replication):
                return rule
        return None


def _names(field: str, base_dir: str, path: str, number: int, what: str) -> list[str]:
    out: list[str] = []
    for part in _split_commas(field):
        if part.startswith("@"):
            include = os.path.join(base_dir, part[1:])
            try:
                with open(include, encoding="utf-8") as handle:
                    text = handle.read()
            except OSError as exc:
                raise ConfigError(f"cannot read {what} file {include}: {exc.strerror}",
                                  path, number) from None
            for line in text.splitlines():
                line = line.split("#", 1)[0]
                out.extend(n for word in line.split() for n in _split_commas(word) if n)
        else:
            out.append(part)
    return out


def _split_commas(field: str) -> list[str]:
    """``a,"b,c",d`` -> a, "b,c", d (quotes kept: they mark a literal name)."""
    parts, current, quoted = [], "", False
    for char in field:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p]


def _fields(line: str) -> list[str]:
    """The whitespace-separated fields of a line; blanks inside double quotes belong to the
    field (``"q1""q2"`` is one), and a list may have blanks around its commas
    (``user1,user2 , user3`` is one field), as PgBouncer reads it."""
    words: list[str] = []
    current, quoted = "", False
    for char in line:
        if char == '"':
            quoted = not quoted
        if char.isspace() and not quoted:
            if current:
                words.append(current)
            current = ""
        else:
            current += char
    if quoted:
        raise ValueError("unterminated quoted string")
    if current:
        words.append(current)
    merged: list[str] = []
    for word in words:
        if merged and (merged[-1].endswith(",") or word.startswith(",")):
            merged[-1] += word
        else:
            merged.append(word)
    return merged


def _unquote(word: str) -> tuple[str, bool]:
    if len(word) >= 2 and word[0] == word[-1] == '"':
        return word[1:-1].replace('""', '"'), True
    return word, False


def parse_hba(text: str, path: str = "<hba>") -> HbaFile:
    base_dir = os.path.dirname(os.path.abspath(path))
    rules: list[HbaRule] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            words = _fields(line)
        except ValueError as exc:
            raise ConfigError(f"cannot parse hba line: {exc}", path, number) from None
        kind = words[0].lower()
        if kind not in KINDS:
            raise ConfigError(f"unknown connection type '{words[0]}' in hba file", path,
                              number)
        need = 4 if kind == "local" else 5
        if len(words) < need:
            raise ConfigError("hba line has too few fields", path, number)
        db_words = _names(words[1], base_dir, path, number, "database")
        user_words = _names(words[2], base_dir, path, number, "user")
        databases: set[str] | None = set()
        sameuser = replication = False
        for word in db_words:
            name, quoted = _unquote(word)
            if not quoted and name == "all":
                databases = None
            elif not quoted and name == "sameuser":
                sameuser = True
            elif not quoted and name == "replication":
                replication = True
            elif not quoted and name in ("samerole", "samegroup"):
                raise ConfigError(f"'{name}' is not supported in the hba file (the pooler "
                                  "cannot see role membership)", path, number)
            elif databases is not None:
                databases.add(name)
        users: set[str] | None = set()
        for word in user_words:
            name, quoted = _unquote(word)
            if not quoted and name == "all":
                users = None
            elif not quoted and name.startswith("+"):
                raise ConfigError(f"group '{name}' is not supported in the hba file (the "
                                  "pooler cannot see role membership)", path, number)
            elif users is not None:
                users.add(name)
        at = 3
        network: Network | None = None
        if kind != "local":
            address = words[3]
            at = 4
            if address == "all":
                network = None
            elif address in ("samehost", "samenet"):
                raise ConfigError(f"'{address}' is not supported in the hba file", path,
                                  number)
            else:
                try:
                    if "/" in address:
                        network = ipaddress.ip_network(address, strict=False)
                    else:
                        if len(words) < 6:
                            raise ValueError("an address needs a /mask or a netmask column")
                        network = ipaddress.ip_network(f"{address}/{words[4]}", strict=False)
                        at = 5
                except ValueError as exc:
                    raise ConfigError(f"invalid address '{address}' in hba file: {exc}",
                                      path, number) from None
        method_word = words[at].lower()
        method = METHODS.get(method_word)
        if method is None:
            raise ConfigError(f"unsupported auth method '{words[at]}' in hba file", path,
                              number)
        ident_map = None
        for option in words[at + 1:]:
            if option.startswith("map=") and method in ("peer", "cert") and len(option) > 4:
                ident_map = _unquote(option[4:])[0]
                continue
            raise ConfigError(f"hba option '{option}' is not supported (map= is, with peer "
                              "and cert)", path, number)
        rules.append(HbaRule(kind, frozenset(databases) if databases is not None else None,
                             sameuser, replication,
                             frozenset(users) if users is not None else None, network,
                             method, number, ident_map))
    return HbaFile(path, tuple(rules))


IdentMaps = dict[str, list[tuple[str, str]]]
ANY_USER = "\0all"  # an ident line's unquoted "all" (a NUL never is in a user name)


def parse_ident(text: str, path: str = "<ident>") -> IdentMaps:
    """An ident map file (pg_ident.conf): ``MAPNAME SYSTEM-USERNAME PG-USERNAME`` lines, as
    {map: [(system user, database user)]}; a system user starting with ``/`` is a regular
    expression (as PostgreSQL), a database user ``all`` allows any (as PgBouncer)."""
    maps: IdentMaps = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            words = _fields(line)
        except ValueError as exc:
            raise ConfigError(f"cannot parse ident line: {exc}", path, number) from None
        if len(words) != 3:
            raise ConfigError("an ident line has three fields: map, system user, database "
                              "user", path, number)
        name, system, user = words
        user = ANY_USER if user == "all" else _unquote(user)[0]  # unquoted all: anyone
        system_name, quoted = _unquote(system)
        if not quoted and system_name.startswith("/"):
            try:
                re.compile(system_name[1:])
            except re.error as exc:
                raise ConfigError(f"invalid regular expression in ident file: {exc}", path,
                                  number) from None
        else:
            system_name = "=" + system_name
        maps.setdefault(_unquote(name)[0], []).append((system_name, user))
    return maps


def ident_allows(maps: IdentMaps, name: str, system_user: str, user: str) -> bool:
    """Does map ``name`` let OS / certificate user ``system_user`` log in as ``user``?"""
    for system, allowed in maps.get(name, ()):
        if system.startswith("="):
            if system[1:] != system_user:
                continue
        elif re.search(system[1:], system_user) is None:
            continue
        if allowed in (ANY_USER, user):
            return True
    return False


def load_ident(path: str) -> IdentMaps:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read auth_ident_file: {exc.strerror}", path) from None
    return parse_ident(text, path)


def load_hba(path: str) -> HbaFile:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read auth_hba_file: {exc.strerror}", path) from None
    return parse_hba(text, path)
