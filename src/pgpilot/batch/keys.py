"""Batch keys as values of the key column's type, the same way through every driver.

Keys often arrive as strings (``/customers/1``): ``load("1")`` on an integer column must load
the row of id 1 whether the batch function runs on asyncpg (which refuses a ``str`` for an
integer parameter), psycopg or SQLAlchemy (which send it as text that PostgreSQL parses, so the
row comes back keyed by ``1`` and the load of ``"1"`` found nothing). So each key is converted
to the Python type the driver returns for the column before it is sent, and the rows are
matched back to the keys as they were given:

- integer columns (smallint, integer, bigint): an int, a whole float or Decimal, or a string of
  decimal digits; a value outside the column's range cannot match a row and loads as no row;
- numeric: an int, a Decimal or a numeric string; real / double precision: an int, a float or
  a numeric string;
- uuid: a UUID or any string ``uuid.UUID`` reads;
- text, varchar, char(n), name and citext columns: a string, or an int or UUID as its text
  (char(n) matches ignoring trailing blanks, citext ignoring case, as PostgreSQL does); enum
  columns: a string;
- date, timestamp, timestamp with time zone: the date / datetime, or its ISO 8601 text; a
  naive datetime for timestamptz, or an aware one for timestamp, is ambiguous and refused;
- boolean: a bool.

A key that cannot stand for a value of the column's type fails its own load with a
:class:`~pgpilot.batch.errors.BatchKeyError` naming the key and the column type; the other
keys of the batch load. Keys for columns of any other type are sent as given. Domains count as
their base type.

The key column's type is read from the catalog (:func:`catalog_query`) once per
:class:`~pgpilot.batch.sql.BatchQuery`, on its first batch, whatever the driver.
"""

from __future__ import annotations

import datetime
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from numbers import Integral
from typing import Any, Final

from pgpilot.batch.errors import BatchKeyError

__all__ = [
    "KeyPlan",
    "KeyType",
    "catalog_query",
    "key_type_from_catalog",
    "key_type_from_python",
]


class _NoRow:
    """A key that is a valid value but no row can have (outside the column's range)."""

    def __repr__(self) -> str:
        return "NO_ROW"


NO_ROW: Final = _NoRow()

# A converter returns the value to send (the key itself when it is already right) or NO_ROW,
# or raises _Unfit with what the column accepts.
Converter = Callable[[Any], Any]


class _Unfit(Exception):
    """The key cannot stand for a value of the column's type; the message says what can."""


_DIGITS = re.compile(r"[+-]?[0-9]+")


def _integer(bits: int) -> Converter:
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    def convert(key: Any) -> Any:
        if type(key) is int:
            value = key
        elif isinstance(key, bool):
            raise _Unfit("expected an int or a string of decimal digits, not a bool")
        elif isinstance(key, Integral):
            value = int(key)
        elif isinstance(key, str) and _DIGITS.fullmatch(key.strip()):
            value = int(key.strip())
        elif isinstance(key, float | Decimal) and _is_whole(key):
            value = int(key)
        else:
            raise _Unfit("expected an int or a string of decimal digits")
        if not low <= value <= high:
            return NO_ROW  # PostgreSQL could not even compare it: no row has it
        return key if value is key else value

    return convert


def _is_whole(number: float | Decimal) -> bool:
    try:
        return bool(number == int(number))
    except (ValueError, OverflowError, InvalidOperation):  # nan, inf
        return False


def _numeric(key: Any) -> Any:
    if isinstance(key, Decimal) and key.is_finite():
        return key
    if isinstance(key, Integral) and not isinstance(key, bool):
        return Decimal(int(key))
    if isinstance(key, str):
        try:
            value = Decimal(key.strip())
        except InvalidOperation:
            pass
        else:
            if value.is_finite():
                return value
    raise _Unfit("expected a Decimal, an int or a numeric string")


def _floating(key: Any) -> Any:
    if type(key) is float:
        return key
    if isinstance(key, Integral | float | Decimal) and not isinstance(key, bool):
        return float(key)
    if isinstance(key, str):
        try:
            return float(key.strip())
        except ValueError:
            pass
    raise _Unfit("expected a float, an int or a numeric string")


def _uuid(key: Any) -> Any:
    if isinstance(key, uuid.UUID):
        return key
    if isinstance(key, str):
        try:
            return uuid.UUID(key.strip())
        except ValueError:
            pass
    raise _Unfit("expected a UUID or its text (e.g. '0b9e6a57-12c4-4f3e-9d5a-3f2a1c7e8b90')")


def _text(key: Any) -> Any:
    if isinstance(key, str):
        return key
    if (isinstance(key, Integral) and not isinstance(key, bool)) or isinstance(key, uuid.UUID):
        return str(key)
    raise _Unfit("expected a str (or an int or UUID, sent as its text)")


def _date(key: Any) -> Any:
    if isinstance(key, datetime.date) and not isinstance(key, datetime.datetime):
        return key
    if isinstance(key, str):
        try:
            return datetime.date.fromisoformat(key.strip())
        except ValueError:
            pass
    raise _Unfit("expected a datetime.date or its ISO 8601 text (YYYY-MM-DD)")


def _timestamp(aware: bool) -> Converter:
    wanted = "an aware datetime" if aware else "a naive datetime"

    def convert(key: Any) -> Any:
        value = key
        if isinstance(key, str):
            try:
                value = datetime.datetime.fromisoformat(key.strip())
            except ValueError:
                raise _Unfit(f"expected {wanted} or its ISO 8601 text") from None
        if not isinstance(value, datetime.datetime):
            raise _Unfit(f"expected {wanted} or its ISO 8601 text")
        if (value.utcoffset() is not None) != aware:
            raise _Unfit(
                f"expected {wanted}: a time zone is needed to tell which instant it is"
                if aware
                else f"expected {wanted}: the column has no time zone to compare it in"
            )
        return value

    return convert


def _label(key: Any) -> Any:
    if isinstance(key, str):
        return key
    raise _Unfit("expected a str, one of the enum's labels")


def _boolean(key: Any) -> Any:
    if isinstance(key, bool):
        return key
    raise _Unfit("expected a bool")


# Base type name (pg_type.typname) -> converter.
_CONVERTERS: Final[dict[str, Converter]] = {
    "int2": _integer(16),
    "int4": _integer(32),
    "int8": _integer(64),
    "numeric": _numeric,
    "float4": _floating,
    "float8": _floating,
    "uuid": _uuid,
    "text": _text,
    "varchar": _text,
    "bpchar": _text,
    "name": _text,
    "citext": _text,
    "date": _date,
    "timestamp": _timestamp(aware=False),
    "timestamptz": _timestamp(aware=True),
    "bool": _boolean,
}


def _blank_padded(value: Any) -> Any:
    return value.rstrip(" ") if isinstance(value, str) else value


def _case_folded(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


# PostgreSQL's equality for these types is looser than Python's on the values returned:
# char(n) comes back blank-padded, citext compares lower-cased.
_MATCHERS: Final[dict[str, Callable[[Any], Any]]] = {
    "bpchar": _blank_padded,
    "citext": _case_folded,
}


@dataclass(frozen=True)
class KeyType:
    """The key column's type as far as converting keys goes."""

    column: str
    """The column as a person reads it, e.g. ``"shop"."customers"."id"``."""
    shown: str
    """Its type as PostgreSQL prints it, e.g. ``integer`` or ``character varying(20)``."""
    convert: Converter | None = None
    """Key -> value to send; None: keys are sent as given."""
    match: Callable[[Any], Any] | None = None
    """Applied to both sides before matching rows to keys, where PostgreSQL's equality is
    looser than Python's (char(n), citext)."""

    def plan(self, keys: Sequence[Any]) -> KeyPlan:
        """The values to send for ``keys``, and how to match the rows back to them."""
        convert = self.convert
        if convert is None:
            return KeyPlan(keys, keys)
        targets: list[Any] = []
        changed = self.match is not None
        for key in keys:
            try:
                target = convert(key)
            except _Unfit as unfit:
                target = BatchKeyError(
                    key, column=self.column, column_type=self.shown, expected=str(unfit)
                )
            changed = changed or target is not key
            targets.append(target)
        if not changed:
            return KeyPlan(keys, keys)
        send = [target for target in targets if not isinstance(target, _NoRow | Exception)]
        return KeyPlan(keys, send, targets, self.match)


class KeyPlan:
    """Keys as given, the values sent for them, and how to match the rows to the keys."""

    __slots__ = ("keys", "match", "send", "targets")

    def __init__(
        self,
        keys: Sequence[Any],
        send: Sequence[Any],
        targets: list[Any] | None = None,
        match: Callable[[Any], Any] | None = None,
    ) -> None:
        self.keys = keys
        self.send = list(send)
        """The key values to send as the array parameter (may be empty: then send nothing)."""
        self.targets = targets
        """Per key, what it was converted to (a value, NO_ROW or its error); None when every
        key is sent as given."""
        self.match = match

    def mapping(
        self,
        shape: Callable[[Sequence[Any], Iterable[Any], Callable[[Any], Any]], dict[Any, Any]],
        rows: Iterable[Any],
        key_of: Callable[[Any], Any],
        many: bool,
    ) -> dict[Any, Any]:
        """The batch result, keyed by the keys as given; ``shape`` groups rows by key."""
        if self.targets is None:
            return shape(self.keys, rows, key_of)
        match = self.match
        if match is None:
            found = shape(self.send, rows, key_of)
        else:
            found = shape([match(v) for v in self.send], rows, lambda row: match(key_of(row)))
        result: dict[Any, Any] = {}
        for key, target in zip(self.keys, self.targets, strict=True):
            if isinstance(target, Exception):
                result[key] = target
                continue
            value = None
            if target is not NO_ROW:
                value = found.get(target if match is None else match(target))
            if value is not None:
                result[key] = value
            elif many:
                result[key] = []
        return result


def catalog_query(relation: str, column: str) -> str:
    """SQL reading a column's type: parameters ``relation`` (the quoted, maybe
    schema-qualified name) and ``column`` (the plain name), as the driver's placeholders.

    One row (type as printed, base type's name, whether the base is an enum) or none when there
    is no such relation or column. Domains are followed to their base type. No ``::`` or ``%``
    in the text, so it suits psycopg and SQLAlchemy's ``text()`` as it is.
    """
    return f"""
WITH RECURSIVE chain (type_oid, shown, depth) AS (
    SELECT a.atttypid, pg_catalog.format_type(a.atttypid, a.atttypmod), 0
    FROM pg_catalog.pg_attribute AS a
    WHERE a.attrelid = pg_catalog.to_regclass(CAST({relation} AS text))
      AND a.attname = CAST({column} AS name) AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
    SELECT t.typbasetype, chain.shown, chain.depth + 1
    FROM chain JOIN pg_catalog.pg_type AS t ON t.oid = chain.type_oid
    WHERE t.typtype = 'd'
)
SELECT chain.shown, CAST(base.typname AS text), base.typtype = 'e'
FROM chain JOIN pg_catalog.pg_type AS base ON base.oid = chain.type_oid
ORDER BY chain.depth DESC
LIMIT 1
"""


def key_type_from_catalog(column: str, row: Sequence[Any] | None) -> KeyType | None:
    """The :class:`KeyType` for a row of :func:`catalog_query` (None: no such column)."""
    if row is None:
        return None
    shown, base, is_enum = row[0], row[1], row[2]
    convert = _label if is_enum else _CONVERTERS.get(base)
    return KeyType(column, str(shown), convert, _MATCHERS.get(base))


def key_type_from_python(column: str, sa_type: Any) -> KeyType:
    """The :class:`KeyType` for a SQLAlchemy column type (ORM attributes): by its Python type."""
    try:
        python_type = sa_type.python_type
    except NotImplementedError:
        return KeyType(column, str(sa_type))
    convert: Converter | None = None
    if python_type is bool:
        convert = _boolean
    elif python_type is int:
        convert = _integer(64)
    elif python_type is Decimal:
        convert = _numeric
    elif python_type is float:
        convert = _floating
    elif python_type is uuid.UUID:
        convert = _uuid
    elif python_type is str:
        convert = _text
    elif python_type is datetime.datetime:
        convert = _timestamp(aware=bool(getattr(sa_type, "timezone", False)))
    elif python_type is datetime.date:
        convert = _date
    return KeyType(column, str(sa_type), convert)
