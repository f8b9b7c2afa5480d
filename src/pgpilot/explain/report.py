"""The analysis result: a plan with its findings, rendered as text or as JSON.

``analyze_plan`` is the public entry point: any EXPLAIN output in, a ``Report`` out. The text
rendering is the plan tree with each node's share of the time, estimated vs actual rows, and
the findings under the nodes they concern, then the findings again, most expensive first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pgpilot.explain.model import ExplainError, Plan, PlanNode
from pgpilot.explain.parse import parse_plan
from pgpilot.explain.rules import Finding, fmt_ms, fmt_rows, run_rules
from pgpilot.explain.sqlinfo import QueryShape, query_shape


@dataclass
class Report:
    """What ``analyze_plan`` returns: the parsed plan and what is wrong with it."""

    plan: Plan
    findings: list[Finding]
    statement: str | None = None
    rolled_back: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def rules_fired(self) -> set[str]:
        return {f.rule for f in self.findings}

    def summary(self) -> dict[str, Any]:
        by_severity = {"critical": 0, "warning": 0, "info": 0}
        for finding in self.findings:
            by_severity[finding.severity] += 1
        return {
            "analyzed": self.plan.analyzed,
            "execution_time_ms": self.plan.execution_time,
            "planning_time_ms": self.plan.planning_time,
            "total_cost": self.plan.root.total_cost,
            "nodes": len(self.plan.nodes),
            "findings": len(self.findings),
            "by_severity": by_severity,
            "input_format": self.plan.source_format,
            "statement": self.statement,
            "rolled_back": self.rolled_back,
            "notes": list(self.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        """``{"findings": [{"rule", "severity", "node", "message", "fix"}], "summary": {...}}``."""
        return {"findings": [f.to_dict() for f in self.findings], "summary": self.summary()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self) -> str:
        return render_report(self)


def analyze_plan(text_or_json: str | bytes | dict[str, Any] | list[Any], *,
                 sql: str | None = None, schemas: Mapping[str, str] | None = None) -> Report:
    """Parse an EXPLAIN result (JSON or psql text) and run every rule over it.

    ``sql``, when given, is the statement the plan is for; it sharpens some fixes (the OFFSET
    value, the ORDER BY of keyset pagination). ``schemas`` maps a scanned table's alias in the
    plan to its schema (``live.relation_schemas``), so that fixes name ``newcomer.events``
    where the plan only says ``events``. Raises ``ExplainError`` on input that is not a plan.
    """
    plan = parse_plan(text_or_json)
    if schemas:
        for node in plan.nodes:
            if node.relation and node.schema is None:
                node.schema = schemas.get(node.alias or node.relation)
    shape: QueryShape | None = None
    if sql:
        try:
            shape = query_shape(sql)
        except ExplainError:
            shape = None  # SQL pglast cannot read: the plan alone still gives every finding
    return Report(plan=plan, findings=run_rules(plan, shape, sql), statement=sql)


# ----------------------------------------------------------------------------------------------
# text rendering

SEVERITY_MARK = {"critical": "!!", "warning": "! ", "info": "i "}
MAX_STATEMENT_SHOWN = 500  # characters of the statement echoed at the top of the report


def _node_line(report: Report, node: PlanNode) -> str:
    plan = report.plan
    indent = "  " * node.depth
    prefix = f"{node.subplan_name}: " if node.subplan_name else ""
    share = f"{plan.share(node) * 100:5.1f}%"
    if plan.analyzed:
        if node.never_executed:
            figures = "never executed"
        else:
            figures = (f"rows {fmt_rows(node.plan_rows)} est / {fmt_rows(node.actual_rows)} "
                       f"actual")
            if node.loops > 1:
                figures += f" x{fmt_rows(node.loops)} loops"
            if node.exclusive_time is not None:
                figures += f", {fmt_ms(node.exclusive_time)} self"
    else:
        figures = f"rows {fmt_rows(node.plan_rows)} est, cost {node.total_cost or 0:,.0f}"
    return f"{share}  {indent}{prefix}{node.label}  ({figures})"


def render_report(report: Report) -> str:
    plan = report.plan
    lines: list[str] = []
    if plan.analyzed and not plan.timed:
        head = "Analyzed without timing (TIMING OFF); % is each node's own share of the cost"
    elif plan.analyzed:
        head = f"Execution {fmt_ms(plan.total_time)}"
        if plan.planning_time is not None:
            head += f", planning {fmt_ms(plan.planning_time)}"
        head += "; % is each node's own share of the time"
    else:
        head = (f"Estimated cost {plan.root.total_cost or 0:,.0f} (not executed: no actual "
                "times); % is each node's own share of the cost")
    lines.append(head)
    if report.statement:
        statement = " ".join(report.statement.split())
        if len(statement) > MAX_STATEMENT_SHOWN:
            statement = statement[:MAX_STATEMENT_SHOWN] + " ..."
        lines.append(f"Statement: {statement}")
    for note in report.notes:
        lines.append(f"Note: {note}")
    lines.append("")
    by_node: dict[int, list[tuple[int, Finding]]] = {}
    for number, finding in enumerate(report.findings, 1):
        if finding.node is not None:
            by_node.setdefault(finding.node.node_id, []).append((number, finding))
    for node in plan.nodes:
        lines.append(_node_line(report, node))
        pad = " " * (8 + 2 * node.depth)
        for number, finding in by_node.get(node.node_id, []):
            lines.append(f"{pad}{SEVERITY_MARK[finding.severity]} [{number}] {finding.rule}: "
                         f"{finding.message}")
    lines.append("")
    if not report.findings:
        lines.append("No findings: nothing in this plan stands out.")
    else:
        lines.append(f"Findings, most expensive first ({len(report.findings)}):")
        for number, finding in enumerate(report.findings, 1):
            where = f" at {finding.node_label}" if finding.node_label else ""
            lines.append(f"  [{number}] {finding.severity.upper()} {finding.rule}{where} "
                         f"({finding.impact:.0%} of the time)")
            lines.append(f"      {finding.message}")
            lines.append(f"      fix: {finding.fix}")
    return "\n".join(lines)
