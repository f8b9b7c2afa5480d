"""Per-query statistics: what each statement shape costs, per database, user and fingerprint.

Every statement a client runs through the pooler is counted under its pglast fingerprint
(``insight.fingerprint``, the in-app detector's ids): calls, errors by SQLSTATE, rows, total
and mean time, p50/p95/p99, the time its transaction waited for a server, first and last
seen, one sample text with its constants stripped (pglast's normalized text, never a parameter
value) and the application_names that ran it. ``SHOW QUERIES`` (admin console),
``pgpilot_query_*`` (metrics.py), ``GET /queries`` (the JSON endpoint on the metrics port)
and ``pgpilot top`` read it.

Where the numbers come from:

- The Python path (fast_path off, session pools, anything the engine hands back): each client
  has a :class:`ClientQueries` fed the messages it sends and receives (client.py). A simple
  Query is timed from when it is sent to its ReadyForQuery, an Execute to its CommandComplete
  (or error), each pipelined one from the answer before it.
- The compiled fast path (``engine/querystats.c``) times each statement itself
  and keeps aggregates per (hash of the text or of the server-side statement name, params id)
  in its pool; :meth:`QueryStats.fold_engine` takes them in batches (about once a second and
  before any read), with the text only the first time a key is seen, so Python fingerprints
  each distinct text once and never sees the per-message flow.

Latencies go into a :class:`LatencySketch`: log-linear buckets (8 per power of two of
microseconds, a value is reported within 6.25 % of itself), which the C engine fills with the
very same bucket numbers, so its batches add to Python's exactly, and which merge by adding
counts (across pools, batches and worker processes). A well-kept package (``ddsketch``,
``hdrhistogram``) was considered: neither can be filled from C without calling Python per
statement, and both would need their own encoding to cross processes; the bucket scheme here
is 20 lines on each side.

The table is bounded: at most ``query_stats_max`` shapes per pooler process, the ones with the
most total time; the others are folded into one ``other`` row per (database, user).

With ``workers = N`` each worker writes its table to a file in the workers' run directory
about once a second (:meth:`QueryStats.tick`), and the console and JSON endpoint of any worker
merge the siblings' files with their own live table (:meth:`QueryStats.merged`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pgpilot.insight.fingerprint import describe
from pgpilot.proxy.advisor import ADVICE_COLUMNS, Advisor, advice_rows
from pgpilot.proxy.slow import SLOW_COLUMNS, SlowEntry, SlowQueries, parse_bind, slow_rows
from pgpilot.proxy.textkey import text_key
from pgpilot.proxy.wire_nplusone import NO_SHAPE, NPLUSONE_COLUMNS, NPlusOneEntry, WireNPlusOne

if TYPE_CHECKING:
    from pgpilot.proxy.client import ClientConnection
    from pgpilot.proxy.pool import Pool
    from pgpilot.proxy.pooler import Pooler

log = logging.getLogger("pgpilot.proxy")

SUB_BUCKETS = 8  # per power of two (the C engine's QS_SUB is the same)
MAX_BUCKET = 36 * SUB_BUCKETS  # 2**36 us: 19 hours; longer durations share the last bucket
OTHER = "other"  # the fingerprint of the row the shapes beyond the bound are folded into
MAX_APPS = 8  # application_names remembered per shape
MAX_CODES = 8  # distinct SQLSTATEs remembered per shape (the rest count as "other")
MAX_TEXTS = 10_000  # distinct texts whose fingerprint is cached
MAX_NAMES = 1_000  # a client's named statements remembered (their texts)
MAX_SAMPLE = 2_000  # characters of the sample text kept
TICK = 1.0  # seconds between engine folds (and worker snapshots)


def bucket_of(seconds: float) -> int:
    """The bucket a duration falls in: 0 below one microsecond, then 8 per power of two."""
    us = seconds * 1e6
    if us < 1.0:
        return 0
    mantissa, exponent = math.frexp(us)  # us = mantissa * 2**exponent, mantissa in [0.5, 1)
    index = (exponent - 1) * SUB_BUCKETS + int((mantissa - 0.5) * 2 * SUB_BUCKETS) + 1
    return min(index, MAX_BUCKET)


def bucket_value(index: int) -> float:
    """The middle of bucket ``index``, in seconds (what a quantile in it is reported as)."""
    if index <= 0:
        return 0.5e-6
    exponent, sub = divmod(index - 1, SUB_BUCKETS)
    low = (0.5 + sub / (2 * SUB_BUCKETS)) * 2.0 ** (exponent + 1)
    high = (0.5 + (sub + 1) / (2 * SUB_BUCKETS)) * 2.0 ** (exponent + 1)
    return (low + high) / 2 * 1e-6


class LatencySketch:
    """A mergeable latency histogram: counts per log-linear bucket (see the module doc)."""

    __slots__ = ("buckets", "count")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0

    def add(self, seconds: float, times: int = 1) -> None:
        index = bucket_of(seconds)
        self.buckets[index] = self.buckets.get(index, 0) + times
        self.count += times

    def add_bucket(self, index: int, times: int) -> None:
        index = min(max(index, 0), MAX_BUCKET)
        self.buckets[index] = self.buckets.get(index, 0) + times
        self.count += times

    def merge(self, other: LatencySketch) -> None:
        for index, times in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + times
        self.count += other.count

    def quantile(self, q: float) -> float:
        """The value below which a fraction ``q`` of the durations fall (0.0 when empty)."""
        if not self.count:
            return 0.0
        rank = max(math.ceil(q * self.count), 1)  # nearest rank
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return bucket_value(index)
        return bucket_value(max(self.buckets))

    def to_json(self) -> dict[str, int]:
        return {str(k): v for k, v in self.buckets.items()}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> LatencySketch:
        sketch = cls()
        for key, times in data.items():
            sketch.add_bucket(int(key), int(times))
        return sketch


class QueryEntry:
    """One (database, user, fingerprint): its running totals."""

    __slots__ = ("apps", "calls", "database", "errors", "fingerprint", "first_seen",
                 "last_seen", "query", "rows", "sketch", "total", "user", "wait")

    def __init__(self, database: str, user: str, fingerprint: str, query: str) -> None:
        self.database = database
        self.user = user
        self.fingerprint = fingerprint
        self.query = query
        self.calls = 0
        self.errors: dict[str, int] = {}
        self.rows = 0
        self.total = 0.0  # seconds, sent to ReadyForQuery
        self.wait = 0.0  # seconds its transactions waited for a server
        self.sketch = LatencySketch()
        self.first_seen = 0.0
        self.last_seen = 0.0
        self.apps: dict[str, int] = {}

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def note_app(self, app: str, calls: int) -> None:
        apps = self.apps
        if app in apps or len(apps) < MAX_APPS:
            apps[app] = apps.get(app, 0) + calls
        else:
            apps["(other)"] = apps.get("(other)", 0) + calls

    def note_error(self, code: str, times: int = 1) -> None:
        errors = self.errors
        if code not in errors and len(errors) >= MAX_CODES:
            code = "other"
        errors[code] = errors.get(code, 0) + times

    def merge(self, other: QueryEntry) -> None:
        self.calls += other.calls
        self.rows += other.rows
        self.total += other.total
        self.wait += other.wait
        self.sketch.merge(other.sketch)
        for code, times in other.errors.items():
            self.note_error(code, times)
        for app, calls in other.apps.items():
            self.note_app(app, calls)
        if other.first_seen and (not self.first_seen or other.first_seen < self.first_seen):
            self.first_seen = other.first_seen
        self.last_seen = max(self.last_seen, other.last_seen)
        if not self.query:
            self.query = other.query

    def copy(self) -> QueryEntry:
        out = QueryEntry(self.database, self.user, self.fingerprint, self.query)
        out.merge(self)
        return out

    def to_json(self) -> dict[str, Any]:
        """Everything, as the JSON endpoint and the worker snapshots carry it."""
        mean = self.total / self.calls if self.calls else 0.0
        return {
            "database": self.database, "user": self.user, "fingerprint": self.fingerprint,
            "query": self.query, "calls": self.calls, "errors": self.error_count,
            "errors_by_sqlstate": dict(self.errors), "rows": self.rows,
            "total_ms": self.total * 1e3, "mean_ms": mean * 1e3,
            "p50_ms": self.sketch.quantile(0.5) * 1e3, "p95_ms": self.sketch.quantile(0.95) * 1e3,
            "p99_ms": self.sketch.quantile(0.99) * 1e3, "wait_ms": self.wait * 1e3,
            "first_seen": self.first_seen, "last_seen": self.last_seen,
            "application_names": dict(self.apps), "histogram": self.sketch.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueryEntry:
        entry = cls(str(data["database"]), str(data["user"]), str(data["fingerprint"]),
                    str(data.get("query") or ""))
        entry.calls = int(data["calls"])
        entry.rows = int(data["rows"])
        entry.total = float(data["total_ms"]) / 1e3
        entry.wait = float(data["wait_ms"]) / 1e3
        entry.errors = {str(k): int(v) for k, v in data["errors_by_sqlstate"].items()}
        entry.first_seen = float(data["first_seen"])
        entry.last_seen = float(data["last_seen"])
        entry.apps = {str(k): int(v) for k, v in data["application_names"].items()}
        entry.sketch = LatencySketch.from_json(data["histogram"])
        return entry


Key = tuple[str, str, str]  # (database, user, fingerprint)


def _sql_text(body: bytes) -> bytes:
    """A Query body or a Parse's text, without its terminating NUL."""
    end = body.find(b"\x00")
    return body if end < 0 else body[:end]


def _rows_of(tag: bytes) -> int:
    """The row count a CommandComplete tag ends with (``SELECT 5``, ``INSERT 0 3``), or 0."""
    end = tag.find(b"\x00")
    tag = tag if end < 0 else tag[:end]
    last = tag.rpartition(b" ")[2]
    return int(last) if last.isdigit() else 0


def _sqlstate_of(body: bytes) -> str:
    """The SQLSTATE of an ErrorResponse body (field ``C``), or ``?????``."""
    pos = 0
    n = len(body)
    while pos < n and body[pos]:
        end = body.find(b"\x00", pos + 1)
        if end < 0:
            break
        if body[pos] == 0x43:  # 'C'
            return body[pos + 1:end].decode("ascii", errors="replace")[:5]
        pos = end + 1
    return "?????"


class QueryStats:
    """One per pooler process: the table, the text cache, and the worker snapshots."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self.entries: dict[Key, QueryEntry] = {}
        self._texts: dict[object, tuple[str, str]] = {}  # text_key -> (fingerprint, sample)
        # The engine's keys (hash of a text or statement name) -> (fingerprint, sample).
        self._engine_keys: dict[int, tuple[str, str]] = {}
        # The fast path's params ids -> application_name (FastPath.params_id), built lazily.
        self._apps_by_params: dict[int, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._dirty = False
        self.engine_statements = 0  # statements the fast path timed (its batches' calls)
        self.nplusone = WireNPlusOne(pooler)  # N+1 at the wire (wire_nplusone.py)
        self.slow = SlowQueries(pooler)  # slow queries, explained (slow.py)
        self.advisor = Advisor(pooler)  # pool sizing advice (advisor.py)
        self._engine_texts: dict[int, bytes] = {}  # a text the engine saw, per key (slow.py)

    # -- settings ----------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.pooler.config.query_stats

    @property
    def limit(self) -> int:
        return max(self.pooler.config.query_stats_max, 1)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.slow.close()
        self._remove_snapshot()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self.tick()
            except Exception:  # a bad round must not end the statistics
                log.exception("query statistics round failed")

    def changed(self) -> None:
        self._dirty = True

    def tick(self) -> None:
        """The engine's batches in, the table within its bound, the worker snapshot out."""
        self.fold_engine()
        now = time.monotonic()
        self.nplusone.expire(now)
        self.advisor.sample(now)
        self._dirty = self._dirty or self.pooler.worker is not None  # advice measures move
        self._prune()
        if self.pooler.worker is not None and self._dirty:
            self._write_snapshot()
        self._dirty = False

    def reset(self) -> None:
        self.fold_engine()
        self.entries.clear()
        self._dirty = True

    # -- recording ---------------------------------------------------------------------
    def shape_of(self, text: bytes) -> tuple[str, str]:
        """(fingerprint, sample text) of a statement text, parsed once per distinct text (up to
        its literal values: text_key)."""
        key = text_key(text)
        found = self._texts.get(key)
        if found is None:
            if len(self._texts) >= MAX_TEXTS:
                self._texts.clear()
            statement = describe(text.decode("utf-8", errors="replace"))
            found = self._texts[key] = (statement.fingerprint,
                                        statement.normalized[:MAX_SAMPLE])
        return found

    def _entry(self, database: str, user: str, fingerprint: str, sample: str) -> QueryEntry:
        key = (database, user, fingerprint)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = QueryEntry(database, user, fingerprint, sample)
            entry.first_seen = time.time()
        return entry

    def record(self, pool: Pool, app: str, text: bytes, seconds: float, wait: float,
               rows: int, sqlstate: str | None) -> tuple[str, str]:
        """One statement the Python path timed; its (fingerprint, sample)."""
        return self.record_shape(pool, app, self.shape_of(text), seconds, wait, rows, sqlstate)

    def record_shape(self, pool: Pool, app: str, shape: tuple[str, str], seconds: float,
                     wait: float, rows: int, sqlstate: str | None) -> tuple[str, str]:
        """One statement of a known (fingerprint, sample) timed on the Python path."""
        fingerprint, sample = shape
        entry = self._entry(pool.db_name, pool.user, fingerprint, sample)
        entry.calls += 1
        entry.total += seconds
        entry.wait += wait
        entry.rows += rows
        entry.sketch.add(seconds)
        entry.last_seen = time.time()
        if sqlstate is not None:
            entry.note_error(sqlstate)
        entry.note_app(app, 1)
        self._dirty = True
        return fingerprint, sample

    def engine_shape(self, key: int) -> tuple[str, str] | None:
        """(fingerprint, sample) of one of the engine's statement keys: known from its batches
        (the one it is filling taken now if need be), or None."""
        shape = self._engine_keys.get(key)
        if shape is None:
            self.fold_engine()
            shape = self._engine_keys.get(key)
        return shape

    def fold_engine(self) -> None:
        """Take the fast path's aggregates from every pool's engine side."""
        fast = self.pooler.fast
        if fast is None:
            return
        nplusone = self.nplusone
        for pool in list(self.pooler.pools.values()):
            lane = pool.lane
            if lane is not None:
                shapes = self.fold_batch(pool, lane.fp.take_queries())
                if shapes and nplusone.threshold >= 2:
                    lane.fp.set_shapes(shapes)
                    nplusone.engine_shapes(shapes)
                bursts = lane.fp.take_bursts()
                if bursts:
                    nplusone.fold_engine_bursts(pool, bursts, self._app_of)

    def fold_batch(self, pool: Pool, batch: Iterable[tuple[Any, ...]]) -> list[tuple[int, int]]:
        """One pool's batch from the engine: per (key, params id), the text the first time,
        calls, errors (SQLSTATE, count) pairs, rows, total and wait nanoseconds, and the
        (bucket, count) pairs of its durations. Returns (key, shape id) for the keys whose
        text came (the engine's N+1 counting groups by them; wire_nplusone.py)."""
        now = time.time()
        shapes: list[tuple[int, int]] = []
        slow_after = self.pooler.config.slow_query_threshold
        for (key, params_id, text, calls, errors, rows, total_ns, wait_ns, buckets,
             max_ns) in batch:
            if text is not None and slow_after > 0:
                if len(self._engine_texts) >= MAX_TEXTS:
                    self._engine_texts.clear()
                self._engine_texts[key] = text
            shape = self._engine_keys.get(key)
            if shape is None and text is not None:
                shape = self.shape_of(text)
                if len(self._engine_keys) >= MAX_TEXTS:
                    self._engine_keys.clear()
                self._engine_keys[key] = shape
            if text is not None and shape is not None and key:
                # NO_SHAPE: not a statement loops are made of (the engine stops counting it)
                shapes.append((key, self.nplusone.shape_id(text, *shape) or NO_SHAPE))
            if not calls:
                continue  # a text seen, its statement still running: known for later
            self.engine_statements += calls
            fingerprint, sample = shape if shape is not None else (OTHER, "")
            entry = self._entry(pool.db_name, pool.user, fingerprint, sample)
            entry.calls += calls
            entry.rows += rows
            entry.total += total_ns / 1e9
            entry.wait += wait_ns / 1e9
            for code, times in errors:
                entry.note_error(code, times)
            for index, times in buckets:
                entry.sketch.add_bucket(index, times)
            entry.last_seen = now
            if slow_after > 0 and max_ns >= slow_after * 1e9 and key in self._engine_texts:
                slow_calls = sum(n for b, n in buckets if bucket_value(b) >= slow_after) or 1
                self.slow.offer(pool, self._engine_texts[key], max_ns / 1e9, None, slow_calls)
            entry.note_app(self._app_of(params_id), calls)
            self._dirty = True
        return shapes

    def _app_of(self, params_id: int) -> str:
        app = self._apps_by_params.get(params_id)
        if app is None:
            fast = self.pooler.fast
            if fast is not None:
                self._apps_by_params = {
                    pid: str(key[5] or "") for key, pid in fast.params_ids_known().items()}
            app = self._apps_by_params.get(params_id, "")
        return app

    def _prune(self) -> None:
        """Keep the ``limit`` shapes with the most total time; fold the rest into ``other``."""
        limit = self.limit
        entries = self.entries
        if len(entries) <= limit + limit // 4 + 16:
            return
        ranked = sorted(entries.values(), key=lambda e: e.total, reverse=True)
        kept = {(e.database, e.user, e.fingerprint): e for e in ranked[:limit]}
        for entry in ranked[limit:]:
            if entry.fingerprint == OTHER:
                continue
            other_key = (entry.database, entry.user, OTHER)
            other = kept.get(other_key) or entries.get(other_key)
            if other is None:
                other = QueryEntry(entry.database, entry.user, OTHER, "")
            kept[other_key] = other
            other.merge(entry)
        for key, entry in entries.items():
            if entry.fingerprint == OTHER and key not in kept:
                kept[key] = entry
        self.entries = kept

    # -- reading ---------------------------------------------------------------------------
    def merged(self) -> list[QueryEntry]:
        """Every worker's shapes (this one's live, its siblings' last snapshots), merged,
        most total time first."""
        self.fold_engine()
        out: dict[Key, QueryEntry] = {k: e.copy() for k, e in self.entries.items()}
        for entry in self._sibling_entries():
            key = (entry.database, entry.user, entry.fingerprint)
            mine = out.get(key)
            if mine is None:
                out[key] = entry
            else:
                mine.merge(entry)
        return sorted(out.values(), key=lambda e: e.total, reverse=True)

    def own(self) -> list[QueryEntry]:
        """This process's shapes only (the metrics: each worker is scraped on its own)."""
        self.fold_engine()
        return sorted(self.entries.values(), key=lambda e: e.total, reverse=True)

    # -- workers -------------------------------------------------------------------------
    def _snapshot_path(self, index: int) -> str | None:
        worker = self.pooler.worker
        if worker is None:
            return None
        return os.path.join(worker.run_dir, f"queries-{index}.json")

    def _write_snapshot(self) -> None:
        worker = self.pooler.worker
        path = self._snapshot_path(worker.index) if worker is not None else None
        if path is None:
            return
        data = json.dumps({"worker": worker.index if worker is not None else 0,
                           "written_at": time.time(),
                           "pools": [pool.summary(settled=False)
                                     for pool in self.pooler.pools.values()],
                           "queries": [e.to_json() for e in self.entries.values()],
                           "nplusone": [e.to_json() for e in self.nplusone.entries.values()],
                           "slow": [e.to_json() for e in self.slow.entries.values()],
                           "advice": [{"database": db, "user": user, **dataclasses.asdict(m)}
                                      for (db, user), m in self.advisor.own_measures().items()]})
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as out:
            out.write(data)
        os.replace(temporary, path)

    def _remove_snapshot(self) -> None:
        worker = self.pooler.worker
        path = self._snapshot_path(worker.index) if worker is not None else None
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _sibling_snapshots(self) -> Iterator[dict[str, Any]]:
        worker = self.pooler.worker
        if worker is None:
            return
        for index in range(worker.count):
            if index == worker.index:
                continue
            path = self._snapshot_path(index)
            if path is None:
                continue
            try:
                with open(path, encoding="utf-8") as source:
                    document = json.load(source)
            except (OSError, ValueError):
                continue  # not written yet, or being replaced
            if isinstance(document, dict):
                yield document

    def _sibling_entries(self) -> Iterator[QueryEntry]:
        for document in self._sibling_snapshots():
            for row in document.get("queries", ()):
                try:
                    yield QueryEntry.from_json(row)
                except (KeyError, TypeError, ValueError):
                    continue

    def merged_slow(self) -> list[SlowEntry]:
        """Every worker's slow-query rows, slowest first."""
        self.fold_engine()
        siblings = [row for document in self._sibling_snapshots()
                    for row in document.get("slow", ())]
        return self.slow.merged(siblings)

    def merged_nplusone(self) -> list[NPlusOneEntry]:
        """Every worker's N+1 rows, merged, most bursts first."""
        self.fold_engine()
        out = {e.key(): e.copy() for e in self.nplusone.entries.values()}
        for document in self._sibling_snapshots():
            for row in document.get("nplusone", ()):
                try:
                    entry = NPlusOneEntry.from_json(row)
                except (KeyError, TypeError, ValueError):
                    continue
                mine = out.get(entry.key())
                if mine is None:
                    out[entry.key()] = entry
                else:
                    mine.merge(entry)
        return sorted(out.values(), key=lambda e: (e.bursts, e.max_n), reverse=True)


class ClientQueries:
    """One client's requests in flight on the Python path, and what their answers say.

    As the engine's QsClient (engine/querystats.c): a Query is answered by its
    ReadyForQuery; an Execute by its CommandComplete, EmptyQueryResponse, PortalSuspended or
    ErrorResponse; a Sync by its ReadyForQuery (which also drops the Executes an error made
    the server skip). A statement's time runs from when it was sent, or from the answer before
    it if that came later (pipelined: its time on the server), to its answer."""

    __slots__ = ("bound", "bound_params", "burst", "burst_last", "client", "code",
                 "last_answer", "names", "pending", "rows", "skip", "stats", "unnamed", "wait")

    def __init__(self, stats: QueryStats, client: ClientConnection) -> None:
        self.stats = stats
        self.client = client
        # (kind Q / E / S, text (or the engine's key: handed_back) or None, when it was sent,
        # its parameters' key)
        self.pending: deque[tuple[int, bytes | int | None, float, object]] = deque()
        # the client's statement names -> (text, parameter types as the Parse gave them)
        self.names: dict[bytes, tuple[bytes, bytes]] = {}
        self.unnamed: tuple[bytes, bytes] | None = None  # the unnamed statement
        self.bound: tuple[bytes, bytes] | None = None  # the statement last bound
        self.bound_params = b""  # the last Bind
        self.burst: Any = None  # insight.ScopeDetector of the open burst (wire_nplusone.py)
        self.burst_last = 0.0
        self.last_answer = 0.0
        self.rows = 0  # of the Query in front so far
        self.code: str | None = None  # the SQLSTATE of the Query in front, if it failed
        self.wait = 0.0  # waited for a server, for the next statement recorded
        self.skip = 0  # ReadyForQuery owed for what the engine forwarded (fastpath.ejected)

    def sent(self, msgs: list[tuple[int, bytes | None]]) -> None:
        now = time.monotonic()
        pending = self.pending
        for mtype, body in msgs:
            if mtype == _QUERY:
                text = _sql_text(body) if body is not None else None
                pending.append((_QUERY, text, now, text))
            elif mtype == _EXECUTE:
                bound = self.bound
                pending.append((_EXECUTE, bound[0] if bound is not None else None, now,
                                (self.bound_params, bound[1] if bound is not None else b"")))
            elif mtype == _SYNC:
                pending.append((_SYNC, None, now, None))
            elif mtype == _BIND and body is not None:  # portal, statement
                self.bound_params = body
                start = body.find(b"\x00") + 1
                name = body[start:body.find(b"\x00", start)]
                self.bound = self.names.get(name) if name else self.unnamed
            elif mtype == _PARSE and body is not None:
                end = body.find(b"\x00")
                name = body[:end]
                text_end = body.find(b"\x00", end + 1)
                text = body[end + 1:text_end] if text_end >= 0 else body[end + 1:]
                statement = (text, body[text_end + 1:] if text_end >= 0 else b"")
                if name:
                    if len(self.names) >= MAX_NAMES and name not in self.names:
                        self.names.clear()
                    self.names[name] = statement
                else:
                    self.unnamed = statement
            elif mtype == _FUNCTION_CALL:  # answered with a ReadyForQuery, not counted
                pending.append((_QUERY, None, now, None))
            elif mtype == _CLOSE and body is not None and body[:1] == b"S":
                self.names.pop(_sql_text(body[1:]), None)

    def received(self, msgs: list[tuple[int, bytes | None]]) -> None:
        pending = self.pending
        for mtype, body in msgs:
            if mtype not in _ANSWERS:
                continue
            if self.skip:
                if mtype == _READY:
                    self.skip -= 1
                continue
            kind = pending[0][0] if pending else 0
            if mtype == _READY:
                while pending:  # the Query it answers, or the Sync (and skipped Executes)
                    kind, text, started, params = pending.popleft()
                    if kind == _QUERY:
                        self._record(text, started, self.rows, self.code, params)
                    if kind != _EXECUTE:
                        break
                self.rows, self.code = 0, None
                self.last_answer = time.monotonic()
            elif mtype == _ERROR:
                code = _sqlstate_of(body) if body is not None else "?????"
                if kind == _QUERY:
                    self.code = self.code or code
                elif kind == _EXECUTE:
                    _kind, text, started, params = pending.popleft()
                    self._record(text, started, 0, code, params)
                    self.last_answer = time.monotonic()
            elif kind == _QUERY:
                if mtype == _COMPLETE and body is not None:
                    self.rows += _rows_of(body)
            elif kind == _EXECUTE:  # CommandComplete, EmptyQueryResponse, PortalSuspended
                _kind, text, started, params = pending.popleft()
                rows = _rows_of(body) if mtype == _COMPLETE and body is not None else 0
                self._record(text, started, rows, None, params)
                self.last_answer = time.monotonic()

    def _record(self, text: bytes | int | None, started: float, rows: int, code: str | None,
                params: object) -> None:
        client = self.client
        pool = client.pool
        if text is None or pool is None or not self.stats.enabled:
            return
        now = time.monotonic()
        wait, self.wait = self.wait, 0.0
        started = max(started, self.last_answer)
        seconds = now - started
        app = client.application_name or client.params.get("application_name", "")
        if isinstance(text, int):  # sent by the engine, by its key (handed_back)
            shape = self.stats.engine_shape(text)
            if shape is not None:
                self.stats.record_shape(pool, app, shape, seconds, wait, rows, code)
            return
        fingerprint, sample = self.stats.record(pool, app, text, seconds, wait, rows, code)
        self.stats.nplusone.observe(self, text, fingerprint, sample, params, now)
        slow_after = client.pooler.config.slow_query_threshold
        if slow_after > 0 and seconds >= slow_after:
            bind = None
            if isinstance(params, tuple):  # an Execute: (its Bind, the Parse's types)
                body, types = params
                count = int.from_bytes(types[:2], "big") if len(types) >= 2 else 0
                oids = [int.from_bytes(types[2 + 4 * i:6 + 4 * i], "big") for i in range(count)]
                bind = parse_bind(body, oids)
            self.stats.slow.offer(pool, text, seconds, bind)

    def handed_back(self, owed: int, inflight: tuple[Any, ...] | None = None) -> None:
        """The engine hands the client back with ``owed`` ReadyForQuery still to come for
        what it forwarded. ``inflight`` (engine/querystats.c, qs_inflight): the statements it timed
        that await their answer, in order, keyed by the engine's statement keys, with the
        state of the one in front; Python times them to their answers as its own. Without it
        (the engine lost count) those answers are skipped, untimed."""
        self.pending.clear()
        self.rows, self.code = 0, None
        if inflight is None:
            self.skip = max(owed, 0)
            return
        entries, last_answer, wait, rows, code = inflight
        self.skip = 0
        for kind, key, started, _params in entries:
            # key 0: a Sync, or a statement the engine did not time (its text not at hand)
            self.pending.append((ord(kind), key or None, started, None))
        self.last_answer = max(self.last_answer, last_answer)
        self.wait += wait
        self.rows, self.code = rows, code or None


# Message types (frontend, then backend) the trackers read.
_QUERY, _PARSE, _BIND, _EXECUTE, _SYNC, _CLOSE, _FUNCTION_CALL = (
    ord("Q"), ord("P"), ord("B"), ord("E"), ord("S"), ord("C"), ord("F"))
_READY, _COMPLETE, _ERROR, _EMPTY, _SUSPENDED = ord("Z"), ord("C"), ord("E"), ord("I"), ord("s")
_ANSWERS = frozenset({_READY, _COMPLETE, _ERROR, _EMPTY, _SUSPENDED})


QUERY_COLUMNS = (
    ("database", "text"), ("user", "text"), ("fingerprint", "text"), ("query", "text"),
    ("calls", "int8"), ("errors", "int8"), ("rows", "int8"), ("total_ms", "numeric"),
    ("mean_ms", "numeric"), ("p50_ms", "numeric"), ("p95_ms", "numeric"),
    ("p99_ms", "numeric"), ("wait_ms", "numeric"), ("first_seen", "text"),
    ("last_seen", "text"), ("application_names", "text"), ("errors_by_sqlstate", "text"),
)
_OIDS = {"text": 25, "int8": 20, "numeric": 1700}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _when(epoch: float) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch)) if epoch else None


def query_rows(entries: Iterable[QueryEntry]) -> Iterator[list[str | int | None]]:
    """SHOW QUERIES' rows, in QUERY_COLUMNS' order."""
    for e in entries:
        mean = e.total / e.calls if e.calls else 0.0
        yield [e.database, e.user, e.fingerprint, e.query, e.calls, e.error_count, e.rows,
               _ms(e.total), _ms(mean), _ms(e.sketch.quantile(0.5)),
               _ms(e.sketch.quantile(0.95)), _ms(e.sketch.quantile(0.99)), _ms(e.wait),
               _when(e.first_seen), _when(e.last_seen),
               ",".join(sorted(e.apps)),
               ",".join(f"{code}:{n}" for code, n in sorted(e.errors.items()))]


def show_queries(pooler: Pooler) -> tuple[list[tuple[str, int]], list[list[str | int | None]]]:
    """SHOW QUERIES: columns (name, type oid) and rows, every worker's, most total time
    first."""
    columns = [(name, _OIDS[kind]) for name, kind in QUERY_COLUMNS]
    return columns, list(query_rows(pooler.query_stats.merged()))


def show_nplusone(pooler: Pooler) -> tuple[list[tuple[str, int]], list[list[Any]]]:
    """SHOW NPLUSONE: columns (name, type oid) and rows, every worker's, most bursts first."""
    stats = pooler.query_stats
    return list(NPLUSONE_COLUMNS), stats.nplusone.rows(stats.merged_nplusone())


def show_advice(pooler: Pooler) -> tuple[list[tuple[str, int]], list[list[Any]]]:
    """SHOW ADVICE: a pool size per pool, from every worker's measures (advisor.py)."""
    siblings = [row for document in pooler.query_stats._sibling_snapshots()
                for row in document.get("advice", ())]
    return list(ADVICE_COLUMNS), advice_rows(pooler, siblings)


def show_slow(pooler: Pooler) -> tuple[list[tuple[str, int]], list[list[Any]]]:
    """SHOW SLOW: columns (name, type oid) and rows, every worker's, slowest first."""
    return list(SLOW_COLUMNS), slow_rows(pooler.query_stats.merged_slow())


def slow_json(pooler: Pooler) -> bytes:
    """``GET /slow`` on the metrics port: every worker's slow-query reports."""
    return json.dumps({"threshold_s": pooler.config.slow_query_threshold,
                       "slow": [e.to_json() for e in pooler.query_stats.merged_slow()]}).encode()


def json_body(pooler: Pooler) -> bytes:
    """``GET /queries`` on the metrics port: every worker's shapes, most total time first."""
    stats = pooler.query_stats
    document = {"enabled": stats.enabled, "generated_at": time.time(),
                "queries": [e.to_json() for e in stats.merged()] if stats.enabled else [],
                "nplusone": [e.to_json() for e in stats.merged_nplusone()]}
    return json.dumps(document).encode()


def metric_families(pooler: Pooler) -> Iterator[Any]:
    """Prometheus families for this process's top ``query_stats_metrics`` shapes."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ("database", "user", "fingerprint")
    calls = CounterMetricFamily("pgpilot_query_calls", "Statements run, per query shape "
                                "(SHOW QUERIES)", labels=labels)
    errors = CounterMetricFamily("pgpilot_query_errors", "Statements that failed, per query "
                                 "shape", labels=labels)
    rows = CounterMetricFamily("pgpilot_query_rows", "Rows returned or affected, per query "
                               "shape", labels=labels)
    seconds = CounterMetricFamily("pgpilot_query_seconds", "Time from a statement sent to its "
                                  "ReadyForQuery, per query shape", labels=labels)
    wait = CounterMetricFamily("pgpilot_query_wait_seconds", "Time its transactions waited "
                               "for a server, per query shape", labels=labels)
    p99 = GaugeMetricFamily("pgpilot_query_p99_seconds", "99th percentile of the statement's "
                            "time since the pooler started, per query shape", labels=labels)
    for entry in pooler.query_stats.own()[:max(pooler.config.query_stats_metrics, 0)]:
        values = [entry.database, entry.user, entry.fingerprint]
        calls.add_metric(values, entry.calls)
        errors.add_metric(values, entry.error_count)
        rows.add_metric(values, entry.rows)
        seconds.add_metric(values, entry.total)
        wait.add_metric(values, entry.wait)
        p99.add_metric(values, entry.sketch.quantile(0.99))
    yield from (calls, errors, rows, seconds, wait, p99)
    bursts = CounterMetricFamily("pgpilot_nplusone_bursts", "Bursts that ran one query shape "
                                 "nplusone_threshold times or more with different parameters "
                                 "(SHOW NPLUSONE)",
                                 labels=("database", "user", "application_name", "fingerprint"))
    top = sorted(pooler.query_stats.nplusone.entries.values(), key=lambda e: e.bursts,
                 reverse=True)
    totals: dict[tuple[str, str, str, str], int] = {}
    for loop in top:
        key = (loop.database, loop.user, loop.application_name, loop.fingerprint)
        if key in totals or len(totals) < max(pooler.config.query_stats_metrics, 0):
            totals[key] = totals.get(key, 0) + loop.bursts
    for key, count in totals.items():
        bursts.add_metric(list(key), count)
    yield bursts


def client_queries(client: ClientConnection) -> ClientQueries | None:
    """The client's tracker, made at its first statement while statistics are on."""
    stats = client.pooler.query_stats
    if not stats.enabled or client.pool is None:
        return None
    tracker = ClientQueries(stats, client)
    client.queries = tracker
    return tracker


__all__ = ["QUERY_COLUMNS", "ClientQueries", "LatencySketch", "QueryEntry", "QueryStats",
           "bucket_of", "bucket_value", "client_queries", "json_body", "metric_families",
           "query_rows", "show_advice", "show_nplusone", "show_queries", "show_slow", "slow_json"]
