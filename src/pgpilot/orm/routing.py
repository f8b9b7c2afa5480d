"""Read replicas in SQLAlchemy 2, for applications without the pooler: reads go to replicas,
writes to the primary, and a session never reads older than its own writes.

``RoutingSession(primary=engine, replicas=[engine, ...])`` (and :class:`AsyncRoutingSession`
with async engines) is a :class:`~sqlalchemy.orm.Session` whose ``get_bind`` decides, per
statement:

* to the **primary**: flushes, Core ``insert/update/delete``, ``with_for_update()``, text that
  writes, locks or calls a function not known safe on a standby (``pgpilot.replication``
  classifies it), ``session.connection()`` without a statement, everything inside a
  ``with session.primary():`` block, and every statement of a transaction after it wrote;
* to a **replica** otherwise: one replica per transaction, the eligible one with the least
  outstanding transactions, where eligible means reachable, a standby, within the lag bounds,
  and replayed at least up to the session's ``min_lsn``; no replica eligible: the primary.

**Read-your-writes by LSN.** When a transaction that wrote commits, the session asks the primary
for ``pg_current_wal_insert_lsn()`` (one round trip, on any pooled connection: the position only
grows, so it is at or past the commit's record) and raises its ``min_lsn`` to it. Its later
reads go only to replicas whose replay position, as last polled, has reached that LSN.
``session.lsn_token`` is that position as text: keep it in the user's web session or a cookie
and give it to the next request's session (``RoutingSession(..., min_lsn=token)``) so that
request is fresh too.

Replica health is polled in a background thread (psycopg, ``HEALTH_SQL``) every
``check_interval`` seconds by a :class:`ReplicaRouter`, shared by all sessions made with the
same engines.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.engine.url import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ClauseElement, TextClause
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import CompoundSelect, Select

from pgpilot.replication import (
    HEALTH_SQL,
    PRIMARY_LSN_SQL,
    SAFE_FUNCTIONS_SQL,
    FunctionSafety,
    ReplicaSet,
    Route,
    classify,
    format_lsn,
    parse_lsn,
)

__all__ = ["AsyncRoutingSession", "ReplicaRouter", "RoutingSession"]

AnyEngine = Engine | AsyncEngine


def _libpq_dsn(url: URL) -> str:
    """The engine's URL for psycopg (the health poller), whatever the engine's driver."""
    return url.set(drivername="postgresql", query={}).render_as_string(hide_password=False)


class ReplicaRouter:
    """One primary and its replicas (SQLAlchemy engines, sync or async), their health, and the
    choice of a replica for a read. Made once per set of engines (:meth:`shared`); the health
    thread starts with the first session and stops with :meth:`close`.

    ``max_lag_bytes`` / ``max_lag_ms``: a replica further behind leaves the read set until it
    catches up. ``safe_functions``: functions of yours that may run on a replica (any other
    function of unknown volatility sends its statement to the primary).
    ``read_your_writes=False`` turns the LSN rule off (for measuring what it prevents)."""

    _shared: ClassVar[weakref.WeakValueDictionary[tuple[int, ...], ReplicaRouter]] = (
        weakref.WeakValueDictionary())
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, primary: AnyEngine, replicas: Sequence[AnyEngine], *,
                 max_lag_bytes: int | None = None, max_lag_ms: float | None = None,
                 check_interval: float = 0.25, safe_functions: Sequence[str] = (),
                 read_your_writes: bool = True, connect_timeout: int = 2) -> None:
        self.primary = primary
        self.replicas = list(replicas)
        self.names = [f"replica{i}" for i in range(1, len(self.replicas) + 1)]
        self.by_name = dict(zip(self.names, self.replicas, strict=True))
        self.replica_set = ReplicaSet(self.names, max_lag_bytes=max_lag_bytes,
                                      max_lag_ms=max_lag_ms)
        self.functions = FunctionSafety(safe_functions)
        self.check_interval = check_interval
        self.read_your_writes = read_your_writes
        self.connect_timeout = connect_timeout
        self.counts = {"primary": 0, **dict.fromkeys(self.names, 0)}
        self._dsns = {"primary": _libpq_dsn(primary.url),
                      **{n: _libpq_dsn(e.url) for n, e in self.by_name.items()}}
        self._conns: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first_check = threading.Event()

    @classmethod
    def shared(cls, primary: AnyEngine, replicas: Sequence[AnyEngine],
               **options: Any) -> ReplicaRouter:
        """The router of these engines, made on first use (``options`` apply then)."""
        key = (id(primary), *map(id, replicas))
        with cls._shared_lock:
            router = cls._shared.get(key)
            if router is None:
                router = cls(primary, replicas, **options)
                cls._shared[key] = router
                # the router lives as long as the primary engine
                primary.__dict__.setdefault("_pgpilot_routers", []).append(router)
            return router

    # -- health -------------------------------------------------------------------------
    def _query(self, name: str, sql: str) -> Any:
        import psycopg

        conn = self._conns.get(name)
        if conn is None or conn.closed:
            conn = psycopg.connect(self._dsns[name], autocommit=True,
                                   connect_timeout=self.connect_timeout)
            self._conns[name] = conn
        try:
            return conn.execute(sql).fetchall()
        except Exception:
            with contextlib.suppress(Exception):
                conn.close()
            self._conns.pop(name, None)
            raise

    def check(self) -> None:
        """One health round: the primary's insert position, then each replica."""
        primary_lsn: int | None = None
        try:
            if not self.functions.loaded:
                self.functions.load(row[0] for row in self._query("primary", SAFE_FUNCTIONS_SQL))
            primary_lsn = parse_lsn(self._query("primary", PRIMARY_LSN_SQL)[0][0])
        except Exception:
            primary_lsn = None
        for name in self.names:
            state = self.replica_set.states[name]
            was_up = state.up
            try:
                row = self._query(name, HEALTH_SQL)[0]
            except Exception as exc:
                state.record(None, primary_lsn, error=str(exc).strip()[:200])
                if was_up:
                    # its pooled connections died with it: a new pool for when it is back
                    # (the old one's connections are dropped as they are checked in)
                    _sync(self.by_name[name]).dispose(close=False)
            else:
                state.record(row, primary_lsn)
        self._first_check.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.check()
            self._stop.wait(self.check_interval)

    def start(self) -> ReplicaRouter:
        """Start the health thread (once) and wait for its first round."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="pgpilot-replica-health",
                                            daemon=True)
            self._thread.start()
        self._first_check.wait(10)
        return self

    def close(self) -> None:
        """Stop the health thread and close its connections."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                conn.close()
        self._conns.clear()

    # -- choice ---------------------------------------------------------------------------
    def choose(self, min_lsn: int) -> str | None:
        """A replica for a read that must see ``min_lsn`` (counted as taken), or None."""
        return self.replica_set.choose(min_lsn if self.read_your_writes else 0)

    def release(self, name: str) -> None:
        self.replica_set.release(name)

    def engine(self, name: str) -> AnyEngine:
        return self.primary if name == "primary" else self.by_name[name]


def _sync(engine: AnyEngine) -> Engine:
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine


def _needs_primary(clause: ClauseElement | None, router: ReplicaRouter) -> bool:
    """True unless ``clause`` only reads and calls only functions safe on a standby."""
    if clause is None:
        return True
    if isinstance(clause, TextClause):
        return classify(clause.text).route(router.functions) is Route.PRIMARY
    if not isinstance(clause, (Select, CompoundSelect)):
        return True
    for element in visitors.iterate(clause):
        if isinstance(element, Select) and element._for_update_arg is not None:
            return True
        if isinstance(element, FunctionElement):
            name = str(getattr(element, "name", "")).lower()
            packages = getattr(element, "packagenames", ()) or ()
            full = ".".join([*packages, name]) if packages else name
            if not router.functions(full):
                return True
        if getattr(element, "is_dml", False):
            return True
    return False


class RoutingSession(Session):
    """A Session that sends reads to replicas and writes to the primary (see the module doc).

    ``RoutingSession(primary=engine, replicas=[engine, ...], min_lsn=None, router_options=...)``
    or ``sessionmaker(class_=RoutingSession, primary=..., replicas=...)``; ``router=`` to share
    a :class:`ReplicaRouter` you made."""

    def __init__(self, primary: AnyEngine | None = None,
                 replicas: Sequence[AnyEngine] = (), *, router: ReplicaRouter | None = None,
                 min_lsn: str | int | None = None,
                 router_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if router is None:
            if primary is None:
                raise TypeError("RoutingSession needs primary= (and replicas=) or router=")
            router = ReplicaRouter.shared(primary, replicas, **(router_options or {}))
        self.router = router.start()
        self.min_lsn = parse_lsn(min_lsn) if isinstance(min_lsn, str) else int(min_lsn or 0)
        self._force_primary = 0
        self._wrote = False
        self._replica: str | None = None
        kwargs.setdefault("bind", _sync(router.primary))
        super().__init__(**kwargs)

    @property
    def lsn_token(self) -> str | None:
        """The WAL position this session's reads must see (its last write's commit), as text
        to carry to the next request; None before any write."""
        return format_lsn(self.min_lsn) if self.min_lsn else None

    def observe_lsn(self, token: str | int | None) -> None:
        """Raise ``min_lsn`` to ``token`` (another request's or service's ``lsn_token``)."""
        if token:
            lsn = parse_lsn(token) if isinstance(token, str) else int(token)
            self.min_lsn = max(self.min_lsn, lsn)

    @contextlib.contextmanager
    def primary(self) -> Iterator[RoutingSession]:
        """Every statement inside the block goes to the primary."""
        self._force_primary += 1
        try:
            yield self
        finally:
            self._force_primary -= 1

    @property
    def replica(self) -> str | None:
        """The replica this session's transaction reads from, if any."""
        return self._replica

    def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Engine:
        router = self.router
        if self._flushing or self._wrote or self._force_primary:
            if self._flushing:
                self._wrote = True
            return self._to_primary()
        if _needs_primary(clause, router):
            self._wrote = True
            return self._to_primary()
        if self._replica is None:
            self._replica = router.choose(self.min_lsn) or "primary"
        if self._replica == "primary":
            return self._to_primary()
        router.counts[self._replica] += 1
        return _sync(router.by_name[self._replica])

    def _to_primary(self) -> Engine:
        self.router.counts["primary"] += 1
        return _sync(self.router.primary)

    def _transaction_over(self, committed: bool) -> None:
        if committed and self._wrote and self.router.read_your_writes:
            with _sync(self.router.primary).connect() as conn:
                lsn = conn.exec_driver_sql(PRIMARY_LSN_SQL).scalar_one()
            self.min_lsn = max(self.min_lsn, parse_lsn(str(lsn)))
        self._wrote = False
        if self._replica not in (None, "primary"):
            self.router.release(self._replica)
        self._replica = None


@event.listens_for(RoutingSession, "after_commit")
def _after_commit(session: Session) -> None:
    if isinstance(session, RoutingSession):
        session._transaction_over(committed=True)


@event.listens_for(RoutingSession, "after_transaction_end")
def _after_end(session: Session, transaction: SessionTransaction) -> None:
    if isinstance(session, RoutingSession) and transaction.parent is None:
        session._transaction_over(committed=False)


class AsyncRoutingSession(AsyncSession):
    """:class:`RoutingSession` for async engines (asyncpg or psycopg async): same arguments,
    same rules; ``lsn_token``, ``observe_lsn`` and ``primary()`` as there."""

    sync_session_class = RoutingSession
    sync_session: RoutingSession

    def __init__(self, primary: AsyncEngine | None = None,
                 replicas: Sequence[AsyncEngine] = (), *, router: ReplicaRouter | None = None,
                 min_lsn: str | int | None = None,
                 router_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if router is None:
            if primary is None:
                raise TypeError("AsyncRoutingSession needs primary= (and replicas=) or router=")
            router = ReplicaRouter.shared(primary, replicas, **(router_options or {}))
        kwargs.setdefault("bind", router.primary)
        super().__init__(router=router, min_lsn=min_lsn, **kwargs)

    @property
    def router(self) -> ReplicaRouter:
        return self.sync_session.router

    @property
    def lsn_token(self) -> str | None:
        return self.sync_session.lsn_token

    @property
    def min_lsn(self) -> int:
        return self.sync_session.min_lsn

    def observe_lsn(self, token: str | int | None) -> None:
        self.sync_session.observe_lsn(token)

    @property
    def replica(self) -> str | None:
        return self.sync_session.replica

    def primary(self) -> contextlib.AbstractContextManager[RoutingSession]:
        """``with session.primary():``: every statement inside goes to the primary."""
        return self.sync_session.primary()
