"""How cached values become bytes and back: msgpack with types by default, signed pickle on request.

The default, :class:`MsgpackSerializer`, never runs code on load: it rebuilds only plain data
(None, bool, int, float, str, bytes, list, dict) and a fixed set of types carried as msgpack
extension types: ``tuple``, ``set``, ``frozenset``, ``datetime``/``date``/``time``/``timedelta``,
``Decimal``, ``UUID``, IP addresses and networks, and SQLAlchemy ``Row`` (rebuilt as a ``Row``
with the same field names). Any other ``Mapping`` (SQLAlchemy ``RowMapping``, asyncpg
``Record``) is stored as a ``dict``; subclasses of ``int``, ``str``, ``list`` and ``dict`` (enums
among them) come back as the builtin. Anything else raises :class:`TypeError` when it is stored:
the call still returns its value, the value is just not cached.

:class:`SignedPickleSerializer` stores anything pickle can, behind an HMAC-SHA256 of the bytes
with a key the application provides: a value whose signature does not verify is never
unpickled (it counts as an error and a miss), so write access to Redis is not code execution.

Each serializer has a one-byte ``format_id`` written in front of every value, so a value
written by one serializer is never read by another (it is a miss).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import pickle
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import msgpack  # type: ignore[import-untyped]

__all__ = [
    "MsgpackSerializer",
    "SerializationError",
    "Serializer",
    "SignedPickleSerializer",
    "canonical_bytes",
]


class SerializationError(ValueError):
    """Stored bytes that cannot be turned back into a value (corrupt, foreign or tampered)."""


@runtime_checkable
class Serializer(Protocol):
    """What a cache needs of a serializer."""

    format_id: int  # 1..255, unique per serializer kind

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


# msgpack extension type codes: part of the stored format, never renumber.
_EXT_TUPLE = 1
_EXT_SET = 2
_EXT_FROZENSET = 3
_EXT_DATETIME = 4
_EXT_DATE = 5
_EXT_TIME = 6
_EXT_TIMEDELTA = 7
_EXT_DECIMAL = 8
_EXT_UUID = 9
_EXT_ROW = 10
_EXT_IP = 11
_EXT_SORTED_MAP = 12  # only in key material: a dict as its items sorted by packed key

_TIMEDELTA = struct.Struct(">qqq")
_IP_TYPES: dict[str, Callable[[str], Any]] = {
    "a4": ipaddress.IPv4Address,
    "a6": ipaddress.IPv6Address,
    "n4": ipaddress.IPv4Network,
    "n6": ipaddress.IPv6Network,
    "i4": ipaddress.IPv4Interface,
    "i6": ipaddress.IPv6Interface,
}
_IP_TAGS: dict[type, str] = {kind: tag for tag, kind in _IP_TYPES.items()}  # type: ignore[misc]


@lru_cache(maxsize=256)
def _row_factory(fields: tuple[str, ...]) -> Callable[[Sequence[Any]], Any]:
    from sqlalchemy.engine.result import result_tuple

    return result_tuple(list(fields))


def _is_row(value: object) -> bool:
    return hasattr(value, "_fields") and hasattr(value, "_mapping") and hasattr(value, "_asdict")


class MsgpackSerializer:
    """msgpack with extension types for the values database rows hold (the default)."""

    format_id = 1

    def __init__(self) -> None:
        self._packer_default = self._default

    def _pack(self, value: Any) -> bytes:
        packed: bytes = msgpack.packb(
            value, default=self._packer_default, strict_types=True, use_bin_type=True
        )
        return packed

    def _default(self, value: Any) -> Any:
        kind = type(value)
        if kind is tuple:
            return msgpack.ExtType(_EXT_TUPLE, self._pack(list(value)))
        if kind is dt.datetime:
            return msgpack.ExtType(_EXT_DATETIME, value.isoformat().encode())
        if kind is Decimal:
            return msgpack.ExtType(_EXT_DECIMAL, str(value).encode())
        if kind is dt.date:
            return msgpack.ExtType(_EXT_DATE, value.isoformat().encode())
        if kind is uuid.UUID:
            return msgpack.ExtType(_EXT_UUID, value.bytes)
        if kind is dt.time:
            return msgpack.ExtType(_EXT_TIME, value.isoformat().encode())
        if kind is dt.timedelta:
            packed = _TIMEDELTA.pack(value.days, value.seconds, value.microseconds)
            return msgpack.ExtType(_EXT_TIMEDELTA, packed)
        if kind is set:
            return msgpack.ExtType(_EXT_SET, self._pack(list(value)))
        if kind is frozenset:
            return msgpack.ExtType(_EXT_FROZENSET, self._pack(list(value)))
        if kind in _IP_TAGS:
            return msgpack.ExtType(_EXT_IP, f"{_IP_TAGS[kind]}{value}".encode())
        if isinstance(value, bool):  # a bool subclass cannot exist, but keep ints honest
            return bool(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, str):
            return str(value)
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        if isinstance(value, dict):
            return dict(value)
        if isinstance(value, list):
            return list(value)
        if _is_row(value):
            payload = self._pack([list(value._fields), list(value)])
            return msgpack.ExtType(_EXT_ROW, payload)
        if isinstance(value, tuple):  # namedtuples: kept as plain tuples
            return msgpack.ExtType(_EXT_TUPLE, self._pack(list(value)))
        if isinstance(value, Mapping):
            return dict(value.items())
        if isinstance(value, dt.datetime | dt.date):  # subclasses (pendulum, ...) as the base
            return self._default(
                dt.datetime.fromisoformat(value.isoformat())
                if isinstance(value, dt.datetime)
                else dt.date.fromisoformat(value.isoformat())
            )
        raise TypeError(
            f"the cache's msgpack serializer cannot store a {kind.__module__}.{kind.__qualname__}"
            " (convert it to plain data, or use SignedPickleSerializer)"
        )

    def _ext_hook(self, code: int, data: bytes) -> Any:
        if code == _EXT_TUPLE:
            return tuple(self._unpack(data))
        if code == _EXT_DATETIME:
            return dt.datetime.fromisoformat(data.decode())
        if code == _EXT_DECIMAL:
            return Decimal(data.decode())
        if code == _EXT_DATE:
            return dt.date.fromisoformat(data.decode())
        if code == _EXT_UUID:
            return uuid.UUID(bytes=data)
        if code == _EXT_TIME:
            return dt.time.fromisoformat(data.decode())
        if code == _EXT_TIMEDELTA:
            days, seconds, micro = _TIMEDELTA.unpack(data)
            return dt.timedelta(days=days, seconds=seconds, microseconds=micro)
        if code == _EXT_SET:
            return set(self._unpack(data))
        if code == _EXT_FROZENSET:
            return frozenset(self._unpack(data))
        if code == _EXT_ROW:
            fields, values = self._unpack(data)
            return _row_factory(tuple(fields))(values)
        if code == _EXT_IP:
            text = data.decode()
            return _IP_TYPES[text[:2]](text[2:])
        raise SerializationError(f"unknown msgpack extension type {code}")

    def _unpack(self, data: bytes) -> Any:
        return msgpack.unpackb(data, ext_hook=self._ext_hook, strict_map_key=False, raw=False)

    def dumps(self, value: Any) -> bytes:
        return self._pack(value)

    def loads(self, data: bytes) -> Any:
        try:
            return self._unpack(data)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(f"cannot read a cached value: {exc}") from exc


class SignedPickleSerializer:
    """pickle, signed with HMAC-SHA256: a value that does not verify is never unpickled.

    ``key`` is a secret of at least 16 bytes shared by every process of the application (keep
    it out of Redis). Use it for values msgpack cannot hold (ORM objects, your own classes).
    """

    format_id = 2
    _DIGEST = 32

    def __init__(self, key: bytes | str, *, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        secret = key.encode() if isinstance(key, str) else bytes(key)
        if len(secret) < 16:
            raise ValueError("SignedPickleSerializer needs a key of at least 16 bytes")
        self._key = secret
        self._protocol = protocol

    def _sign(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def dumps(self, value: Any) -> bytes:
        data = pickle.dumps(value, protocol=self._protocol)
        return self._sign(data) + data

    def loads(self, data: bytes) -> Any:
        signature, body = data[: self._DIGEST], data[self._DIGEST :]
        if len(signature) != self._DIGEST or not hmac.compare_digest(signature, self._sign(body)):
            raise SerializationError("a cached pickle's signature does not verify: not loaded")
        return pickle.loads(body)


# ------------------------------------------------------------------------------------------
# Key material: the same arguments give the same bytes in every process and Python version
# ------------------------------------------------------------------------------------------

_KEY_SERIALIZER = MsgpackSerializer()
_PLAIN = (int, str, bytes, float, bool, type(None))


def _canonical(value: Any) -> Any:
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is list or kind is tuple:
        return kind(_canonical(item) for item in value)
    if isinstance(value, Mapping):
        items = sorted(
            ((_KEY_SERIALIZER.dumps(_canonical(k)), _canonical(v)) for k, v in value.items()),
            key=lambda item: item[0],
        )
        return msgpack.ExtType(
            _EXT_SORTED_MAP, _KEY_SERIALIZER.dumps([[k, v] for k, v in items])
        )
    if kind is set or kind is frozenset:
        members = sorted(_KEY_SERIALIZER.dumps(_canonical(item)) for item in value)
        return msgpack.ExtType(_EXT_SET, _KEY_SERIALIZER.dumps(members))
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    return value


def canonical_bytes(value: Any) -> bytes:
    """The bytes a key is hashed from: msgpack, with dicts and sets in a sorted order.

    Raises :class:`TypeError` for a value the msgpack serializer cannot hold.
    """
    return _KEY_SERIALIZER.dumps(_canonical(value))
