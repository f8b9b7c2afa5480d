"""What a SQL statement *is*, independent of its parameter values: fingerprint, normalized text,
command class, and the columns it filters on.

The fingerprint is libpg_query's (through pglast): two statements that differ only in constants,
parameter values or the length of an ``IN`` list share it, which is what makes a loop of queries
recognisable as one. Parsing costs tens of microseconds, so :func:`describe` is cached (LRU) on
the exact SQL text: an application or a pooler sees a few hundred distinct texts, each many times.

Driver placeholders (psycopg's ``%s`` / ``%(name)s``) are not PostgreSQL syntax; they are rewritten
to ``$n`` before parsing, so the same query sent by psycopg, asyncpg or the pooler fingerprints
alike.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pglast import ast, parse_sql, parser
from pglast.enums import A_Expr_Kind
from pglast.stream import RawStream

__all__ = [
    "COMMAND_OTHER",
    "COMMAND_READ",
    "COMMAND_WRITE",
    "Statement",
    "describe",
    "fingerprint",
    "normalize",
    "to_dollar_params",
]

# The three classes of statement the detector treats differently: reads of tables can be
# N+1s and duplicates, writes can be N+1s (a loop of single-row writes), anything else
# (transaction control, SET, SELECT now(), nextval()) is neither.
COMMAND_READ = "read"
COMMAND_WRITE = "write"
COMMAND_OTHER = "other"

DESCRIBE_CACHE_SIZE = 4096

# One alternation, scanned left to right, so a placeholder-looking sequence inside a string
# literal, a quoted identifier or a comment is skipped as part of that token.
_PLACEHOLDER_SCAN = re.compile(
    r"""(?P<skip>'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|/\*.*?\*/)"""
    r"""|%\((?P<name>[^)]+)\)[sbt]|(?P<positional>%[sbt])|(?P<percent>%%)"""
    r"""|(?P<qmark>\?(?![|&]))""",
    re.DOTALL,
)
_DOLLAR_PARAM = re.compile(r"\$\d")
_PYFORMAT_PARAM = re.compile(r"%(?:\([^)]*\))?[sbt]")


@dataclass(frozen=True, slots=True)
class Statement:
    """The shape of one SQL text, as far as detection and suggestions need it."""

    fingerprint: str
    """libpg_query fingerprint (hex), or ``"text:<hash>"`` when the text does not parse."""
    normalized: str
    """The text with constants replaced by ``$n`` placeholders."""
    command: str
    """``COMMAND_READ``, ``COMMAND_WRITE`` or ``COMMAND_OTHER``."""
    tables: tuple[str, ...]
    """Relations named in the FROM clause of a read, or the target of a write."""
    filter_columns: tuple[str, ...]
    """Columns compared for equality with a parameter in the WHERE clause (``col = $1``)."""
    parsed: bool
    """False when pglast could not parse the text (the fields above are then best effort)."""


def to_dollar_params(sql: str) -> str:
    """Rewrite psycopg-style ``%s`` / ``%(name)s`` placeholders to PostgreSQL's ``$n``.

    A repeated ``%(name)s`` gets the same number; ``%%`` becomes ``%``. The ``?`` of qmark
    drivers (SQLite) is numbered too, in a text that has no ``$n`` already and no psycopg
    placeholder (where ``?`` is jsonb's), outside the ``?|`` / ``?&`` operators. Text without
    ``%`` or ``?`` is returned as is (asyncpg and the wire protocol already use ``$n``).
    """
    qmarks = (
        "?" in sql
        and _DOLLAR_PARAM.search(sql) is None
        and _PYFORMAT_PARAM.search(sql) is None
    )
    if "%" not in sql and not qmarks:
        return sql
    numbers: dict[str, int] = {}
    counter = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal counter
        if match.group("skip") is not None:
            return match.group(0)
        if match.group("percent") is not None:
            return "%"
        if match.group("qmark") is not None:
            if not qmarks:
                return "?"
            counter += 1
            return f"${counter}"
        name = match.group("name")
        if name is not None:
            if name not in numbers:
                counter += 1
                numbers[name] = counter
            return f"${numbers[name]}"
        counter += 1
        return f"${counter}"

    return _PLACEHOLDER_SCAN.sub(replace, sql)


def fingerprint(sql: str) -> str:
    """The statement's fingerprint (cached): equal for statements that differ only in values."""
    return describe(sql).fingerprint


def normalize(sql: str) -> str:
    """The statement with its constants replaced by ``$n`` (cached)."""
    return describe(sql).normalized


@lru_cache(maxsize=DESCRIBE_CACHE_SIZE)
def describe(sql: str) -> Statement:
    """Parse ``sql`` once and say what it is. Cached on the exact text (LRU)."""
    text = to_dollar_params(sql)
    try:
        tree = parse_sql(text)
        statement_fingerprint = parser.fingerprint(text)
        normalized = parser.normalize(text)
    except Exception:
        # Not every driver text parses (vendor extensions, a client's syntax error): fall back
        # to a hash of the whitespace-collapsed text so identical texts still group together.
        return _describe_unparsed(text)
    command: str
    tables: tuple[str, ...]
    columns: tuple[str, ...]
    if len(tree) != 1:
        command, tables, columns = COMMAND_OTHER, (), ()
    else:
        command, tables, columns = _classify(tree[0].stmt)
    return Statement(
        fingerprint=statement_fingerprint,
        normalized=normalized,
        command=command,
        tables=tables,
        filter_columns=columns,
        parsed=True,
    )


def _describe_unparsed(text: str) -> Statement:
    collapsed = " ".join(text.split())
    digest = hashlib.blake2b(collapsed.lower().encode(), digest_size=8).hexdigest()
    first_word = collapsed.split(" ", 1)[0].lower() if collapsed else ""
    if first_word in ("select", "with", "table"):
        command = COMMAND_READ
    elif first_word in ("insert", "update", "delete", "merge", "copy"):
        command = COMMAND_WRITE
    else:
        command = COMMAND_OTHER
    return Statement(
        fingerprint=f"text:{digest}",
        normalized=collapsed,
        command=command,
        tables=(),
        filter_columns=(),
        parsed=False,
    )


def _classify(node: Any) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    if isinstance(node, ast.SelectStmt):
        tables = _range_names(node.fromClause)
        if node.larg is not None or node.rarg is not None:  # UNION / INTERSECT / EXCEPT
            tables = _range_names(getattr(node.larg, "fromClause", None)) + _range_names(
                getattr(node.rarg, "fromClause", None)
            )
        # A SELECT without a table (SELECT 1, SELECT nextval(...)) reads no data: repeating it
        # is not a redundant read, and it may have side effects.
        command = COMMAND_READ if tables else COMMAND_OTHER
        return command, tables, _equality_columns(node.whereClause)
    if isinstance(node, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt):
        relation = node.relation
        target: tuple[str, ...] = (
            (str(relation.relname),) if relation is not None and relation.relname else ()
        )
        return COMMAND_WRITE, target, _equality_columns(getattr(node, "whereClause", None))
    if isinstance(node, ast.MergeStmt | ast.CopyStmt):
        return COMMAND_WRITE, (), ()
    return COMMAND_OTHER, (), ()


def _range_names(from_clause: Any) -> tuple[str, ...]:
    names: list[str] = []
    for item in from_clause or ():
        _collect_range_names(item, names)
    return tuple(names)


def _collect_range_names(item: Any, names: list[str]) -> None:
    if isinstance(item, ast.RangeVar):
        names.append(str(item.relname))
    elif isinstance(item, ast.JoinExpr):
        _collect_range_names(item.larg, names)
        _collect_range_names(item.rarg, names)
    elif isinstance(item, ast.RangeSubselect):
        names.append("(subquery)")
    elif isinstance(item, ast.RangeFunction):
        names.append("(function)")


def _equality_columns(where: Any) -> tuple[str, ...]:
    columns: list[str] = []
    for comparison in _equality_comparisons(where):
        column = comparison[0]
        if column not in columns:
            columns.append(column)
    return tuple(columns)


def _equality_comparisons(where: Any) -> list[tuple[str, ast.A_Expr, str]]:
    """``(column, node, side)`` for each ``column = $n`` (either order) under AND."""
    found: list[tuple[str, ast.A_Expr, str]] = []
    if isinstance(where, ast.BoolExpr) and where.boolop == 0:  # AND_EXPR
        for arg in where.args or ():
            found.extend(_equality_comparisons(arg))
        return found
    if (
        isinstance(where, ast.A_Expr)
        and where.kind == A_Expr_Kind.AEXPR_OP
        and [getattr(part, "sval", None) for part in where.name or ()] == ["="]
    ):
        if isinstance(where.lexpr, ast.ColumnRef) and isinstance(where.rexpr, ast.ParamRef):
            found.append((_column_name(where.lexpr), where, "rexpr"))
        elif isinstance(where.rexpr, ast.ColumnRef) and isinstance(where.lexpr, ast.ParamRef):
            found.append((_column_name(where.rexpr), where, "lexpr"))
    return found


def _column_name(ref: ast.ColumnRef) -> str:
    fields = [getattr(field, "sval", "*") for field in ref.fields or ()]
    return str(fields[-1]) if fields else "?"


@lru_cache(maxsize=256)
def batch_rewrite(sql: str) -> tuple[str, str] | None:
    """``(column, sql)``: the statement with its first ``column = $n`` turned into
    ``column = ANY(:ids)``, the one query that replaces a loop over that column's values.

    None when the statement is not a read filtered by equality on a parameter.
    """
    text = to_dollar_params(sql)
    try:
        tree = parse_sql(text)
    except Exception:
        return None
    if len(tree) != 1 or not isinstance(tree[0].stmt, ast.SelectStmt):
        return None
    select = tree[0].stmt
    comparisons = _equality_comparisons(select.whereClause)
    if not comparisons:
        return None
    column, comparison, param_side = comparisons[0]
    column_side: Any = comparison.lexpr if param_side == "rexpr" else comparison.rexpr
    # The loop's parameter becomes a marker column, deparsed and then renamed to ":ids".
    marker: Any = ast.ColumnRef(fields=(ast.String(sval="pgpilot_batch_ids"),))
    comparison.kind = A_Expr_Kind.AEXPR_OP_ANY
    comparison.lexpr = column_side
    comparison.rexpr = marker
    rewritten = RawStream()(select)
    return column, rewritten.replace("pgpilot_batch_ids", ":ids")
