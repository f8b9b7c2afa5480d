"""Peering: cancel requests between poolers behind one balancer (PgBouncer's ``[peers]``).

Several poolers can share one address (``so_reuseport``, or a TCP balancer in front of
several hosts). A client's CancelRequest comes on a new connection, which the balancer may give
to any of them, not to the one running the client's query. With ``peer_id`` set, every
cancel key this pooler gives out carries its peer id, and a CancelRequest whose key names
another peer is passed on, as the same request, to that peer's address from ``[peers]``.

The key layout is PgBouncer 1.21's, so pgpilot and PgBouncer processes can be peered
together. The 8 bytes of BackendKeyData (pid, then key, both big-endian):

- bytes 1 and 2 (the pid's second and third byte): the peer id, low byte first;
- byte 0: random with its top bit clear (a pid is positive), or with ``workers = N`` the
  worker's index (workers.py); byte 3 and the key's other bits: random;
- the key's two lowest bits: a time to live, 3 when given out. Each pooler that passes the
  request on takes one off and refuses to pass on one at 0, so peers that name each other
  wrongly cannot pass a request round in a loop. The owner sets the bits back before it looks
  the key up.

This module holds the layout (pure functions) and :class:`PeerCancels`, which carries the
requests out: per peer at most its ``pool_size`` in flight, the rest waiting, and each one
given up after ``cancel_wait_timeout``. The pooler decides what to do with a request
(pooler.py, ``Pooler.cancel``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from pgpilot.proxy.config import PeerConfig
from pgpilot.wire import messages as m

if TYPE_CHECKING:
    from pgpilot.proxy.pooler import Pooler

log = logging.getLogger("pgpilot.proxy")

TTL_MASK = 0x3  # the key's time-to-live bits


def pid_layout(peer_id: int, worker_index: int | None) -> tuple[int, int]:
    """How cancel pids are made with peering on, as (fixed bits, random bits): the peer id in
    the pid's second and third byte, the worker's index (if any) in its first."""
    fixed = ((peer_id & 0xFF) << 16) | ((peer_id >> 8) << 8)
    if worker_index is None:
        return fixed, 0x7F0000FF
    return fixed | (worker_index << 24), 0xFF


def peer_of(pid: int) -> int:
    """The peer id a cancel pid carries."""
    return ((pid >> 16) & 0xFF) | (((pid >> 8) & 0xFF) << 8)


def own_key(key: int) -> int:
    """A key as its owner stored it: the TTL bits set back to their value when given out."""
    return key | TTL_MASK


@dataclasses.dataclass
class PeerPoolCounts:
    """One peer's cancel requests now (SHOW PEER_POOLS)."""

    waiting: int = 0  # waiting for a slot (the peer's pool_size are in flight)
    connecting: int = 0  # a connection to the peer being opened
    active: int = 0  # sent; waiting for the peer to close the connection (it has acted)


class PeerCancels:
    """Cancel requests this pooler passes on to its peers."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self.counts: dict[int, PeerPoolCounts] = {}
        # Per peer: the slots (its pool_size) and the size they were made for; a reload that
        # changes pool_size makes new slots, and the requests in flight finish on the old.
        self._slots: dict[int, tuple[int, asyncio.Semaphore]] = {}

    def _slots_for(self, peer: PeerConfig) -> asyncio.Semaphore:
        size = peer.pool_size or self.pooler.config.default_pool_size or 1
        made = self._slots.get(peer.peer_id)
        if made is None or made[0] != size:
            made = (size, asyncio.Semaphore(size))
            self._slots[peer.peer_id] = made
        return made[1]

    def forward(self, peer_id: int, pid: int, key: int,
                then: Callable[[], None] | None = None) -> None:
        """Pass a CancelRequest for a key peer ``peer_id`` gave out to that peer; ``then``
        is called once the peer has closed the connection (it has acted on it) or the
        request was given up."""
        peer = self.pooler.config.peers.get(peer_id)
        if peer is None:
            log.warning("cancel request for peer %d: could not find peer to forward request "
                        "to", peer_id)
            if then is not None:
                then()
            return
        if not key & TTL_MASK:
            log.warning("cancel request for peer %d: failed to forward cancel request because "
                        "its TTL was exhausted", peer_id)
            if then is not None:
                then()
            return
        if self.in_flight() >= self.pooler.config.max_client_conn:
            # Anyone may send requests naming a peer, and each holds its sender's connection
            # (a descriptor) until the peer answers: with a peer slow or gone they would pile
            # up. PgBouncer counts them among max_client_conn; so are they bounded here.
            log.warning("cancel request for peer %d: dropped, max_client_conn (%d) cancel "
                        "requests are being passed on already", peer_id,
                        self.pooler.config.max_client_conn)
            if then is not None:
                then()
            return
        packet = m.cancel_request(pid, key - 1)  # one hop less to live
        self.counts.setdefault(peer.peer_id, PeerPoolCounts()).waiting += 1
        self.pooler.track_task(asyncio.get_running_loop().create_task(
            self._send(peer, packet, then)))

    def in_flight(self) -> int:
        """Cancel requests being passed on now, to all peers."""
        return sum(c.waiting + c.connecting + c.active for c in self.counts.values())

    async def _send(self, peer: PeerConfig, packet: bytes,
                    then: Callable[[], None] | None) -> None:
        counts = self.counts[peer.peer_id]  # its waiting count taken up by forward()
        slots = self._slots_for(peer)
        where = self.address_text(peer)
        stage = "waiting"

        def connected() -> None:
            nonlocal stage
            counts.connecting -= 1
            counts.active += 1
            stage = "active"
            log.debug("forwarding cancellation request to peer %d", peer.peer_id)

        try:
            async with asyncio.timeout(self.pooler.config.cancel_wait_timeout or 10.0):
                async with slots:
                    counts.waiting -= 1
                    counts.connecting += 1
                    stage = "connecting"
                    host, port = self.address(peer)
                    await send_cancel_request(host, port, packet, connected)
        except (OSError, TimeoutError) as exc:
            log.warning("could not forward a cancel request to peer %d (%s): %s",
                        peer.peer_id, where, exc or "timed out")
        finally:
            if stage == "waiting":
                counts.waiting -= 1
            elif stage == "connecting":
                counts.connecting -= 1
            else:
                counts.active -= 1
            if then is not None:
                then()

    def address(self, peer: PeerConfig) -> tuple[str, int]:
        """Where the peer listens: (host or unix socket directory, port); no host means
        this pooler's own unix_socket_dir, as for a [databases] entry."""
        return peer.host or self.pooler.config.unix_socket_dir or "/tmp", peer.port

    def address_text(self, peer: PeerConfig) -> str:
        host, port = self.address(peer)
        return f"unix:{host}/.s.PGSQL.{port}" if host.startswith("/") else f"{host}:{port}"


async def send_cancel_request(host: str, port: int, packet: bytes,
                              connected: Callable[[], None] | None = None) -> None:
    """Send a CancelRequest ``packet`` on a connection of its own to ``host`` (a name, an
    address, or a unix socket directory) and ``port``, and wait until the other end closes it:
    PostgreSQL (and a peer pooler) answers nothing and closes once it has acted on it.
    ``connected`` is called once the connection is open. Raises OSError."""
    if host.startswith("/"):
        reader, writer = await asyncio.open_unix_connection(
            os.path.join(host, f".s.PGSQL.{port}"))
    else:
        reader, writer = await asyncio.open_connection(host, port)
    try:
        if connected is not None:
            connected()
        writer.write(packet)
        await writer.drain()
        await reader.read()
    finally:
        writer.close()
