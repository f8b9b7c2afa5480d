"""What a statement's text alone says about how it will perform.

:func:`shape` parses a statement once (cached on the exact text, like ``describe``) and reads
the few facts the query doctor's statement-level rules need:

* its verb (``select``, ``insert``, ``update``, ``delete`` ...), for the write-loop kinds;
* its ``OFFSET`` and ``LIMIT``: a constant, or which parameter carries it (``deep_offset``);
* ``FOR UPDATE`` / ``FOR SHARE`` (``unlocked_read_modify_write``);
* ``SELECT *`` from a table;
* a correlated scalar subquery in the select list (one subquery run per row);
* an identifier-like column (``id``, ``*_id``) compared with a quoted number
  (``WHERE user_id = '42'``), a wrong-type comparison.

It imports nothing else of pgpilot but ``insight.fingerprint``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind, SubLinkType

from pgpilot.insight.fingerprint import to_dollar_params

__all__ = ["Bound", "Shape", "param_names", "shape"]

SHAPE_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Bound:
    """A LIMIT or OFFSET: a constant ``value``, or the number of the parameter that holds it."""

    value: int | None = None
    param: int | None = None
    """1-based ``$n`` number (placeholders numbered as ``to_dollar_params`` numbers them)."""


@dataclass(frozen=True, slots=True)
class Shape:
    """The facts about one statement text the doctor's statement rules read."""

    verb: str
    """``select``, ``insert``, ``update``, ``delete``, ``merge``, ``copy``, or ``other``."""
    parsed: bool
    offset: Bound | None = None
    limit: Bound | None = None
    for_update: bool = False
    select_star: bool = False
    correlated_subquery: str | None = None
    """The outer table the select list's subquery refers to, when it does."""
    wrong_type: tuple[str, str] | None = None
    """``(column, literal)`` for ``column = '42'`` on an ``id`` / ``*_id`` column."""
    tables: tuple[str, ...] = ()


_UNPARSED = Shape(verb="other", parsed=False)


@lru_cache(maxsize=SHAPE_CACHE_SIZE)
def param_names(sql: str) -> tuple[str, ...]:
    """The ``%(name)s`` names of a pyformat statement in ``$n`` order (empty for others)."""
    if "%(" not in sql:
        return ()
    names: list[str] = []
    start = 0
    while True:
        start = sql.find("%(", start)
        if start < 0:
            break
        end = sql.find(")", start)
        if end < 0:
            break
        name = sql[start + 2 : end]
        if name not in names:
            names.append(name)
        start = end + 1
    return tuple(names)


@lru_cache(maxsize=SHAPE_CACHE_SIZE)
def shape(sql: str) -> Shape:
    """Parse ``sql`` once and read its shape (cached on the exact text)."""
    try:
        tree = parse_sql(to_dollar_params(sql))
    except Exception:
        return _UNPARSED
    if len(tree) != 1:
        return Shape(verb="other", parsed=True)
    node = tree[0].stmt
    if isinstance(node, ast.SelectStmt):
        return _select_shape(node)
    verb = {
        ast.InsertStmt: "insert",
        ast.UpdateStmt: "update",
        ast.DeleteStmt: "delete",
        ast.MergeStmt: "merge",
        ast.CopyStmt: "copy",
    }.get(type(node), "other")
    relation = getattr(node, "relation", None)
    tables = (str(relation.relname),) if relation is not None and relation.relname else ()
    return Shape(
        verb=verb,
        parsed=True,
        wrong_type=_wrong_type(getattr(node, "whereClause", None)),
        tables=tables,
    )


def _select_shape(node: ast.SelectStmt) -> Shape:
    tables = _relation_names(node.fromClause)
    star = bool(tables) and any(
        isinstance(target.val, ast.ColumnRef)
        and any(isinstance(field, ast.A_Star) for field in target.val.fields or ())
        for target in node.targetList or ()
        if isinstance(target, ast.ResTarget)
    )
    return Shape(
        verb="select",
        parsed=True,
        offset=_bound(node.limitOffset),
        limit=_bound(node.limitCount),
        for_update=bool(node.lockingClause),
        select_star=star,
        correlated_subquery=_correlated_subquery(node),
        wrong_type=_wrong_type(node.whereClause),
        tables=tuple(name for name, _ in tables),
    )


def _bound(node: Any) -> Bound | None:
    if isinstance(node, ast.TypeCast):
        node = node.arg
    if isinstance(node, ast.A_Const):
        value = getattr(node.val, "ival", None)
        return Bound(value=int(value)) if isinstance(value, int) else None
    if isinstance(node, ast.ParamRef) and node.number is not None:
        return Bound(param=int(node.number))
    return None


def _relation_names(from_clause: Any) -> list[tuple[str, str]]:
    """``(table, alias or table)`` for each plain table of a FROM clause."""
    found: list[tuple[str, str]] = []

    def visit(item: Any) -> None:
        if isinstance(item, ast.RangeVar):
            name = str(item.relname)
            alias = item.alias.aliasname if item.alias is not None else name
            found.append((name, str(alias)))
        elif isinstance(item, ast.JoinExpr):
            visit(item.larg)
            visit(item.rarg)

    for item in from_clause or ():
        visit(item)
    return found


def _correlated_subquery(node: ast.SelectStmt) -> str | None:
    outer = {alias for _, alias in _relation_names(node.fromClause)}
    if not outer:
        return None
    for target in node.targetList or ():
        value = getattr(target, "val", None)
        if not (
            isinstance(value, ast.SubLink)
            and value.subLinkType == SubLinkType.EXPR_SUBLINK
            and isinstance(value.subselect, ast.SelectStmt)
        ):
            continue
        inner = {alias for _, alias in _relation_names(value.subselect.fromClause)}
        for qualifier in _qualifiers(value.subselect.whereClause):
            if qualifier in outer and qualifier not in inner:
                return qualifier
    return None


def _qualifiers(node: Any) -> list[str]:
    """The table qualifiers of every column reference under ``node``."""
    found: list[str] = []

    def visit(item: Any) -> None:
        if isinstance(item, ast.ColumnRef):
            fields = [getattr(field, "sval", None) for field in item.fields or ()]
            if len(fields) >= 2 and fields[-2]:
                found.append(str(fields[-2]))
            return
        if isinstance(item, ast.Node):
            for name in item:
                visit(getattr(item, name))
        elif isinstance(item, tuple | list):
            for element in item:
                visit(element)

    visit(node)
    return found


def _wrong_type(where: Any) -> tuple[str, str] | None:
    if isinstance(where, ast.BoolExpr):
        for arg in where.args or ():
            found = _wrong_type(arg)
            if found is not None:
                return found
        return None
    if not (
        isinstance(where, ast.A_Expr)
        and where.kind == A_Expr_Kind.AEXPR_OP
        and [getattr(part, "sval", None) for part in where.name or ()] == ["="]
    ):
        return None
    for column, constant in ((where.lexpr, where.rexpr), (where.rexpr, where.lexpr)):
        if isinstance(column, ast.ColumnRef) and isinstance(constant, ast.A_Const):
            value = getattr(constant.val, "sval", None)
            name = str(getattr((column.fields or (None,))[-1], "sval", ""))
            if (
                isinstance(value, str)
                and value.strip().lstrip("-").isdigit()
                and (name == "id" or name.endswith("_id"))
            ):
                return name, value
    return None
