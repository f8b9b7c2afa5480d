"""How many connections an application's pool should hold.

A request holds a connection for ``service_ms`` (its time inside PostgreSQL) and, in a
typical ORM request, also across ``wait_ms`` spent outside it (network, Python between
queries). While one connection waits, a core could serve another: the pool that keeps
``cores`` busy is ``cores x (1 + wait / service)`` (the sizing rule of Brian Goetz's *Java
Concurrency in Practice*). HikariCP's ``cores x 2 + spindles`` (PostgreSQL's wiki, "Number
Of Database Connections") is the floor: below it the server's cores idle during I/O. Above
both stands the server: ``max_connections`` less the superuser-reserved slots, shared by every
instance of the application, and each instance may open ``pool_size + max_overflow``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["PoolSettings", "pool_settings"]


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """``create_engine`` pool arguments, and how they were reached."""

    pool_size: int
    max_overflow: int
    pool_timeout: float
    pool_pre_ping: bool
    reasoning: str

    def kwargs(self) -> dict[str, Any]:
        """``create_engine(url, **settings.kwargs())``."""
        return {
            "pool_size": self.pool_size,
            "max_overflow": self.max_overflow,
            "pool_timeout": self.pool_timeout,
            "pool_pre_ping": self.pool_pre_ping,
        }


def pool_settings(
    cores: int,
    wait_ms: float,
    service_ms: float,
    *,
    spindles: int = 1,
    max_connections: int | None = None,
    instances: int = 1,
    reserved: int = 3,
    overflow_share: float = 0.5,
    pool_timeout: float = 30.0,
) -> PoolSettings:
    """The pool for one application instance.

    ``cores``: the database server's cores; ``wait_ms`` / ``service_ms``: per request, the
    time a connection is held outside the database and inside it; ``max_connections``: the
    server's setting (``SHOW max_connections``), less ``reserved`` slots, divided among
    ``instances``. ``overflow_share``: the part of an instance's slots kept as
    ``max_overflow`` for bursts.
    """
    if cores < 1 or service_ms <= 0 or wait_ms < 0 or instances < 1:
        raise ValueError("cores and instances must be at least 1, service_ms above 0")
    formula = cores * (1 + wait_ms / service_ms)
    floor = cores * 2 + spindles
    wanted = max(math.ceil(formula), floor)
    lines = [
        f"cores x (1 + wait/service) = {cores} x (1 + {wait_ms:g}/{service_ms:g}) "
        f"= {formula:.1f}",
        f"floor cores x 2 + spindles = {floor}",
        f"wanted: {wanted} connections",
    ]
    cap: int | None = None
    if max_connections is not None:
        cap = max((max_connections - reserved) // instances, 1)
        lines.append(
            f"cap (max_connections {max_connections} - {reserved} reserved) / {instances} "
            f"instance(s) = {cap}"
        )
    total = min(wanted, cap) if cap is not None else wanted
    pool_size = max(1, math.ceil(total / (1 + overflow_share)))
    max_overflow = max(0, total - pool_size)
    lines.append(f"pool_size {pool_size} + max_overflow {max_overflow} = {total} per instance")
    return PoolSettings(pool_size, max_overflow, pool_timeout, True, "; ".join(lines))
