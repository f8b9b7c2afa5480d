"""The plan model: one typed tree that JSON and text EXPLAIN output both parse into.

Everything downstream (rules, rendering, comparison, the advisor) reads this model only, so
the two input formats and the PostgreSQL versions they come from (13 to 18) differ in
``parse.py`` and nowhere else. Times are in milliseconds, sizes in kB.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


class ExplainError(Exception):
    """A problem the user can fix (bad input, unreachable server, failing statement).

    The command-line front ends print its message as one line and exit non-zero.
    """


# Scans that read something other than a table: "on X" names a CTE or a function ...
NAMED_SCANS = ("CTE Scan", "Function Scan", "WorkTable Scan", "Named Tuplestore Scan",
               "Table Function Scan")
# ... or only an alias (a subquery, a VALUES list).
ALIAS_ONLY_SCANS = ("Subquery Scan", "Values Scan")


@dataclass
class PlanNode:
    """One node of a plan tree, with the fields the rules read."""

    node_type: str
    relation: str | None = None
    # What a non-table scan reads: the CTE of a CTE Scan, the function of a Function Scan.
    object_name: str | None = None
    schema: str | None = None
    alias: str | None = None
    index_name: str | None = None
    join_type: str | None = None
    strategy: str | None = None
    parent_relationship: str | None = None
    subplan_name: str | None = None
    parallel_aware: bool = False
    partial_mode: str | None = None
    operation: str | None = None
    scan_direction: str | None = None
    startup_cost: float | None = None
    total_cost: float | None = None
    plan_rows: float | None = None
    plan_width: int | None = None
    actual_startup_time: float | None = None
    actual_total_time: float | None = None
    actual_rows: float | None = None
    actual_loops: float | None = None
    never_executed: bool = False
    filter: str | None = None
    index_cond: str | None = None
    recheck_cond: str | None = None
    join_filter: str | None = None
    hash_cond: str | None = None
    merge_cond: str | None = None
    sort_key: list[str] = field(default_factory=list)
    sort_method: str | None = None
    sort_space_used: float | None = None
    sort_space_type: str | None = None
    rows_removed_by_filter: float | None = None
    rows_removed_by_index_recheck: float | None = None
    rows_removed_by_join_filter: float | None = None
    heap_fetches: float | None = None
    exact_heap_blocks: float | None = None
    lossy_heap_blocks: float | None = None
    hash_batches: int | None = None
    original_hash_batches: int | None = None
    peak_memory_usage: float | None = None
    workers_planned: int | None = None
    workers_launched: int | None = None
    shared_hit_blocks: int | None = None
    shared_read_blocks: int | None = None
    temp_read_blocks: int | None = None
    temp_written_blocks: int | None = None
    children: list[PlanNode] = field(default_factory=list)
    # Filled in by ``Plan.__post_init__``: position and derived timings.
    node_id: int = 0
    depth: int = 0
    parent: PlanNode | None = field(default=None, repr=False, compare=False)
    inclusive_time: float | None = None
    exclusive_time: float | None = None
    exclusive_cost: float | None = None

    @property
    def display_type(self) -> str:
        """The node's name as EXPLAIN's text format prints it (``Parallel Seq Scan``, ...)."""
        name = self.node_type
        if name == "Aggregate":
            name = {"Hashed": "HashAggregate", "Sorted": "GroupAggregate",
                    "Mixed": "MixedAggregate"}.get(self.strategy or "", "Aggregate")
        elif name == "SetOp" and self.strategy == "Hashed":
            name = "HashSetOp"
        elif name == "ModifyTable" and self.operation:
            name = self.operation
        elif name in ("Hash Join", "Merge Join", "Nested Loop") and self.join_type not in (
            None, "Inner"
        ):
            base = name.removesuffix(" Join")
            name = f"{base} {self.join_type} Join"
        if self.partial_mode in ("Partial", "Finalize"):
            name = f"{self.partial_mode} {name}"
        if self.parallel_aware:
            name = f"Parallel {name}"
        if self.scan_direction == "Backward" and "Index" in name:
            name += " Backward"
        return name

    @property
    def label(self) -> str:
        """What a person calls this node: ``Seq Scan on orders o``, ``Index Scan using pk on t``."""
        text = self.display_type
        if self.index_name and self.node_type == "Bitmap Index Scan":
            return f"{text} on {self.index_name}"
        if self.index_name:
            text += f" using {self.index_name}"
        if self.relation:
            text += f" on {self.relation}"
            if self.alias and self.alias != self.relation:
                text += f" {self.alias}"
        elif self.object_name:
            text += f" on {self.object_name}"
            if self.alias and self.alias != self.object_name:
                text += f" {self.alias}"
        elif self.alias and self.node_type in ALIAS_ONLY_SCANS:
            text += f" on {self.alias}"
        return text

    @property
    def loops(self) -> float:
        return self.actual_loops if self.actual_loops else 1.0

    @property
    def total_actual_rows(self) -> float | None:
        """Rows produced over all loops (``actual rows`` is a per-loop average)."""
        if self.actual_rows is None:
            return None
        return self.actual_rows * self.loops

    def total_removed(self, per_loop: float | None) -> float:
        """A ``Rows Removed by ...`` counter over all loops (it is printed per loop)."""
        return (per_loop or 0.0) * self.loops

    def walk(self) -> Iterator[PlanNode]:
        """This node and every node below it, depth first, in plan order."""
        yield self
        for child in self.children:
            yield from child.walk()

    def ancestors(self) -> Iterator[PlanNode]:
        node = self.parent
        while node is not None:
            yield node
            node = node.parent


@dataclass
class JitInfo:
    functions: int | None = None
    generation_time: float | None = None
    inlining_time: float | None = None
    optimization_time: float | None = None
    emission_time: float | None = None
    total_time: float | None = None


@dataclass
class Plan:
    """A whole EXPLAIN result: the tree plus the statement-level figures."""

    root: PlanNode
    planning_time: float | None = None
    execution_time: float | None = None
    jit: JitInfo | None = None
    triggers: list[dict[str, Any]] = field(default_factory=list)
    source_format: str = "json"

    def __post_init__(self) -> None:
        self._number_and_time()

    @property
    def analyzed(self) -> bool:
        """Whether the plan carries run-time figures (EXPLAIN ANALYZE) or estimates only."""
        return any(
            n.actual_total_time is not None or n.actual_rows is not None or n.never_executed
            for n in self.root.walk()
        )

    @property
    def total_time(self) -> float | None:
        """Wall time the statement took: Execution Time, else the root node's time."""
        if self.execution_time is not None:
            return self.execution_time
        return self.root.inclusive_time

    @property
    def nodes(self) -> list[PlanNode]:
        return list(self.root.walk())

    @property
    def timed(self) -> bool:
        """Whether node times are known (not so without ANALYZE, or with TIMING OFF)."""
        return bool(self.root.inclusive_time)

    def share(self, node: PlanNode) -> float:
        """The node's own share (0..1) of the plan's time, or of its cost when not timed."""
        if self.timed:
            total = self.root.inclusive_time or self.total_time or 0.0
            if total <= 0 or node.exclusive_time is None:
                return 0.0
            return min(1.0, node.exclusive_time / total)
        total_cost = self.root.total_cost or 0.0
        if total_cost <= 0 or node.exclusive_cost is None:
            return 0.0
        return min(1.0, node.exclusive_cost / total_cost)

    def inclusive_share(self, node: PlanNode) -> float:
        """Share of the node together with everything below it."""
        if self.timed:
            total = self.root.inclusive_time or 0.0
            if total <= 0 or node.inclusive_time is None:
                return 0.0
            return min(1.0, node.inclusive_time / total)
        if not self.root.total_cost or node.total_cost is None:
            return 0.0
        return min(1.0, node.total_cost / self.root.total_cost)

    def _number_and_time(self) -> None:
        counter = 0

        def visit(node: PlanNode, parent: PlanNode | None, depth: int) -> None:
            nonlocal counter
            counter += 1
            node.node_id = counter
            node.depth = depth
            node.parent = parent
            if node.actual_total_time is not None:
                node.inclusive_time = node.actual_total_time * node.loops
            elif node.never_executed:
                node.inclusive_time = 0.0
            for child in node.children:
                visit(child, node, depth + 1)
            if node.node_type in ("Gather", "Gather Merge"):
                _fill_parallel_section(node)
            if node.inclusive_time is not None:
                node.exclusive_time = max(0.0, node.inclusive_time - _time_inside(node))
            if node.total_cost is not None:
                below_cost = sum(
                    c.total_cost or 0.0
                    for c in node.children
                    if c.parent_relationship not in ("InitPlan", "SubPlan")
                )
                node.exclusive_cost = max(0.0, node.total_cost - below_cost)

        visit(self.root, None, 0)


def _time_inside(node: PlanNode) -> float:
    """Time of the node's children that is part of the node's own time.

    InitPlans run once, separately: their time is not inside the parent's.
    """
    return sum(
        c.inclusive_time or 0.0 for c in node.children if c.parent_relationship != "InitPlan"
    )


def _fill_parallel_section(gather: PlanNode) -> None:
    """Give the wall time of a Gather (Merge) to the nodes below it, which ran in parallel.

    Below a Gather, a node's actual time is an average over the processes that ran it (leader
    and workers, ``loops`` of them), and the leader only times a node while it runs it itself:
    while it waits for the workers' rows, the time is counted as the Gather's, although the
    workers spend it in the nodes below. So the Gather's own time would hide the parallel
    scan that makes it up (a Parallel Seq Scan rated at half the statement, where the same
    scan without workers is all of it). Instead, the Gather's wall time is divided among the
    nodes below it in proportion to the time the processes spent in each (their times summed
    over all loops), and the Gather keeps none: a parallel plan and its serial twin then give
    the scan the same share. InitPlans of the Gather run before the workers and keep their
    own times.
    """
    wall = gather.inclusive_time
    inside = [c for c in gather.children if c.parent_relationship != "InitPlan"]
    measured = sum(c.inclusive_time or 0.0 for c in inside)
    if wall is None or measured <= 0:
        return
    scale = wall / measured
    for child in inside:
        for node in child.walk():
            if node.inclusive_time is not None:
                node.inclusive_time *= scale
            if node.exclusive_time is not None:
                node.exclusive_time *= scale
