"""The index and statistics advisor: propose from the parse tree, prove on the real database.

Candidates come from the statement's parse tree (``sqlinfo.query_shape``): per table,
equality columns first, then one range column, then the ORDER BY columns; a variant with
INCLUDE columns for an index-only scan; a partial variant that moves constant filters into
the index's WHERE. A candidate whose key is a prefix of an existing index is skipped.

Each candidate is proven by planning the statement with it: as a HypoPG hypothetical index
(nothing is built, nothing is locked) or, with ``validate="real"``, by building it inside
BEGIN ... ROLLBACK. A candidate is recommended only if it *pays*: the planner uses it and the
plan's total cost falls by at least ``PAYS_MIN_IMPROVEMENT`` (30%). The recommendation is a
ready ``CREATE INDEX CONCURRENTLY`` statement.
Where HypoPG is not there (not installed, or not creatable by this role) and ``validate`` is
``"auto"``, the candidates are listed as not proven, and the advice says that nothing could be
proven, why, and how to make it provable rather than that no index pays.

For a ``row_misestimate`` on a scan filtered on several columns of one table, a
``CREATE STATISTICS (dependencies, mcv)`` is proposed, and the estimate is shown before and
after it (created, ANALYZEd, and rolled back).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgpilot.explain.live import connect, explain_json, relation_schemas, statement_error
from pgpilot.explain.model import ExplainError, Plan, PlanNode
from pgpilot.explain.parse import plan_from_json
from pgpilot.explain.report import Report, analyze_plan
from pgpilot.explain.rules import MISESTIMATE_FACTOR, fmt_ms, fmt_rows, own_predicates
from pgpilot.explain.sqlinfo import Predicate, QueryShape, TableRef, query_shape, quote_ident

PAYS_MIN_IMPROVEMENT = 0.30  # the plan's total cost must fall by at least this fraction
MAX_INCLUDE_COLUMNS = 4  # beyond this an INCLUDE list makes the index too wide to pay
MAX_CANDIDATES = 12
# A constant equality goes into a partial index's WHERE only on a column with at most this
# many distinct values (a status, a type); on anything more selective it belongs in the key.
PARTIAL_MAX_DISTINCT = 20
STATISTICS_MIN_GAIN = 2.0  # the estimate's error must shrink at least this many times

VALIDATION_METHODS = ("auto", "hypopg", "real")
# How to make candidates provable when HypoPG was not there to prove them: the first part
# depends on whether the server has HypoPG installed; the second is always there.
INSTALL_HYPOPG = (
    "install HypoPG on the server (the postgresql-<version>-hypopg package) and run "
    "CREATE EXTENSION hypopg in this database as a superuser"
)
CREATE_HYPOPG = "have a superuser run CREATE EXTENSION hypopg in this database"
VALIDATE_REAL = (
    "rerun with --validate real (builds each candidate inside BEGIN ... ROLLBACK: nothing is "
    "kept, but writes to the table wait while each index is built)"
)


@dataclass
class TableInfo:
    ref: TableRef
    oid: int
    schema: str
    name: str
    columns: list[str]
    indexes: list[tuple[str, list[str | None], list[str], bool]]  # name, keys, include, partial
    n_distinct: dict[str, float] = field(default_factory=dict)  # pg_stats, negative = fraction

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"


@dataclass
class IndexCandidate:
    table: TableInfo
    columns: list[str]
    include: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    reason: str = ""
    # Columns filtered with LIKE 'prefix%': under a non-C collation only text_pattern_ops
    # lets a btree serve that.
    pattern_columns: frozenset[str] = frozenset()

    @property
    def key(self) -> tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        return (self.table.qualified, tuple(self.columns), tuple(self.include),
                tuple(self.where))

    @property
    def name(self) -> str:
        name = "_".join([self.table.name, *self.columns, "idx"])
        if self.where:
            name = name.removesuffix("_idx") + "_partial_idx"
        return re.sub(r"[^a-z0-9_]", "_", name.lower())[:63]

    def ddl(self, *, concurrently: bool = True, name: str | None = None) -> str:
        columns = ", ".join(
            quote_ident(c) + (" text_pattern_ops" if c in self.pattern_columns else "")
            for c in self.columns)
        text = "CREATE INDEX "
        if concurrently:
            text += "CONCURRENTLY "
        if name:
            text += f"{name} "
        text += f"ON {self.table.qualified} ({columns})"
        if self.include:
            text += f" INCLUDE ({', '.join(quote_ident(c) for c in self.include)})"
        if self.where:
            text += f" WHERE {' AND '.join(self.where)}"
        return text


@dataclass
class CandidateResult:
    candidate: IndexCandidate
    cost_before: float
    cost_after: float | None
    used: bool
    plan_after: list[str]
    time_before_ms: float | None = None
    time_after_ms: float | None = None

    @property
    def improvement(self) -> float:
        if self.cost_after is None or self.cost_before <= 0:
            return 0.0
        return 1.0 - self.cost_after / self.cost_before

    @property
    def pays(self) -> bool:
        return self.used and self.improvement >= PAYS_MIN_IMPROVEMENT

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.candidate.ddl(concurrently=False),
            "reason": self.candidate.reason,
            "cost_before": self.cost_before,
            "cost_after": self.cost_after,
            "improvement": round(self.improvement, 4),
            "used": self.used,
            "pays": self.pays,
            "plan_after": self.plan_after,
            "time_before_ms": self.time_before_ms,
            "time_after_ms": self.time_after_ms,
        }


@dataclass
class StatisticsProposal:
    table: str
    columns: list[str]
    ddl: str
    node: str
    estimate_before: float
    estimate_after: float | None
    actual: float

    @property
    def helps(self) -> bool:
        if self.estimate_after is None:
            return False
        error_before = _error(self.estimate_before, self.actual)
        error_after = _error(self.estimate_after, self.actual)
        return error_after * STATISTICS_MIN_GAIN <= error_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistics": self.ddl,
            "node": self.node,
            "estimate_before": self.estimate_before,
            "estimate_after": self.estimate_after,
            "actual": self.actual,
            "helps": self.helps,
        }


def _error(estimate: float, actual: float) -> float:
    larger, smaller = max(estimate, actual, 1.0), max(min(estimate, actual), 1.0)
    return larger / smaller


@dataclass
class Advice:
    statement: str
    validation: str  # hypopg | real | none
    baseline: Report
    cost_before: float
    results: list[CandidateResult] = field(default_factory=list)
    unproven: list[IndexCandidate] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    statistics: list[StatisticsProposal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unproven_reason: str | None = None
    """Why the ``unproven`` candidates were not tested (HypoPG missing, or not creatable)."""
    proof_hint: str | None = None
    """How to make them provable: HypoPG in this database, or ``--validate real``."""

    @property
    def recommendations(self) -> list[CandidateResult]:
        """The best paying candidate per table, cheapest plan first."""
        best: dict[str, CandidateResult] = {}
        for result in self.results:
            if not result.pays:
                continue
            table = result.candidate.table.qualified
            current = best.get(table)
            if current is None or _better(result, current):
                best[table] = result
        return sorted(best.values(), key=lambda r: r.cost_after or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "statement": self.statement,
            "validation": self.validation,
            "pays_threshold": PAYS_MIN_IMPROVEMENT,
            "cost_before": self.cost_before,
            "candidates": [r.to_dict() for r in self.results],
            "unproven": [c.ddl(concurrently=False) for c in self.unproven],
            "unproven_reason": self.unproven_reason,
            "proof_hint": self.proof_hint,
            "skipped": self.skipped,
            "recommendations": [r.candidate.ddl(name=r.candidate.name) + ";"
                                for r in self.recommendations],
            "statistics": [s.to_dict() for s in self.statistics],
            "findings": [f.to_dict() for f in self.baseline.findings],
            "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self) -> str:
        lines = [f"Statement: {' '.join(self.statement.split())}"]
        method = {"hypopg": "HypoPG hypothetical indexes (nothing built)",
                  "real": "real indexes built inside BEGIN ... ROLLBACK",
                  "none": f"none ({self.unproven_reason or 'HypoPG is not available'})"
                  }[self.validation]
        lines.append(f"Validation: {method}")
        plan = self.baseline.plan
        baseline = f"Plan cost now: {self.cost_before:,.0f}"
        if plan.analyzed:
            baseline += f", execution {fmt_ms(plan.total_time)}"
        lines.append(baseline)
        lines.extend(f"Note: {note}" for note in self.notes)
        if self.baseline.findings:
            lines.append("Findings in the current plan:")
            for finding in self.baseline.findings:
                lines.append(f"  {finding.severity} {finding.rule}: {finding.message}")
        lines.append("")
        lines.append(f"Index candidates (pay = used by the plan and cost "
                     f"-{PAYS_MIN_IMPROVEMENT:.0%} or better):")
        if not (self.results or self.unproven or self.skipped):
            lines.append("  none: the statement has no filter, join or ORDER BY column to index")
        for result in self.results:
            verdict = "PAYS " if result.pays else "no   "
            after = f"{result.cost_after:,.0f}" if result.cost_after is not None else "?"
            lines.append(f"  {verdict} {result.candidate.ddl(concurrently=False)}")
            detail = (f"        cost {result.cost_before:,.0f} -> {after} "
                      f"({-result.improvement:+.0%}), {'used' if result.used else 'not used'}")
            if result.time_after_ms is not None:
                detail += (f", time {fmt_ms(result.time_before_ms)} -> "
                           f"{fmt_ms(result.time_after_ms)}")
            lines.append(detail)
            if result.plan_after:
                lines.append(f"        plan: {'; '.join(result.plan_after)}")
        for candidate in self.unproven:
            lines.append(f"  ?     {candidate.ddl(concurrently=False)} (not proven)")
        for skipped in self.skipped:
            lines.append(f"  skip  {skipped['index']}: {skipped['reason']}")
        lines.append("")
        recommended = self.recommendations
        if recommended:
            lines.append("Recommended:")
            for result in recommended:
                lines.append(f"  {result.candidate.ddl(name=result.candidate.name)};")
        elif self.unproven:
            count = len(self.unproven)
            lines.append("Recommended: nothing could be proven "
                         f"(the {'candidate' if count == 1 else f'{count} candidates'} above "
                         f"{'was' if count == 1 else 'were'} not tested).")
            hint = self.proof_hint or f"{INSTALL_HYPOPG}, or {VALIDATE_REAL}"
            lines.append(f"  To prove {'it' if count == 1 else 'them'}: {hint}.")
        elif self.results:
            lines.append("Recommended: no index pays for this statement.")
        else:
            lines.append("Recommended: no index to propose for this statement.")
        if self.statistics:
            lines.append("")
            lines.append("Statistics (for row misestimates on correlated columns):")
            for proposal in self.statistics:
                after = fmt_rows(proposal.estimate_after)
                verdict = "helps" if proposal.helps else "does not help"
                lines.append(f"  {proposal.ddl}")
                before = fmt_rows(proposal.estimate_before)
                lines.append(f"        {proposal.node}: estimate {before}"
                             f" -> {after} rows, actual {fmt_rows(proposal.actual)} ({verdict})")
        return "\n".join(lines)


def _better(a: CandidateResult, b: CandidateResult) -> bool:
    """Cheaper plan wins; within 2% the narrower index wins."""
    cost_a, cost_b = a.cost_after or 0.0, b.cost_after or 0.0
    width_a = len(a.candidate.columns) + len(a.candidate.include)
    width_b = len(b.candidate.columns) + len(b.candidate.include)
    if abs(cost_a - cost_b) <= 0.02 * max(cost_a, cost_b, 1.0):
        return width_a < width_b
    return cost_a < cost_b


# ----------------------------------------------------------------------------------------------
# catalog


def load_tables(conn: psycopg.Connection[Any], shape: QueryShape) -> dict[str, TableInfo]:
    """The statement's real tables by alias (CTE names and functions are left out)."""
    tables: dict[str, TableInfo] = {}
    with conn.cursor() as cur:
        for ref in shape.tables:
            if ref.alias in tables:
                continue
            cur.execute(
                "SELECT c.oid::int, n.nspname, c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.oid = to_regclass(%s) AND c.relkind IN ('r', 'p', 'm')",
                (".".join(quote_ident(part) for part in (ref.schema, ref.name) if part),),
            )
            row = cur.fetchone()
            if row is None:
                continue
            oid, schema, name = int(row[0]), str(row[1]), str(row[2])
            cur.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
                "AND NOT attisdropped ORDER BY attnum", (oid,))
            columns = [str(r[0]) for r in cur.fetchall()]
            cur.execute(
                "SELECT i.indexrelid::regclass::text, i.indnkeyatts, i.indpred IS NOT NULL, "
                "ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, pos) "
                "LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                "ORDER BY k.pos) FROM pg_index i WHERE i.indrelid = %s AND i.indisvalid",
                (oid,))
            indexes = []
            for index_name, nkey, partial, names in cur.fetchall():
                names = list(names)
                indexes.append((str(index_name), names[:nkey], [str(n) for n in names[nkey:] if n],
                                bool(partial)))
            cur.execute("SELECT attname::text, n_distinct FROM pg_stats "
                        "WHERE schemaname = %s AND tablename = %s", (schema, name))
            n_distinct = {str(r[0]): float(r[1]) for r in cur.fetchall() if r[1] is not None}
            tables[ref.alias] = TableInfo(ref, oid, schema, name, columns, indexes, n_distinct)
    return tables


def _owner(table: str | None, column: str, tables: dict[str, TableInfo]) -> TableInfo | None:
    if table is not None:
        return tables.get(table)
    owners = [t for t in tables.values() if column in t.columns]
    return owners[0] if len(owners) == 1 else None


# ----------------------------------------------------------------------------------------------
# candidates


def build_candidates(shape: QueryShape, tables: dict[str, TableInfo]
                     ) -> tuple[list[IndexCandidate], list[dict[str, str]]]:
    """Candidate indexes per table, and the ones left out because an index covers them."""
    per_table: dict[str, list[Predicate]] = {}
    for predicate in shape.predicates:
        owner = _owner(predicate.table, predicate.column, tables)
        if owner is not None and predicate.column in owner.columns and not predicate.cast:
            per_table.setdefault(owner.qualified, []).append(predicate)
    joins: dict[str, list[str]] = {}
    for alias, column in shape.join_columns:
        owner = _owner(alias, column, tables)
        if owner is not None and column in owner.columns:
            joins.setdefault(owner.qualified, [])
            if column not in joins[owner.qualified]:
                joins[owner.qualified].append(column)
    order: dict[str, list[str]] = {}
    order_owners = [_owner(t, c, tables) for t, c, _ in shape.order_by]
    # Only an ORDER BY on one table's columns can be served by one index.
    owner_names = {o.qualified if o else None for o in order_owners}
    if order_owners and len(owner_names) == 1 and order_owners[0] is not None:
        order[order_owners[0].qualified] = [c for _, c, _ in shape.order_by]
    selected: dict[str, list[str]] = {}
    for alias, column in shape.selected:
        owner = _owner(alias, column, tables)
        if owner is not None and column in owner.columns:
            selected.setdefault(owner.qualified, [])
            if column not in selected[owner.qualified]:
                selected[owner.qualified].append(column)

    candidates: list[IndexCandidate] = []
    by_name = {t.qualified: t for t in tables.values()}
    for qualified, table in by_name.items():
        predicates = per_table.get(qualified, [])
        eq = _unique([p.column for p in predicates if p.kind in ("eq", "null", "bool")])
        ranges = _unique([p.column for p in predicates if p.kind == "range"])
        order_cols = order.get(qualified, [])
        join_cols = joins.get(qualified, [])
        found: list[IndexCandidate] = []
        if eq or ranges or order_cols:
            key = _unique(eq + ranges[:1] + order_cols)
            found.append(IndexCandidate(table, key, reason="equality, range, ORDER BY columns"))
            if ranges and order_cols and order_cols[0] not in ranges[:1]:
                found.append(IndexCandidate(table, _unique(eq + order_cols),
                                            reason="equality then ORDER BY columns (no sort)"))
        if join_cols and not any(
                not partial and keys[: len(join_cols)] == join_cols
                for _, keys, _, partial in table.indexes):
            # (an index already leads with the join columns: per-row lookups are served)
            found.append(IndexCandidate(table, _unique(join_cols + eq + ranges[:1]),
                                        reason="join columns, for a per-row lookup"))
        if found and not shape.selects_star and shape.kind == "select":
            wanted = selected.get(qualified, [])
            base = found[0]
            include = [c for c in wanted if c not in base.columns]
            if include and len(include) <= MAX_INCLUDE_COLUMNS and _only_columns_of(
                    table, shape, base.columns + include, tables):
                found.append(IndexCandidate(table, base.columns, include=include,
                                            reason="INCLUDE selected columns: index-only scan"))
        constants = [p for p in predicates if _partial_condition(p, table)]
        if constants:
            constant_cols = {p.column for p in constants}
            rest = [c for c in _unique(eq + ranges[:1] + order_cols) if c not in constant_cols]
            rest = rest or join_cols[:1] or [constants[0].column]
            found.append(IndexCandidate(table, rest, where=[p.sql for p in constants],
                                        reason="partial index: constant filters in WHERE"))
        patterns = frozenset(p.column for p in predicates if p.pattern)
        for candidate in found:
            candidate.pattern_columns = patterns & set(candidate.columns)
        candidates.extend(found)
    unique: dict[Any, IndexCandidate] = {}
    skipped: list[dict[str, str]] = []
    for candidate in candidates:
        if candidate.key in unique:
            continue
        covering = _covered_by(candidate)
        if covering:
            skipped.append({"index": candidate.ddl(concurrently=False),
                            "reason": f"covered by the existing index {covering}"})
            continue
        unique[candidate.key] = candidate
    return list(unique.values())[:MAX_CANDIDATES], skipped


def _partial_condition(predicate: Predicate, table: TableInfo) -> bool:
    """Whether a condition suits a partial index's WHERE: constant and not selective."""
    if not predicate.constant:
        return False
    if predicate.kind in ("null", "bool"):
        return True
    distinct = table.n_distinct.get(predicate.column)
    return (predicate.kind == "eq" and " IN " not in predicate.sql and distinct is not None
            and 0 < distinct <= PARTIAL_MAX_DISTINCT)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _only_columns_of(table: TableInfo, shape: QueryShape, columns: list[str],
                     tables: dict[str, TableInfo]) -> bool:
    """Whether every column the statement reads from ``table`` is in ``columns``."""
    used = [c for t, c in shape.selected + [(p.table, p.column) for p in shape.predicates]
            + [(t, c) for t, c, _ in shape.order_by] + shape.join_columns
            if _owner(t, c, tables) is table]
    return all(c in columns for c in used)


def _covered_by(candidate: IndexCandidate) -> str | None:
    """An existing index that already serves this candidate, if any."""
    if candidate.pattern_columns:
        return None  # the operator class matters; let the planner decide
    for name, keys, include, partial in candidate.table.indexes:
        # An existing partial index serves only its own WHERE; comparing predicates is
        # not worth the risk of skipping a good candidate, so it never counts as covering.
        if partial:
            continue
        if keys[: len(candidate.columns)] != candidate.columns:
            continue
        available = {k for k in keys if k} | set(include)
        if all(c in available for c in candidate.include):
            return name
    return None


# ----------------------------------------------------------------------------------------------
# proving


def _plan_cost(plan_json: Any) -> tuple[float, Plan]:
    plan = plan_from_json(plan_json)
    return plan.root.total_cost or 0.0, plan


def _access_paths(plan: Plan) -> list[str]:
    return [n.label for n in plan.nodes if n.relation or n.index_name]


def _uses(plan: Plan, index_name: str) -> bool:
    wanted = index_name.strip('"')
    return any((n.index_name or "").strip('"') == wanted for n in plan.nodes)


def hypopg_ready(conn: psycopg.Connection[Any]) -> bool:
    """Make HypoPG usable in the current transaction (CREATE EXTENSION is rolled back too)."""
    return hypopg_unavailable(conn) is None


def hypopg_unavailable(conn: psycopg.Connection[Any]) -> tuple[str, str] | None:
    """Make HypoPG usable in the current transaction, or say why it cannot be.

    None when it is ready (already created in the database, or created now inside the
    transaction, so it is rolled back with it); otherwise (why not, how to make it possible),
    both for a person.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_extension WHERE extname = 'hypopg'")
        if cur.fetchone():
            return None
        cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'hypopg'")
        if cur.fetchone() is None:
            return "HypoPG is not installed on this server", f"{INSTALL_HYPOPG}, or {VALIDATE_REAL}"
        try:
            cur.execute("SAVEPOINT pgpilot_hypopg")
            cur.execute("CREATE EXTENSION hypopg")
        except psycopg.Error as exc:
            cur.execute("ROLLBACK TO SAVEPOINT pgpilot_hypopg")
            detail = (exc.diag.message_primary or str(exc)).strip()
            return (
                "HypoPG is installed on this server but not created in this database, and this "
                f"role cannot create it: {detail}",
                f"{CREATE_HYPOPG}, or {VALIDATE_REAL}",
            )
    return None


def prove_with_hypopg(conn: psycopg.Connection[Any], sql: str, cost_before: float,
                      candidates: list[IndexCandidate]) -> list[CandidateResult]:
    results = []
    with conn.cursor() as cur:
        for candidate in candidates:
            cur.execute("SELECT indexname FROM hypopg_create_index(%s)",
                        (candidate.ddl(concurrently=False),))
            row = cur.fetchone()
            index_name = str(row[0]) if row else ""
            cost, plan = _plan_cost(explain_json(conn, sql, analyze=False))
            results.append(CandidateResult(candidate, cost_before, cost, _uses(plan, index_name),
                                           _access_paths(plan)))
            cur.execute("SELECT hypopg_reset()")
    return results


def prove_for_real(conn: psycopg.Connection[Any], sql: str, cost_before: float,
                   time_before: float | None, candidates: list[IndexCandidate],
                   analyze: bool, statement_timeout_ms: int | None = None
                   ) -> list[CandidateResult]:
    """Build each candidate inside a transaction, plan (and run) with it, roll back."""
    results = []
    for number, candidate in enumerate(candidates, 1):
        name = f"pgpilot_candidate_{number}"
        try:
            with conn.cursor() as cur:
                cur.execute("SET LOCAL lock_timeout = '5s'")
                cur.execute(candidate.ddl(concurrently=False, name=name).encode())
            cost, plan = _plan_cost(explain_json(conn, sql, analyze=False))
            time_after = None
            if analyze:
                _, run_plan = _plan_cost(explain_json(
                    conn, sql, analyze=True, statement_timeout_ms=statement_timeout_ms))
                time_after = run_plan.total_time
        except psycopg.Error as exc:
            raise statement_error(exc) from None
        finally:
            conn.rollback()
        results.append(CandidateResult(candidate, cost_before, cost, _uses(plan, name),
                                       _access_paths(plan), time_before, time_after))
    return results


def _misestimated_scans(report: Report) -> list[PlanNode]:
    nodes = []
    for node in report.plan.nodes:
        if not node.relation or node.actual_rows is None or node.plan_rows is None:
            continue
        if _error(node.plan_rows, node.actual_rows) < MISESTIMATE_FACTOR:
            continue
        nodes.append(node)
    return nodes


def propose_statistics(conn: psycopg.Connection[Any], sql: str, report: Report,
                       tables: dict[str, TableInfo]) -> list[StatisticsProposal]:
    """CREATE STATISTICS for misestimated scans filtered on several columns, with proof."""
    if "row_misestimate" not in report.rules_fired:
        return []
    proposals = []
    for node in _misestimated_scans(report):
        table = tables.get(node.alias or "") or next(
            (t for t in tables.values() if t.name == node.relation), None)
        if table is None:
            continue
        predicates = own_predicates(node, node.filter) + own_predicates(node, node.index_cond)
        columns = _unique([p.column for p in predicates
                           if p.kind in ("eq", "range", "bool") and p.column in table.columns])
        if len(columns) < 2:
            continue
        name = re.sub(r"[^a-z0-9_]", "_", f"{table.name}_{'_'.join(columns)}_stats".lower())[:63]
        ddl = (f"CREATE STATISTICS {name} (dependencies, mcv) ON "
               f"{', '.join(quote_ident(c) for c in columns)} FROM {table.qualified};")
        estimate_after = None
        try:
            with conn.cursor() as cur:
                cur.execute(ddl.encode())
                cur.execute(f"ANALYZE {table.qualified}".encode())
            _, plan = _plan_cost(explain_json(conn, sql, analyze=False))
            same = [n for n in plan.nodes
                    if n.relation == node.relation and n.alias == node.alias]
            if same:
                estimate_after = same[0].plan_rows
        except psycopg.Error as exc:
            raise statement_error(exc) from None
        finally:
            conn.rollback()
        proposals.append(StatisticsProposal(
            table.qualified, columns, ddl + f" ANALYZE {table.qualified};",
            f"#{node.node_id} {node.label}", node.plan_rows or 0.0, estimate_after,
            node.actual_rows or 0.0))
    return proposals


def advise(dsn: str, sql: str, *, validate: str = "auto", analyze: bool = True,
           statement_timeout_ms: int | None = None) -> Advice:
    """Propose indexes and statistics for ``sql`` and prove them on the database at ``dsn``.

    ``statement_timeout_ms`` bounds each run of the statement (the baseline EXPLAIN ANALYZE
    and, with ``validate="real"``, the run with each candidate).
    """
    if validate not in VALIDATION_METHODS:
        raise ExplainError(f"--validate must be one of {', '.join(VALIDATION_METHODS)}")
    shape = query_shape(sql)
    with connect(dsn) as conn:
        try:
            tables = load_tables(conn, shape)
            cost_before, _ = _plan_cost(explain_json(conn, sql, analyze=False))
            if analyze:
                plan_json = explain_json(conn, sql, analyze=True,
                                         statement_timeout_ms=statement_timeout_ms)
            else:
                plan_json = explain_json(conn, sql, analyze=False)
            schemas = relation_schemas(conn, plan_json, sql)
        finally:
            conn.rollback()
        baseline = analyze_plan(plan_json, sql=sql, schemas=schemas)
        candidates, skipped = build_candidates(shape, tables)
        advice = Advice(sql, "none", baseline, cost_before, skipped=skipped)
        if shape.modifies and analyze:
            advice.notes.append(f"data-modifying statement ({shape.kind.upper()}): run inside "
                                "BEGIN ... ROLLBACK, no change was kept")
        method = validate
        if validate in ("auto", "hypopg"):
            try:
                unavailable = hypopg_unavailable(conn)
                if unavailable is None:
                    advice.results = prove_with_hypopg(conn, sql, cost_before, candidates)
                    method = "hypopg"
                elif validate == "hypopg":
                    reason, hint = unavailable
                    raise ExplainError(f"{reason}; to prove candidates, {hint}")
                else:
                    method = "none"
                    advice.unproven = candidates
                    advice.unproven_reason, advice.proof_hint = unavailable
            finally:
                conn.rollback()
        if method == "real":
            advice.results = prove_for_real(conn, sql, cost_before, baseline.plan.total_time
                                            if baseline.plan.analyzed else None,
                                            candidates, analyze, statement_timeout_ms)
        advice.validation = method
        if analyze:
            advice.statistics = propose_statistics(conn, sql, baseline, tables)
    return advice
