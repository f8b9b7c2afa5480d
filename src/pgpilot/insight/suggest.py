"""The fix to print for a finding: a loader option, a batch query, or reusing a result.

Used by both faces: the in-app detector passes ``suggest_fix`` to its ``ScopeDetector``, and the
pooler can do the same. An ORM lazy load comes with its loader option already worked out by the
feed that saw it (``QueryEvent.loader_option``); everything else is read from the SQL.
"""

from __future__ import annotations

from pgpilot.insight.detector import FindingKind, QueryEvent
from pgpilot.insight.fingerprint import COMMAND_WRITE, batch_rewrite, describe

__all__ = ["suggest_fix"]


def suggest_fix(kind: FindingKind, event: QueryEvent) -> str:
    """How to remove the round trips a finding counts."""
    if kind == "duplicate":
        return (
            "reuse the first result instead of asking again: keep it in a variable, or load "
            "it through a request-scoped pgpilot.batch DataLoader (it answers a repeated key "
            "from its cache)"
        )
    if event.loader_option:
        return event.loader_option
    statement = describe(event.sql)
    if statement.command == COMMAND_WRITE:
        return (
            "send the rows together: executemany() (psycopg pipelines it), one multi-row "
            "INSERT ... VALUES / UPDATE ... FROM (VALUES ...), or COPY for bulk loads"
        )
    rewrite = batch_rewrite(event.sql)
    if rewrite is None:
        return (
            "fetch what the loop needs in one query before the loop, or load it through a "
            "pgpilot.batch DataLoader"
        )
    column, batch_sql = rewrite
    return (
        f"one query for the whole loop: {batch_sql} (collect the {column} values first, "
        f"select {column} to group the rows), or load through a pgpilot.batch DataLoader "
        f"keyed on {column}"
    )
