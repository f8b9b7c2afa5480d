"""The pooler's file-descriptor budget: clients are admitted only while servers still fit.

Every client and every server connection is a descriptor. When clients alone use up
``ulimit -n``, no server can be opened any more and the clients already in wait for a server
until ``query_wait_timeout``, while new ones hang in the listen backlog (accept fails with
EMFILE). PgBouncer warns at start and then behaves like that. pgpilot instead:

* raises its soft ``RLIMIT_NOFILE`` towards the hard limit at start, as far as the
  configuration needs (``max_client_conn`` plus the pools' servers);
* keeps room for servers: a client is admitted only while the descriptors in use (those
  open at start, the clients, the servers) plus the room one pool needs to open all its
  servers stay under the limit; beyond it a client is refused at once with SQLSTATE 53300,
  as beyond ``max_client_conn``, so the clients already in keep getting servers.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgpilot.proxy.pooler import Pooler

log = logging.getLogger(__name__)

try:
    import resource
except ImportError:  # pragma: no cover - not on POSIX
    resource = None  # type: ignore[assignment]

# Descriptors beyond the counted ones: log files, the metrics server, cancel requests and
# admin-console connections in flight, DNS lookups, the engine's pipes.
MARGIN = 16


def open_descriptors() -> int:
    """Descriptors this process has open now (Linux /proc; elsewhere a guess)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - no /proc
        return 32


def raise_soft_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (never above the hard limit, never
    lowering it); the soft limit in force afterwards (0: unknown, no limit enforced)."""
    if resource is None:  # pragma: no cover
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("file descriptor limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:  # pragma: no cover - platform-dependent
            log.warning("could not raise the file descriptor limit from %d: %s", soft, exc)
    return int(soft)


class DescriptorBudget:
    """How many clients the descriptor limit still admits (Pooler.admit)."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        cfg = pooler.config
        per_pool = cfg.default_pool_size + cfg.reserve_pool_size
        named = sum((db.pool_size or cfg.default_pool_size) + cfg.reserve_pool_size
                    for name, db in cfg.databases.items() if name != "*")
        self.base = open_descriptors()
        servers = max(named, per_pool)
        self.limit = raise_soft_limit(self.base + MARGIN + cfg.max_client_conn + servers)
        if self.limit and self.client_room(servers) < cfg.max_client_conn:
            log.warning("max_client_conn = %d, but the file descriptor limit (ulimit -n = %d) "
                        "leaves room for about %d clients next to the servers; clients beyond "
                        "are refused (53300)", cfg.max_client_conn, self.limit,
                        max(self.client_room(servers), 0))

    def server_room(self) -> int:
        """Servers open now, plus what the pool furthest below its size may still open."""
        pools = self.pooler.pools.values()
        cfg = self.pooler.config
        opened = 0
        growth = cfg.default_pool_size + cfg.reserve_pool_size  # a pool not made yet
        for pool in pools:
            count = pool.server_count()
            opened += count
            growth = max(growth, pool.size + pool.reserve_size - count)
        return opened + growth

    def client_room(self, servers: int | None = None) -> int:
        """Clients the limit admits in all, with ``servers`` (default: server_room())
        descriptors kept for servers."""
        if not self.limit:
            return self.pooler.config.max_client_conn
        kept = self.server_room() if servers is None else servers
        return self.limit - self.base - MARGIN - kept
