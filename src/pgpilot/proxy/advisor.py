"""Pool sizing advisor: ``SHOW ADVICE``, a pool size recommended from what each pool measures.

Every second (``QueryStats.tick``) the advisor samples each pool's running totals (the ones
``SHOW STATS`` reads, the fast path's folded in by the janitor) and keeps the last ``WINDOW``
seconds. Over
that window, per pool:

- arrival rate: transactions per second (lambda);
- service time: how long a transaction holds its server (S: first request to the
  ReadyForQuery that ends it), of which the server was running statements (Q: statement time);
- the clients' wait for a server (mean, and p95 from the wait histogram);
- servers busy: lambda x S / pool size (Little's law: lambda x S servers are busy on average).

The recommendation is the smallest pool size that keeps the p95 wait for a server under
``advisor_wait_target``. A pool's clients are a finite population: each one runs a transaction,
then thinks (round trips to its application, its own work) before the next, and while it waits
for a server it sends nothing more. So the queue is the machine-repair model M/M/c//N: N clients
(the pool's, averaged over the window), each asking for a server Z seconds after its last
transaction ended, where Z = N / lambda - S - W comes from what was measured (W: the mean wait).
That holds whatever the pool size the measures came from: a pool too small lowers lambda, and
raises W by as much, so the demand N / (Z + S) is seen through it. An open M/M/c queue
(Erlang's C formula) fed lambda would take the throttled rate for the demand, and, with many
clients each asking seldom, is what the finite model tends to; it is used beyond
``FINITE_CLIENTS`` clients (at the demand rate). The sizing is
checked against the seed formula ``cores x (1 + wait/service)``, where wait is the time a
transaction holds its server without running a statement (S - Q: round trips to the client)
and service the statement time Q, with ``advisor_db_cores`` (0: unknown, no seed): beyond the
seed, more servers only queue inside PostgreSQL, so the seed caps the advice. It is capped by
``max_db_connections`` and by the server's ``max_connections`` less its reserved connections
and the other pools' sizes on that server (read once per 5 minutes on a connection of its own).

``SHOW ADVICE`` prints pool, current size, recommended size and the numbers it came from, in
words. With ``workers = N`` the workers' measures are added up (every worker's console shows
the pooler as a whole).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pgpilot.proxy.poolstats import WAIT_BUCKETS

if TYPE_CHECKING:
    from pgpilot.proxy.pool import Pool
    from pgpilot.proxy.pooler import Pooler

WINDOW = 60.0  # seconds of measures the advice is made from
FINITE_CLIENTS = 2_000  # more clients than this: the open M/M/c queue (Erlang C) is as good
LIMITS_EVERY = 300.0  # seconds between two reads of a server's max_connections
MAX_POOL = 10_000


def erlang_c(servers: int, load: float) -> float:
    """The probability that an arrival waits, with ``servers`` servers and ``load`` Erlangs."""
    if servers <= load:
        return 1.0
    blocking = 1.0  # Erlang B, by its recurrence
    for k in range(1, servers + 1):
        blocking = load * blocking / (k + load * blocking)
    return servers * blocking / (servers - load * (1 - blocking))


def wait_exceeds(servers: int, load: float, service: float, wait: float) -> float:
    """P(a client waits longer than ``wait``) in an M/M/c queue (``service``: mean seconds)."""
    if servers <= load:
        return 1.0
    return erlang_c(servers, load) * math.exp(-(servers - load) * wait / service)


def smallest_pool(rate: float, service: float, target: float, quantile: float = 0.95) -> int:
    """The fewest servers that keep the ``quantile`` of the wait for one under ``target``."""
    load = rate * service
    if load <= 0:
        return 1
    servers = max(1, math.floor(load) + 1)
    while servers < MAX_POOL and wait_exceeds(servers, load, service, target) > 1 - quantile:
        servers += 1
    return servers


def finite_wait_exceeds(clients: int, servers: int, think: float, service: float,
                        wait: float) -> float:
    """P(a request waits longer than ``wait`` for a server) with ``clients`` clients, each
    asking ``think`` mean seconds after its last transaction ended, ``servers`` servers and a
    mean holding time of ``service`` (M/M/c//N, exponential times)."""
    if clients <= servers:
        return 0.0
    per_client = 1.0 / think
    per_server = 1.0 / service
    # log of the stationary weight of k requests in the system, k = 0..clients-1 (an arrival
    # comes from one of the clients - k not in the system: it sees k with weight (N - k) p_k)
    log_weight = [0.0]
    for k in range(1, clients):
        log_weight.append(log_weight[-1] + math.log((clients - k + 1) * per_client)
                          - math.log(min(k, servers) * per_server))
    log_seen = [math.log(clients - k) + lw for k, lw in enumerate(log_weight)]
    top = max(log_seen)
    seen = [math.exp(x - top) for x in log_seen]
    total = sum(seen)
    # An arrival that finds k >= c in the system starts after k - c + 1 departures at rate
    # c x mu: P(Gamma(k - c + 1, c mu) > wait), a Poisson sum that grows one term per k.
    rate_t = servers * per_server * wait
    term = math.exp(-rate_t)
    tail = 0.0
    exceeds = 0.0
    for k in range(servers, clients):
        j = k - servers
        tail += term
        term *= rate_t / (j + 1)
        exceeds += seen[k] * tail
    return min(1.0, exceeds / total)


def smallest_finite_pool(clients: int, think: float, service: float, target: float,
                         quantile: float = 0.95) -> int:
    """The fewest servers that keep the ``quantile`` of ``clients`` clients' wait for one
    under ``target`` (M/M/c//N)."""
    if clients <= 0 or service <= 0:
        return 1
    if think <= 0:
        return max(clients, 1)
    load = clients * service / (think + service)  # servers busy if no client ever waited
    servers = max(1, math.floor(load))
    while servers < clients and finite_wait_exceeds(clients, servers, think, service,
                                                    target) > 1 - quantile:
        servers += 1
    return servers


@dataclass
class Measures:
    """One pool's (or all workers' share of it) measures over the window."""

    seconds: float = 0.0
    transactions: int = 0
    xact_time: float = 0.0
    query_time: float = 0.0
    waits: int = 0
    wait_time: float = 0.0
    wait_buckets: tuple[int, ...] = ()
    pool_size: int = 0
    clients: float = 0.0  # logged-in clients of the pool, on average over the window

    def add(self, other: Measures) -> None:
        self.seconds = max(self.seconds, other.seconds)
        self.transactions += other.transactions
        self.xact_time += other.xact_time
        self.query_time += other.query_time
        self.waits += other.waits
        self.wait_time += other.wait_time
        mine = self.wait_buckets or (0,) * len(other.wait_buckets)
        self.wait_buckets = tuple(a + b for a, b in zip(mine, other.wait_buckets, strict=False))
        self.pool_size += other.pool_size
        self.clients += other.clients

    def wait_p95(self) -> float:
        total = sum(self.wait_buckets)
        if not total:
            return 0.0
        seen = 0
        for bound, count in zip((*WAIT_BUCKETS, float("inf")), self.wait_buckets, strict=False):
            seen += count
            if seen >= 0.95 * total:
                return bound if bound != float("inf") else WAIT_BUCKETS[-1]
        return WAIT_BUCKETS[-1]


@dataclass
class Advice:
    database: str
    user: str
    pool_size: int
    recommended: int | None
    measures: Measures
    seed: int | None
    capped_by: str
    words: str


class Advisor:
    """One per pooler process."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self._samples: dict[tuple[str, str], collections.deque[tuple[float, tuple[Any, ...]]]] = {}
        # (host, port) -> (max_connections - reserved, when read)
        self.server_limits: dict[tuple[str | None, int], tuple[int, float]] = {}
        self._fetching: set[tuple[str | None, int]] = set()

    def sample(self, now: float) -> None:
        """Note every pool's running totals (once a second)."""
        for key, pool in list(self.pooler.pools.items()):
            st = pool.stats  # the fast path's counters are folded in by the janitor (0.2 s)
            ring = self._samples.setdefault(key, collections.deque())
            clients = len(pool.clients) + (pool.lane.fp.phantoms if pool.lane is not None else 0)
            ring.append((now, (st.xact_count, st.xact_time, st.query_time,
                               st.server_assignment_count, st.wait_time,
                               tuple(st.wait_buckets), clients)))
            while ring and now - ring[0][0] > WINDOW:
                ring.popleft()
            self._limits_due(pool, now)
        for key in [k for k in self._samples if k not in self.pooler.pools]:
            del self._samples[key]

    def measures(self, pool: Pool) -> Measures:
        ring = self._samples.get((pool.db_name, pool.user))
        if not ring or len(ring) < 2:
            return Measures(pool_size=pool.size)
        (t0, a), (t1, b) = ring[0], ring[-1]
        return Measures(seconds=t1 - t0, transactions=b[0] - a[0], xact_time=b[1] - a[1],
                        query_time=b[2] - a[2], waits=b[3] - a[3], wait_time=b[4] - a[4],
                        wait_buckets=tuple(y - x for x, y in zip(a[5], b[5], strict=True)),
                        pool_size=pool.size,
                        clients=sum(sample[6] for _when, sample in ring) / len(ring))

    def own_measures(self) -> dict[tuple[str, str], Measures]:
        return {(p.db_name, p.user): self.measures(p) for p in self.pooler.pools.values()}

    # -- max_connections ---------------------------------------------------------------------
    def _limits_due(self, pool: Pool, now: float) -> None:
        where = (pool.db.host, pool.db.port)
        known = self.server_limits.get(where)
        if where in self._fetching or (known is not None and now - known[1] < LIMITS_EVERY):
            return
        from pgpilot.proxy.slow import conninfo_for

        conninfo = conninfo_for(pool)
        if conninfo is None:
            return
        self._fetching.add(where)
        future = asyncio.get_running_loop().run_in_executor(
            self.pooler.query_stats.slow.executor(), _read_limits, conninfo)

        def done(fut: asyncio.Future[int]) -> None:
            self._fetching.discard(where)
            try:
                self.server_limits[where] = (fut.result(), time.monotonic())
            except Exception:
                self.server_limits[where] = (0, time.monotonic())  # unknown; try again later

        future.add_done_callback(done)

    # -- advice --------------------------------------------------------------------------
    def advise(self, pool: Pool, m: Measures) -> Advice:
        cfg = self.pooler.config
        target = cfg.advisor_wait_target
        cores = cfg.advisor_db_cores
        if m.transactions < 10 or m.seconds <= 0:
            return Advice(pool.db_name, pool.user, m.pool_size, None, m, None, "",
                          f"not enough traffic yet ({m.transactions} transactions in the last "
                          f"{m.seconds:.0f} s)")
        rate = m.transactions / m.seconds
        service = m.xact_time / m.transactions
        running = m.query_time / m.transactions
        busy = rate * service  # servers busy on average (Little's law)
        wait_p95 = m.wait_p95()
        clients = round(m.clients)
        # each client's cycle is think + wait + service (Little's law on the N clients)
        think = clients / rate - service - m.wait_time / m.transactions if clients else 0.0
        if service <= 0:
            need, model = 1, ""
        elif 0 < clients <= FINITE_CLIENTS and think > 0:
            need = smallest_finite_pool(clients, think, service, target)
            model = (f"{clients} clients asking every {(think + service) * 1e3:.1f} ms "
                     f"(think {think * 1e3:.1f} ms + service)")
        else:
            demand = clients / (think + service) if clients and think > 0 else rate
            need = smallest_pool(demand, service, target)
            model = f"{demand:.1f} transactions/s asked"
        seed = None
        capped_by = ""
        recommended = need
        if cores > 0 and running > 0:
            held_idle = max(service - running, 0.0)
            seed = max(1, round(cores * (1 + held_idle / running)))
            if recommended > seed:
                recommended, capped_by = seed, "db cores"
        cap, cap_name = self._cap(pool)
        if cap is not None and recommended > cap:
            recommended, capped_by = max(cap, 1), cap_name
        words = [f"clients waited p95 {wait_p95 * 1e3:.1f} ms for a server",
                 f"servers {100 * busy / max(m.pool_size, 1):.0f}% busy "
                 f"({rate:.1f} transactions/s x {service * 1e3:.1f} ms held = {busy:.1f} busy "
                 f"on average)",
                 f"statements ran {running * 1e3:.1f} ms of each transaction"]
        if cores > 0:
            words.append(f"{cores} db cores (seed {seed})")
        words.append(f"with {model}, {need} servers keep the p95 wait under "
                     f"{target * 1e3:.0f} ms" if model else
                     f"{need} servers keep the p95 wait under {target * 1e3:.0f} ms")
        if capped_by:
            words.append(f"capped by {capped_by}")
        words.append(f"recommend default_pool_size = {recommended}")
        return Advice(pool.db_name, pool.user, m.pool_size, recommended, m, seed, capped_by,
                      "; ".join(words))

    def _cap(self, pool: Pool) -> tuple[int | None, str]:
        cfg = self.pooler.config
        caps: list[tuple[int, str]] = []
        max_db = cfg.max_db_connections_for(pool.db)
        if max_db:
            caps.append((max_db, "max_db_connections"))
        limit = self.server_limits.get((pool.db.host, pool.db.port))
        if limit is not None and limit[0] > 0:
            others = sum(p.size for p in self.pooler.pools.values()
                         if p is not pool and (p.db.host, p.db.port) == (pool.db.host,
                                                                          pool.db.port))
            if self.pooler.worker is not None:
                others *= self.pooler.worker.count  # each worker holds its share
            caps.append((limit[0] - others, "max_connections (less reserved and other pools)"))
        if not caps:
            return None, ""
        return min(caps)


def _read_limits(conninfo: dict[str, Any]) -> int:
    import psycopg

    with psycopg.connect(**conninfo, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("select current_setting('max_connections')::int - "
                           "current_setting('superuser_reserved_connections')::int").fetchone()
    return int(row[0]) if row else 0


ADVICE_COLUMNS = (
    ("database", 25), ("user", 25), ("pool_size", 20), ("recommended", 20),
    ("transactions_per_s", 1700), ("xact_ms", 1700), ("query_ms", 1700), ("busy_pct", 1700),
    ("wait_p95_ms", 1700), ("db_cores", 20), ("seed", 20), ("capped_by", 25), ("advice", 25),
)


def advice_rows(pooler: Pooler, sibling_measures: list[dict[str, Any]]) -> list[list[Any]]:
    """SHOW ADVICE's rows: this worker's measures plus its siblings', per pool."""
    advisor = pooler.query_stats.advisor
    totals = advisor.own_measures()
    for row in sibling_measures:
        try:
            key = (str(row["database"]), str(row["user"]))
            theirs = Measures(**{k: v for k, v in row.items() if k not in ("database", "user")})
            theirs.wait_buckets = tuple(theirs.wait_buckets)
        except (KeyError, TypeError, ValueError):
            continue
        totals.setdefault(key, Measures()).add(theirs)
    rows = []
    for pool in sorted(pooler.pools.values(), key=lambda p: (p.db_name, p.user)):
        m = totals.get((pool.db_name, pool.user), Measures(pool_size=pool.size))
        advice = advisor.advise(pool, m)
        rate = m.transactions / m.seconds if m.seconds else 0.0
        per = max(m.transactions, 1)
        rows.append([pool.db_name, pool.user, m.pool_size, advice.recommended,
                     f"{rate:.2f}", f"{m.xact_time / per * 1e3:.3f}",
                     f"{m.query_time / per * 1e3:.3f}",
                     f"{100 * rate * (m.xact_time / per) / max(m.pool_size, 1):.1f}",
                     f"{m.wait_p95() * 1e3:.1f}", pooler.config.advisor_db_cores or None,
                     advice.seed, advice.capped_by, advice.words])
    return rows


__all__ = ["ADVICE_COLUMNS", "Advice", "Advisor", "Measures", "advice_rows", "erlang_c",
           "finite_wait_exceeds", "smallest_finite_pool", "smallest_pool", "wait_exceeds"]
