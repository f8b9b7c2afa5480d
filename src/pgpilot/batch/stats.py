"""Counters every batcher keeps, and the snapshot object ``loader.stats`` returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoaderStats:
    """What a loader has done since it was created (a snapshot; it does not update itself).

    - ``loads``: calls to ``load`` (each key of ``load_many`` counts once).
    - ``batches``: calls made to the batch function.
    - ``keys_dispatched``: keys sent to the batch function, summed over batches (duplicates and
      cache hits are not dispatched, so this is at most ``loads``).
    - ``cache_hits``: loads answered from the loader's cache without a batch.
    - ``mean_batch_size``: ``keys_dispatched / batches``.
    - ``coalescing_rate``: share of loads that did not cost a batch of their own,
      ``1 - batches / loads``: 0.0 when every load made its own call, near 1.0 when many loads
      shared one.
    - ``max_wait_ms``: the longest a batch stayed open collecting loads before it was
      dispatched: the latency that coalescing added, at worst.
    """

    loads: int
    batches: int
    keys_dispatched: int
    cache_hits: int
    max_wait_ms: float

    @property
    def mean_batch_size(self) -> float:
        return self.keys_dispatched / self.batches if self.batches else 0.0

    @property
    def coalescing_rate(self) -> float:
        return 1.0 - self.batches / self.loads if self.loads else 0.0

    def as_dict(self) -> dict[str, float]:
        """Every figure, derived ones included (for logs and metrics exporters)."""
        return {
            "loads": self.loads,
            "batches": self.batches,
            "keys_dispatched": self.keys_dispatched,
            "cache_hits": self.cache_hits,
            "mean_batch_size": self.mean_batch_size,
            "coalescing_rate": self.coalescing_rate,
            "max_wait_ms": self.max_wait_ms,
        }
