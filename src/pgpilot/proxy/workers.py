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
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
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


@dataclasses.dataclass
class WorkerIdentity:
    """Who a worker is among its siblings (None of this exists with workers = 1)."""

    index: int
    count: int
    run_dir: str  # holds each worker's cancel socket
    unix_socket: socket.socket | None  # the shared, inherited unix listening socket

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
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def start(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            identity = WorkerIdentity(index, count, run_dir, unix_socket)
            status = 1
            try:
                status = run_worker(worker_config(config, index, count), identity)
            finally:
                os._exit(status)
        children[pid] = index
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
    for index in range(count):
        with contextlib.suppress(OSError):
            os.unlink(cancel_socket_path(run_dir, index))
    with contextlib.suppress(OSError):
        os.rmdir(run_dir)
    return status

