"""The rules: each names one way a plan is slow, with its thresholds, message and fix.

Rule ids are a stable contract (scripts match on them). Every rule states its thresholds as
module constants, documented in the README. A rule only says *what* it saw; how loud it is
comes from ``severity_for``: the share of the statement's time (or, without ANALYZE, cost)
spent where the problem is, so a slow-looking pattern in a node that costs nothing is not
reported, and a primary-key lookup, which trips no rule, stays clean.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pgpilot.explain.model import Plan, PlanNode
from pgpilot.explain.sqlinfo import (
    Predicate,
    QueryShape,
    expression_predicates,
    join_rewrite,
    quote_ident,
)

# Severity by share of total time (cost without ANALYZE) of the place the finding concerns.
CRITICAL_SHARE = 0.50
WARNING_SHARE = 0.20
MIN_SHARE = 0.05  # below this a finding is noise and is dropped

SEQ_SCAN_MIN_REMOVED = 1000  # rows discarded by the Filter, all loops together
SEQ_SCAN_MIN_REMOVED_FRACTION = 0.90  # of the rows the scan read
MISESTIMATE_FACTOR = 10.0  # actual vs estimated rows, either direction
MISESTIMATE_MIN_ROWS = 100  # the larger of the two must be at least this
NESTED_LOOP_MIN_LOOPS = 1000  # executions of the inner side
# A correlated SubPlan is "N+1 in SQL" when it runs many times, or a few times but takes a
# large share of the statement: 20 runs making up 99% of a slow statement count as much as
# 10,000 cheap ones.
SUBPLAN_MIN_LOOPS = 3  # executions, whatever the share...
SUBPLAN_MIN_SHARE = 0.25  # ...if the SubPlan (all runs, all below it) takes this share
SUBPLAN_MANY_LOOPS = 100  # from this many executions, any share worth reporting (MIN_SHARE)
HEAP_FETCHES_MIN = 1000
HEAP_FETCHES_MIN_FRACTION = 0.10  # of the rows the index-only scan returned
LOSSY_MIN_FRACTION = 0.10  # lossy heap blocks among all heap blocks of a bitmap scan
JIT_MIN_FRACTION = 0.10  # JIT time as a share of execution time
JIT_MIN_MS = 5.0
LARGE_OFFSET_MIN_ROWS = 1000  # rows fetched then thrown away by LIMIT/OFFSET
PLANNING_MIN_MS = 30.0  # a cold or busy backend can take 10 ms for a simple plan
PLANNING_MIN_FRACTION = 0.25  # of planning + execution time
INDEX_FILTER_MIN_REMOVED = 1000
INDEX_FILTER_MIN_REMOVED_FRACTION = 0.50  # of the rows the index returned
JOIN_FILTER_MIN_REMOVED = 1000
JOIN_FILTER_MIN_REMOVED_FRACTION = 0.90  # of the row pairs the join considered

SCAN_TYPES = ("Seq Scan",)
INDEX_TYPES = ("Index Scan", "Index Only Scan", "Bitmap Heap Scan")
JOIN_TYPES = ("Nested Loop", "Hash Join", "Merge Join")


@dataclass
class Finding:
    """One problem in a plan: which rule, how bad, where, what, and the fix."""

    rule: str
    severity: str  # critical | warning | info
    node: PlanNode | None
    message: str
    fix: str
    impact: float  # the share (0..1) the severity was computed from; orders findings

    @property
    def node_label(self) -> str | None:
        if self.node is None:
            return None
        prefix = f"{self.node.subplan_name}: " if self.node.subplan_name else ""
        return f"#{self.node.node_id} {prefix}{self.node.label}"

    def to_dict(self) -> dict[str, str | None]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "node": self.node_label,
            "message": self.message,
            "fix": self.fix,
        }


def severity_for(share: float) -> str | None:
    """critical / warning / info from the share of time at stake; None below ``MIN_SHARE``."""
    if share >= CRITICAL_SHARE:
        return "critical"
    if share >= WARNING_SHARE:
        return "warning"
    if share >= MIN_SHARE:
        return "info"
    return None


@dataclass
class Context:
    plan: Plan
    shape: QueryShape | None  # from the SQL text, when known
    sql: str | None = None

    def finding(self, rule: str, node: PlanNode | None, share: float, message: str,
                fix: str) -> Finding | None:
        severity = severity_for(share)
        if severity is None:
            return None
        return Finding(rule, severity, node, message, fix, share)


RuleCheck = Callable[[Context], Iterator[Finding | None]]


@dataclass(frozen=True)
class Rule:
    id: str
    summary: str
    check: RuleCheck


RULES: list[Rule] = []


def rule(rule_id: str, summary: str) -> Callable[[RuleCheck], RuleCheck]:
    def register(check: RuleCheck) -> RuleCheck:
        RULES.append(Rule(rule_id, summary, check))
        return check

    return register


# ----------------------------------------------------------------------------------------------
# helpers


def fmt_rows(value: float | None) -> str:
    if value is None:
        return "?"
    if value != int(value) and value < 100:  # PostgreSQL 18 prints averaged rows: 2.50
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:,.1f} ms" if value >= 10 else f"{value:,.3f} ms"


def relation_name(node: PlanNode) -> str:
    """The node's table as SQL names it: schema-qualified when the schema is known."""
    if node.relation is None:
        return "the table"
    name = quote_ident(node.relation)
    return f"{quote_ident(node.schema)}.{name}" if node.schema else name


def own_predicates(node: PlanNode, expression: str | None) -> list[Predicate]:
    """The column predicates of ``expression`` that belong to this node's table."""
    if not expression:
        return []
    predicates, _ = expression_predicates(expression)
    names = {node.alias, node.relation, None}
    return [p for p in predicates if p.table in names]


def index_columns(predicates: list[Predicate], leading: list[str] | None = None) -> list[str]:
    """Equality columns first, then one range column (a btree uses nothing after a range)."""
    columns = list(leading or [])
    for kind in ("eq", "null", "bool"):
        for p in predicates:
            if p.kind == kind and p.column not in columns:
                columns.append(p.column)
    for p in predicates:
        if p.kind == "range" and p.column not in columns:
            columns.append(p.column)
            break
    return columns


def create_index(node: PlanNode, columns: list[str]) -> str:
    return f"CREATE INDEX CONCURRENTLY ON {relation_name(node)} ({', '.join(columns)});"


def work_mem_for(kilobytes: float) -> str:
    """A work_mem setting comfortably above ``kilobytes``, as a power of two in MB."""
    megabytes = max(1, math.ceil(kilobytes / 1024))
    return f"{2 ** math.ceil(math.log2(megabytes))}MB"


def total_rows(node: PlanNode) -> float:
    return node.total_actual_rows or 0.0


def join_columns_of(expression: str | None, node: PlanNode) -> list[str]:
    """Columns of ``node``'s table that ``expression`` compares with other tables' columns."""
    if not expression:
        return []
    _, joins = expression_predicates(expression)
    # In a scan's own expressions its columns are printed unqualified.
    names = {node.alias, node.relation, None}
    return [column for table, column in joins if table in names]


def referenced_columns(expression: str | None, node: PlanNode) -> list[str]:
    """Columns of ``node``'s table named (qualified) anywhere in ``expression``."""
    if not expression:
        return []
    names = {node.alias, node.relation}
    return list(dict.fromkeys(
        m.group(2) for m in _OUTER_REFERENCE.finditer(expression) if m.group(1) in names))


def has_cast(predicates: list[Predicate]) -> Predicate | None:
    return next((p for p in predicates if p.cast), None)


# ----------------------------------------------------------------------------------------------
# rules, in the order of the README


def discards_most(removed: float, kept: float, min_removed: float,
                  min_fraction: float) -> bool:
    """At least ``min_removed`` rows thrown away, and at least ``min_fraction`` of those read."""
    return removed >= min_removed and removed / (removed + kept) >= min_fraction


@rule("seq_scan_filter", "a sequential scan reads many rows to keep few")
def seq_scan_filter(ctx: Context) -> Iterator[Finding | None]:
    for node in ctx.plan.nodes:
        if node.node_type not in SCAN_TYPES or not node.filter:
            continue
        removed = node.total_removed(node.rows_removed_by_filter)
        kept = total_rows(node)
        if not discards_most(removed, kept, SEQ_SCAN_MIN_REMOVED, SEQ_SCAN_MIN_REMOVED_FRACTION):
            continue
        predicates = own_predicates(node, node.filter)
        if has_cast(predicates):
            continue  # cast_prevents_index says it better: an index would not be used
        columns = index_columns(predicates)
        columns += [c for c in join_columns_of(node.filter, node) if c not in columns]
        if columns:
            fix = create_index(node, columns)
        else:
            fix = (f"index the columns of the filter {node.filter} on {relation_name(node)} "
                   "(run `pgpilot advise` with the query to get a proven CREATE INDEX)")
        message = (f"Seq Scan on {relation_name(node)} discarded {fmt_rows(removed)} rows to "
                   f"return {fmt_rows(kept)} (Filter: {node.filter})")
        yield ctx.finding("seq_scan_filter", node, ctx.plan.share(node), message, fix)


@rule("row_misestimate", "the planner's row estimate is off by 10x or more")
def row_misestimate(ctx: Context) -> Iterator[Finding | None]:
    for node in ctx.plan.nodes:
        if node.actual_rows is None or node.plan_rows is None or node.never_executed:
            continue
        actual, estimate = node.actual_rows, node.plan_rows
        larger, smaller = max(actual, estimate), max(min(actual, estimate), 1.0)
        if larger < MISESTIMATE_MIN_ROWS or larger / smaller < MISESTIMATE_FACTOR:
            continue
        # Under a LIMIT a node stops early, so fewer rows than estimated is expected.
        if actual < estimate and any(a.node_type == "Limit" for a in node.ancestors()):
            continue
        if node.node_type in ("Hash", "Materialize", "Memoize", "Gather", "Gather Merge",
                              "Sort", "Limit"):
            continue  # they pass on the misestimate of the node below, reported there
        # A wrong estimate costs through the decisions made with it: weigh by the parent.
        weigh = node.parent or node
        share = ctx.plan.inclusive_share(weigh)
        direction = "under" if actual > estimate else "over"
        message = (f"estimated {fmt_rows(estimate)} rows, got {fmt_rows(actual)} "
                   f"({larger / smaller:,.0f}x {direction}estimate)")
        if node.relation:
            predicates = own_predicates(node, node.filter) + own_predicates(
                node, node.index_cond)
            columns = sorted({p.column for p in predicates if p.kind in ("eq", "range", "bool")})
            fix = f"ANALYZE {relation_name(node)};"
            cast = has_cast(predicates)
            if cast is not None:
                fix = (f"the filter casts {cast.column} to {cast.cast}, for which PostgreSQL "
                       "has no statistics and guesses: compare the bare column instead "
                       "(see cast_prevents_index)")
            elif len(columns) >= 2:
                name = f"{node.relation}_{'_'.join(columns)}_stats"
                fix += (f" If the estimate stays wrong the columns are correlated: CREATE "
                        f"STATISTICS {name} (dependencies, mcv) ON {', '.join(columns)} FROM "
                        f"{relation_name(node)}; ANALYZE {relation_name(node)};")
        else:
            tables = sorted({relation_name(n) for n in node.walk() if n.relation})
            fix = ("; ".join(f"ANALYZE {t}" for t in tables) + ";") if tables else (
                "ANALYZE the tables below this node")
            if node.node_type in JOIN_TYPES:
                fix += (" If the join estimate stays wrong, check that the join columns' "
                        "types match and consider CREATE STATISTICS on correlated columns.")
        yield ctx.finding("row_misestimate", node, share, message, fix)


@rule("sort_spill", "a sort did not fit in work_mem and went to disk")
def sort_spill(ctx: Context) -> Iterator[Finding | None]:
    for node in ctx.plan.nodes:
        if "Sort" not in node.node_type:
            continue
        spilled = node.sort_space_type == "Disk" or (node.sort_method or "").startswith(
            "external")
        if not spilled:
            continue
        used = node.sort_space_used or 0.0
        # An in-memory sort needs roughly two to three times what the on-disk runs took.
        setting = work_mem_for(used * 3)
        message = (f"{node.sort_method or 'sort'} wrote {used:,.0f}kB to disk "
                   f"(Sort Key: {', '.join(node.sort_key) or '?'})")
        fix = (f"SET LOCAL work_mem = '{setting}'; in the transaction that runs this query "
               "(not globally: every sort and hash of every connection may use that much)")
        scans = [n for n in node.walk() if n.relation]
        keys = [re.sub(r"^[a-z_][a-z0-9_]*\.", "", k) for k in node.sort_key]
        if len(scans) == 1 and keys and all(
                re.fullmatch(r"[a-z_][a-z0-9_]*( DESC)?", k) for k in keys):
            fix += (f"; or {create_index(scans[0], keys)} so the rows come out of the index "
                    "already sorted")
        yield ctx.finding("sort_spill", node, ctx.plan.share(node), message, fix)


@rule("hash_spill", "a hash table did not fit in work_mem and was split into batches")
def hash_spill(ctx: Context) -> Iterator[Finding | None]:
    for node in ctx.plan.nodes:
        if node.node_type != "Hash" or not node.hash_batches or node.hash_batches <= 1:
            continue
        peak = node.peak_memory_usage or 0.0
        needed = peak * node.hash_batches * 1.5
        setting = work_mem_for(needed)
        message = (f"hash used {node.hash_batches} batches (planned "
                   f"{node.original_hash_batches or node.hash_batches}), {peak:,.0f}kB each: "
                   "the build side went to temporary files")
        fix = (f"SET LOCAL work_mem = '{setting}'; for this query (or raise "
               "hash_mem_multiplier), so the hash table fits in one batch")
        # The Hash node's own time is small; the spill slows the join above it.
        weigh = node.parent or node
        yield ctx.finding("hash_spill", node, ctx.plan.inclusive_share(weigh), message, fix)


def _misestimated_low(node: PlanNode) -> bool:
    if node.actual_rows is None or node.plan_rows is None:
        return False
    return node.actual_rows >= MISESTIMATE_FACTOR * max(node.plan_rows, 1.0)


@rule("nested_loop_many_loops", "a nested loop ran its inner side thousands of times")
def nested_loop_many_loops(ctx: Context) -> Iterator[Finding | None]:
    for node in ctx.plan.nodes:
        if node.node_type != "Nested Loop" or len(node.children) < 2:
            continue
        outer, inner = node.children[0], node.children[1]
        loops = inner.actual_loops or 0
        if loops < NESTED_LOOP_MIN_LOOPS:
            continue
        wasteful = [
            n for n in inner.walk()
            if n.node_type in SCAN_TYPES
            or n.total_removed(n.rows_removed_by_filter) >= loops
            or n.total_removed(n.rows_removed_by_join_filter) >= loops
        ]
        misled = _misestimated_low(outer)
        if not wasteful and not misled:
            continue  # an index lookup per outer row, as planned: that is a good plan
        message = (f"the inner side ({inner.label}) ran {fmt_rows(loops)} times, once per "
                   f"outer row")
        scan = next((n for n in wasteful if n.relation), None)
        if scan is not None:
            columns = join_columns_of(node.join_filter, scan) + join_columns_of(
                scan.filter, scan) + [p.column for p in own_predicates(scan, scan.filter)
                                      if p.kind == "eq"]
            if not columns:
                columns = referenced_columns(node.join_filter, scan)[:2]
            columns = list(dict.fromkeys(columns))
            if columns:
                fix = create_index(scan, columns) + " so each loop is an index lookup"
            else:
                fix = (f"index the join column of {relation_name(scan)} so each loop is an "
                       "index lookup")
        else:
            fix = ""
        if misled:
            tables = sorted({relation_name(n) for n in outer.walk() if n.relation})
            analyze = "; ".join(f"ANALYZE {t}" for t in tables) + ";"
            note = (f"the planner expected {fmt_rows(outer.plan_rows)} outer rows, got "
                    f"{fmt_rows(outer.actual_rows)}: {analyze} with a right estimate it "
                    "chooses a hash join")
            fix = f"{fix}; {note}" if fix else note
        # The cost is the join as a whole: the inner work times the loops, plus the join
        # filter evaluated for every pair, which EXPLAIN books on the join node itself.
        yield ctx.finding("nested_loop_many_loops", node, ctx.plan.inclusive_share(node),
                          message, fix)


_OUTER_REFERENCE = re.compile(r"\b([a-z_][a-z0-9_$]*)\.([a-z_][a-z0-9_$]*)\b")


@rule("correlated_subplan", "a subquery runs once per outer row")
def correlated_subplan(ctx: Context) -> Iterator[Finding | None]:
    for node in ctx.plan.nodes:
        if node.parent_relationship != "SubPlan":
            continue
        if (node.subplan_name or "").startswith("hashed"):
            continue  # hashed: evaluated once into a hash table
        loops = node.actual_loops or 0
        share = ctx.plan.inclusive_share(node)
        if loops < SUBPLAN_MIN_LOOPS or (loops < SUBPLAN_MANY_LOOPS and share < SUBPLAN_MIN_SHARE):
            continue
        scan = next((n for n in node.walk() if n.relation), None)
        correlation = None
        for inner in node.walk():
            for expression in (inner.index_cond, inner.filter, inner.recheck_cond):
                if not expression:
                    continue
                _, joins = expression_predicates(expression)
                if joins:
                    correlation = expression.strip("()")
                    break
            if correlation:
                break
        name = node.subplan_name or "SubPlan"
        message = (f"{name} ran {fmt_rows(loops)} times, once per outer row, "
                   f"{fmt_ms(node.inclusive_time)} in all ({share:.0%} of the statement)")
        rewritten = join_rewrite(ctx.sql) if ctx.sql else None
        if rewritten:
            fix = f"rewrite it as a join, computed in one pass: {rewritten}"
        else:
            fix = _join_rewrite(node, scan, correlation)
        yield ctx.finding("correlated_subplan", node, share, message, fix)


def _join_rewrite(node: PlanNode, scan: PlanNode | None, correlation: str | None) -> str:
    """The JOIN that computes what the correlated subquery computes, in one pass."""
    if scan is None or correlation is None:
        return ("rewrite the subquery as a JOIN (or LEFT JOIN LATERAL) so it is computed "
                "in one pass instead of once per row")
    inner_alias = scan.alias or scan.relation or "sub"
    # The correlation reads "inner_col = outer.col"; find which side is the inner table.
    match = re.match(r"\(?(.+?) = (.+?)\)?$", correlation)
    if match is None:
        return f"rewrite as a JOIN on {correlation} instead of a per-row subquery"
    left, right = match.group(1).strip("() "), match.group(2).strip("() ")
    inner_column, outer_column = left, right
    if right.split(".")[0] == inner_alias or ("." not in right and "." in left):
        inner_column, outer_column = right, left
    inner_column = inner_column.split(".")[-1]
    table = relation_name(scan)
    if node.node_type == "Aggregate":
        return (f"LEFT JOIN (SELECT {inner_column}, <aggregate> AS value FROM {table} "
                f"GROUP BY {inner_column}) AS sub ON sub.{inner_column} = {outer_column} "
                "and read sub.value (coalesce(sub.value, 0) for a count) instead of the "
                "subquery: one pass over "
                f"{table} instead of one per row; or at least "
                f"CREATE INDEX CONCURRENTLY ON {table} ({inner_column});")
    return (f"JOIN {table} AS {inner_alias} ON {inner_alias}.{inner_column} = {outer_column} "
            "(or WHERE EXISTS, which the planner turns into a semi-join) instead of a "
            f"per-row subquery; or at least CREATE INDEX CONCURRENTLY ON {table} "
            f"({inner_column});")


@rule("heap_fetches", "an index-only scan had to visit the table anyway")
def heap_fetches(ctx: Context) -> Iterator[Finding | None]:
    for node in ctx.plan.nodes:
        if node.node_type != "Index Only Scan" or node.heap_fetches is None:
            continue
        fetches = node.heap_fetches  # already a total over all loops
        returned = total_rows(node)
        if fetches < HEAP_FETCHES_MIN or fetches < HEAP_FETCHES_MIN_FRACTION * max(returned, 1):
            continue
        message = (f"{fmt_rows(fetches)} heap fetches for {fmt_rows(returned)} rows: the "
                   "visibility map is out of date, so the index-only scan reads the table")
        fix = (f"VACUUM (ANALYZE) {relation_name(node)}; and let autovacuum keep up "
               f"(lower autovacuum_vacuum_scale_factor for {relation_name(node)})")
        yield ctx.finding("heap_fetches", node, ctx.plan.share(node), message, fix)


@rule("lossy_bitmap", "a bitmap heap scan went lossy and rechecked whole pages")
def lossy_bitmap(ctx: Context) -> Iterator[Finding | None]:
    for node in ctx.plan.nodes:
        if node.node_type != "Bitmap Heap Scan" or not node.lossy_heap_blocks:
            continue
        lossy, exact = node.lossy_heap_blocks, node.exact_heap_blocks or 0.0
        if lossy / (lossy + exact) < LOSSY_MIN_FRACTION:
            continue
        # A bitmap needs on the order of 100 bytes per exact page; keep a 4MB floor.
        setting = work_mem_for(max((lossy + exact) * 0.1, 4096))
        removed = node.total_removed(node.rows_removed_by_index_recheck)
        message = (f"{fmt_rows(lossy)} of {fmt_rows(lossy + exact)} heap blocks were lossy; "
                   f"{fmt_rows(removed)} rows were rechecked and removed")
        fix = f"SET LOCAL work_mem = '{setting}'; for this query so the bitmap stays exact"
        yield ctx.finding("lossy_bitmap", node, ctx.plan.share(node), message, fix)


@rule("jit_overhead", "JIT compilation cost a large part of the run time")
def jit_overhead(ctx: Context) -> Iterator[Finding | None]:
    jit, execution = ctx.plan.jit, ctx.plan.execution_time
    if jit is None or jit.total_time is None or not execution:
        return
    share = jit.total_time / execution
    if jit.total_time < JIT_MIN_MS or share < JIT_MIN_FRACTION:
        return
    cost = ctx.plan.root.total_cost
    message = (f"JIT compiled {jit.functions or '?'} functions in {fmt_ms(jit.total_time)}, "
               f"{share:.0%} of the {fmt_ms(execution)} execution")
    # Never suggest less than PostgreSQL's default (100000): JIT fired below it, so the
    # setting was lowered somewhere.
    raise_to = f"{max(int((cost or 0) * 10), 100000):d}"
    fix = (f"SET LOCAL jit = off; for this query, or raise jit_above_cost above the plan's cost "
           f"{cost or 0:,.0f} (ALTER DATABASE ... SET jit_above_cost = {raise_to};)")
    yield ctx.finding("jit_overhead", None, share, message, fix)


@rule("cast_prevents_index", "a cast on a column keeps an index on it from being used")
def cast_prevents_index(ctx: Context) -> Iterator[Finding | None]:
    for node in ctx.plan.nodes:
        if node.node_type not in SCAN_TYPES + INDEX_TYPES or not node.filter:
            continue
        removed = node.total_removed(node.rows_removed_by_filter)
        if removed < SEQ_SCAN_MIN_REMOVED:
            continue
        cast = has_cast(own_predicates(node, node.filter))
        if cast is None:
            continue
        value = cast.sql.split(" = ", 1)[-1] if cast.kind == "eq" else None
        message = (f"the filter casts column {cast.column} to {cast.cast} "
                   f"({node.filter}), so an index on {cast.column} cannot be used; "
                   f"{fmt_rows(removed)} rows were read and discarded")
        bare = re.sub(r"CAST\((.*) AS [^)]+\)", r"\1", value) if value else None
        written = f"{cast.column} = {bare}" if bare else f"{cast.column} <op> <value>"
        fix = (f"remove the cast: compare the bare column, WHERE {written} (PostgreSQL then "
               f"converts the value to {cast.column}'s type), and index it if needed: "
               f"{create_index(node, [cast.column])} If the cast must stay, index the "
               f"expression: CREATE INDEX CONCURRENTLY ON {relation_name(node)} "
               f"(({cast.column}::{cast.cast}));")
        yield ctx.finding("cast_prevents_index", node, ctx.plan.share(node), message, fix)


@rule("large_offset", "OFFSET reads and throws away many rows")
def large_offset(ctx: Context) -> Iterator[Finding | None]:
    for node in ctx.plan.nodes:
        if node.node_type != "Limit" or not node.children or node.actual_rows is None:
            continue
        child = node.children[0]
        discarded = total_rows(child) - total_rows(node)
        if ctx.shape is not None and ctx.shape.offset is not None:
            discarded = max(discarded, float(ctx.shape.offset))
        if discarded < LARGE_OFFSET_MIN_ROWS:
            continue
        sort_key = next((n.sort_key for n in node.walk() if n.sort_key), [])
        if not sort_key and ctx.shape is not None:
            sort_key = [c for _, c, _ in ctx.shape.order_by]
        keys = ", ".join(k.split(".")[-1] for k in sort_key) or "<sort key>"
        last = ", ".join(f":last_{k.split('.')[-1].split(' ')[0]}" for k in sort_key) or (
            ":last_seen")
        message = (f"the LIMIT read {fmt_rows(total_rows(child))} rows and returned "
                   f"{fmt_rows(total_rows(node))}: {fmt_rows(discarded)} were skipped by OFFSET")
        fix = (f"keyset pagination: remember the last row's key and ask for the next page with "
               f"WHERE ({keys}) > ({last}) ORDER BY {keys} LIMIT n, no OFFSET (with an index "
               f"on ({keys}) each page costs the same)")
        yield ctx.finding("large_offset", node, ctx.plan.inclusive_share(node), message, fix)


@rule("workers_not_launched", "fewer parallel workers started than planned")
def workers_not_launched(ctx: Context) -> Iterator[Finding | None]:
    for node in ctx.plan.nodes:
        if node.workers_planned is None or node.workers_launched is None:
            continue
        if node.workers_launched >= node.workers_planned:
            continue
        message = (f"{node.workers_planned} workers planned, {node.workers_launched} launched: "
                   "the leader did the work the missing workers were meant to share")
        fix = ("all parallel worker slots were busy: raise max_parallel_workers (and "
               "max_worker_processes, which needs a restart), e.g. ALTER SYSTEM SET "
               f"max_parallel_workers = {max(8, node.workers_planned * 4)}; SELECT "
               "pg_reload_conf(); or run fewer parallel queries at once")
        yield ctx.finding("workers_not_launched", node, ctx.plan.inclusive_share(node),
                          message, fix)


@rule("high_planning_time", "planning took longer than it should")
def high_planning_time(ctx: Context) -> Iterator[Finding | None]:
    planning = ctx.plan.planning_time
    if planning is None or planning < PLANNING_MIN_MS:
        return
    execution = ctx.plan.execution_time or 0.0
    share = planning / (planning + execution)
    if share < PLANNING_MIN_FRACTION:
        return
    scans = [n for n in ctx.plan.nodes if n.relation]
    message = (f"planning took {fmt_ms(planning)}, {share:.0%} of the statement's time "
               f"({len(scans)} table scans in the plan)")
    fix = ("plan once and reuse it: a prepared statement (PREPARE, or psycopg's prepare=True, "
           "asyncpg's statement cache)")
    if len(scans) >= 8:
        fix += ("; with this many tables, SET LOCAL join_collapse_limit = 4 and "
                "from_collapse_limit = 4 to cut the join search")
    appends = [n for n in ctx.plan.nodes if n.node_type in ("Append", "Merge Append")]
    if any(len(n.children) >= 50 for n in appends):
        fix += "; filter on the partition key so partitions are pruned at plan time"
    yield ctx.finding("high_planning_time", None, share, message, fix)


@rule("index_filter_inefficient", "an index scan fetched many rows its Filter then threw away")
def index_filter_inefficient(ctx: Context) -> Iterator[Finding | None]:
    for node in ctx.plan.nodes:
        if node.node_type not in INDEX_TYPES or not node.filter:
            continue
        removed = node.total_removed(node.rows_removed_by_filter)
        kept = total_rows(node)
        if not discards_most(removed, kept, INDEX_FILTER_MIN_REMOVED,
                             INDEX_FILTER_MIN_REMOVED_FRACTION):
            continue
        condition = node.index_cond or node.recheck_cond
        leading = [p.column for p in own_predicates(node, condition) if p.kind == "eq"]
        leading += join_columns_of(condition, node)
        filter_predicates = own_predicates(node, node.filter)
        if has_cast(filter_predicates):
            continue  # reported by cast_prevents_index
        columns = index_columns(filter_predicates, list(dict.fromkeys(leading)))
        ranges = [p.column for p in own_predicates(node, condition) if p.kind == "range"]
        columns += [c for c in ranges[:1] if c not in columns]
        index_name = node.index_name or next(
            (n.index_name for n in node.walk() if n.index_name), "?")
        message = (f"the index {index_name} found {fmt_rows(removed + kept)} rows and the "
                   f"Filter {node.filter} discarded {fmt_rows(removed)} of them")
        fix = (create_index(node, columns) + " so the filter columns are in the index"
               if columns else f"add the filter's columns to the index {index_name}")
        yield ctx.finding("index_filter_inefficient", node, ctx.plan.share(node), message, fix)


@rule("join_filter_removed", "a join compared many row pairs only to discard them")
def join_filter_removed(ctx: Context) -> Iterator[Finding | None]:
    for node in ctx.plan.nodes:
        if node.node_type not in JOIN_TYPES or not node.join_filter:
            continue
        removed = node.total_removed(node.rows_removed_by_join_filter)
        kept = total_rows(node)
        if not discards_most(removed, kept, JOIN_FILTER_MIN_REMOVED,
                             JOIN_FILTER_MIN_REMOVED_FRACTION):
            continue
        message = (f"the join checked {fmt_rows(removed + kept)} row pairs against "
                   f"Join Filter {node.join_filter} and discarded {fmt_rows(removed)}")
        inner = node.children[1] if len(node.children) > 1 else None
        scan = next((n for n in inner.walk() if n.relation), None) if inner else None
        columns = join_columns_of(node.join_filter, scan) if scan else []
        if scan is not None and not columns:
            # A range join (a.x BETWEEN b.lo AND b.hi): index the inner columns it reads.
            columns = referenced_columns(node.join_filter, scan)
        if "::" in node.join_filter and "=" in node.join_filter:
            fix = ("the join condition compares columns of different types: make the types "
                   "match (or remove the cast) so it becomes a hash or merge join condition")
        elif scan is not None and columns:
            fix = (f"{create_index(scan, columns[:2])} so the inner side is an index lookup "
                   "on the join condition instead of a filter over every pair")
        else:
            fix = ("rewrite the join condition as an equality on columns (no function or OR "
                   "around the join columns) so it can be a hash or merge join")
        yield ctx.finding("join_filter_removed", node, ctx.plan.inclusive_share(node),
                          message, fix)


RULE_IDS: tuple[str, ...] = tuple(r.id for r in RULES)


def run_rules(plan: Plan, shape: QueryShape | None = None,
              sql: str | None = None) -> list[Finding]:
    """All findings for ``plan``, most expensive first."""
    ctx = Context(plan, shape, sql)
    findings = [f for r in RULES for f in r.check(ctx) if f is not None]
    findings.sort(key=lambda f: (-f.impact, f.node.node_id if f.node else 0))
    return findings
