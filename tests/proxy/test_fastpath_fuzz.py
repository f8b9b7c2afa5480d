"""A bounded protocol fuzz of a live pooler (issue 26): malformed, truncated, oversized and
out-of-order client messages, from a seeded generator, at the real pooler in front of real
PostgreSQL. Afterwards a well-behaved client on the same pool gets exactly its own answers,
and the pooler's descriptors are back where they were.

Under the sanitizer job (.ci/asan) the same test runs with the engine built with
AddressSanitizer and UBSan.
"""

from __future__ import annotations

import os
import random
import socket
import struct
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import wait_until

from pgpilot.proxy import fastpath
from pgpilot.wire import messages as m

pytestmark = pytest.mark.skipif(not fastpath.available() and os.environ.get("CI") != "true",
                                reason="fast path not built (no C compiler at install)")

CONNECTIONS = int(os.environ.get("PGPILOT_FUZZ_CONNECTIONS", "300"))
SEED = int(os.environ.get("PGPILOT_FUZZ_SEED", "26"))
TYPES = b"QPBDECSHXFdcfpx\x00\xff"


def message(t: bytes, body: bytes, length: int | None = None) -> bytes:
    return t + struct.pack("!i", len(body) + 4 if length is None else length) + body


def junk(rng: random.Random) -> bytes:
    """One client's bytes after its login: valid messages mixed with broken ones."""
    out = bytearray()
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(10)
        if kind == 0:
            out += m.query(f"select {rng.randint(0, 9)}")
        elif kind == 1:  # a length that lies (short, negative, huge)
            out += message(bytes([rng.choice(TYPES)]), b"select 1\0",
                           rng.choice([0, 3, -1, 2**31 - 1, 1 << 24, 5]))
        elif kind == 2:  # random bytes
            out += rng.randbytes(rng.randint(1, 64))
        elif kind == 3:  # extended protocol, out of order, names that do not exist
            out += rng.choice([m.bind_simple("", "nosuch"), m.execute_message(), m.sync(),
                               m.parse_message("", "select $1::int"),
                               message(b"D", b"Sx\0"), message(b"C", b"S\0")])
        elif kind == 4:  # a message cut short (the rest never comes)
            full = m.query("select 'truncated'")
            out += full[:rng.randint(1, len(full) - 1)]
            break
        elif kind == 5:  # \f SET, U& identifiers: the pre-filter's edge cases
            out += m.query(rng.choice(["\fSET application_name = 'fuzz'",
                                       'select U&"\\0061"', "select 1;;;", "/* x */ select 1"]))
        elif kind == 6:  # a startup-phase packet after login
            out += struct.pack("!II", 8, 80877103)
        elif kind == 7:  # a big, valid query
            out += m.query("select length('" + "y" * rng.randint(1000, 70000) + "')")
        elif kind == 8:  # a Bind large enough to be streamed: whole, cut short, or lying
            size = rng.randint(70_000, 300_000)
            bind = m.bind_message("", rng.choice(["", "nosuch"]),
                                  struct.pack("!hhi", 0, 1, size) + b"z" * size
                                  + struct.pack("!h", 0))
            out += m.parse_message("", "select length($1::text)")
            way = rng.randrange(3)
            if way == 0:
                out += bind + m.execute_message() + m.sync()
            elif way == 1:
                out += bind[:rng.randint(6, len(bind) - 1)]
                break
            else:  # a length past its bytes, then other messages read as its body
                out += b"B" + struct.pack("!i", len(bind) + rng.randint(1, 5000)) + bind[5:]
        else:
            out += m.terminate()
    return bytes(out)


def test_protocol_fuzz_leaves_the_pool_clean(proxy_factory: Any, pg_params: dict[str, str]) -> None:
    proxy = proxy_factory(default_pool_size=2, client_message_timeout=1,
                          query_wait_timeout=20)
    with psycopg.connect(proxy.dsn(), autocommit=True) as warm:
        warm.execute("select 1")
    baseline = len(os.listdir("/proc/self/fd")) - proxy.server_count()
    rng = random.Random(SEED)
    startup = m.startup_message({"user": pg_params["user"], "database": "test"})
    for _ in range(CONNECTIONS):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            if rng.random() < 0.1:  # broken before the login
                sock.sendall(rng.randbytes(rng.randint(1, 40)))
            else:
                sock.sendall(startup + junk(rng))
            sock.settimeout(0.2 if rng.random() < 0.7 else 0.01)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
    # A well-behaved client on the same pool: exactly its own answers, in order.
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for i in range(50):
            assert conn.execute("select %s::int, %s::text", [i, f"v{i}"]).fetchone() == (
                i, f"v{i}")
        assert conn.execute("show application_name").fetchone() != ("fuzz",)
    wait_until(lambda: len(os.listdir("/proc/self/fd")) - proxy.server_count() <= baseline + 2,
               timeout=20)
