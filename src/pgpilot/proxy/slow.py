"""Slow queries, explained: a statement slower than ``slow_query_threshold`` gets its plan read.

When a statement takes longer than ``slow_query_threshold`` seconds (0, the default, is off),
it is sampled (``slow_query_sample_rate``) and the pooler asks PostgreSQL for its plan on a
separate server connection to the same database as the same server user, made for that (never
one of the pool's, so no client waits for it): ``EXPLAIN (FORMAT JSON)`` with the statement's
own parameters where the Python path has them, its text as sent otherwise. With
``slow_query_explain_analyze`` the plan is ``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)``, always
inside ``BEGIN`` ... ``ROLLBACK`` (so a write it runs is undone). Each EXPLAIN runs under
``statement_timeout = slow_query_explain_timeout``, at most ``slow_query_max_concurrent`` at
once and once per fingerprint every ``EXPLAIN_INTERVAL`` seconds; the rest are counted.

The plan goes through the EXPLAIN analyzer's rules (``pgpilot.explain``); ``SHOW SLOW`` lists
per fingerprint how many slow statements were seen, the slowest, and the top findings with
their fixes; the last ``slow_query_keep`` reports per fingerprint are served as JSON
(``GET /slow`` on the metrics port). Parameter values are never kept (the plan's constants are
masked in the findings, the plan itself is left out) unless ``log_parameters = 1``.

On the compiled fast path the engine reports, per statement key and batch, its slowest run
(stats.py): the text the engine saw first for that key is explained; a statement with ``$n``
parameters there is explained with PostgreSQL 16's ``GENERIC_PLAN``, and not at all on older
servers.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import random
import re
import struct
import time
from typing import TYPE_CHECKING, Any

from pgpilot.insight.fingerprint import COMMAND_READ, COMMAND_WRITE, describe

if TYPE_CHECKING:
    from pgpilot.proxy.config import Config
    from pgpilot.proxy.pool import Pool
    from pgpilot.proxy.pooler import Pooler

log = logging.getLogger("pgpilot.proxy")

EXPLAIN_INTERVAL = 10.0  # seconds between two EXPLAINs of one fingerprint (per process)
MAX_ENTRIES = 500  # fingerprints SHOW SLOW keeps per process
TOP_FINDINGS = 3
_QUOTED = re.compile(r"'(?:[^']|'')*'")
_COMPARED_NUMBER = re.compile(r"([=<>]\s*\(?)-?\d+(?:\.\d+)?")
_DOLLAR = re.compile(r"\$\d")

Bind = tuple[list[bytes | None], list[int], list[int]]  # values, type oids, formats


def mask(text: str) -> str:
    """A plan's words with the constants it compares with masked (they are parameter values)."""
    return _COMPARED_NUMBER.sub(r"\1?", _QUOTED.sub("'?'", text))


def parse_bind(body: bytes, types: list[int]) -> Bind | None:
    """A Bind message's parameters: values (None for NULL), type oids (the Parse's, 0 for the
    rest), formats per value. None when it does not read as a Bind."""
    try:
        pos = body.index(b"\x00") + 1
        pos = body.index(b"\x00", pos) + 1
        (nfmt,) = struct.unpack_from("!h", body, pos)
        pos += 2
        fmts = list(struct.unpack_from(f"!{nfmt}h", body, pos))
        pos += 2 * nfmt
        (nparams,) = struct.unpack_from("!h", body, pos)
        pos += 2
        values: list[bytes | None] = []
        for _ in range(nparams):
            (length,) = struct.unpack_from("!i", body, pos)
            pos += 4
            if length < 0:
                values.append(None)
            else:
                values.append(body[pos:pos + length])
                pos += length
    except (ValueError, struct.error):
        return None
    formats = fmts * nparams if len(fmts) == 1 else fmts if fmts else [0] * nparams
    if len(formats) != nparams:
        return None
    oids = (types + [0] * nparams)[:nparams]
    return values, oids, formats


class SlowEntry:
    """One (database, user, fingerprint): its slow statements and the reports on them."""

    __slots__ = ("count", "database", "explained", "fingerprint", "last_explain", "last_ms",
                 "max_ms", "note", "query", "reports", "skipped", "user")

    def __init__(self, database: str, user: str, fingerprint: str, query: str,
                 keep: int) -> None:
        self.database = database
        self.user = user
        self.fingerprint = fingerprint
        self.query = query
        self.count = 0
        self.explained = 0
        self.skipped = 0  # sampled out, rate-limited or over the concurrency limit
        self.max_ms = 0.0
        self.last_ms = 0.0
        self.last_explain = 0.0  # monotonic
        self.note = ""
        self.reports: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)

    def to_json(self, reports: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "database": self.database, "user": self.user, "fingerprint": self.fingerprint,
            "query": self.query, "slow_calls": self.count, "explained": self.explained,
            "skipped": self.skipped, "max_ms": self.max_ms, "last_ms": self.last_ms,
            "note": self.note}
        if reports:
            out["reports"] = list(self.reports)
        return out


class SlowQueries:
    """One per pooler process."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self.entries: dict[tuple[str, str, str], SlowEntry] = {}
        self.running = 0
        self._tasks: set[asyncio.Future[Any]] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """Threads of their own for the EXPLAIN connections (and the advisor's reads), so that
        they never hold up the event loop's default executor (getaddrinfo for server logins)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(self.pooler.config.slow_query_max_concurrent, 1) + 1,
                thread_name_prefix="pgpilot-explain")
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def threshold(self) -> float:
        return self.pooler.config.slow_query_threshold

    def offer(self, pool: Pool, text: bytes, seconds: float, bind: Bind | None = None,
              slow_calls: int = 1) -> None:
        """A statement (or ``slow_calls`` of them) took ``seconds``, at or over the threshold."""
        cfg = self.pooler.config
        fingerprint, sample = self.pooler.query_stats.shape_of(text)
        key = (pool.db_name, pool.user, fingerprint)
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= MAX_ENTRIES:
                return
            entry = self.entries[key] = SlowEntry(pool.db_name, pool.user, fingerprint, sample,
                                                  max(cfg.slow_query_keep, 1))
        ms = seconds * 1e3
        entry.count += slow_calls
        entry.last_ms = ms
        entry.max_ms = max(entry.max_ms, ms)
        self.pooler.query_stats.changed()
        statement = describe(text.decode("utf-8", errors="replace"))
        if statement.command not in (COMMAND_READ, COMMAND_WRITE) or not statement.parsed:
            entry.note = "not explained: not a single read or write"
            return
        now = time.monotonic()
        if random.random() >= cfg.slow_query_sample_rate or (
                entry.last_explain and now - entry.last_explain < EXPLAIN_INTERVAL) \
                or self.running >= max(cfg.slow_query_max_concurrent, 1):
            entry.skipped += slow_calls
            return
        conninfo = conninfo_for(pool)
        if conninfo is None:
            entry.note = "not explained: auth_file holds no usable password for a separate " \
                         "connection"
            return
        entry.last_explain = now
        self.running += 1
        sql = text.decode("utf-8", errors="replace")
        analyze = cfg.slow_query_explain_analyze
        timeout = cfg.slow_query_explain_timeout or 5.0
        future = asyncio.get_running_loop().run_in_executor(
            self.executor(), explain, conninfo, sql, bind, analyze, timeout)
        self._tasks.add(future)
        future.add_done_callback(
            lambda done: self._explained(done, entry, sql, ms, analyze, bind is not None))

    def _explained(self, done: asyncio.Future[Any], entry: SlowEntry, sql: str, ms: float,
                   analyze: bool, bound: bool) -> None:
        self._tasks.discard(done)
        self.running -= 1
        try:
            plan, analyzed, note = done.result()
        except Exception as exc:  # the connection, the EXPLAIN, the analyzer
            entry.note = f"not explained: {type(exc).__name__}: {mask(str(exc))[:200]}"
            log.info("slow query not explained (%s): %s", entry.fingerprint, entry.note)
            return
        from pgpilot.explain import ExplainError, analyze_plan

        keep_values = self.pooler.config.log_parameters
        try:
            report = analyze_plan(plan, sql=sql)
        except ExplainError as exc:
            entry.note = f"not explained: {exc}"
            return
        findings = []
        for finding in report.findings:
            item = finding.to_dict()
            if not keep_values:
                item = {k: mask(v) if isinstance(v, str) else v for k, v in item.items()}
            findings.append(item)
        record: dict[str, Any] = {
            "at": time.time(), "duration_ms": ms, "analyzed": analyzed,
            "with_parameters": bound, "findings": findings,
            "summary": {k: v for k, v in report.summary().items() if k != "statement"},
            "note": note}
        if keep_values:
            record["plan"] = plan
            record["statement"] = sql
        entry.reports.append(record)
        entry.explained += 1
        entry.note = note
        self.pooler.query_stats.changed()

    # -- reading ---------------------------------------------------------------------------
    def merged(self, siblings: list[dict[str, Any]]) -> list[SlowEntry]:
        out = {(e.database, e.user, e.fingerprint): e for e in self.entries.values()}
        merged: dict[tuple[str, str, str], SlowEntry] = {}
        for key, entry in out.items():
            copy = SlowEntry(*key, entry.query, max(self.pooler.config.slow_query_keep, 1))
            _merge(copy, entry.to_json())
            merged[key] = copy
        for row in siblings:
            try:
                key = (str(row["database"]), str(row["user"]), str(row["fingerprint"]))
                target = merged.get(key)
                if target is None:
                    target = merged[key] = SlowEntry(*key, str(row["query"]),
                                                     max(self.pooler.config.slow_query_keep, 1))
                _merge(target, row)
            except (KeyError, TypeError, ValueError):
                continue
        return sorted(merged.values(), key=lambda e: e.max_ms, reverse=True)


def conninfo_for(pool: Pool) -> dict[str, Any] | None:
    """How to open a connection of its own to ``pool``'s database as its server user (None
    when auth_file holds only a SCRAM or md5 secret for it)."""
    user, password = pool.server_credentials()
    if password is not None and password.startswith(("SCRAM-SHA-256$", "md5")):
        return None
    conninfo: dict[str, Any] = {"dbname": pool.server_dbname, "user": user,
                                "port": pool.db.port, "application_name": "pgpilot-explain"}
    if pool.db.host:
        conninfo["host"] = pool.db.host
    if password:
        conninfo["password"] = password
    conninfo.update(server_tls_conninfo(pool.pooler.config))
    return conninfo


def server_tls_conninfo(config: Config) -> dict[str, str]:
    """libpq's TLS parameters for a connection of the pooler's own to a server, as
    ``server_tls_*`` make its server connections (tls.py): never libpq's defaults (sslmode
    prefer, no check of the certificate) nor PGSSLMODE, so that such a connection, and the
    password it sends, are never in clear text or to an unchecked server where the pooler's
    are not. ``require`` (and ``prefer``, ``allow``) check no certificate, as tls.py."""
    mode = config.server_tls_sslmode
    params = {"sslmode": mode}
    if mode in ("verify-ca", "verify-full"):
        # The pooler checks against the system's roots without a CA file (libpq 16+ says so
        # with "system"; an older one reads ~/.postgresql/root.crt, or refuses).
        from psycopg import pq

        if config.server_tls_ca_file:
            params["sslrootcert"] = config.server_tls_ca_file
        elif pq.version() >= 160000:
            params["sslrootcert"] = "system"
    if mode != "disable" and config.server_tls_cert_file and config.server_tls_key_file:
        params["sslcert"] = config.server_tls_cert_file
        params["sslkey"] = config.server_tls_key_file
    return params


def _merge(target: SlowEntry, row: dict[str, Any]) -> None:
    target.count += int(row["slow_calls"])
    target.explained += int(row["explained"])
    target.skipped += int(row["skipped"])
    target.max_ms = max(target.max_ms, float(row["max_ms"]))
    target.last_ms = float(row["last_ms"]) or target.last_ms
    target.note = target.note or str(row.get("note") or "")
    for report in row.get("reports", ()):
        target.reports.append(report)


def explain(conninfo: dict[str, Any], sql: str, bind: Bind | None, analyze: bool,
            timeout: float) -> tuple[Any, bool, str]:
    """Run the EXPLAIN (in a worker thread): (the JSON plan, analyzed, a note)."""
    import psycopg
    from psycopg.pq import ExecStatus

    with psycopg.connect(**conninfo, autocommit=True, connect_timeout=max(int(timeout), 1),
                         options=f"-c statement_timeout={int(timeout * 1000)}") as conn:
        note = ""
        options = ["FORMAT JSON"]
        if bind is None and _DOLLAR.search(sql):
            if conn.info.server_version < 160000:
                raise RuntimeError("its parameters are not at hand (fast path) and PostgreSQL "
                                   "before 16 has no GENERIC_PLAN")
            options.insert(0, "GENERIC_PLAN")
            note = "generic plan (parameters not at hand)"
            analyze = False
        if analyze:
            options[:0] = ["ANALYZE", "BUFFERS"]
            conn.execute("BEGIN")  # whatever it runs is rolled back
        try:
            command = f"EXPLAIN ({', '.join(options)}) {sql}".encode()
            values, types, formats = bind if bind is not None else (None, None, None)
            result = conn.pgconn.exec_params(command, values, types, formats, 0)
            if result.status != ExecStatus.TUPLES_OK:
                message = result.error_field(psycopg.pq.DiagnosticField.MESSAGE_PRIMARY)
                raise RuntimeError((message or b"EXPLAIN failed").decode(errors="replace"))
            value = result.get_value(0, 0)
        finally:
            if analyze:
                conn.execute("ROLLBACK")
    plan = json.loads(value.decode() if value is not None else "null")
    return plan, analyze, note


SLOW_COLUMNS = (
    ("database", 25), ("user", 25), ("fingerprint", 25), ("query", 25), ("slow_calls", 20),
    ("explained", 20), ("max_ms", 1700), ("last_ms", 1700), ("findings", 25), ("fix", 25),
    ("note", 25),
)


def slow_rows(entries: list[SlowEntry]) -> list[list[Any]]:
    rows = []
    for e in entries:
        findings = e.reports[-1]["findings"][:TOP_FINDINGS] if e.reports else []
        rows.append([e.database, e.user, e.fingerprint, e.query, e.count, e.explained,
                     f"{e.max_ms:.3f}", f"{e.last_ms:.3f}",
                     "; ".join(f"{f['severity']} {f['rule']}: {f['message']}" for f in findings),
                     findings[0]["fix"] if findings else "", e.note])
    return rows


__all__ = ["SLOW_COLUMNS", "SlowEntry", "SlowQueries", "conninfo_for", "explain", "mask",
           "parse_bind",
           "slow_rows"]
