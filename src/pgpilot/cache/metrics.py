"""Prometheus metrics of a cache, read from ``cache.stats()`` when scraped (nothing on the hot
path): counters ``pgpilot_cache_<what>_total`` labelled by ``namespace`` and ``function``, and
the gauge ``pgpilot_cache_pending_invalidations`` (invalidations waiting for the backend).

``registry.register(cache.metrics_collector())`` on the registry the application exposes (or
``prometheus_client.REGISTRY``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from pgpilot.cache.core import Cache

__all__ = ["CacheCollector"]

_COUNTERS = {
    "hits": "Calls answered from the cache",
    "misses": "Calls not answered from the cache",
    "fills": "Calls of the function to fill the cache",
    "fill_seconds": "Time spent in fills",
    "fills_discarded": "Fills not stored because an invalidation happened meanwhile",
    "errors": "Backend failures and values that could not be (de)serialized",
    "degraded": "Calls answered by the function because the backend was unavailable",
    "evictions": "Entries the in-process LRU dropped",
    "stampede_waits": "Calls that waited for another caller to fill the entry",
    "early_refreshes": "Background refreshes of entries near their expiry",
    "bypasses": "SQLAlchemy reads that skipped the cache after their transaction wrote",
}


class CacheCollector:
    """A prometheus_client collector of one :class:`~pgpilot.cache.Cache`."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        stats = self.cache.stats()
        for field, text in _COUNTERS.items():
            family = CounterMetricFamily(f"pgpilot_cache_{field}", text,
                                         labels=["namespace", "function"])
            for name, snapshot in sorted(stats.items()):
                family.add_metric([snapshot.namespace, name], float(getattr(snapshot, field)))
            yield family
        pending = GaugeMetricFamily("pgpilot_cache_pending_invalidations",
                                      "Invalidations waiting for the backend",
                                      labels=["namespace"])
        pending.add_metric([self.cache.namespace], float(self.cache.pending_invalidations))
        yield pending
