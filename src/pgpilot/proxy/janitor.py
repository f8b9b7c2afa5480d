"""The periodic work: timeouts, server lifetimes, warm-up, health (PgBouncer's janitor).

Runs a few times a second and walks the clients and pools once per tick. Every timeout here is
a PgBouncer setting with PgBouncer's meaning; 0 disables it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from pgpilot.proxy.fastpath import fast_client_overdue, is_fast_conn
from pgpilot.proxy.states import ClientState, ServerState

if TYPE_CHECKING:
    from pgpilot.proxy.pool import Pool
    from pgpilot.proxy.pooler import Pooler

log = logging.getLogger("pgpilot.proxy")

TICK = 0.2  # seconds between rounds: fine enough for sub-second timeouts in tests


class Janitor:
    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self._message_ticks = 0

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # one bad round must not end the janitor
                log.exception("janitor round failed")
            await asyncio.sleep(TICK)

    def tick(self) -> None:
        now = time.monotonic()
        cfg = self.pooler.config
        if self.pooler.shutdown_mode == "WAIT_FOR_SERVERS":
            self._shutdown_waiters()
        for client in list(self.pooler.clients[ClientState.WAITING]):
            waited = now - client.wait_started
            if cfg.query_timeout and waited > cfg.query_timeout:
                # As PgBouncer: query_timeout counts the wait for a server too.
                client.fail("57014", "query_timeout", hint=waited_hint(client.pool))
            elif cfg.query_wait_timeout and waited > cfg.query_wait_timeout:
                log_pinned(client.pool)
                client.fail("08P01", f"query_wait_timeout: no server connection became free "
                            f"within {cfg.query_wait_timeout:g} s", hint=waited_hint(client.pool))
            elif cfg.reserve_pool_timeout > 0 and waited > cfg.reserve_pool_timeout \
                    and client.pool is not None:  # reserve_pool_timeout = 0 disables
                client.pool.launch_if_needed(use_reserve=True)
        if cfg.client_login_timeout:
            fast = self.pooler.fast
            if fast is not None and fast.engine.phantoms_logging_in:
                # Clients the engine holds with no Python object, logging in for too long:
                # Python sees them now and times them out below, as any other. (The walk
                # skips logged-in ones; with none logging in, 10,000 idle clients are not
                # walked five times a second.)
                fast.engine.claim_stale(cfg.client_login_timeout)
            for client in list(self.pooler.clients[ClientState.LOGIN]):
                if now - client.last_activity > cfg.client_login_timeout:
                    client.fail("08P01", "client_login_timeout: login took too long",
                                hint=waited_hint(client.pool))
        if cfg.query_timeout:
            # A client whose login waits for a first server (its parameters), as PgBouncer.
            for client in list(self.pooler.clients[ClientState.LOGIN]):
                if client.waits_for_welcome and now - client.last_activity > cfg.query_timeout:
                    client.fail("57014", "query_timeout", hint=waited_hint(client.pool))
        if cfg.client_message_timeout:
            self._stalled_messages(now, cfg.client_message_timeout)
        users = cfg.users
        # Logged-in clients only need looking at when some client timeout is set: 10,000
        # idle clients must not cost a Python loop five times a second for nothing.
        client_limits = any((cfg.client_idle_timeout, cfg.idle_transaction_timeout,
                             cfg.query_timeout)) or any(
            u.client_idle_timeout or u.idle_transaction_timeout for u in (users or {}).values())
        active = list(self.pooler.clients[ClientState.ACTIVE]) if client_limits else []
        for client in active:
            if client.is_admin:
                continue
            user = users.get(client.user) if users else None  # [users] overrides
            if is_fast_conn(client.transport) and client.transport.fast:  # type: ignore[union-attr]
                idle_limit, txn_limit = cfg.client_idle_timeout, cfg.idle_transaction_timeout
                if user is not None and user.client_idle_timeout is not None:
                    idle_limit = user.client_idle_timeout
                if user is not None and user.idle_transaction_timeout is not None:
                    txn_limit = user.idle_transaction_timeout
                if not fast_client_overdue(client, now, idle_limit, txn_limit, cfg.query_timeout):
                    continue
                # A timeout fires: Python takes the pair back, then judges it as always. Not
                # mid-way through a Bind the client streams: judged once it is through.
                if not client.transport.eject():  # type: ignore[union-attr]
                    continue
            if client.server is None:
                limit = cfg.client_idle_timeout
                if user is not None and user.client_idle_timeout is not None:
                    limit = user.client_idle_timeout
                if limit and now - client.last_activity > limit:
                    client.fail("08P01", f"client_idle_timeout: no activity for {limit:g} s")
            elif client.idle_in_txn_since and client.expected_rfq <= 0:
                limit = cfg.idle_transaction_timeout
                if user is not None and user.idle_transaction_timeout is not None:
                    limit = user.idle_transaction_timeout
                if limit and now - client.idle_in_txn_since > limit:
                    # The client is closed; its server's transaction is rolled back and the
                    # server goes back to the pool (Pool.release).
                    client.fail("25P03", "idle transaction timeout",
                                hint=f"The transaction was idle for more than "
                                f"idle_transaction_timeout ({limit:g} s).")
        if cfg.query_timeout:
            self._query_timeouts(now, cfg.query_timeout)
        for pool in list(self.pooler.pools.values()):
            self._pool_upkeep(pool, now)

    def _stalled_messages(self, now: float, limit: float) -> None:
        """client_message_timeout: a client that began a message and then sent nothing for
        ``limit`` seconds is disconnected, and what it sent of the message is dropped (a
        message may be up to 1 MiB on the fast path and more in Python: it must not be held
        forever). The engine keeps its own list of such clients; Python's are walked once
        a second (every fifth tick)."""
        text = f"client_message_timeout: no byte of an unfinished message for {limit:g} s"
        fast = self.pooler.fast
        if fast is not None:
            for client in fast.engine.stalled(limit):
                client.fail("08P01", text)
        self._message_ticks = (self._message_ticks + 1) % 5
        if self._message_ticks:
            return
        for client in list(self.pooler.clients[ClientState.ACTIVE]):
            if is_fast_conn(client.transport) and client.transport.fast:  # type: ignore[union-attr]
                continue
            if client._reader.mid_message and now - client.last_activity > limit:
                client.fail("08P01", text)

    def _query_timeouts(self, now: float, limit: float) -> None:
        """query_timeout: cancel what runs too long, and tell its client (as PgBouncer)."""
        for client in list(self.pooler.clients[ClientState.ACTIVE]):
            server = client.server
            if server is not None and client.expected_rfq > 0 and client.query_started \
                    and now - client.query_started > limit:
                self.pooler.cancel_server(server)
                # PgBouncer's words, which alerts grep: "closing because: query timeout".
                client.fail("57014", "query timeout",
                            hint=f"The query ran longer than query_timeout ({limit:g} s).")

    def _pool_upkeep(self, pool, now: float) -> None:  # type: ignore[no-untyped-def]
        cfg = self.pooler.config
        min_size = pool.min_size
        lane = pool.lane
        if lane is not None:
            self._lane_upkeep(pool, lane)
        for server in list(pool.idle):
            idle_for = now - server.last_used
            if pool._too_old(server):
                server.close("server_lifetime reached")
            elif (cfg.server_idle_timeout and idle_for > cfg.server_idle_timeout
                  and pool.server_count() > min_size):
                server.close("server_idle_timeout reached")
        if cfg.server_fast_close and pool.mode == "session":
            self._fast_close(pool)
        if now >= pool.login_failed_until:
            # Clients still waiting (to log in, or for a server) get servers: after
            # server_login_retry, or by evicting an idle server of another pool once one is
            # idle (max_db_connections / max_user_connections), as PgBouncer's janitor.
            pool.retry_login()
        if (not self.pooler.stopping and not pool.paused
                and pool.server_count() < min_size and pool.can_open()
                and not pool.servers[ServerState.LOGIN]
                and now >= pool.login_failed_until):
            pool.open_server()

    def _shutdown_waiters(self) -> None:
        """SHUTDOWN WAIT_FOR_SERVERS: a client that needs a server (a new transaction) is
        closed, as PgBouncer's; those inside a transaction finish it."""
        for client in list(self.pooler.clients[ClientState.WAITING]):
            client.fail("57P01", "server shutting down")
        for pool in list(self.pooler.pools.values()):
            if pool.lane is not None and pool.lane.waiting_count():
                for client in pool.lane.fp.drop_waiters(0.0):
                    client.fail("57P01", "server shutting down")

    @staticmethod
    def _fast_close(pool: Pool) -> None:
        """server_fast_close, as PgBouncer: a session-mode server that RECONNECT or a RELOAD
        marked to close is closed between transactions, its client with it, instead of at
        the end of the client's session."""
        for server in list(pool.servers[ServerState.ACTIVE]):
            client = server.client
            if server.close_needed and client is not None and server.txn_status == "I" \
                    and client.expected_rfq <= 0:
                client.fail("08006", "database configuration changed",
                            hint="server_fast_close: RECONNECT or RELOAD closed this "
                            "session's server; connect again.")
                server.close("database configuration changed")

    def _lane_upkeep(self, pool, lane) -> None:  # type: ignore[no-untyped-def]
        """The fast path's share: counters, servers idle there, clients waiting there."""
        cfg = self.pooler.config
        lane.fold_stats()
        # Servers idle past a check or idle timeout come back to Python's idle list, where the
        # loop below closes them, or the next hand-over checks them first (Pool.hand_to_lane).
        limits = [x for x in (cfg.server_idle_timeout, cfg.server_check_delay
                              if cfg.server_check_query else 0.0) if x > 0]
        # server_lifetime holds for idle servers too, as PgBouncer: when one the engine holds
        # has lived that long, its idle servers come back, and the loop below closes the old.
        lifetime, now = pool.lifetime, time.monotonic()
        if lifetime > 0 and any(s.in_engine and now - s.created_at >= lifetime
                                for s in pool.servers[ServerState.IDLE]):
            limits.append(0.0)
        lane.recall(min(limits) if limits else 60.0)
        if lane.waiting_count():
            oldest = lane.fp.oldest_wait()
            if cfg.query_timeout and oldest > cfg.query_timeout:
                for client in lane.fp.drop_waiters(cfg.query_timeout):
                    client.fail("57014", "query_timeout", hint=waited_hint(pool))
            elif cfg.query_wait_timeout and oldest > cfg.query_wait_timeout:
                log_pinned(pool)
                for client in lane.fp.drop_waiters(cfg.query_wait_timeout):
                    client.fail("08P01", f"query_wait_timeout: no server connection became "
                                f"free within {cfg.query_wait_timeout:g} s",
                                hint=waited_hint(pool))
            elif cfg.reserve_pool_timeout > 0 and oldest > cfg.reserve_pool_timeout:
                pool.launch_if_needed(use_reserve=True)
            else:
                pool.launch_if_needed()  # clients wait in the engine: servers for them
        lane.update_assist()


def waited_hint(pool: Pool | None) -> str | None:
    """What a client that waited in vain for a server is told of why: the last failure."""
    error = pool.last_login_error if pool is not None else None
    return f"The last server login failed: {error}" if error is not None else None


def log_pinned(pool: Pool | None) -> None:
    """Clients waited in vain while others held servers for pinned state: say who."""
    if pool is not None and pool.pinned_count():
        log.warning("pool %s: clients waited query_wait_timeout while %d of its servers are "
                    "pinned by: %s", pool.name, pool.pinned_count(), pool.pinned_clients_text())
