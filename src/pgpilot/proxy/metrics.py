"""Prometheus exporter: ``GET /metrics`` on ``metrics_port`` (0 = off), names ``pgpilot_*``.

Nothing is updated per query for the metrics: a custom collector reads the pooler's own state
(its per-state connection lists and the running totals in each pool's ``PoolStats``, which the
pooler keeps anyway for ``SHOW STATS``) at scrape time. The HTTP endpoint is a tiny asyncio
server on the pooler's event loop, so a scrape reads that state from the only thread that
changes it, with no locking.

Metrics (labels ``database``, ``user`` unless noted):

- ``pgpilot_clients{state=active|idle|waiting}``: logged-in clients, linked to a server or not
- ``pgpilot_clients_login``: clients still logging in (no labels)
- ``pgpilot_servers{state=active|idle|used|tested|login}``: server connections
- ``pgpilot_waiting_clients``, ``pgpilot_max_wait_seconds``: the line for a server
- ``pgpilot_pool_size``, ``pgpilot_pool_paused``
- counters ``pgpilot_transactions_total``, ``pgpilot_queries_total``,
  ``pgpilot_received_bytes_total``, ``pgpilot_sent_bytes_total``, ``pgpilot_errors_total``,
  ``pgpilot_server_assignments_total``
- histogram ``pgpilot_wait_seconds``: how long clients waited for a server
- ``pgpilot_hazards_total{database,user,application_name,kind}``: transaction-pooling hazards
- ``pgpilot_pins_total{reason}``, ``pgpilot_pinned_clients{database,user}``: clients kept on
  their server by LISTEN, temp tables, advisory locks ... (session.py)
- ``pgpilot_login_failures_total``, ``pgpilot_paused``, ``pgpilot_start_time_seconds``,
  ``pgpilot_info{version}``
- per-query statistics (stats.py), for the ``query_stats_metrics`` shapes with the most total
  time (labels ``database``, ``user``, ``fingerprint``: bounded): ``pgpilot_query_calls_total``,
  ``pgpilot_query_errors_total``, ``pgpilot_query_rows_total``, ``pgpilot_query_seconds_total``,
  ``pgpilot_query_wait_seconds_total``, ``pgpilot_query_p99_seconds``

``GET /queries`` serves the per-query statistics of every worker as JSON (stats.py), ``GET /slow``
the slow-query reports (slow.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)

import pgpilot
from pgpilot.proxy.admin import max_wait
from pgpilot.proxy.poolstats import WAIT_BUCKETS
from pgpilot.proxy.states import ClientState, ServerState

if TYPE_CHECKING:
    from pgpilot.proxy.pooler import Pooler

log = logging.getLogger("pgpilot.proxy")

POOL_LABELS = ("database", "user")
SERVER_STATES = (ServerState.ACTIVE, ServerState.IDLE, ServerState.USED, ServerState.TESTED,
                 ServerState.LOGIN)
REQUEST_TIMEOUT = 10.0  # seconds for a scraper to send its request
MAX_REQUEST_HEAD = 16_384


class PoolerCollector:
    """A prometheus_client collector that reads the pooler's state when scraped."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler

    def describe(self) -> list[Any]:
        return []  # families are only known at collect time; nothing to check up front

    def collect(self) -> Iterator[Any]:
        pooler = self.pooler
        if pooler.fast is not None:
            # Exact counts: fast-path pairs come back to Python; clients idle in the engine
            # with no Python object are counted where they are (Pool.client_counts).
            pooler.fast.settle(claim=False)
        now = time.monotonic()
        clients = GaugeMetricFamily("pgpilot_clients", "Logged-in client connections by state "
                                    "(active: linked to a server, idle, waiting for one)",
                                    labels=(*POOL_LABELS, "state"))
        servers = GaugeMetricFamily("pgpilot_servers", "Server connections by state",
                                    labels=(*POOL_LABELS, "state"))
        waiting = GaugeMetricFamily("pgpilot_waiting_clients",
                                    "Clients waiting for a server connection", labels=POOL_LABELS)
        maxwait = GaugeMetricFamily("pgpilot_max_wait_seconds",
                                    "How long the oldest waiting client has waited",
                                    labels=POOL_LABELS)
        pool_size = GaugeMetricFamily("pgpilot_pool_size", "Configured pool size",
                                      labels=POOL_LABELS)
        pool_paused = GaugeMetricFamily("pgpilot_pool_paused", "1 while the pool is paused",
                                        labels=POOL_LABELS)
        counters = {
            "xact_count": CounterMetricFamily(
                "pgpilot_transactions", "Transactions pooled", labels=POOL_LABELS),
            "query_count": CounterMetricFamily(
                "pgpilot_queries", "Queries (commands) pooled", labels=POOL_LABELS),
            "bytes_received": CounterMetricFamily(
                "pgpilot_received_bytes", "Bytes received from clients", labels=POOL_LABELS),
            "bytes_sent": CounterMetricFamily(
                "pgpilot_sent_bytes", "Bytes sent to clients", labels=POOL_LABELS),
            "errors": CounterMetricFamily(
                "pgpilot_errors", "Error responses sent to clients", labels=POOL_LABELS),
            "server_assignment_count": CounterMetricFamily(
                "pgpilot_server_assignments", "Times a server was assigned to a client",
                labels=POOL_LABELS),
        }
        wait_hist = HistogramMetricFamily("pgpilot_wait_seconds",
                                          "Time clients waited for a server connection",
                                          labels=POOL_LABELS)
        for pool in sorted(pooler.pools.values(), key=lambda p: (p.db_name, p.user)):
            labels = [pool.db_name, pool.user]
            active_or_idle, waiting_count = pool.client_counts()
            linked = sum(1 for c in pool.clients
                         if c.state is ClientState.ACTIVE and c.server is not None)
            clients.add_metric([*labels, "active"], linked)
            clients.add_metric([*labels, "idle"], active_or_idle - linked)
            clients.add_metric([*labels, "waiting"], waiting_count)
            for state in SERVER_STATES:
                servers.add_metric([*labels, state.value], len(pool.servers[state]))
            waiting.add_metric(labels, waiting_count)
            maxwait.add_metric(labels, max_wait(pool, now))
            pool_size.add_metric(labels, pool.size)
            pool_paused.add_metric(labels, int(pool.paused))
            stats = pool.stats
            for attr, family in counters.items():
                family.add_metric(labels, getattr(stats, attr))
            cumulative, buckets = 0, []
            for bound, count in zip((*WAIT_BUCKETS, float("inf")), stats.wait_buckets,
                                    strict=True):
                cumulative += count
                buckets.append((_bucket_label(bound), cumulative))
            wait_hist.add_metric(labels, buckets, stats.wait_time)
        logging_in = len(pooler.clients[ClientState.LOGIN])
        if pooler.fast is not None:
            pooler.fast.refill()
            logging_in += pooler.fast.engine.phantoms_logging_in
        yield clients
        yield GaugeMetricFamily("pgpilot_clients_login", "Clients still logging in",
                                value=logging_in)
        yield servers
        yield waiting
        yield maxwait
        yield pool_size
        yield pool_paused
        yield from counters.values()
        yield wait_hist
        hazards = CounterMetricFamily(
            "pgpilot_hazards", "Transaction-pooling hazards seen (see SHOW HAZARDS)",
            labels=("database", "user", "application_name", "kind"))
        for (db, user, app, kind), entry in sorted(pooler.hazards.counts.items()):
            hazards.add_metric([db, user, app, kind], entry.count)
        yield hazards
        pins = CounterMetricFamily(
            "pgpilot_pins", "Clients pinned to their server, by the state that pinned them",
            labels=("reason",))
        for reason, count in sorted(pooler.pins_total.items()):
            pins.add_metric([reason], count)
        yield pins
        pinned = GaugeMetricFamily("pgpilot_pinned_clients", "Clients pinned to their server "
                                   "now (pin_session_state)", labels=("database", "user"))
        for pool in pooler.pools.values():
            pinned.add_metric([pool.db_name, pool.user], pool.pinned_count())
        yield pinned
        yield CounterMetricFamily("pgpilot_login_failures", "Client logins refused for bad "
                                  "credentials", value=pooler.auth_failures)
        yield GaugeMetricFamily("pgpilot_paused", "1 while the whole pooler is paused",
                                value=int(pooler.paused))
        yield GaugeMetricFamily("pgpilot_start_time_seconds", "When the pooler started (unix "
                                "time)", value=pooler.started_at)
        if pooler.routers:  # read/write split: decisions by target, replica health
            from pgpilot.proxy.routing import metric_families

            yield from metric_families(pooler)
        if pooler.config.query_stats:
            from pgpilot.proxy.stats import metric_families as query_families

            yield from query_families(pooler)
        yield InfoMetricFamily("pgpilot", "pgpilot version",
                               value={"version": pgpilot.__version__})


def _bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def registry_for(pooler: Pooler) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolerCollector(pooler))
    return registry


async def start_metrics_server(pooler: Pooler) -> asyncio.AbstractServer:
    """Serve ``/metrics`` on the pooler's loop, on its first listen address.

    With ``workers = N`` each worker is a pooler of its own and serves its own metrics on
    ``metrics_port + index`` (its config says so: workers.worker_config); scrape them all.
    """
    cfg = pooler.config
    registry = registry_for(pooler)
    port = cfg.metrics_port
    addresses = cfg.listen_addresses
    host: str | None = "127.0.0.1" if not addresses else None if addresses[0] == "*" \
        else addresses[0]
    from pgpilot.proxy.dashboard import is_exposed

    exposed = is_exposed(host)  # the dashboard and its JSON then need dashboard_token

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = _respond(head, registry, pooler, exposed)
            body_out = b"" if head.startswith(b"HEAD ") else body
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type
                         + b"\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n" + body_out)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # reuse_port: at an online restart (takeover.py) the new process binds the port while
    # the old one still serves it (it closes its own at the hand-over); only a process of the
    # same user may share it so.
    server = await asyncio.start_server(handle, host=host, port=port,
                                        limit=MAX_REQUEST_HEAD, reuse_address=True,
                                        reuse_port=True)
    log.info("metrics on http://%s:%d/metrics", host or "*", port)
    return server


def _respond(head: bytes, registry: CollectorRegistry, pooler: Pooler | None = None,
             exposed: bool = False) -> tuple[bytes, bytes, bytes]:
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
        return b"405 Method Not Allowed", b"text/plain", b"only GET /metrics\n"
    path = parts[1].split(b"?", 1)[0]
    if pooler is not None:
        from pgpilot.proxy import dashboard

        if path in dashboard.PROTECTED:
            allowed, why = dashboard.authorized(head, pooler, exposed)
            if not allowed:
                return b"403 Forbidden", b"text/plain", why
        if path in (b"/", b"/index.html"):  # the dashboard (proxy/dashboard/)
            return b"200 OK", b"text/html; charset=utf-8", dashboard.page()
        if path == b"/dashboard.json":
            return b"200 OK", b"application/json", dashboard.state_json(pooler)
    if path == b"/metrics":
        return b"200 OK", CONTENT_TYPE_LATEST.encode(), generate_latest(registry)
    if path == b"/queries" and pooler is not None:  # per-query statistics (stats.py)
        from pgpilot.proxy.stats import json_body

        return b"200 OK", b"application/json", json_body(pooler)
    if path == b"/slow" and pooler is not None:  # slow queries, explained (slow.py)
        from pgpilot.proxy.stats import slow_json

        return b"200 OK", b"application/json", slow_json(pooler)
    if path == b"/":
        return b"200 OK", b"text/plain", b"pgpilot: metrics at /metrics\n"
    return b"404 Not Found", b"text/plain", b"not found: try /metrics\n"
