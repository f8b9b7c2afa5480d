"""``workers = N``: N pooler processes sharing one listen port, for more than one core.

The supervisor (the process ``pgpilot proxy`` started) forks N workers and then only watches
them: it passes SIGHUP and SIGTERM/SIGINT on, and starts a worker again if one dies. Each worker
is a whole pooler of its own:

- TCP: every worker binds the listen port with SO_REUSEPORT, and the kernel spreads new
  connections over them. The unix socket is made once by the supervisor and inherited.
- Limits are divided, so the workers together never open more than the config allows: worker i
  of N gets ``x // N`` of each pool size and connection limit, plus one of the remainder.
- Cancel requests: a client's BackendKeyData carries its worker's index in the top bits of the
  pid. A CancelRequest that reaches another worker (the kernel chose its connection at random)
  is passed, as the same 16 bytes, to the owning worker over that worker's private unix socket.
- Balance: the kernel's choice follows a hash of the addresses, not the load, and can leave one
  worker with 60 % of the clients. A worker whose engine accepts a TCP client while it holds
  more than its least busy sibling hands the socket over at once (:class:`Balance`; the engine
  does it, see ``engine/balance.c``), so each ends up with an even share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable

from pgpilot.proxy.config import Config

log = logging.getLogger("pgpilot.proxy")

WORKER_SHIFT = 24  # cancel pid = worker index << 24 | 24 random bits
MAX_WORKERS = 64


def share(total: int, index: int, count: int) -> int:
    """Worker ``index``'s part of ``total``: the parts add up to exactly ``total``."""
    if total <= 0 or count <= 1:
        return total
    return total // count + (1 if index < total % count else 0)


def _share_min1(total: int, index: int, count: int) -> int:
    # A pool size of 0 would make the pool unusable: every worker keeps at least one server.
    part = share(total, index, count)
    return max(part, 1) if total > 0 else part


def worker_config(config: Config, index: int, count: int) -> Config:
    """The configuration worker ``index`` of ``count`` runs with (limits divided)."""
    if count <= 1:
        return config

    def opt(value: int | None, min1: bool = False) -> int | None:
        if value is None:
            return None
        return _share_min1(value, index, count) if min1 else share(value, index, count)

    databases = {
        name: dataclasses.replace(
            db, pool_size=opt(db.pool_size, True), min_pool_size=opt(db.min_pool_size),
            reserve_pool=opt(db.reserve_pool), max_db_connections=opt(db.max_db_connections, True),
            max_db_client_connections=opt(db.max_db_client_connections, True))
        for name, db in config.databases.items()
    }
    users = {
        name: dataclasses.replace(
            user, max_user_connections=opt(user.max_user_connections, True),
            pool_size=opt(user.pool_size, True), reserve_pool_size=opt(user.reserve_pool_size),
            max_user_client_connections=opt(user.max_user_client_connections, True))
        for name, user in config.users.items()
    }
    return dataclasses.replace(
        config,
        default_pool_size=_share_min1(config.default_pool_size, index, count),
        min_pool_size=share(config.min_pool_size, index, count),
        reserve_pool_size=share(config.reserve_pool_size, index, count),
        max_client_conn=_share_min1(config.max_client_conn, index, count),
        max_db_connections=_share_min1(config.max_db_connections, index, count),
        max_user_connections=_share_min1(config.max_user_connections, index, count),
        max_db_client_connections=_share_min1(config.max_db_client_connections, index, count),
        max_user_client_connections=_share_min1(config.max_user_client_connections, index,
                                                 count),
        metrics_port=config.metrics_port + index if config.metrics_port else 0,
        so_reuseport=True,
        databases=databases,
        users=users,
    )


def cancel_socket_path(run_dir: str, index: int) -> str:
    return os.path.join(run_dir, f"cancel-{index}.sock")


# Each worker's slot in Balance.counters: 64-bit words, as the engine reads them
# (engine/balance.c, "the shared counters"); a slot fills a cache line.
SLOT_WORDS = 8
SLOT_CLIENTS = 0  # TCP clients counted in its share (handed to it and not taken in yet too)
SLOT_ACCEPTING = 1  # 1 while it takes hand-offs
SLOT_HANDED_OFF = 2  # clients it handed to a sibling, in all
SLOT_HANDED_IN = 3  # clients siblings handed to it, in all
SLOT_PID = 4  # the worker process, written by the supervisor


@dataclasses.dataclass(frozen=True)
class WorkerSlot:
    """One worker's counters, as read at one moment (SHOW WORKERS)."""

    index: int
    pid: int
    clients: int
    accepting: bool
    handed_off: int
    handed_in: int


class Balance:
    """What the workers share to even out their TCP clients, made by the supervisor before it
    forks: counters in anonymous shared memory (MAP_SHARED, so every worker sees the others'),
    one slot per worker, and per worker a datagram socketpair its siblings hand clients to
    (sent to ``send_ends[i]``, received on ``receive_ends[i]``). The supervisor keeps every
    end open, so a worker started again in place of one that died takes in what was handed to
    its predecessor and still waits in the queue."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.counters = mmap.mmap(-1, count * SLOT_WORDS * 8)
        self.receive_ends: list[socket.socket] = []
        self.send_ends: list[socket.socket] = []
        for _ in range(count):
            receive_end, send_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            receive_end.setblocking(False)
            send_end.setblocking(False)
            self.receive_ends.append(receive_end)
            self.send_ends.append(send_end)
        self._words = memoryview(self.counters).cast("q")

    def _set(self, index: int, word: int, value: int) -> None:
        self._words[index * SLOT_WORDS + word] = value

    def starting(self, index: int) -> None:
        """Worker ``index`` is about to be forked: it starts with an empty share (its
        engine counts from there, Engine.balance) and takes no hand-offs until it says so."""
        self._set(index, SLOT_ACCEPTING, 0)
        self._set(index, SLOT_CLIENTS, 0)
        self._set(index, SLOT_PID, 0)

    def started(self, index: int, pid: int) -> None:
        self._set(index, SLOT_PID, pid)

    def stopped(self, index: int) -> None:
        """Worker ``index`` is gone: its siblings hand it no more clients."""
        self._set(index, SLOT_ACCEPTING, 0)

    def slots(self) -> list[WorkerSlot]:
        words = self._words
        out = []
        for index in range(self.count):
            base = index * SLOT_WORDS
            out.append(WorkerSlot(index, words[base + SLOT_PID], words[base + SLOT_CLIENTS],
                                  bool(words[base + SLOT_ACCEPTING]),
                                  words[base + SLOT_HANDED_OFF], words[base + SLOT_HANDED_IN]))
        return out

    def close(self) -> None:
        self._words.release()
        self.counters.close()
        for sock in (*self.receive_ends, *self.send_ends):
            sock.close()


@dataclasses.dataclass
class WorkerIdentity:
    """Who a worker is among its siblings (None of this exists with workers = 1)."""

    index: int
    count: int
    run_dir: str  # holds each worker's cancel socket
    unix_socket: socket.socket | None  # the shared, inherited unix listening socket
    balance: Balance | None = None  # shared with the siblings to even out clients

    def owner_of(self, pid: int) -> int:
        return (pid >> WORKER_SHIFT) & (MAX_WORKERS - 1)


def _make_unix_socket(config: Config) -> socket.socket | None:
    if not config.unix_socket_dir:
        return None
    path = os.path.join(config.unix_socket_dir, f".s.PGSQL.{config.listen_port}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(path):
            os.unlink(path)
        sock.bind(path)
        os.chmod(path, config.unix_socket_mode)
        sock.listen(config.listen_backlog)
        sock.setblocking(False)
    except OSError as exc:
        log.warning("could not listen on unix socket %s: %s", path, exc)
        sock.close()
        return None
    return sock


def supervise(config: Config, run_worker: Callable[[Config, WorkerIdentity], int],
              ) -> int:
    """Fork ``config.workers`` workers running ``run_worker`` and look after them."""
    count = min(config.workers, MAX_WORKERS)
    run_dir = tempfile.mkdtemp(prefix="pgpilot-workers-")
    unix_socket = _make_unix_socket(config)
    balance = Balance(count)
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def start(index: int) -> None:
        balance.starting(index)  # before the fork: the worker owns its slot from then on
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            identity = WorkerIdentity(index, count, run_dir, unix_socket, balance)
            status = 1
            try:
                status = run_worker(worker_config(config, index, count), identity)
            finally:
                os._exit(status)
        children[pid] = index
        balance.started(index, pid)
        log.info("worker %d started (pid %d)", index, pid)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for index in range(count):
        start(index)
    status = 0
    restarts: list[float] = []
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries os.wait
            continue
        if pid not in children:
            continue
        index = children.pop(pid)
        balance.stopped(index)
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            status = status or (code if code > 0 else 0)
            continue
        log.error("worker %d (pid %d) exited with %d; starting it again", index, pid, code)
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 10] + [now]
        if len(restarts) > 5 * count:
            log.error("workers keep dying: giving up")
            stopping = True
            forward(signal.SIGTERM, None)
            status = 1
            continue
        start(index)
    if unix_socket is not None:
        path = unix_socket.getsockname()
        unix_socket.close()
        if isinstance(path, str) and os.path.exists(path):
            os.unlink(path)
    balance.close()
    for index in range(count):
        with contextlib.suppress(OSError):
            os.unlink(cancel_socket_path(run_dir, index))
    with contextlib.suppress(OSError):
        os.rmdir(run_dir)
    return status

