"""How long the admin console's SHOW commands take with many idle clients logged in.

The console (and /metrics) take back from the compiled fast path what Python's view lacks
before they read it; this measures what that costs with N idle clients. Against a running
pooler whose console user is ``postgres`` and whose ``auth_type`` lets ``postgres`` in without
a password (``trust`` or ``any``):

    python bench/show_cost.py --port 6432 --database pgbench_ab --clients 5000
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import struct
import time

import psycopg


async def idle_client(port: int, database: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = (struct.pack("!I", 196608) + b"user\0postgres\0database\0" + database.encode()
            + b"\0\0")
    writer.write(struct.pack("!I", len(body) + 4) + body)
    while True:
        head = await reader.readexactly(5)
        await reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)
        if head[:1] == b"Z":
            return writer


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database", default="postgres")
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.clients + 1000), hard))
    writers: list[asyncio.StreamWriter] = []
    for start in range(0, args.clients, 200):
        batch = min(200, args.clients - start)
        writers += await asyncio.gather(*(idle_client(args.port, args.database)
                                          for _ in range(batch)))
    with psycopg.connect(host="127.0.0.1", port=args.port, user="postgres",
                         dbname="pgbouncer", autocommit=True,
                         cursor_factory=psycopg.ClientCursor) as console:  # simple protocol
        # The first command claims the clients the engine logged in alone (login routes,
        # with connection logging off): each gets its Python object, once.
        started = time.perf_counter()
        console.execute("SHOW POOLS").fetchall()
        print(f"first SHOW POOLS: {(time.perf_counter() - started) * 1000:.1f} ms "
              f"with {args.clients} idle clients")
        for command in ("SHOW POOLS", "SHOW STATS", "SHOW CLIENTS"):
            started = time.perf_counter()
            for _ in range(args.repeat):
                console.execute(command).fetchall()
            took = (time.perf_counter() - started) / args.repeat * 1000
            print(f"{command}: {took:.1f} ms with {args.clients} idle clients")
    for writer in writers:
        writer.close()


if __name__ == "__main__":
    asyncio.run(main())
