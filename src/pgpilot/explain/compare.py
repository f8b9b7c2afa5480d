"""Two plans of one query side by side: did the shape change, and where did time and rows move.

Nodes are paired by their path from the root (each step a node label), so an unchanged part
of the tree lines up even when another part changed; scans are also paired by table, which
shows an access-path change (``Seq Scan`` -> ``Index Scan using ...``) as one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pgpilot.explain.model import Plan, PlanNode
from pgpilot.explain.report import Report
from pgpilot.explain.rules import fmt_ms, fmt_rows


def _paths(plan: Plan) -> dict[tuple[str, ...], PlanNode]:
    out: dict[tuple[str, ...], PlanNode] = {}

    def visit(node: PlanNode, prefix: tuple[str, ...]) -> None:
        key = (*prefix, node.label)
        while key in out:  # two identical siblings: number them
            key = (*key[:-1], key[-1] + "'")
        out[key] = node
        for child in node.children:
            visit(child, key)

    visit(plan.root, ())
    return out


def _shape(node: PlanNode) -> Any:
    return [node.display_type, node.relation, [_shape(c) for c in node.children]]


def _scans(plan: Plan) -> dict[str, PlanNode]:
    out: dict[str, PlanNode] = {}
    for node in plan.nodes:
        if node.relation and node.node_type != "ModifyTable":
            out.setdefault(node.alias or node.relation, node)
    return out


def _ratio(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or after <= 0:
        return None
    return before / after


@dataclass
class Comparison:
    before: Report
    after: Report
    shape_changed: bool
    access_paths: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        a, b = self.before.plan, self.after.plan
        return {
            "summary": {
                "shape_changed": self.shape_changed,
                "time_ms": {"before": a.total_time, "after": b.total_time},
                "speedup": _ratio(a.total_time, b.total_time),
                "cost": {"before": a.root.total_cost, "after": b.root.total_cost},
                "planning_time_ms": {"before": a.planning_time, "after": b.planning_time},
                "rules_fixed": sorted(self.before.rules_fired - self.after.rules_fired),
                "rules_new": sorted(self.after.rules_fired - self.before.rules_fired),
            },
            "access_paths": self.access_paths,
            "nodes": self.nodes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self) -> str:
        data = self.to_dict()["summary"]
        a, b = self.before.plan, self.after.plan
        lines = []
        if a.analyzed and b.analyzed:
            speed = data["speedup"]
            verdict = (f"{speed:.1f}x faster" if speed and speed >= 1 else
                       f"{1 / speed:.1f}x slower" if speed else "?")
            lines.append(f"Time: {fmt_ms(a.total_time)} -> {fmt_ms(b.total_time)} ({verdict})")
        lines.append(f"Cost: {a.root.total_cost or 0:,.0f} -> {b.root.total_cost or 0:,.0f}")
        lines.append("Shape: " + ("changed" if self.shape_changed else "unchanged"))
        for path in self.access_paths:
            if path["before"] != path["after"]:
                lines.append(f"  {path['table']}: {path['before'] or '(absent)'} -> "
                             f"{path['after'] or '(absent)'}")
        if data["rules_fixed"]:
            lines.append("Fixed: " + ", ".join(data["rules_fixed"]))
        if data["rules_new"]:
            lines.append("New: " + ", ".join(data["rules_new"]))
        lines.append("")
        lines.append("Per node (before -> after):")
        for row in self.nodes:
            status = row["status"]
            if status == "both":
                lines.append(
                    f"  {row['node']}: rows {fmt_rows(row['rows_before'])} -> "
                    f"{fmt_rows(row['rows_after'])}, time {fmt_ms(row['time_before_ms'])} -> "
                    f"{fmt_ms(row['time_after_ms'])}")
            else:
                lines.append(f"  {row['node']}: only {status}")
        return "\n".join(lines)


def compare_reports(before: Report, after: Report) -> Comparison:
    a, b = before.plan, after.plan
    comparison = Comparison(before, after, _shape(a.root) != _shape(b.root))
    scans_a, scans_b = _scans(a), _scans(b)
    for table in sorted(set(scans_a) | set(scans_b)):
        node_a, node_b = scans_a.get(table), scans_b.get(table)
        comparison.access_paths.append({
            "table": table,
            "before": node_a.label if node_a else None,
            "after": node_b.label if node_b else None,
        })
    paths_a, paths_b = _paths(a), _paths(b)
    for key in list(paths_a) + [k for k in paths_b if k not in paths_a]:
        node_a, node_b = paths_a.get(key), paths_b.get(key)
        status = "both" if node_a and node_b else "before" if node_a else "after"
        comparison.nodes.append({
            "node": key[-1],
            "depth": len(key) - 1,
            "status": status,
            "rows_before": node_a.actual_rows if node_a else None,
            "rows_after": node_b.actual_rows if node_b else None,
            "time_before_ms": node_a.exclusive_time if node_a else None,
            "time_after_ms": node_b.exclusive_time if node_b else None,
        })
    return comparison
