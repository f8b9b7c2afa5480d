"""What a statement's parse tree (pglast) says: its kind, its tables, and how it filters them.

The advisor builds index candidates from this, and the rules use it to make fixes concrete
(the columns of a plan node's ``Filter``, whether a statement modifies data). It also reads
plan expressions (``Filter: ((status = 'open'::text) AND ...)``), which are valid SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pglast import ast, enums, parse_sql
from pglast.parser import ParseError
from pglast.stream import RawStream

from pgpilot.explain.model import ExplainError

EQUALITY_OPERATORS = {"="}
RANGE_OPERATORS = {"<", ">", "<=", ">=", "~~", "~~*"}
MAX_LISTED_VALUES = 20


def quote_ident(name: str) -> str:
    """``name`` as it must be written in SQL: bare when lower-case and plain, else quoted."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class TableRef:
    """A table named in FROM: ``schema.name AS alias``."""

    name: str
    schema: str | None
    alias: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass(frozen=True)
class Predicate:
    """One AND-ed condition on one column of one table.

    ``kind`` is ``eq`` (=, IN, = ANY), ``range`` (<, >, BETWEEN, LIKE 'prefix%'), ``null``
    (IS [NOT] NULL) or ``bool`` (a boolean column alone). ``constant`` says the value is a
    literal, so the condition can become a partial index's WHERE; ``sql`` is that condition
    written against the bare column. ``cast`` says the column is wrapped in a cast.
    """

    table: str | None  # alias as written, or None when unqualified
    column: str
    kind: str
    constant: bool
    sql: str
    cast: str | None = None
    pattern: bool = False  # a LIKE 'prefix%': the index needs text_pattern_ops


@dataclass
class QueryShape:
    kind: str  # select | insert | update | delete | merge | other
    modifies: bool
    tables: list[TableRef] = field(default_factory=list)
    predicates: list[Predicate] = field(default_factory=list)
    join_columns: list[tuple[str | None, str]] = field(default_factory=list)
    order_by: list[tuple[str | None, str, bool]] = field(default_factory=list)
    selected: list[tuple[str | None, str]] = field(default_factory=list)
    selects_star: bool = False
    offset: int | None = None
    limit: int | None = None


def _names(fields: Any) -> list[str]:
    return [str(f.sval) for f in fields if isinstance(f, ast.String)]


def _column_of(node: Any) -> tuple[str | None, str, str | None] | None:
    """``o.status`` -> ("o", "status", None); ``(o.id)::text`` -> ("o", "id", "text")."""
    cast = None
    if isinstance(node, ast.TypeCast):
        type_name: Any = node.typeName
        cast = ".".join(_names(type_name.names)).removeprefix("pg_catalog.")
        node = node.arg
    if isinstance(node, ast.ColumnRef):
        names = _names(node.fields)
        if not names:
            return None
        table = names[-2] if len(names) >= 2 else None
        return table, names[-1], cast
    return None


def _is_value(node: Any) -> bool:
    """A comparison value that does not depend on the row: literal, parameter, now() ..."""
    if isinstance(node, ast.A_Const | ast.ParamRef):
        return True
    if isinstance(node, ast.TypeCast):
        return _is_value(node.arg)
    if isinstance(node, ast.A_Expr):
        return all(_is_value(x) for x in (node.lexpr, node.rexpr) if x is not None)
    if isinstance(node, ast.FuncCall):
        return all(_is_value(a) for a in node.args or ())
    if isinstance(node, ast.SQLValueFunction):
        return True
    if isinstance(node, ast.A_ArrayExpr):
        return all(_is_value(a) for a in node.elements or ())
    if isinstance(node, tuple | list):
        return all(_is_value(a) for a in node)
    return False


def _is_literal(node: Any) -> bool:
    if isinstance(node, ast.A_Const):
        return True
    if isinstance(node, ast.TypeCast):
        return _is_literal(node.arg)
    return False


def _sql(node: Any) -> str:
    return str(RawStream()(node))


def conjuncts(expr: Any) -> list[Any]:
    """The AND-ed parts of a WHERE clause."""
    if expr is None:
        return []
    if isinstance(expr, ast.BoolExpr) and expr.boolop == enums.BoolExprType.AND_EXPR:
        out: list[Any] = []
        for arg in expr.args or ():
            out.extend(conjuncts(arg))
        return out
    return [expr]


def classify(expr: Any) -> tuple[list[Predicate], list[tuple[str | None, str]]]:
    """Predicates on single columns, and columns compared to other tables' columns (joins)."""
    predicates: list[Predicate] = []
    joins: list[tuple[str | None, str]] = []
    part: Any
    for part in conjuncts(expr):
        if isinstance(part, ast.A_Expr):
            op = _names(part.name)[0] if part.name else ""
            left, right = _column_of(part.lexpr), _column_of(part.rexpr)
            kind_enum = enums.A_Expr_Kind
            if part.kind == kind_enum.AEXPR_OP and op in EQUALITY_OPERATORS and left and right:
                joins.extend([(left[0], left[1]), (right[0], right[1])])
                continue
            value: Any
            column, value = (left, part.rexpr) if left else (right, part.lexpr)
            if column is None or not _is_value(value):
                continue
            table, name, cast = column
            constant = _is_literal(value) if not isinstance(value, tuple) else all(
                _is_literal(v) for v in value
            )
            if part.kind in (kind_enum.AEXPR_IN, kind_enum.AEXPR_OP_ANY) or (
                part.kind == kind_enum.AEXPR_OP and op in EQUALITY_OPERATORS
            ):
                if part.kind == kind_enum.AEXPR_IN and len(value) > MAX_LISTED_VALUES:
                    # Deparsing is per node and slow; a long IN list is never a partial
                    # index's WHERE anyway, so it is only summarised.
                    text = f"{name} IN (<{len(value)} values>)"
                elif part.kind == kind_enum.AEXPR_IN:
                    text = f"{name} IN ({', '.join(_sql(v) for v in value)})"
                else:
                    text = f"{name} = {_sql(value)}"
                predicates.append(Predicate(table, name, "eq", constant, text, cast))
            elif part.kind in (kind_enum.AEXPR_BETWEEN, kind_enum.AEXPR_LIKE) or (
                part.kind == kind_enum.AEXPR_OP and op in RANGE_OPERATORS
            ):
                is_like = part.kind == kind_enum.AEXPR_LIKE or op in ("~~", "~~*")
                if is_like:
                    # Only a case-sensitive LIKE with a fixed prefix is a btree range scan.
                    pattern = value.val.sval if isinstance(value, ast.A_Const) and isinstance(
                        value.val, ast.String) else ""
                    if op != "~~" or not pattern or pattern[0] in "%_":
                        continue
                text = (f"{name} BETWEEN {_sql(value[0])} AND {_sql(value[1])}"
                        if isinstance(value, tuple) else f"{name} {op} {_sql(value)}")
                predicates.append(Predicate(table, name, "range", constant, text, cast,
                                            pattern=is_like))
        elif (isinstance(part, ast.SubLink)
              and part.subLinkType == enums.SubLinkType.ANY_SUBLINK):
            # col IN (SELECT ...): a semi-join on col.
            column = _column_of(part.testexpr)
            if column:
                joins.append((column[0], column[1]))
        elif isinstance(part, ast.NullTest):
            column = _column_of(part.arg)
            if column:
                negated = part.nulltesttype == enums.NullTestType.IS_NOT_NULL
                text = f"{column[1]} IS {'NOT ' if negated else ''}NULL"
                predicates.append(Predicate(column[0], column[1], "null", True, text))
        elif isinstance(part, ast.ColumnRef):
            column = _column_of(part)
            if column:
                predicates.append(Predicate(column[0], column[1], "bool", True, column[1]))
        elif (isinstance(part, ast.BoolExpr) and part.boolop == enums.BoolExprType.NOT_EXPR
              and isinstance((part.args or (None,))[0], ast.ColumnRef)):
            args: Any = part.args
            column = _column_of(args[0])
            if column:
                predicates.append(
                    Predicate(column[0], column[1], "bool", True, f"NOT {column[1]}"))
    return predicates, joins


def parse_statement(sql: str) -> Any:
    """The single statement in ``sql`` as a pglast node; ``ExplainError`` if it is not one."""
    try:
        statements = parse_sql(sql)
    except ParseError as exc:
        raise ExplainError(f"cannot parse the statement: {exc}") from None
    if len(statements) != 1:
        raise ExplainError(f"expected one SQL statement, got {len(statements)}")
    return statements[0].stmt


def _modifies(stmt: Any) -> bool:
    if isinstance(stmt, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt | ast.MergeStmt):
        return True
    # A SELECT may still write through a data-modifying WITH.
    with_clause = getattr(stmt, "withClause", None)
    if with_clause is not None:
        for cte in with_clause.ctes or ():
            if _modifies(cte.ctequery):
                return True
    return False


def _tables(from_items: Any, out: list[TableRef]) -> None:
    for item in from_items or ():
        if isinstance(item, ast.RangeVar):
            alias = item.alias.aliasname if item.alias else item.relname
            out.append(TableRef(str(item.relname), item.schemaname, str(alias)))
        elif isinstance(item, ast.JoinExpr):
            _tables((item.larg, item.rarg), out)


def _join_quals(from_items: Any, out: list[Any]) -> None:
    for item in from_items or ():
        if isinstance(item, ast.JoinExpr):
            if item.quals is not None:
                out.append(item.quals)
            _join_quals((item.larg, item.rarg), out)


def _int_value(node: Any) -> int | None:
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.Integer):
        return int(node.val.ival or 0)
    return None


def statement_kind(sql: str) -> tuple[str, bool]:
    """("select" | "insert" | ..., whether it modifies data)."""
    stmt = parse_statement(sql)
    return _kind(stmt), _modifies(stmt)


def _kind(stmt: Any) -> str:
    return {
        ast.SelectStmt: "select",
        ast.InsertStmt: "insert",
        ast.UpdateStmt: "update",
        ast.DeleteStmt: "delete",
        ast.MergeStmt: "merge",
    }.get(type(stmt), "other")


def query_shape(sql: str) -> QueryShape:
    """Tables, column predicates, ORDER BY and selected columns of a statement.

    Conditions inside subqueries (a correlated ``WHERE o.customer_id = c.id``) count too:
    they are where a missing index hurts most.
    """
    stmt: Any = parse_statement(sql)
    shape = QueryShape(kind=_kind(stmt), modifies=_modifies(stmt))
    wheres: list[Any] = []
    if isinstance(stmt, ast.SelectStmt):
        _tables(stmt.fromClause, shape.tables)
        _join_quals(stmt.fromClause, wheres)
        wheres.append(stmt.whereClause)
        for sort in stmt.sortClause or ():
            column = _column_of(sort.node)
            if column:
                desc = sort.sortby_dir == enums.SortByDir.SORTBY_DESC
                shape.order_by.append((column[0], column[1], desc))
        for target in stmt.targetList or ():
            value: Any = target.val
            last_field = (value.fields or (None,))[-1] if isinstance(value, ast.ColumnRef) else None
            if isinstance(last_field, ast.A_Star):
                shape.selects_star = True
                continue
            for ref in _column_refs(value):
                shape.selected.append(ref)
        shape.offset = _int_value(stmt.limitOffset)
        shape.limit = _int_value(stmt.limitCount)
    elif isinstance(stmt, ast.UpdateStmt | ast.DeleteStmt):
        relation: Any = stmt.relation
        alias = relation.alias.aliasname if relation.alias else relation.relname
        shape.tables.append(TableRef(str(relation.relname), relation.schemaname, str(alias)))
        _tables(getattr(stmt, "fromClause", None) or getattr(stmt, "usingClause", None),
                shape.tables)
        wheres.append(stmt.whereClause)
    # Subqueries: their tables and conditions (correlated ones included).
    for sub in _subselects(stmt):
        _tables(sub.fromClause, shape.tables)
        _join_quals(sub.fromClause, wheres)
        wheres.append(sub.whereClause)
    for where in wheres:
        predicates, joins = classify(where)
        shape.predicates.extend(predicates)
        shape.join_columns.extend(joins)
    return shape


def _column_refs(node: Any) -> list[tuple[str | None, str]]:
    refs: list[tuple[str | None, str]] = []

    def visit(value: Any) -> None:
        if isinstance(value, ast.ColumnRef):
            column = _column_of(value)
            if column:
                refs.append((column[0], column[1]))
        elif isinstance(value, ast.SubLink):
            return
        elif isinstance(value, ast.Node):
            for name in getattr(value, "__slots__", ()):
                visit(getattr(value, name, None))
        elif isinstance(value, tuple | list):
            for item in value:
                visit(item)

    visit(node)
    return refs


def _subselects(stmt: Any) -> list[Any]:
    found: list[Any] = []

    def visit(value: Any, top: bool) -> None:
        if isinstance(value, ast.SelectStmt) and not top:
            found.append(value)
        if isinstance(value, ast.Node):
            for name in getattr(value, "__slots__", ()):
                visit(getattr(value, name, None), False)
        elif isinstance(value, tuple | list):
            for item in value:
                visit(item, False)

    visit(stmt, True)
    return found


def expression_predicates(expression: str) -> tuple[list[Predicate], list[tuple[str | None, str]]]:
    """Classify a plan expression such as ``((status = 'open'::text) AND (amount > 5))``."""
    try:
        statements = parse_sql(f"SELECT 1 WHERE {expression}")
    except ParseError:
        return [], []
    stmt: Any = statements[0].stmt
    return classify(stmt.whereClause)


# Aggregates whose scalar subquery can move into a grouped LEFT JOIN; count needs a
# coalesce to keep returning 0 for outer rows without a match.
_MOVABLE_AGGREGATES = {"count", "sum", "min", "max", "avg", "bool_and", "bool_or",
                       "string_agg", "array_agg", "every"}


def join_rewrite(sql: str) -> str | None:
    """``sql`` with its correlated scalar aggregate subqueries turned into LEFT JOINs.

    ``SELECT c.id, (SELECT sum(p.amount) FROM payments p WHERE p.customer_id = c.id) FROM
    customers c`` becomes ``SELECT c.id, sub1.value AS sum FROM customers c LEFT JOIN (SELECT
    p.customer_id, sum(p.amount) AS value FROM payments p GROUP BY p.customer_id) AS sub1 ON
    sub1.customer_id = c.id``: one pass over payments instead of one per customer. Only the
    shapes where this is exactly equivalent are rewritten; None for anything else.
    """
    try:
        stmt: Any = parse_statement(sql)
    except ExplainError:
        return None
    if not isinstance(stmt, ast.SelectStmt) or len(stmt.fromClause or ()) != 1:
        return None
    outer: list[TableRef] = []
    _tables(stmt.fromClause, outer)
    outer_names = {t.alias for t in outer} | {t.name for t in outer}
    from_item: Any = (stmt.fromClause or (None,))[0]
    rewritten = 0
    for target in stmt.targetList or ():
        parts = _movable_subquery(target.val, outer_names)
        if parts is None:
            continue
        inner_refs, outer_refs, aggregate, relation, local = parts
        rewritten += 1
        name = f"sub{rewritten}"
        columns = ", ".join(_sql(ref) for ref in inner_refs)
        derived = f"SELECT {columns}, {_sql(aggregate)} AS value FROM {_sql(relation)}"
        if local:
            derived += " WHERE " + " AND ".join(_sql(c) for c in local)
        derived += f" GROUP BY {columns}"
        on = " AND ".join(
            f"{name}.{_names(i.fields)[-1]} = {_sql(o)}" for i, o in zip(inner_refs, outer_refs,
                                                                          strict=True))
        template: Any = parse_sql(f"SELECT 1 FROM x LEFT JOIN ({derived}) AS {name} ON {on}")
        join = template[0].stmt.fromClause[0]
        join.larg = from_item
        from_item = join
        function = _names(aggregate.funcname)[-1]
        value = f"coalesce({name}.value, 0)" if function == "count" else f"{name}.value"
        replacement: Any = parse_sql(f"SELECT {value}")
        if target.name is None:
            target.name = function  # the column keeps the name the subquery gave it
        target.val = replacement[0].stmt.targetList[0].val
    if not rewritten:
        return None
    stmt.fromClause = (from_item,)
    return str(RawStream()(stmt))


def _movable_subquery(value: Any, outer_names: set[str]) -> tuple[Any, ...] | None:
    if not isinstance(value, ast.SubLink) or value.subLinkType != enums.SubLinkType.EXPR_SUBLINK:
        return None
    sub: Any = value.subselect
    if (not isinstance(sub, ast.SelectStmt) or len(sub.fromClause or ()) != 1
            or not isinstance((sub.fromClause or (None,))[0], ast.RangeVar) or sub.groupClause
            or sub.havingClause or sub.limitCount or sub.limitOffset or sub.withClause
            or len(sub.targetList or ()) != 1):
        return None
    first_target: Any = (sub.targetList or (None,))[0]
    aggregate: Any = first_target.val
    if (not isinstance(aggregate, ast.FuncCall) or aggregate.over is not None
            or _names(aggregate.funcname)[-1] not in _MOVABLE_AGGREGATES):
        return None
    relation: Any = (sub.fromClause or (None,))[0]
    inner_name = relation.alias.aliasname if relation.alias else relation.relname
    inner_refs: list[Any] = []
    outer_refs: list[Any] = []
    local: list[Any] = []

    def side(ref: Any) -> str | None:
        if not isinstance(ref, ast.ColumnRef):
            return None
        names = _names(ref.fields)
        if len(names) == 1 or names[-2] == inner_name:
            return "inner"
        return "outer" if names[-2] in outer_names else None

    for condition in conjuncts(sub.whereClause):
        if (isinstance(condition, ast.A_Expr) and condition.kind == enums.A_Expr_Kind.AEXPR_OP
                and _names(condition.name) == ["="]):
            sides = (side(condition.lexpr), side(condition.rexpr))
            if sides == ("inner", "outer"):
                inner_refs.append(condition.lexpr)
                outer_refs.append(condition.rexpr)
                continue
            if sides == ("outer", "inner"):
                inner_refs.append(condition.rexpr)
                outer_refs.append(condition.lexpr)
                continue
        refs = _column_refs(condition)
        if any(t is not None and t != inner_name for t, _ in refs):
            return None  # another outer reference we cannot move into a join
        local.append(condition)
    if not inner_refs or any(r is not None for r in (aggregate.agg_filter,)):
        return None
    return inner_refs, outer_refs, aggregate, relation, local
