"""The fix to print for a finding: a loader option, a batch query, a bulk statement, a lock.

Used by both faces: the in-app detector passes ``suggest_fix`` to its ``ScopeDetector``, and the
pooler can do the same. An ORM lazy load comes with its loader option already worked out by the
feed that saw it (``QueryEvent.loader_option``); everything else is read from the SQL. For ORM
statements the fix is written in SQLAlchemy's words, for raw SQL in SQL.
"""

from __future__ import annotations

from pgpilot.insight.detector import FindingKind, QueryEvent
from pgpilot.insight.fingerprint import COMMAND_WRITE, batch_rewrite, describe
from pgpilot.insight.shape import shape

__all__ = ["suggest_fix"]


def suggest_fix(kind: FindingKind, event: QueryEvent) -> str:
    """How to remove the round trips (or the rows, or the risk) a finding counts."""
    if kind == "duplicate":
        return (
            "reuse the first result instead of asking again: keep it in a variable, or load "
            "it through a request-scoped pgpilot.batch DataLoader (it answers a repeated key "
            "from its cache); if every request asks it, cache it across requests with "
            "pgpilot.cache (@cache.cached, invalidated when its tables are written)"
        )
    if kind == "duplicate_get":
        return (
            "Session.get() answers a key from the identity map once its row is loaded, so "
            "this repeat looked up a row that was not there (or an object expired by a "
            "commit): keep the first result (None included) in a variable if the lookup is "
            "hot; otherwise it costs one index probe"
        )
    if kind in ("insert_loop", "update_loop", "delete_loop"):
        return _write_loop(kind, event)
    if kind == "missing_contains_eager":
        return (
            f".options({event.loader_option}): the query already joins that table, "
            "so the rows are there to fill the relationship"
            if event.loader_option
            else ".options(contains_eager(...)) on the relationship the query joins"
        )
    if kind == "large_result":
        return (
            "stream it instead of holding every row: .execution_options(yield_per=1000) "
            "(ORM) or .execution_options(stream_results=True) and iterate, or "
            "session.stream(...) / conn.stream(...) on asyncio; or page it (keyset, "
            "pgpilot.orm.paginate)"
        )
    if kind == "deep_offset":
        return (
            "keyset pagination: WHERE (created_at, id) > (:last_created_at, :last_id) "
            "ORDER BY created_at, id LIMIT :n (pgpilot.orm.paginate(session, query, n, "
            "after=cursor) does it for SQLAlchemy, NULLs and mixed directions included); "
            "PostgreSQL reads and throws away every row before an OFFSET"
        )
    if kind == "wrong_type_comparison":
        return (
            "compare with a value of the column's type (WHERE user_id = 42, not '42'; in "
            "SQLAlchemy bind an int): a quoted number is a text literal, and a mismatched "
            "type can keep PostgreSQL from using the column's index"
        )
    if kind == "correlated_subquery":
        return (
            "join and aggregate once instead of a subquery per row: LEFT JOIN (SELECT key, "
            "count(*) ... GROUP BY key) USING (key), or a LATERAL join; in SQLAlchemy a "
            "subquery() joined with .outerjoin()"
        )
    if kind == "unused_eager_load":
        return event.loader_option or "drop the eager loader option nothing reads"
    if event.loader_option:
        return event.loader_option
    if describe(event.sql).command == COMMAND_WRITE:
        return _write_loop(kind, event)
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
        f"keyed on {column}; rows read far more often than written can also come from "
        f"pgpilot.cache"
    )


def _write_loop(kind: FindingKind, event: QueryEvent) -> str:
    if event.tag == "commit_loop":
        return (
            "commit once after the loop: each commit() in the loop flushes one row and ends "
            "a transaction; add all the rows, then commit (or "
            "session.execute(insert(Model), rows) for many)"
        )
    if event.tag == "flush":
        return (
            "flush once: the loop flushes a row at a time (an explicit flush(), or autoflush "
            "before a query in the loop); add all the rows first, or "
            "session.execute(insert(Model), rows) / update(Model) with a list of rows"
        )
    verb = shape(event.sql).verb
    if kind == "insert_loop" or verb == "insert":
        return (
            "send the rows together: session.execute(insert(Model), [dict, ...]) "
            "(SQLAlchemy's insertmanyvalues batches them), executemany() for raw SQL, or COPY "
            "through pgpilot.orm.bulk_load for bulk loads"
        )
    if kind == "update_loop" or verb == "update":
        return (
            "one statement for all the rows: session.execute(update(Model), [{'id': ..., "
            "...}, ...]) (ORM bulk UPDATE by primary key), update(Model).where(Model.id.in_("
            "ids)).values(...) when the change is the same, or UPDATE ... FROM (VALUES ...) "
            "in SQL"
        )
    return (
        "one statement for all the rows: session.execute(delete(Model).where("
        "Model.id.in_(ids))), or DELETE ... WHERE id = ANY(:ids) in SQL"
    )
