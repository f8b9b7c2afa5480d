"""``workers = N``: TCP clients balanced between the workers, handed over at accept.

In this process, a pooler runs as worker 0 of 2 (``worker0``) and the test plays worker 1: it
hands clients in over worker 0's hand-off socket, takes those worker 0 hands off from its own,
and writes worker 1's counters. Then the real thing: ``pgpilot proxy`` with ``workers = 2``,
with the clients each worker holds counted from /proc.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import RunningProxy, wait_until
from tests.proxy.test_cancel import send_cancel
from tests.proxy.test_fastpath_prepared import read_answers
from tests.proxy.test_workers import run_workers

from pgpilot.proxy.workers import SLOT_ACCEPTING, SLOT_CLIENTS, SLOT_WORDS, Balance, WorkerIdentity
from pgpilot.wire import messages as m

HANDOFF = b"pgpilot:client"  # the data of a hand-off datagram (engine/balance.c)


def add(balance: Balance, index: int, word: int, n: int) -> None:
    """Change a counter as a sibling would (the test is the only other writer here)."""
    words = memoryview(balance.counters).cast("q")
    words[index * SLOT_WORDS + word] += n
    words.release()


def hand_in(balance: Balance, index: int, sock: socket.socket) -> None:
    """Hand ``sock`` to worker ``index`` as a sibling's engine does: counted for it, sent."""
    add(balance, index, SLOT_CLIENTS, 1)
    socket.send_fds(balance.send_ends[index], [HANDOFF], [sock.fileno()])
    sock.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair: (the client's end, the end a listener accepted)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    return client, accepted


def log_in(sock: socket.socket, user: str) -> tuple[int, int]:
    """A raw client's login (auth trust); returns its BackendKeyData."""
    sock.settimeout(10)
    sock.sendall(m.startup_message({"user": user, "database": "test"}))
    keys = [m.parse_backend_key_data(body) for kind, body in read_answers(sock)
            if kind == "K"]
    assert len(keys) == 1
    return keys[0]


def receive_handoff(balance: Balance, index: int) -> tuple[bytes, list[int]]:
    """The next datagram on worker ``index``'s hand-off socket (waits up to 10 s)."""
    sock = balance.receive_ends[index]
    assert select.select([sock], [], [], 10)[0], "nothing was handed over"
    data, fds, _flags, _addr = socket.recv_fds(sock, 100, 8)
    return data, fds


@pytest.fixture
def worker0(proxy_factory: Any, tmp_path: Path) -> Iterator[tuple[RunningProxy, Balance]]:
    """A pooler as worker 0 of 2; the test is worker 1 (not accepting until it says so)."""
    balance = Balance(2)
    yield proxy_factory(worker=WorkerIdentity(0, 2, str(tmp_path), None, balance)), balance


def test_a_handed_client_is_served_and_its_query_can_be_canceled(
        worker0: tuple[RunningProxy, Balance], pg_params: dict[str, str],
        pg_dsn: str) -> None:
    proxy, balance = worker0
    client, accepted = tcp_pair()
    hand_in(balance, 0, accepted)
    with client:
        pid, key = log_in(client, pg_params["user"])
        assert proxy.call(lambda: proxy.pooler.fast.engine.balanced_clients) == 1  # type: ignore[union-attr]
        client.sendall(m.query("select 41 + 1"))
        rows = [m.parse_data_row(body) for kind, body in read_answers(client) if kind == "D"]
        assert rows == [[b"42"]]
        assert balance.slots()[0].handed_in == 1

        client.sendall(m.query("select pg_sleep(20)"))
        with psycopg.connect(pg_dsn, autocommit=True) as pg:
            wait_until(lambda: pg.execute(
                "select 1 from pg_stat_activity where query = 'select pg_sleep(20)' "
                "and state = 'active'").fetchone())
        send_cancel(proxy.port, pid, key)
        answer = read_answers(client)
        errors = [m.parse_error_fields(body) for kind, body in answer if kind == "E"]
        assert [e["C"] for e in errors] == ["57014"]
    # Uncounted when it leaves (the cancel request's connection came and went too).
    wait_until(lambda: balance.slots()[0].clients == 0)
    assert proxy.call(lambda: proxy.pooler.fast.engine.balanced_clients) == 0  # type: ignore[union-attr]


def test_clients_handed_to_a_dead_predecessor_are_taken_in_at_start(
        proxy_factory: Any, tmp_path: Path, pg_params: dict[str, str]) -> None:
    """A worker started again in place of one that died takes in what waits in the queue."""
    balance = Balance(2)
    client, accepted = tcp_pair()
    hand_in(balance, 0, accepted)
    add(balance, 0, SLOT_CLIENTS, 7)  # the predecessor's count, wrong now
    proxy_factory(worker=WorkerIdentity(0, 2, str(tmp_path), None, balance))
    with client:
        log_in(client, pg_params["user"])
        slot = balance.slots()[0]
        assert (slot.clients, slot.accepting) == (1, True)


def test_a_busy_worker_hands_new_clients_to_its_least_busy_sibling(
        worker0: tuple[RunningProxy, Balance]) -> None:
    proxy, balance = worker0
    add(balance, 1, SLOT_ACCEPTING, 1)
    add(balance, 0, SLOT_CLIENTS, 5)  # as if worker 0 held 5 clients and worker 1 none
    startup = m.startup_message({"user": "x", "database": "y"})
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.sendall(startup)  # (tcp_defer_accept: accepted once this is in)
        data, fds = receive_handoff(balance, 1)
        assert data == HANDOFF and len(fds) == 1
        with socket.socket(fileno=fds[0]) as handed:
            assert handed.getpeername() == client.getsockname()
            handed.settimeout(5)
            assert handed.recv(1000) == startup  # nothing was read of it
    slots = balance.slots()
    assert (slots[0].clients, slots[0].handed_off) == (5, 1)
    assert slots[1].clients == 1  # counted for the sibling by the worker that sent it

    # A sibling that takes none, or whose queue is full, does not get the client.
    add(balance, 1, SLOT_ACCEPTING, -1)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    add(balance, 1, SLOT_ACCEPTING, 1)
    sent = 0
    try:
        while sent < 100_000:
            balance.send_ends[1].send(b"x")
            sent += 1
    except BlockingIOError:
        pass
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 2").fetchone() == (2,)
    slots = balance.slots()
    assert (slots[0].handed_off, slots[1].clients) == (1, 1)
    while sent:
        balance.receive_ends[1].recv(10)
        sent -= 1


def test_stray_datagrams_on_the_handoff_socket_are_dropped(
        worker0: tuple[RunningProxy, Balance]) -> None:
    proxy, balance = worker0
    sender = balance.send_ends[0]
    read_end, write_end = os.pipe()
    socket.send_fds(sender, [b"not a client"], [read_end])  # closed, never served
    sender.send(b"")
    add(balance, 0, SLOT_CLIENTS, 1)
    sender.send(HANDOFF)  # a hand-off whose descriptor was lost: uncounted
    add(balance, 0, SLOT_CLIENTS, 1)
    socket.send_fds(sender, [HANDOFF], [read_end])  # a pipe is no client
    add(balance, 0, SLOT_CLIENTS, 1)
    socket.send_fds(sender, [HANDOFF], [read_end, read_end])  # one client a hand-off
    os.close(read_end)

    def pipe_closed() -> bool:
        try:
            os.write(write_end, b"x")
        except BrokenPipeError:
            return True
        return False

    wait_until(pipe_closed)  # the engine closed every copy it was sent
    os.close(write_end)
    slot = balance.slots()[0]
    assert (slot.clients, slot.handed_in) == (0, 0)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_a_worker_with_no_listener_left_passes_handed_clients_on_or_closes_them(
        worker0: tuple[RunningProxy, Balance]) -> None:
    """Shutting down (or client TLS turned on): its siblings hand it nothing more. A client
    that was on its way goes on to a sibling that still takes hand-offs, uncounted here and
    counted there; with none, it is closed and uncounted."""
    proxy, balance = worker0
    assert balance.slots()[0].accepting
    proxy.call(lambda: proxy.pooler.stop_listening())  # type: ignore[union-attr]
    assert not balance.slots()[0].accepting

    # Worker 1 (the test) takes hand-offs: the client is passed on to it, as it is.
    add(balance, 1, SLOT_ACCEPTING, 1)
    client, accepted = tcp_pair()
    hand_in(balance, 0, accepted)
    data, fds = receive_handoff(balance, 1)
    assert data == HANDOFF and len(fds) == 1
    with client, socket.socket(fileno=fds[0]) as passed_on:
        assert passed_on.getpeername() == client.getsockname()
        client.sendall(b"hello")
        passed_on.settimeout(10)
        assert passed_on.recv(100) == b"hello"
    wait_until(lambda: balance.slots()[0].clients == 0)
    assert balance.slots()[1].clients == 1  # counted for worker 1 by worker 0
    assert balance.slots()[0].handed_in == 0 and balance.slots()[0].handed_off == 1

    # No sibling takes hand-offs: closed.
    add(balance, 1, SLOT_ACCEPTING, -1)
    client, accepted = tcp_pair()
    hand_in(balance, 0, accepted)
    with client:
        client.settimeout(10)
        assert client.recv(100) == b""
    wait_until(lambda: balance.slots()[0].clients == 0)
    assert balance.slots()[0].handed_in == 0 and balance.slots()[0].handed_off == 1


def test_one_worker_balances_nothing(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        with psycopg.connect(proxy.dsn("pgbouncer"), autocommit=True) as console:
            assert console.execute("SHOW WORKERS").fetchall() == []
        assert proxy.call(lambda: proxy.pooler.fast.engine.balanced_clients) == 0  # type: ignore[union-attr]


# -- workers = 2 ------------------------------------------------------------------------------

@pytest.fixture
def balanced_workers(tmp_path: Path, pg_params: dict[str, str],
                     pg_dsn: str) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    yield from run_workers(tmp_path, pg_params, pg_dsn,
                           settings=f"auth_type = trust\nadmin_users = {pg_params['user']}\n")


def held_by(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections on ``port`` each process holds: its socket
    descriptors matched, by inode, with /proc/net/tcp."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(f"socket:[{fields[9]}]")
    held = {}
    for pid in pids:
        count = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # closed meanwhile
                count += os.readlink(fd) in inodes
        held[pid] = count
    return held


def workers_of(proc: subprocess.Popen[bytes]) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    return sorted(int(pid) for pid in out.stdout.split())


def check_balance(console: psycopg.Connection[Any], dsn: str, port: int,
                  pids: list[int], clients: int) -> dict[int, int]:
    """Open ``clients`` more clients and check how they are spread: each worker's share
    within 2 of the other's (the hash alone does that for 60 clients about 3 times in 10),
    and the shared counters right. Returns the hand-offs so far by worker pid."""
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(clients)]
    try:
        for i, conn in enumerate(conns):
            assert conn.execute("select %s::int * 2", [i]).fetchone() == (i * 2,)
        held = held_by(pids, port)
        assert abs(held[pids[0]] - held[pids[1]]) <= 2, held
        rows = console.execute("SHOW WORKERS").fetchall()
        assert {row[1]: row[2] for row in rows} == held
        assert all(row[3] == "yes" for row in rows)
        return {row[1]: row[4] for row in rows}
    finally:
        for conn in conns:
            conn.close()


def test_clients_are_balanced_between_workers(balanced_workers: Any) -> None:
    proc, dsn, _tmp = balanced_workers
    port = int(dsn.rsplit(":", 1)[1].split("/")[0])
    pids = workers_of(proc)
    assert len(pids) == 2
    for _round in range(3):
        with psycopg.connect(dsn.rsplit("/", 1)[0] + "/pgbouncer", autocommit=True) as console:
            # Only the console left from the round before (closing clients are uncounted).
            wait_until(lambda: sum(r[2] for r in console.execute("SHOW WORKERS")) == 1)
            handed_off = check_balance(console, dsn, port, pids, 60)
    assert sum(handed_off.values()) > 0

    # A worker started again in place of one killed (with its clients) starts from an empty
    # share, and the clients that come next go mostly to it.
    kept = [psycopg.connect(dsn, autocommit=True) for _ in range(30)]
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: len(workers_of(proc)) == 2 and pids[0] not in workers_of(proc), 20)
    pids = workers_of(proc)
    deadline = time.monotonic() + 20
    while True:
        try:
            console = psycopg.connect(dsn.rsplit("/", 1)[0] + "/pgbouncer", autocommit=True)
            if all(r[3] == "yes" for r in console.execute("SHOW WORKERS")):
                break
            console.close()
        except psycopg.OperationalError:
            pass
        assert time.monotonic() < deadline, "the new worker never took hand-offs"
        time.sleep(0.2)
    with console:
        check_balance(console, dsn, port, pids, 40)
    for conn in kept:
        conn.close()
