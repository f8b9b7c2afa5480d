"""N+1 at the wire: one query shape run again and again, with different parameters, in one
client's burst.

A *burst* is a client's run of statements with at most ``nplusone_window`` seconds between one
and the next (a request's loop, a transaction). When one shape (fingerprint and sqlcommenter
origin) runs ``nplusone_threshold`` times or more in one burst, each time with other parameters,
it is a loop issuing one query per item where one query for all items would do: an N+1. The
pooler then

- counts it in ``SHOW NPLUSONE`` (per database, user, application_name, origin and fingerprint:
  bursts, the largest N, first and last seen, the fix),
- logs it once per (fingerprint, application_name), with the fix,
- exports ``pgpilot_nplusone_bursts_total``.

The fix is the in-app detector's (``insight.suggest_fix``): the batch query, ``col = ANY(:ids)``.
The Python path feeds each statement to an ``insight.ScopeDetector`` per burst (the in-app
detector's core: distinct parameter sets per shape); the compiled fast path counts per burst
itself, by the shapes Python told it (``FastPool.set_shapes``) or, for a statement key whose
shape it has not been told yet, by the key (Python names the shape when it takes the event),
and hands over only the bursts that cross the threshold (``FastPool.take_bursts``; see "N+1 at
the wire" in ``engine/querystats.c``).

The origin is read from a sqlcommenter comment the client put in the statement
(``/*controller='orders',action='index'*/``, as Django, Flask, Rails and OpenTelemetry
integrations emit), so the finding names the code that ran the loop.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from pgpilot.insight import QueryEvent, ScopeDetector, suggest_fix
from pgpilot.insight.fingerprint import COMMAND_OTHER, describe
from pgpilot.proxy.textkey import text_key

if TYPE_CHECKING:
    from pgpilot.proxy.pool import Pool
    from pgpilot.proxy.pooler import Pooler
    from pgpilot.proxy.stats import ClientQueries

log = logging.getLogger("pgpilot.proxy")

MAX_ENTRIES = 500  # rows of SHOW NPLUSONE per process; later new ones are counted as dropped
MAX_SHAPES = 50_000  # shape ids given out before the numbering starts again
# The engine's shape for a statement key that is no loop's (BEGIN, SET ...): counted by no
# burst (engine/querystats.c, QS_NO_SHAPE); never a shape id (those stay far below it).
NO_SHAPE = 0xFFFF_FFFF
# sqlcommenter keys that say where a statement comes from (the rest, such as traceparent or
# db_driver, change per request or say nothing about the code)
ORIGIN_KEYS = ("application", "controller", "action", "route", "framework", "job", "task")
_COMMENT = re.compile(r"/\*(.*?)\*/", re.DOTALL)
_PAIR = re.compile(r"([A-Za-z_][\w.-]*)='((?:[^'\\]|\\.)*)'")

Shape = tuple[str, str, str, str]  # (fingerprint, origin, sample text, command)


def origin_of(sql: str) -> str:
    """The sqlcommenter origin of a statement, ``"controller='orders',action='index'"``, or
    ``""``."""
    if "/*" not in sql:
        return ""
    for comment in _COMMENT.findall(sql):
        pairs = {key: unquote(value.replace("\\'", "'")) for key, value in _PAIR.findall(comment)}
        found = [f"{key}='{pairs[key]}'" for key in ORIGIN_KEYS if key in pairs]
        if found:
            return ",".join(found)[:200]
    return ""


class NPlusOneEntry:
    """One (database, user, application_name, origin, fingerprint): the loops seen."""

    __slots__ = ("application_name", "bursts", "database", "executions", "fingerprint",
                 "first_seen", "last_seen", "max_n", "origin", "query", "suggestion", "user")

    def __init__(self, database: str, user: str, application_name: str, origin: str,
                 fingerprint: str, query: str, suggestion: str) -> None:
        self.database = database
        self.user = user
        self.application_name = application_name
        self.origin = origin
        self.fingerprint = fingerprint
        self.query = query
        self.suggestion = suggestion
        self.bursts = 0
        self.executions = 0
        self.max_n = 0
        self.first_seen = 0.0
        self.last_seen = 0.0

    def key(self) -> tuple[str, str, str, str, str]:
        return (self.database, self.user, self.application_name, self.origin, self.fingerprint)

    def merge(self, other: NPlusOneEntry) -> None:
        self.bursts += other.bursts
        self.executions += other.executions
        self.max_n = max(self.max_n, other.max_n)
        if other.first_seen and (not self.first_seen or other.first_seen < self.first_seen):
            self.first_seen = other.first_seen
        self.last_seen = max(self.last_seen, other.last_seen)

    def copy(self) -> NPlusOneEntry:
        out = NPlusOneEntry(*self.key()[:4], self.fingerprint, self.query, self.suggestion)
        out.merge(self)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"database": self.database, "user": self.user,
                "application_name": self.application_name, "origin": self.origin,
                "fingerprint": self.fingerprint, "query": self.query, "bursts": self.bursts,
                "max_n": self.max_n, "executions": self.executions,
                "first_seen": self.first_seen, "last_seen": self.last_seen,
                "suggestion": self.suggestion}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NPlusOneEntry:
        entry = cls(str(data["database"]), str(data["user"]), str(data["application_name"]),
                    str(data["origin"]), str(data["fingerprint"]), str(data["query"]),
                    str(data["suggestion"]))
        entry.bursts = int(data["bursts"])
        entry.max_n = int(data["max_n"])
        entry.executions = int(data["executions"])
        entry.first_seen = float(data["first_seen"])
        entry.last_seen = float(data["last_seen"])
        return entry


class WireNPlusOne:
    """One per pooler process: the shapes, the open bursts of the Python path, the table."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self.entries: dict[tuple[str, str, str, str, str], NPlusOneEntry] = {}
        self.dropped = 0
        self._shape_ids: dict[tuple[str, str], int] = {}
        self._shapes: dict[int, Shape] = {}
        self._by_text: dict[object, int] = {}  # text_key -> shape id (0: none)
        self._engine_keys: dict[int, int] = {}  # the engine's statement key -> shape id
        self._last_shape = 0
        self._logged: set[tuple[str, str]] = set()
        self._open: dict[int, ClientQueries] = {}  # Python-path clients with an open burst
        self._suggestions: dict[str, str] = {}
        self.engine_loops = 0  # loops the compiled fast path counted (take_bursts)

    @property
    def threshold(self) -> int:
        cfg = self.pooler.config
        return cfg.nplusone_threshold if cfg.query_stats else 0

    @property
    def window(self) -> float:
        return self.pooler.config.nplusone_window

    # -- shapes ------------------------------------------------------------------------
    def shape_id(self, raw: bytes, fingerprint: str, sample: str) -> int:
        """The small number the engine groups a statement text's executions by: one per
        (fingerprint, origin) of a read or write (0: not a statement a loop is made of).
        Cached per text up to its literal values (textkey.text_key)."""
        cache_key = text_key(raw)
        cached = self._by_text.get(cache_key)
        if cached is not None:
            return cached
        if len(self._by_text) >= MAX_SHAPES:
            self._by_text.clear()
        text = raw.decode("utf-8", errors="replace")
        statement = describe(text)
        if statement.command == COMMAND_OTHER:
            self._by_text[cache_key] = 0
            return 0
        key = (fingerprint, origin_of(text))
        found = self._shape_ids.get(key)
        if found is None:
            if len(self._shape_ids) >= MAX_SHAPES:
                self._shape_ids.clear()
                self._shapes.clear()
                self._by_text.clear()
            # Never reused: the engine may still count a shape forgotten here, which must
            # then find nothing rather than another shape.
            self._last_shape += 1
            found = self._shape_ids[key] = self._last_shape
            self._shapes[found] = (fingerprint, key[1], sample, statement.command)
        self._by_text[cache_key] = found
        return found

    def engine_shapes(self, shapes: list[tuple[int, int]]) -> None:
        """(engine statement key, shape id) pairs learnt from a batch, for the events the
        engine counted by key before it was told the shape."""
        if len(self._engine_keys) + len(shapes) > MAX_SHAPES:
            self._engine_keys.clear()
        self._engine_keys.update(shapes)

    # -- events --------------------------------------------------------------------------
    def loop(self, pool: Pool, app: str, shape: int, count: int, final: bool) -> None:
        """A burst ran ``shape`` ``count`` times with different parameters: at the threshold
        (``final`` False: a new loop) or at the burst's end (its final count)."""
        found = self._shapes.get(shape)
        if found is None:
            return
        fingerprint, origin, sample, command = found
        key = (pool.db_name, pool.user, app, origin, fingerprint)
        entry = self.entries.get(key)
        now = time.time()
        if entry is None:
            if len(self.entries) >= MAX_ENTRIES:
                self.dropped += 1
                return
            entry = self.entries[key] = NPlusOneEntry(
                pool.db_name, pool.user, app, origin, fingerprint, sample,
                self._suggestion(fingerprint, sample, command))
            entry.first_seen = now
        entry.last_seen = now
        entry.max_n = max(entry.max_n, count)
        if final:
            entry.executions += count
        else:
            entry.bursts += 1
            if (fingerprint, app) not in self._logged:
                self._logged.add((fingerprint, app))
                where = f" ({origin})" if origin else ""
                log.warning("N+1 at the wire: db=%s user=%s application_name=%s%s ran one "
                            "query %d times with different parameters in one burst: %s; fix: "
                            "%s", pool.db_name, pool.user, app or "-", where, count, sample,
                            entry.suggestion)
        self.pooler.query_stats.changed()

    def _suggestion(self, fingerprint: str, sample: str, command: str) -> str:
        found = self._suggestions.get(fingerprint)
        if found is None:
            kind = "n_plus_one" if command == "read" else "update_loop"
            if command == "write":
                first = sample.lstrip().split(" ", 1)[0].lower()
                kind = {"insert": "insert_loop", "delete": "delete_loop"}.get(first,
                                                                             "update_loop")
            try:
                found = suggest_fix(kind, QueryEvent(fingerprint, sample, None))  # type: ignore[arg-type]
            except Exception:
                found = "fetch what the loop needs in one query before the loop"
            if len(self._suggestions) > MAX_ENTRIES:
                self._suggestions.clear()
            self._suggestions[fingerprint] = found
        return found

    # -- the Python path -------------------------------------------------------------------
    def observe(self, tracker: ClientQueries, text: bytes, fingerprint: str, sample: str,
                params_key: object, now: float) -> None:
        """One statement the Python path ran, for its client's burst."""
        threshold = self.threshold
        if threshold < 2:
            return
        if tracker.burst is not None and now - tracker.burst_last > self.window:
            self.end_burst(tracker)
        shape = self.shape_id(text, fingerprint, sample)
        if not shape:
            return
        if tracker.burst is None:
            tracker.burst = ScopeDetector(threshold)
            self._open[id(tracker)] = tracker
        tracker.burst_last = now
        event = (str(shape), "", params_key, None, "", now, self._shapes[shape][3])
        if tracker.burst.add(event):
            self.loop(*self._where(tracker), shape, threshold, False)

    def end_burst(self, tracker: ClientQueries) -> None:
        detector, tracker.burst = tracker.burst, None
        self._open.pop(id(tracker), None)
        if detector is None:
            return
        pool, app = self._where(tracker)
        for finding in detector.findings():
            if finding.kind in ("n_plus_one", "insert_loop", "update_loop", "delete_loop"):
                self.loop(pool, app, int(finding.fingerprint), finding.distinct_params, True)

    def _where(self, tracker: ClientQueries) -> tuple[Any, str]:
        client = tracker.client
        return client.pool, client.application_name or client.params.get("application_name",
                                                                          "")

    def expire(self, now: float) -> None:
        """End the Python path's bursts that have been quiet for longer than the window."""
        window = self.window
        for tracker in [t for t in self._open.values() if now - t.burst_last > window]:
            self.end_burst(tracker)

    # -- the fast path ---------------------------------------------------------------------
    def fold_engine_bursts(self, pool: Pool, events: list[tuple[int, int, int, int, int]],
                           app_of: Any) -> None:
        for shape, count, params_id, final, key in events:
            if not shape:  # counted by its key: the batch taken before named its shape
                shape = self._engine_keys.get(key, 0)
            if not shape or shape == NO_SHAPE:
                continue  # not known after all, or no loop's statement
            self.engine_loops += not final
            self.loop(pool, app_of(params_id), shape, count, bool(final))

    # -- reading ---------------------------------------------------------------------------
    def rows(self, entries: Iterator[NPlusOneEntry] | list[NPlusOneEntry]) -> list[list[Any]]:
        out = []
        for e in entries:
            out.append([e.database, e.user, e.application_name, e.origin, e.fingerprint,
                        e.query, e.bursts, e.max_n, e.executions,
                        _when(e.first_seen), _when(e.last_seen), e.suggestion])
        return out


NPLUSONE_COLUMNS = (
    ("database", 25), ("user", 25), ("application_name", 25), ("origin", 25),
    ("fingerprint", 25), ("query", 25), ("bursts", 20), ("max_n", 20), ("executions", 20),
    ("first_seen", 25), ("last_seen", 25), ("suggestion", 25),
)


def _when(epoch: float) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch)) if epoch else None


__all__ = ["NPLUSONE_COLUMNS", "NPlusOneEntry", "WireNPlusOne", "origin_of"]
