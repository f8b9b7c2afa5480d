"""EXPLAIN analyzer and index advisor: read a plan, name what makes it slow, prove the fix.

``analyze_plan(text_or_json)`` parses EXPLAIN output (JSON, or text as psql prints it) and
returns a ``Report`` of findings with concrete fixes; ``pgpilot explain`` and
``pgpilot advise`` are the command-line faces (``command.py``, ``advise_command.py``).
"""

from pgpilot.explain.model import ExplainError, Plan, PlanNode
from pgpilot.explain.parse import parse_plan
from pgpilot.explain.report import Report, analyze_plan
from pgpilot.explain.rules import RULE_IDS, Finding

__all__ = [
    "RULE_IDS",
    "ExplainError",
    "Finding",
    "Plan",
    "PlanNode",
    "Report",
    "analyze_plan",
    "parse_plan",
]
