"""A pool's running totals as SHOW STATS reports them, and the buckets of its wait-time
histogram: plain data that the pool, the fast path's lanes, the advisor, the metrics and the
admin console all read, kept apart from pool.py so that none of them imports the pool for it."""

from __future__ import annotations

import bisect

# Upper bounds (seconds) of the wait-time histogram's buckets (metrics.py); then +Inf.
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)


class PoolStats:
    """Running totals, as SHOW STATS reports them (PgBouncer's names)."""

    __slots__ = ("bytes_received", "bytes_sent", "errors", "query_count", "query_time",
                 "server_assignment_count", "wait_buckets", "wait_time", "xact_count",
                 "xact_time")

    def __init__(self) -> None:
        self.xact_count = 0
        self.query_count = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.xact_time = 0.0
        self.query_time = 0.0
        self.wait_time = 0.0
        self.server_assignment_count = 0
        self.errors = 0
        self.wait_buckets = [0] * (len(WAIT_BUCKETS) + 1)  # per bucket, not cumulative

    def record_wait(self, seconds: float) -> None:
        """A client got a server after ``seconds`` in line: total and histogram, O(1)."""
        self.wait_time += seconds
        self.wait_buckets[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1
