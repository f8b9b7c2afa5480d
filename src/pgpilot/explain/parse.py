"""Reading EXPLAIN output: JSON or psql's text rendering, detected, into one ``Plan``.

Text input is accepted as psql prints it: with or without the ``QUERY PLAN`` header and its
dashes, with ``+`` continuation marks at line ends, with the ``(N rows)`` footer, from
PostgreSQL 13 to 18 (18 prints fractional ``rows=1.00`` and ``Index Searches``; 17 adds
``Storage`` and JIT ``Deform`` timings; both are read or ignored as appropriate). A JSON plan
that was itself pasted from psql (header, ``+`` marks) is also recognised.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pgpilot.explain.model import (
    ALIAS_ONLY_SCANS,
    NAMED_SCANS,
    ExplainError,
    JitInfo,
    Plan,
    PlanNode,
)


def parse_plan(source: str | bytes | dict[str, Any] | list[Any]) -> Plan:
    """Parse one EXPLAIN result, whatever its format; raise ``ExplainError`` if it is not one."""
    if isinstance(source, dict | list):
        return plan_from_json(source)
    text = source.decode("utf-8", "replace") if isinstance(source, bytes) else source
    cleaned = strip_psql_decoration(text)
    if not cleaned.strip():
        raise ExplainError("empty input: expected an EXPLAIN plan (JSON or text)")
    first = cleaned.lstrip()[:1]
    if first in "[{":
        try:
            data = json.loads(cleaned)
        except json.JSONDecodeError as exc:
            raise ExplainError(
                f"invalid JSON plan: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        return plan_from_json(data)
    return plan_from_text(cleaned)


# ----------------------------------------------------------------------------------------------
# psql decoration

_FOOTER = re.compile(r"^\s*\(\d+ rows?\)\s*$")
_DASHES = re.compile(r"^\s*-{3,}\s*$")


def strip_psql_decoration(text: str) -> str:
    """Remove what psql adds around a result: header, dashes, ``+`` marks, row-count footer."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    for raw in lines:
        line = raw.rstrip()
        if _FOOTER.match(line) or _DASHES.match(line):
            continue
        if line.strip() == "QUERY PLAN" and not any(x.strip() for x in out):
            continue
        # psql marks a line that continues in the same cell with a trailing "+" (after the
        # padding, or straight after the widest line). No plan line ends in "+" otherwise.
        if line.endswith("+"):
            line = line[:-1].rstrip()
        out.append(line)
    # psql indents every line of an aligned result by one space; remove the common indent
    # of plan lines so that the root node sits at column 0.
    nonblank = [line for line in out if line.strip()]
    if nonblank:
        common = min(len(line) - len(line.lstrip(" ")) for line in nonblank)
        out = [line[common:] for line in out]
    while out and not out[-1].strip():
        out.pop()
    while out and not out[0].strip():
        out.pop(0)
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# JSON

_JSON_FIELDS: dict[str, str] = {
    "Relation Name": "relation",
    "Schema": "schema",
    "Alias": "alias",
    "Index Name": "index_name",
    "Join Type": "join_type",
    "Strategy": "strategy",
    "Partial Mode": "partial_mode",
    "Operation": "operation",
    "Scan Direction": "scan_direction",
    "Parent Relationship": "parent_relationship",
    "Subplan Name": "subplan_name",
    "Filter": "filter",
    "Index Cond": "index_cond",
    "Recheck Cond": "recheck_cond",
    "Join Filter": "join_filter",
    "Hash Cond": "hash_cond",
    "Merge Cond": "merge_cond",
    "Sort Method": "sort_method",
    "Sort Space Type": "sort_space_type",
}
_JSON_NUMBERS: dict[str, str] = {
    "Startup Cost": "startup_cost",
    "Total Cost": "total_cost",
    "Plan Rows": "plan_rows",
    "Actual Startup Time": "actual_startup_time",
    "Actual Total Time": "actual_total_time",
    "Actual Rows": "actual_rows",
    "Actual Loops": "actual_loops",
    "Sort Space Used": "sort_space_used",
    "Rows Removed by Filter": "rows_removed_by_filter",
    "Rows Removed by Index Recheck": "rows_removed_by_index_recheck",
    "Rows Removed by Join Filter": "rows_removed_by_join_filter",
    "Heap Fetches": "heap_fetches",
    "Exact Heap Blocks": "exact_heap_blocks",
    "Lossy Heap Blocks": "lossy_heap_blocks",
    "Peak Memory Usage": "peak_memory_usage",
}
_JSON_INTS: dict[str, str] = {
    "Plan Width": "plan_width",
    "Hash Batches": "hash_batches",
    "Original Hash Batches": "original_hash_batches",
    "Workers Planned": "workers_planned",
    "Workers Launched": "workers_launched",
    "Shared Hit Blocks": "shared_hit_blocks",
    "Shared Read Blocks": "shared_read_blocks",
    "Temp Read Blocks": "temp_read_blocks",
    "Temp Written Blocks": "temp_written_blocks",
}


def plan_from_json(data: Any) -> Plan:
    """Build a ``Plan`` from ``EXPLAIN (FORMAT JSON)`` output (the list, its item, or a node)."""
    if isinstance(data, list):
        if not data:
            raise ExplainError("not a plan: the JSON is an empty list")
        data = data[0]
        if isinstance(data, list) and data:  # psycopg may hand back [[{...}]]
            data = data[0]
    if not isinstance(data, dict):
        raise ExplainError("not a plan: expected a JSON object with a \"Plan\" key")
    top = data
    if "Plan" not in top:
        if "Node Type" in top:
            top = {"Plan": top}
        else:
            raise ExplainError("not a plan: the JSON has no \"Plan\" key")
    if not isinstance(top["Plan"], dict) or "Node Type" not in top["Plan"]:
        raise ExplainError("not a plan: \"Plan\" has no \"Node Type\"")
    root = _node_from_json(top["Plan"])
    jit = None
    if isinstance(top.get("JIT"), dict):
        timing = top["JIT"].get("Timing") or {}
        jit = JitInfo(
            functions=_as_int(top["JIT"].get("Functions")),
            generation_time=_timing_value(timing.get("Generation")),
            inlining_time=_timing_value(timing.get("Inlining")),
            optimization_time=_timing_value(timing.get("Optimization")),
            emission_time=_timing_value(timing.get("Emission")),
            total_time=_timing_value(timing.get("Total")),
        )
    triggers = [t for t in top.get("Triggers") or [] if isinstance(t, dict)]
    return Plan(
        root=root,
        planning_time=_as_float(top.get("Planning Time")),
        execution_time=_as_float(top.get("Execution Time")),
        jit=jit,
        triggers=triggers,
        source_format="json",
    )


def _timing_value(value: Any) -> float | None:
    # PostgreSQL 17 turned "Generation" into an object: {"Deform": .., "Total": ..}.
    if isinstance(value, dict):
        return _as_float(value.get("Total"))
    return _as_float(value)


def _node_from_json(data: dict[str, Any]) -> PlanNode:
    node = PlanNode(node_type=str(data.get("Node Type")))
    for key, attr in _JSON_FIELDS.items():
        if data.get(key) is not None:
            setattr(node, attr, str(data[key]))
    for key, attr in _JSON_NUMBERS.items():
        setattr(node, attr, _as_float(data.get(key)))
    for key, attr in _JSON_INTS.items():
        setattr(node, attr, _as_int(data.get(key)))
    node.parallel_aware = bool(data.get("Parallel Aware"))
    for key in ("CTE Name", "Function Name", "Tuplestore Name", "Table Function Name"):
        if data.get(key) is not None:
            node.object_name = str(data[key])
    if node.subplan_name:
        # "InitPlan 1 (returns $0)" in JSON up to PostgreSQL 17; text prints "InitPlan 1".
        node.subplan_name = re.sub(r" \(returns .*\)$", "", node.subplan_name)
    if isinstance(data.get("Sort Key"), list):
        node.sort_key = [str(k) for k in data["Sort Key"]]
    if node.actual_loops == 0:
        node.never_executed = True
        node.actual_total_time = node.actual_startup_time = None
        node.actual_rows = None
    node.children = [_node_from_json(c) for c in data.get("Plans") or [] if isinstance(c, dict)]
    return node


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _as_int(value: Any) -> int | None:
    number = _as_float(value)
    return None if number is None else int(number)


# ----------------------------------------------------------------------------------------------
# Text

_NUM = r"[0-9]+(?:\.[0-9]+)?"
_COSTS = re.compile(
    rf"\s+\(cost=(?P<sc>{_NUM})\.\.(?P<tc>{_NUM}) rows=(?P<rows>{_NUM}) width=(?P<width>\d+)\)"
)
_ACTUAL = re.compile(
    rf"\s+\((?:actual (?:time=(?P<as>{_NUM})\.\.(?P<at>{_NUM}) )?rows=(?P<ar>{_NUM}) "
    rf"loops=(?P<al>{_NUM})|(?P<never>never executed))\)"
)
_GROUP = re.compile(r"^(?P<name>(?:InitPlan|SubPlan) \d+|CTE \S+)(?: \(returns .*\))?$")
_AGGREGATES = {
    "Aggregate": None,
    "HashAggregate": "Hashed",
    "GroupAggregate": "Sorted",
    "MixedAggregate": "Mixed",
}
_JOIN = re.compile(
    r"^(?P<kind>Hash|Merge|Nested Loop)(?: (?P<jt>Left|Right|Full|Semi|Anti|Right Semi|"
    r"Right Anti))?(?: Join)?$"
)
_MODIFY = ("Insert", "Update", "Delete", "Merge")


_IDENT = r'(?:"(?:[^"]|"")*"|[^\s."]+)'
_RELATION = re.compile(rf"^(?:(?P<schema>{_IDENT})\.)?(?P<name>{_IDENT})(?: (?P<alias>{_IDENT}))?$")


def _unquote(identifier: str | None) -> str | None:
    if identifier and identifier.startswith('"') and identifier.endswith('"'):
        return identifier[1:-1].replace('""', '"')
    return identifier


def _split_relation(rest: str) -> tuple[str | None, str, str | None]:
    """``public.orders o`` -> (schema, relation, alias); quoted names are unquoted."""
    match = _RELATION.match(rest)
    if match is None:
        return None, rest, None
    return (_unquote(match["schema"]), _unquote(match["name"]) or rest,
            _unquote(match["alias"]))


def _node_from_label(label: str) -> PlanNode:
    node = PlanNode(node_type=label)
    text = label
    if text.startswith("Parallel "):
        node.parallel_aware = True
        text = text[len("Parallel "):]
    for mode in ("Partial ", "Finalize "):
        if text.startswith(mode):
            node.partial_mode = mode.strip()
            text = text[len(mode):]
    on_part: str | None = None
    using = re.match(r"^(?P<type>.+?)(?: (?P<dir>Backward))? using (?P<idx>\S+) on (?P<rest>.+)$",
                     text)
    if using:
        text, node.index_name, on_part = using["type"], _unquote(using["idx"]), using["rest"]
        if using["dir"]:
            node.scan_direction = "Backward"
    elif text.startswith("Bitmap Index Scan on "):
        node.index_name = _unquote(text[len("Bitmap Index Scan on "):].strip())
        text = "Bitmap Index Scan"
    elif " on " in text:
        text, on_part = text.split(" on ", 1)
    if on_part:
        schema, name, alias = _split_relation(on_part.strip())
        if text in NAMED_SCANS:
            node.object_name, node.alias = name, alias or name
        elif text in ALIAS_ONLY_SCANS:
            node.alias = name
        else:
            node.schema, node.relation, node.alias = schema, name, alias or name
    if text in _AGGREGATES:
        node.node_type = "Aggregate"
        node.strategy = _AGGREGATES[text]
        if node.strategy is None:
            node.strategy = "Plain"
        return node
    if text == "HashSetOp":
        node.node_type, node.strategy = "SetOp", "Hashed"
        return node
    if text in _MODIFY:
        node.node_type, node.operation = "ModifyTable", text
        return node
    join = _JOIN.match(text)
    if join and (text.endswith("Join") or text == "Nested Loop"):
        kind = join["kind"]
        node.node_type = "Nested Loop" if kind == "Nested Loop" else f"{kind} Join"
        node.join_type = join["jt"] or "Inner"
        return node
    node.node_type = text
    return node


def _kb(value: str) -> float | None:
    match = re.match(rf"({_NUM})\s*kB", value)
    return float(match.group(1)) if match else None


def _split_top_level(text: str) -> list[str]:
    """Split ``a, f(b, c), d`` at commas outside parentheses and quotes."""
    parts: list[str] = []
    current: list[str] = []
    depth, quote = 0, False
    for char in text:
        if char == "'":
            quote = not quote
        elif not quote and char == "(":
            depth += 1
        elif not quote and char == ")":
            depth -= 1
        if char == "," and depth == 0 and not quote:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if current:
        parts.append("".join(current).strip())
    return parts


def _apply_property(node: PlanNode, key: str, value: str) -> None:
    simple = {
        "Filter": "filter",
        "Index Cond": "index_cond",
        "Recheck Cond": "recheck_cond",
        "Join Filter": "join_filter",
        "Hash Cond": "hash_cond",
        "Merge Cond": "merge_cond",
    }
    counters = {
        "Rows Removed by Filter": "rows_removed_by_filter",
        "Rows Removed by Index Recheck": "rows_removed_by_index_recheck",
        "Rows Removed by Join Filter": "rows_removed_by_join_filter",
        "Heap Fetches": "heap_fetches",
    }
    if key in simple:
        setattr(node, simple[key], value)
    elif key in counters:
        setattr(node, counters[key], _as_float(value))
    elif key in ("Sort Key", "Presorted Key"):
        if key == "Sort Key":
            node.sort_key = _split_top_level(value)
    elif key == "Sort Method":
        # "external merge  Disk: 1688kB" / "quicksort  Memory: 64kB"
        method, _, space = value.partition("  ")
        node.sort_method = method.strip()
        space_match = re.search(rf"(Disk|Memory): ({_NUM})kB", space)
        if space_match:
            node.sort_space_type = space_match.group(1)
            node.sort_space_used = float(space_match.group(2))
    elif key == "Heap Blocks":
        for name, number in re.findall(rf"(exact|lossy)=({_NUM})", value):
            if name == "exact":
                node.exact_heap_blocks = float(number)
            else:
                node.lossy_heap_blocks = float(number)
    elif key == "Buckets":
        batches = re.search(r"Batches: (\d+)(?: \(originally (\d+)\))?", value)
        if batches:
            node.hash_batches = int(batches.group(1))
            node.original_hash_batches = int(batches.group(2) or batches.group(1))
        memory = re.search(rf"Memory Usage: ({_NUM})kB", value)
        if memory:
            node.peak_memory_usage = float(memory.group(1))
    elif key == "Workers Planned":
        node.workers_planned = _as_int(value)
    elif key == "Workers Launched":
        node.workers_launched = _as_int(value)
    elif key == "Buffers":
        for scope, body in re.findall(r"(shared|local|temp)((?: \w+=\d+)+)", value):
            figures = dict(re.findall(r"(\w+)=(\d+)", body))
            if scope == "shared":
                node.shared_hit_blocks = _as_int(figures.get("hit")) or 0
                node.shared_read_blocks = _as_int(figures.get("read")) or 0
            elif scope == "temp":
                node.temp_read_blocks = _as_int(figures.get("read")) or 0
                node.temp_written_blocks = _as_int(figures.get("written")) or 0


def _parse_header(line: str) -> PlanNode | None:
    """A node line (``Seq Scan on t  (cost=...) (actual ...)``), or None if it is not one."""
    costs = _COSTS.search(line)
    actual = _ACTUAL.search(line)
    first = costs or actual
    if first is None:
        return None
    node = _node_from_label(line[: first.start()].strip())
    if costs:
        node.startup_cost = float(costs["sc"])
        node.total_cost = float(costs["tc"])
        node.plan_rows = float(costs["rows"])
        node.plan_width = int(costs["width"])
    if actual:
        if actual["never"]:
            node.never_executed = True
        else:
            node.actual_startup_time = _as_float(actual["as"])
            node.actual_total_time = _as_float(actual["at"])
            node.actual_rows = _as_float(actual["ar"])
            node.actual_loops = _as_float(actual["al"])
    return node


def _parse_duration(value: str) -> float | None:
    match = re.match(rf"({_NUM}) ms", value.strip())
    return float(match.group(1)) if match else None


def plan_from_text(text: str) -> Plan:
    """Build a ``Plan`` from EXPLAIN's text format (already stripped of psql decoration)."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        raise ExplainError("empty input: expected an EXPLAIN plan")
    # Whatever precedes the first node line is psql chatter (echoed commands, SET, BEGIN).
    root = None
    for start, line in enumerate(lines):
        root = _parse_header(line.strip().removeprefix("->").strip())
        if root is not None:
            lines = lines[start:]
            break
    if root is None:
        snippet = lines[0].strip()[:60]
        raise ExplainError("not a plan: no plan node line such as 'Seq Scan on t  (cost=...)'; "
                           f"the input starts with {snippet!r}")
    # Lines indented no deeper than the root are statement-level (Planning Time, JIT ...).
    base = len(lines[0]) - len(lines[0].lstrip())
    # Stack of (column where the node's label starts, node).
    stack: list[tuple[int, PlanNode]] = [(base, root)]
    pending_group: tuple[int, str] | None = None
    planning_time = execution_time = None
    jit: JitInfo | None = None
    triggers: list[dict[str, Any]] = []
    section: str | None = None  # a statement-level block such as "JIT:" or "Planning:"
    worker_indent: int | None = None  # inside a "Worker N:" block of per-worker figures
    for line in lines[1:]:
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if worker_indent is not None:
            if indent > worker_indent:
                continue  # one worker's own Sort Method, Buffers ...: the node's are above
            worker_indent = None
        if indent <= base:
            section = None
            key, _, value = body.partition(":")
            value = value.strip()
            if key == "Planning Time":
                planning_time = _parse_duration(value)
            elif key in ("Execution Time", "Total runtime"):
                execution_time = _parse_duration(value)
            elif key == "JIT":
                jit = JitInfo()
                section = "JIT"
            elif key.startswith("Trigger "):
                match = re.match(rf"Trigger (.+?): time=({_NUM}) calls=(\d+)", body)
                if match:
                    triggers.append({"Trigger Name": match.group(1),
                                     "Time": float(match.group(2)),
                                     "Calls": int(match.group(3))})
            else:
                section = key
            continue
        if section is not None:
            if section == "JIT" and jit is not None:
                _apply_jit(jit, body)
            continue
        if body.startswith("->"):
            arrow_col = indent
            node = _parse_header(body[2:].strip())
            if node is None:
                raise ExplainError(f"not a plan: cannot read node line {body[:60]!r}")
            while len(stack) > 1 and stack[-1][0] >= arrow_col:
                stack.pop()
            parent = stack[-1][1]
            if pending_group is not None and pending_group[0] < arrow_col:
                name = pending_group[1]
                node.subplan_name = name
                node.parent_relationship = (
                    "InitPlan" if name.startswith(("InitPlan", "CTE")) else "SubPlan"
                )
                pending_group = None
            elif node.parent_relationship is None:
                node.parent_relationship = "Inner" if parent.children else "Outer"
            parent.children.append(node)
            label_col = arrow_col + len(body) - len(body[2:].lstrip())
            stack.append((label_col, node))
            continue
        group = _GROUP.match(body)
        if group:
            while len(stack) > 1 and stack[-1][0] >= indent:
                stack.pop()
            pending_group = (indent, group["name"])
            continue
        while len(stack) > 1 and stack[-1][0] >= indent:
            stack.pop()
        key, sep, value = body.partition(":")
        if key.startswith("Worker ") and sep:
            worker_indent = indent
        elif sep:
            _apply_property(stack[-1][1], key.strip(), value.strip())
    return Plan(
        root=root,
        planning_time=planning_time,
        execution_time=execution_time,
        jit=jit,
        triggers=triggers,
        source_format="text",
    )


def _apply_jit(jit: JitInfo, body: str) -> None:
    key, _, value = body.partition(":")
    if key == "Functions":
        jit.functions = _as_int(value.strip())
    elif key == "Timing":
        # PostgreSQL 17: "Generation 1.2 ms (Deform 0.1 ms), Inlining ..." - drop the aside.
        value = re.sub(r"\s*\(Deform [^)]*\)", "", value)
        for name, number in re.findall(rf"(\w+) ({_NUM}) ms", value):
            attr = f"{name.lower()}_time"
            if hasattr(jit, attr):
                setattr(jit, attr, float(number))
