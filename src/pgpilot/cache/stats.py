"""Counters every cache keeps per cached function, and the snapshot ``cache.stats()`` returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["CacheStats", "Counters"]


class Counters:
    """Mutable counters of one cached function (or ``sql`` for statements); cheap to bump."""

    __slots__ = ("bypasses", "degraded", "early_refreshes", "errors", "evictions",
                 "fill_seconds", "fills", "fills_discarded", "hits", "misses", "stampede_waits")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.fills = 0
        self.fill_seconds = 0.0
        self.fills_discarded = 0
        self.errors = 0
        self.degraded = 0
        self.evictions = 0
        self.stampede_waits = 0
        self.early_refreshes = 0
        self.bypasses = 0

    def snapshot(self, namespace: str, name: str) -> CacheStats:
        return CacheStats(namespace, name, **{f: getattr(self, f) for f in self.__slots__})


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What one cached function's cache did since the :class:`~pgpilot.cache.Cache` was made.

    - ``hits`` / ``misses``: calls answered from the cache / not (a miss is filled by this
      caller, by another one it waited for, or by calling the function when the backend is down).
    - ``fills``: calls of the function to fill the cache (early refreshes included);
      ``fill_seconds`` their total time.
    - ``fills_discarded``: fills not stored because the entry, one of its tags or the namespace
      was invalidated while they ran (their value was older than the write).
    - ``errors``: backend failures and values that could not be serialized or read back.
    - ``degraded``: calls answered by the function alone because the backend was unavailable.
    - ``evictions``: entries the in-process LRU dropped to stay within its bounds.
    - ``stampede_waits``: calls that waited for another caller (thread, task or process) to
      fill the entry instead of running the function themselves.
    - ``early_refreshes``: background refills started because an entry neared its expiry.
    - ``bypasses``: SQLAlchemy reads that skipped the cache because their transaction had
      written to a table they read.
    """

    namespace: str
    name: str
    hits: int
    misses: int
    fills: int
    fill_seconds: float
    fills_discarded: int
    errors: int
    degraded: int
    evictions: int
    stampede_waits: int
    early_refreshes: int
    bypasses: int

    @property
    def hit_rate(self) -> float:
        calls = self.hits + self.misses
        return self.hits / calls if calls else 0.0

    def as_dict(self) -> dict[str, float | str]:
        data: dict[str, float | str] = asdict(self)
        data["hit_rate"] = self.hit_rate
        return data


COUNTER_FIELDS = tuple(f.name for f in fields(CacheStats) if f.name not in ("namespace", "name"))
