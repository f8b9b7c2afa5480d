"""Faults of the pooler's own process (issue 26's fault suite): descriptor exhaustion under a
low ``ulimit -n``, one of ``workers = 2`` killed under load, and a soak of 10,000 clients.

Both run the pooler as a process of its own (``python -m pgpilot proxy``), so that its
descriptor limit and its workers are its own, in front of the machine's PostgreSQL.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import wait_until

from pgpilot.embedded import free_port

pytestmark = pytest.mark.slow


def start_pooler(tmp_path: Path, pg_params: dict[str, str], settings: str,
                 preexec: Callable[[], None] | None = None
                 ) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    (tmp_path / "users.txt").write_text(f'"{pg_params["user"]}" ""\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n* = host={pg_params['host']} port={pg_params['port']}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = users.txt\npool_mode = transaction\n"
        f"logfile = {tmp_path / 'log'}\n{settings}")
    proc = subprocess.Popen([sys.executable, "-m", "pgpilot", "proxy", "--config", str(ini)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=preexec)
    dsn = f"postgresql://{pg_params['user']}@127.0.0.1:{port}/{pg_params['dbname']}"
    deadline = time.monotonic() + 30
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=5).close()
            return proc, dsn
        except psycopg.OperationalError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)


def stop_pooler(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def pooler_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@pytest.fixture
def low_ulimit_pooler(tmp_path: Path, pg_params: dict[str, str]
                      ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc, dsn = start_pooler(tmp_path, pg_params, "max_client_conn = 500\n"
                             "default_pool_size = 4\n", preexec=low_limit)
    yield proc, dsn
    stop_pooler(proc)


def test_descriptor_exhaustion_refuses_new_clients_and_spares_the_others(
        low_ulimit_pooler: tuple[subprocess.Popen[bytes], str], tmp_path: Path) -> None:
    """Under ``ulimit -n 64`` and max_client_conn = 500: the clients beyond what the limit
    admits next to the servers are refused at once with 53300, never left hanging; the ones
    in keep getting servers and their own answers."""
    proc, dsn = low_ulimit_pooler
    admitted: list[psycopg.Connection[Any]] = []
    refusals: list[psycopg.OperationalError] = []
    try:
        for _ in range(80):
            try:
                admitted.append(psycopg.connect(dsn, autocommit=True, connect_timeout=5))
            except psycopg.OperationalError as exc:
                refusals.append(exc)
        assert 10 <= len(admitted) < 64
        assert len(refusals) == 80 - len(admitted)
        for exc in refusals:  # each refused at once, with PgBouncer's SQLSTATE for it
            assert "no more connections allowed (file descriptor limit)" in str(exc)
        assert "timeout" not in " ".join(str(e) for e in refusals)

        answers: dict[int, list[tuple[int, ...] | None]] = {}

        def work(n: int, conn: psycopg.Connection[Any]) -> None:
            answers[n] = [conn.execute("select %s::int + pg_backend_pid() * 0", [n * 100 + i])
                          .fetchone() for i in range(20)]

        threads = [threading.Thread(target=work, args=(n, c)) for n, c in enumerate(admitted)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # Every admitted client got servers (4 of them, shared) and only its own answers.
        assert answers == {n: [(n * 100 + i,) for i in range(20)] for n in range(len(admitted))}

        # Room again once clients leave.
        for conn in admitted[:5]:
            conn.close()
        del admitted[:5]
        wait_until(lambda: _can_connect(dsn), timeout=10)
    finally:
        for conn in admitted:
            conn.close()
    log = (tmp_path / "log").read_text()
    assert "file descriptor limit (ulimit -n = 64)" in log  # the start-up warning
    assert "accept failed" not in log  # nobody was left in the backlog
    assert proc.poll() is None


def _can_connect(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            return conn.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def worker_of_each(proc: subprocess.Popen[bytes], conns: list[psycopg.Connection[Any]],
                   port: int) -> list[int]:
    """The worker process that holds each client's connection, by the client's port."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"sport = :{port}"],
                         capture_output=True, text=True, check=True).stdout
    owner: dict[int, int] = {}
    for line in out.splitlines():
        fields = line.split()
        peer_port = int(fields[3].rsplit(":", 1)[1])
        pid = int(fields[-1].split("pid=")[1].split(",")[0])
        owner[peer_port] = pid
    ports = [c.pgconn.socket and _local_port(c) for c in conns]
    return [owner.get(p, 0) for p in ports]


def _local_port(conn: psycopg.Connection[Any]) -> int:
    import socket

    sock = socket.socket(fileno=conn.pgconn.socket)
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.detach()


def test_a_killed_worker_is_replaced_and_the_other_workers_clients_see_nothing(
        tmp_path: Path, pg_params: dict[str, str]) -> None:
    """workers = 2, 12 clients running: one worker SIGKILLed. Its clients lose their
    connections (the process is gone: nothing can be said to them) and connect again; the
    other worker's clients get every answer, with no error; the supervisor starts a new
    worker, which takes clients."""
    proc, dsn = start_pooler(tmp_path, pg_params, "workers = 2\ndefault_pool_size = 4\n")
    port = int(dsn.rsplit(":", 1)[1].split("/")[0])
    conns: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(40):  # until both workers hold some of the 12
            conns.append(psycopg.connect(dsn, autocommit=True))
            if len(conns) >= 12:
                owners = worker_of_each(proc, conns, port)
                if len(set(owners)) == 2 and 0 not in owners:
                    break
        owners = worker_of_each(proc, conns, port)
        assert len(set(owners)) == 2 and 0 not in owners
        victim = owners[0]
        stop = threading.Event()
        answers = [0] * len(conns)
        errors: list[list[str]] = [[] for _ in conns]
        wrong: list[str] = []

        def run(n: int) -> None:
            conn = conns[n]
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    if conn.closed:
                        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
                    got = conn.execute("select %s::int", [n * 1_000_000 + i]).fetchone()
                    if got != (n * 1_000_000 + i,):
                        wrong.append(f"client {n} sent {n * 1_000_000 + i}, got {got}")
                    answers[n] += 1
                except psycopg.OperationalError as exc:
                    errors[n].append(str(exc).strip()[:120])
                    conn.close()
                    time.sleep(0.05)
            conn.close()

        threads = [threading.Thread(target=run, args=(n,), daemon=True)
                   for n in range(len(conns))]
        for t in threads:
            t.start()
        wait_until(lambda: min(answers) > 5, timeout=20)
        import os

        os.kill(victim, signal.SIGKILL)
        killed_at = list(answers)
        # Every client answers again: the survivors never stopped, the victims reconnected.
        wait_until(lambda: all(a > k + 10 for a, k in zip(answers, killed_at, strict=True)),
                   timeout=30)
        stop.set()
        for t in threads:
            t.join(30)
        assert wrong == []
        for n, owner in enumerate(owners):
            if owner != victim:
                assert errors[n] == [], f"client {n} of the surviving worker: {errors[n]}"
        assert any(errors[n] for n, o in enumerate(owners) if o == victim)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 2 and str(victim) not in children
        replacement = next(int(c) for c in children if int(c) not in owners)
        # The new worker serves clients too, once it listens (the kernel spreads new
        # connections over both workers, and the busier one hands clients over).
        def replacement_serves() -> bool:
            fresh = [psycopg.connect(dsn, autocommit=True) for _ in range(6)]
            try:
                assert all(c.execute("select 1").fetchone() == (1,) for c in fresh)
                return replacement in worker_of_each(proc, fresh, port)
            finally:
                for c in fresh:
                    c.close()

        wait_until(replacement_serves, timeout=20)
    finally:
        for c in conns:
            c.close()
        stop_pooler(proc)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def raw_client_query(host: str, port: int, user: str, dbname: str, sql: str) -> str | None:
    """One whole client life on a bare socket (a cheap client, so that the soak measures the
    pooler): StartupMessage (trust), a simple Query, its one value, Terminate."""
    import socket

    from pgpilot.wire import messages as m
    from pgpilot.wire.framing import MessageReader

    def read_until_ready(sock: socket.socket, reader: MessageReader
                         ) -> list[tuple[int, bytes | None]]:
        out: list[tuple[int, bytes | None]] = []
        while not out or out[-1][0] != ord("Z"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            out += reader.feed(chunk)
        return out

    reader = MessageReader()
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(m.startup_message({"user": user, "database": dbname}))
        read_until_ready(sock, reader)
        sock.sendall(m.query(sql))
        value = None
        for kind, body in read_until_ready(sock, reader):
            assert body is not None
            if kind == ord("D"):
                cell = m.parse_data_row(body)[0]
                value = None if cell is None else cell.decode()
            elif kind == ord("E"):
                raise AssertionError(m.parse_error_fields(body))
        sock.sendall(m.terminate())
    return value


def test_soak_ten_thousand_clients_come_and_go_with_flat_memory(
        tmp_path: Path, pg_params: dict[str, str]) -> None:
    """10,000 clients connect, run a query and leave (4 at a time). After the first 2,000 (the
    pools, caches and allocator warm) and the pooler's first periodic rounds, its RSS stays
    flat and its descriptors return to what they were: nothing is kept per client that came
    and went."""
    proc, dsn = start_pooler(tmp_path, pg_params, "default_pool_size = 4\n"
                             "log_connections = 0\nlog_disconnections = 0\n")
    try:
        lock = threading.Lock()
        done = [0]
        wrong: list[str] = []

        host, port = "127.0.0.1", int(dsn.rsplit(":", 1)[1].split("/")[0])

        def churn(n: int, count: int) -> None:
            for i in range(count):
                got = raw_client_query(host, port, pg_params["user"], pg_params["dbname"],
                                       f"select {n * 100_000 + i}")
                with lock:
                    if got != str(n * 100_000 + i):
                        wrong.append(f"{n}/{i}: {got}")
                    done[0] += 1

        def run(total: int) -> None:
            threads = [threading.Thread(target=churn, args=(n, total // 4)) for n in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)

        run(2_000)
        # The once-a-second tasks (janitor, statistics, advisor) allocate once in their first
        # rounds (~12 MiB, whatever the traffic): the baseline is taken after them.
        time.sleep(3)
        fds_warm, rss_warm = pooler_fds(proc.pid), rss_kib(proc.pid)
        run(8_000)
        assert done[0] == 10_000 and wrong == []
        wait_until(lambda: pooler_fds(proc.pid) <= fds_warm, timeout=10)
        growth = rss_kib(proc.pid) - rss_warm
        assert growth < 4096, f"RSS grew {growth} KiB over 8,000 clients"
    finally:
        stop_pooler(proc)
