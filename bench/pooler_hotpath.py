"""The pooler's per-transaction Python cost, without sockets: one client, one server, fakes.

Feeds a ClientConnection a Query and its ServerConnection the reply (RowDescription, DataRow,
CommandComplete, ReadyForQuery), as in ``pgbench -S -M simple``, through the real objects of
``pgpilot.proxy`` with transports that only count what is written. What it measures is the
Python work per transaction that no kernel or event loop takes part in; ``--profile`` shows
where it goes. Run: ``python bench/pooler_hotpath.py [--n 50000] [--profile]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from typing import Any

from pgpilot.proxy.client import ClientConnection
from pgpilot.proxy.config import DatabaseConfig, default_config
from pgpilot.proxy.pooler import Pooler
from pgpilot.proxy.server import ServerConnection
from pgpilot.proxy.states import ClientState, ServerState
from pgpilot.wire import messages as m


class FakeTransport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 6432)}.get(name, default)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool:
        return False


QUERY = m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;")
REPLY = (m.row_description([("abalance", 23)]) + m.data_row(["0"])
         + m.command_complete("SELECT 1") + m.READY_IDLE)


async def setup(pool_mode: str) -> tuple[ClientConnection, ServerConnection]:
    cfg = default_config(auth_type="trust", pool_mode=pool_mode, server_check_delay=3600,
                         databases={"*": DatabaseConfig(name="*", host="127.0.0.1")})
    pooler = Pooler(cfg)
    db = cfg.database_for("bench")
    assert db is not None
    pool = pooler.get_pool(db, "bench", "bench")
    pool.welcome_params = {"server_version": "15", "client_encoding": "UTF8"}
    server = ServerConnection(pool)
    pool.add_server(server)
    server.transport = FakeTransport(("127.0.0.1", 5432))  # type: ignore[assignment]
    server.params = dict(pool.welcome_params)
    server.login_done.set_result(None)
    from pgpilot.proxy.server import LINKED_TYPES
    from pgpilot.wire.framing import MessageReader

    server.reader = MessageReader(LINKED_TYPES)
    server.set_state(ServerState.IDLE)
    pool.idle.append(server) if server not in pool.idle else None
    client = ClientConnection(pooler)
    client.connection_made(FakeTransport(("127.0.0.1", 40000)))  # type: ignore[arg-type]
    client.user, client.database = "bench", "bench"
    client.logged_in(auth_ok_sent=True)
    assert client.state is ClientState.ACTIVE
    return client, server


def run(client: ClientConnection, server: ServerConnection, n: int) -> float:
    # CPU time of this process: on a shared machine, wall time would count others' turns.
    start = time.process_time()
    for _ in range(n):
        client.data_received(QUERY)
        server.data_received(REPLY)
    return (time.process_time() - start) / n


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--mode", default="transaction")
    args = parser.parse_args()
    client, server = await setup(args.mode)
    run(client, server, 2000)  # warm up
    assert client.server is None or args.mode == "session"
    per_tx = min(run(client, server, args.n) for _ in range(3))
    print(f"{args.mode}: {per_tx * 1e6:.2f} us of Python CPU per transaction (best of 3)")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(client, server, args.n)
        prof.disable()
        stats = pstats.Stats(prof)
        print(f"{stats.total_calls / args.n:.0f} function calls per transaction")  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    asyncio.run(main())
