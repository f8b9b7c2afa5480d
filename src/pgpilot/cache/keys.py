"""Where things live in the backend: the key layout of one namespace.

Every key of a namespace starts with ``pgc:{<namespace>}:``; the braces are a Redis Cluster
hash tag, so all keys of a namespace hash to one slot and the scripts that touch an entry, its
lock and its tags together are valid on a cluster (spread load over nodes with several
namespaces). Below that prefix:

=============================================  ==============================================
``e:<version>:<name>:<args hash>``              an entry: a cached value
``l:<version>:<name>:<args hash>``              the lock of that entry while one caller fills it
``k:<version>:<name>:<args hash>``              the entry's guard: set when it is invalidated
``s:<tag>`` / ``v:<tag>``                        a tag's member set / its guard
``c`` / ``n``                                    the namespace's counter / its epoch (``clear``)
=============================================  ==============================================

``<name>`` is the cached function's ``module.qualname`` (or the ``name=`` it was given, or
``sql`` for statements cached through SQLAlchemy) and ``<args hash>`` is the hex BLAKE2b
(16-byte digest) of the call's arguments in parameter order, defaults applied, packed by
:func:`pgpilot.cache.serialize.canonical_bytes`: ``f(42)`` and ``f(customer_id=42)`` share a
key, in every process. ``<version>`` is the cache's version and the function's, joined with a
dot: change either on a deploy that changes what a function returns, and old entries are
never read again (they expire).

A guard holds the namespace counter's value at the last invalidation: a fill records the guards
of its entry, of the namespace and of its tags when it starts, and its value is stored only if
none of them moved meanwhile. That is how a fill that read the database before a write
committed never stores what it read after the write invalidated the entry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["EntryKeys", "KeySpace", "hash_key_material", "table_tag"]


def hash_key_material(material: bytes) -> str:
    """The ``<args hash>`` of a key."""
    return hashlib.blake2b(material, digest_size=16).hexdigest()


def table_tag(table: str) -> str:
    """The tag of a table: ``table:<name>``, the schema and quotes dropped, lower-cased
    (``shop."Orders"`` and ``orders`` share it: an invalidation may drop more than it must,
    never less)."""
    return "table:" + table.rsplit(".", 1)[-1].strip().strip('"').lower()


@dataclass(frozen=True, slots=True)
class EntryKeys:
    """The keys of one cached call."""

    entry: str
    lock: str
    guard: str


class KeySpace:
    """The keys of one namespace."""

    __slots__ = ("counter", "epoch", "namespace", "prefix")

    def __init__(self, namespace: str) -> None:
        if not namespace or any(c in namespace for c in "{}"):
            raise ValueError("a cache namespace is a non-empty name without braces")
        self.namespace = namespace
        self.prefix = f"pgc:{{{namespace}}}:"
        self.counter = self.prefix + "c"
        self.epoch = self.prefix + "n"

    def entry(self, version: str, name: str, digest: str) -> EntryKeys:
        rest = f"{version}:{name}:{digest}"
        return EntryKeys(self.prefix + "e:" + rest, self.prefix + "l:" + rest,
                         self.prefix + "k:" + rest)

    def tag_set(self, tag: str) -> str:
        return self.prefix + "s:" + tag

    def tag_guard(self, tag: str) -> str:
        return self.prefix + "v:" + tag

    def name_of(self, entry_key: str) -> str:
        """The function name inside an entry key (for statistics), ``?`` if it has none."""
        parts = entry_key[len(self.prefix):].split(":")
        return ":".join(parts[2:-1]) if len(parts) >= 4 else "?"
