"""Pooler benchmark: pgpilot against PgBouncer, side by side, in one run.

``python bench/pooler.py [--quick] [--cases NAME ...] [--dsn URL]``

What it does, all on 127.0.0.1:

1. Starts PostgreSQL (an embedded one by default, with ``max_connections`` high enough for the
   direct 1,000-client row; ``--dsn`` uses an existing server instead), creates the ``bench``
   role and database and runs ``pgbench -i``.
2. For every case, runs the direct (no pooler) reference once, then PgBouncer and pgpilot
   alternately (A B A B ...) for ``--rounds`` rounds. Each run starts a fresh pooler process
   with equivalent settings (same ``[databases]`` entry, pool mode, pool size, auth,
   ``max_client_conn``), warms it up with a short unmeasured pgbench run, then measures:

   - tps (pgbench), average and p99 latency (from pgbench's per-transaction log, ``-l``);
   - pooler CPU seconds per 100k transactions (utime + stime from ``/proc/<pid>/stat``,
     before/after the measured run only);
   - pooler peak RSS (``VmHWM`` from ``/proc/<pid>/status``).

3. The scale case holds 10,000 logged-in client connections open (a load generator in a
   separate process: this same file with ``--loadgen``, raw protocol over uvloop) while 100 of
   them run queries, on at most 100 server connections, and reports errors, RSS and bytes per
   idle client (RSS after login minus RSS before, divided by the number of clients).
4. Prints the tables with the pgpilot / PgBouncer ratio per case and writes
   ``bench/results/pooler.json`` and ``bench/results/pooler.md``.
5. The ``tls-*`` cases (issue 27) encrypt one side or the other with the same certificate for
   both poolers (a test CA and a server certificate made for the run): ``client_tls_sslmode =
   require`` with pgbench's ``PGSSLMODE=require``, or ``server_tls_sslmode = require`` to a
   PostgreSQL with ``ssl = on`` (the embedded one is then started from the system's
   binaries, built with OpenSSL; a ``--dsn`` server must have ssl on already). Cipher and
   protocol are each library's default (TLS 1.3, AES-256-GCM here, both sides).

The poolers, pgbench, the load generator and PostgreSQL share the machine's cores; the numbers
are only comparable within one run, which is why every case alternates the two poolers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HOST = "127.0.0.1"  # every byte of traffic stays on this machine
BENCH_DB = "bench"
BENCH_USER = "bench"
BENCH_SCRAM_USER = "bench_scram"  # direct connections that must do SCRAM (the churn row)
BENCH_PASSWORD = "bench-secret"
MAX_CLIENT_CONN = 11_000
NOFILE = 65_536
TICKS = os.sysconf("SC_CLK_TCK")
POOLERS = ("pgbouncer", "pgpilot")


# -- cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    kind: str = "pgbench"  # pgbench | scale
    args: tuple[str, ...] = ()  # pgbench options besides -c/-j/-T
    clients: int = 10
    threads: int = 2
    auth: str = "trust"  # client-side auth_type of the poolers
    pool_size: int = 20
    poolers: tuple[str, ...] = POOLERS
    direct: bool = True
    note: str = ""
    workers: int = 1  # pgpilot's workers = N
    # PgBouncer processes sharing the port (so_reuseport = 1), the pool and
    # max_db_connections divided between them as pgpilot's workers divide theirs
    pgbouncer_processes: int = 1
    # pgbench options for PgBouncer's runs instead of ``args``, where it cannot run those
    pgbouncer_args: tuple[str, ...] | None = None
    # log_connections / log_disconnections on (both poolers' defaults), each pooler writing
    # its lines once, to its stderr (a file)
    logging: bool = False
    # TLS between pgbench and the pooler (client_tls_sslmode = require, PGSSLMODE=require)
    client_tls: bool = False
    # TLS between the pooler and PostgreSQL (server_tls_sslmode = require)
    server_tls: bool = False


CASES: tuple[Case, ...] = (
    Case("select-simple-10", "pgbench -S -M simple, 10 clients", args=("-S", "-M", "simple"),
         clients=10),
    Case("select-simple-100", "pgbench -S -M simple, 100 clients", args=("-S", "-M", "simple"),
         clients=100),
    Case("select-simple-1000", "pgbench -S -M simple, 1,000 clients",
         args=("-S", "-M", "simple"), clients=1000),
    Case("select-extended-10", "pgbench -S -M extended, 10 clients",
         args=("-S", "-M", "extended"), clients=10),
    Case("select-extended-100", "pgbench -S -M extended, 100 clients",
         args=("-S", "-M", "extended"), clients=100),
    Case("select-extended-1000", "pgbench -S -M extended, 1,000 clients",
         args=("-S", "-M", "extended"), clients=1000),
    Case("tpcb-50", "pgbench TPC-B-like (default script), 50 clients", args=("-M", "simple"),
         clients=50),
    Case("select-prepared-100", "pgbench -S -M prepared, 100 clients",
         args=("-S", "-M", "prepared"), clients=100,
         pgbouncer_args=("-S", "-M", "extended"),
         note="PgBouncer 1.18 cannot pool named prepared statements in transaction mode: its "
              "row is its best at this workload, -M extended (the same queries, unnamed)"),
    Case("select-simple-100-w2", "pgbench -S -M simple, 100 clients, pgpilot workers = 2",
         args=("-S", "-M", "simple"), clients=100, workers=2, direct=False,
         note="pgpilot with workers = 2 (two processes, pool and limits split between them); "
              "PgBouncer as always one process; CPU and RSS summed over the pooler's processes"),
    Case("select-simple-100-w2-reuseport",
         "pgbench -S -M simple, 100 clients, pgpilot workers = 2, PgBouncer two processes",
         args=("-S", "-M", "simple"), clients=100, workers=2, pgbouncer_processes=2,
         direct=False,
         note="each pooler's way to use two cores: pgpilot with workers = 2 against two "
              "PgBouncer processes on the same port (so_reuseport = 1), each with half the "
              "pool (10) and of max_db_connections; CPU and RSS summed over each pooler's "
              "processes"),
    Case("churn-scram-10", "pgbench -S -C (new connection per transaction), SCRAM, 10 clients",
         args=("-S", "-M", "simple", "-C"), clients=10, auth="scram-sha-256"),
    Case("churn-scram-10-logged",
         "pgbench -S -C, SCRAM, 10 clients, log_connections and log_disconnections on",
         args=("-S", "-M", "simple", "-C"), clients=10, auth="scram-sha-256", logging=True,
         direct=False, note="the poolers' default logging: a line per login and per leaving"),
    Case("scale-10k", "10,000 clients held open, 100 running queries, <= 100 server conns",
         kind="scale", clients=10_000, pool_size=100, direct=False),
    Case("tls-client-simple-10", "client TLS (require): pgbench -S -M simple, 10 clients",
         args=("-S", "-M", "simple"), clients=10, client_tls=True, direct=False),
    Case("tls-client-extended-100", "client TLS (require): pgbench -S -M extended, 100 clients",
         args=("-S", "-M", "extended"), clients=100, client_tls=True, direct=False),
    Case("tls-server-simple-10", "server TLS (require): pgbench -S -M simple, 10 clients",
         args=("-S", "-M", "simple"), clients=10, server_tls=True, direct=False),
    Case("tls-server-extended-100", "server TLS (require): pgbench -S -M extended, 100 clients",
         args=("-S", "-M", "extended"), clients=100, server_tls=True, direct=False),
    Case("tls-churn-10", "client TLS churn: pgbench -S -C with PGSSLMODE=require, 10 clients",
         args=("-S", "-M", "simple", "-C"), clients=10, client_tls=True, direct=False,
         note="a TLS handshake (and a login) per transaction; trust auth, so that the row "
              "measures TLS and not SCRAM"),
)
CASE_NAMES = [c.name for c in CASES]


@dataclass
class Settings:
    duration: float
    warmup: float
    rounds: int
    scale: int
    scale_clients: int
    scale_active: int
    scale_duration: float


# -- small helpers -------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> None:
    """Enough descriptors for 10k clients, here and in every child (inherited)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (pgpilot's workers = N forks worker processes)."""
    out = [pid]
    i = 0
    while i < len(out):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{out[i]}/task"):
                with open(f"/proc/{out[i]}/task/{task}/children") as fh:
                    out.extend(int(c) for c in fh.read().split())
        i += 1
    return out


def user_system_seconds(pid: int) -> tuple[float, float]:
    """utime and stime of a process and its live descendants (all threads), in seconds."""
    user = system = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as fh:
            stat = fh.read()
            fields = stat[stat.rindex(")") + 2:].split()
            # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
            user += int(fields[11])
            system += int(fields[12])
    return user / TICKS, system / TICKS


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live descendants (all threads), in seconds."""
    return sum(user_system_seconds(pid))


def proc_status_kb(pid: int, key: str) -> int:
    """A /proc/<pid>/status value in kB (VmRSS, VmHWM), summed over the process tree."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
                    break
    return total


def wait_port(port: int, proc: subprocess.Popen[Any] | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout:g} s")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} after {timeout:g} s")
        time.sleep(0.05)


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except OSError:
        return "not found"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
        else "?"


# -- PostgreSQL ----------------------------------------------------------------------------


@dataclass
class Upstream:
    """The PostgreSQL everything talks to, and how to reach it as an administrator."""

    port: int
    admin_user: str
    admin_password: str | None
    psql_host: str  # a socket folder (embedded) or 127.0.0.1
    embedded: Any = None

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        env = dict(os.environ)
        if self.admin_password:
            env["PGPASSWORD"] = self.admin_password
        out = subprocess.run(
            ["psql", "-X", "-q", "-At", "-h", self.psql_host, "-p", str(self.port),
             "-U", self.admin_user, "-d", dbname, "-v", "ON_ERROR_STOP=1", "-c", sql],
            capture_output=True, text=True, env=env, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def server_connections(self) -> int:
        return int(self.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'bench' "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"))


@dataclass(frozen=True)
class TLSFiles:
    """The run's certificates: a CA and a server certificate for 127.0.0.1 / localhost,
    readable by PgBouncer's user (it runs as nobody under root)."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(folder: Path) -> TLSFiles:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(mode=0o755, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("pgpilot bench CA"))
          .issuer_name(name("pgpilot bench CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost"))
            .issuer_name(name("pgpilot bench CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TLSFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    for path in (files.ca, files.cert, files.key):
        path.chmod(0o644)
    return files


TLS: TLSFiles | None = None  # made in main() when a case needs TLS


def system_bin_dir_with_openssl() -> Path:
    out = subprocess.run(["pg_config", "--configure", "--bindir"], capture_output=True,
                         text=True, check=False).stdout if shutil.which("pg_config") else ""
    if "openssl" not in out:
        raise SystemExit("the server TLS cases need a PostgreSQL built with OpenSSL "
                         "(pg_config not found or without --with-openssl)")
    return Path(out.strip().splitlines()[-1])


def start_upstream(args: argparse.Namespace, workdir: Path, server_tls: bool = False) -> Upstream:
    if args.dsn:
        url = urlparse(args.dsn)
        if url.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("--dsn must point at this machine (127.0.0.1)")
        up = Upstream(port=url.port or 5432, admin_user=unquote(url.username or "postgres"),
                      admin_password=unquote(url.password) if url.password else None,
                      psql_host=HOST)
        if server_tls and up.psql("SHOW ssl") != "on":
            raise SystemExit("the server TLS cases need ssl = on in the --dsn PostgreSQL "
                             "(or no --dsn: an embedded one is started with it)")
    else:
        from pgpilot.embedded import EmbeddedPostgres

        data_dir = Path(args.data_dir) if args.data_dir else workdir / "pgdata"
        settings = {"max_connections": "1200", "shared_buffers": "256MB",
                    "max_files_per_process": "200"}
        bin_dir = None
        if server_tls:
            assert TLS is not None
            settings.update({"ssl": "on", "ssl_cert_file": "server.crt",
                             "ssl_key_file": "server.key"})
            bin_dir = system_bin_dir_with_openssl()
        pg = EmbeddedPostgres(data_dir, bin_dir=bin_dir, settings=settings)
        if server_tls:
            from pgpilot.embedded import SERVER_USER

            assert TLS is not None
            pg.init()
            for src_file, dest in ((TLS.cert, "server.crt"), (TLS.key, "server.key")):
                shutil.copy(src_file, data_dir / dest)
                (data_dir / dest).chmod(0o600)
                with contextlib.suppress(OSError, LookupError):
                    shutil.chown(data_dir / dest, SERVER_USER, SERVER_USER)
        log(f"starting embedded PostgreSQL in {data_dir}" + (" (ssl = on)" if server_tls else ""))
        pg.start(timeout=120)
        up = Upstream(port=pg.port, admin_user="postgres", admin_password=None,
                      psql_host=str(pg.socket_dir), embedded=pg)
        # Direct connections of the churn row log in with SCRAM as bench_scram; the others
        # (bench directly, the poolers as postgres, a forced server user) are trusted, so
        # 1,000 direct clients do not spend the run on PBKDF2.
        hba = data_dir / "pg_hba.conf"
        hba.write_text("local all all trust\n"
                       f"host all {BENCH_SCRAM_USER} 127.0.0.1/32 scram-sha-256\n"
                       "host all all 127.0.0.1/32 trust\n")
        with contextlib.suppress(OSError, LookupError):
            shutil.chown(hba, "pgpilot_pg", "pgpilot_pg")
        up.psql("SELECT pg_reload_conf()")
    return up


def prepare_data(up: Upstream, scale: int, reuse: bool) -> str:
    """Create the bench role and database, run pgbench -i; return the role's SCRAM secret."""
    for role in (BENCH_USER, BENCH_SCRAM_USER):
        if not up.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'"):
            up.psql(f"CREATE ROLE {role} LOGIN SUPERUSER")
        up.psql(f"SET password_encryption = 'scram-sha-256'; "
                f"ALTER ROLE {role} PASSWORD '{BENCH_PASSWORD}'")
    have_db = up.psql(f"SELECT 1 FROM pg_database WHERE datname = '{BENCH_DB}'")
    have_data = False
    if have_db and reuse:
        with contextlib.suppress(RuntimeError):
            have_data = int(up.psql("SELECT count(*) FROM pgbench_branches", BENCH_DB)) == scale
    if not have_data:
        if not have_db:
            up.psql(f"CREATE DATABASE {BENCH_DB}")
        log(f"pgbench -i -s {scale}")
        env = dict(os.environ)
        if up.admin_password:
            env["PGPASSWORD"] = up.admin_password
        subprocess.run(["pgbench", "-i", "-q", "-s", str(scale), "-h", up.psql_host,
                        "-p", str(up.port), "-U", up.admin_user, BENCH_DB],
                       check=True, capture_output=True, env=env)
        up.psql("VACUUM ANALYZE", BENCH_DB)
    secret = up.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{BENCH_USER}'")
    if not secret.startswith("SCRAM-SHA-256$"):
        from pgpilot.proxy.auth import scram_secret

        secret = scram_secret(BENCH_PASSWORD)
    return secret


# -- poolers -------------------------------------------------------------------------------


@dataclass
class Pooler:
    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    stderr_path: Path
    group: bool = False  # several processes under a shell: stopped as a process group

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.group:
            # The shell started its PgBouncers in the background, with SIGINT ignored;
            # SIGTERM (PgBouncer's immediate shutdown) reaches every one.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if self.kind == "pgpilot" else signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stderr_tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])
        return ""


def pooler_ini(kind: str, case: Case, port: int, up: Upstream, userlist: Path) -> str:
    """One pgbouncer.ini for both poolers: the same settings, read by each (by every
    PgBouncer process where it runs several, so each gets its share of the limits)."""
    share = case.pgbouncer_processes if kind == "pgbouncer" else 1
    server = f"host={HOST} port={up.port} dbname={BENCH_DB} user={up.admin_user}"
    if up.admin_password:
        server += f" password={up.admin_password}"
    lines = [
        "[databases]",
        f"{BENCH_DB} = {server}",
        "",
        "[pgbouncer]",
        f"listen_addr = {HOST}",
        f"listen_port = {port}",
        "unix_socket_dir =",
        f"auth_type = {case.auth}",
        f"auth_file = {userlist}",
        "pool_mode = transaction",
        f"default_pool_size = {case.pool_size // share}",
        "reserve_pool_size = 0",
        f"max_db_connections = {max(case.pool_size, 100) // share}",
        f"max_client_conn = {MAX_CLIENT_CONN}",
        "listen_backlog = 4096",
        f"log_connections = {int(case.logging)}",
        f"log_disconnections = {int(case.logging)}",
        "stats_period = 60",
    ]
    if case.client_tls or case.server_tls:
        assert TLS is not None
    if case.client_tls and TLS is not None:
        lines += ["client_tls_sslmode = require", f"client_tls_cert_file = {TLS.cert}",
                  f"client_tls_key_file = {TLS.key}"]
    if case.server_tls:
        lines += ["server_tls_sslmode = require"]
    else:
        lines += ["server_tls_sslmode = disable"]  # as before these cases (PgBouncer's default)
    if kind == "pgbouncer":
        lines += ["pidfile =", "logfile ="]
        if share > 1:
            lines.append("so_reuseport = 1")
    elif case.workers > 1:
        lines.append(f"workers = {case.workers}")
    return "\n".join(lines) + "\n"


def start_pooler(kind: str, case: Case, up: Upstream, secret: str, base: Path) -> Pooler:
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=base))
    workdir.chmod(0o755)
    userlist = workdir / "userlist.txt"
    userlist.write_text(f'"{BENCH_USER}" "{secret}"\n')
    port = free_port()
    ini = workdir / ("pgbouncer.ini" if kind == "pgbouncer" else "pgpilot.ini")
    ini.write_text(pooler_ini(kind, case, port, up, userlist))
    for p in (userlist, ini):
        p.chmod(0o644)
    stderr_path = workdir / "stderr.log"
    stderr = stderr_path.open("wb")
    if kind == "pgbouncer":
        kwargs: dict[str, Any] = {"user": "nobody"} if os.geteuid() == 0 else {}
        cmd = ["pgbouncer", str(ini)]
        if case.pgbouncer_processes > 1:
            # Several processes under one shell, so that the process tree (CPU, RSS) and the
            # process group (stop) hold them all.
            one = f"pgbouncer {shlex.quote(str(ini))}"
            cmd = ["sh", "-c", " & ".join([one] * case.pgbouncer_processes) + " & wait"]
    else:
        kwargs = {}
        # -q: warnings only, as PgBouncer's log_connections = 0 / log_disconnections = 0
        # (set for both in the ini): no per-connection logging on either side.
        cmd = [sys.executable, "-m", "pgpilot", "proxy", "--config", str(ini)]
        if not case.logging:
            cmd.append("-q")
    # Each pooler in a session of its own, as a service manager starts it. Where the kernel
    # groups processes by session for CPU shares (autogroup, on in Debian's kernels), a pooler
    # started in the bench's session would share one share with pgbench's threads, and
    # PostgreSQL (pg_ctl starts it in its own session) would hold another.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=workdir,
                            start_new_session=True, **kwargs)
    stderr.close()
    pooler = Pooler(kind, port, proc, workdir, stderr_path,
                    group=kind == "pgbouncer" and case.pgbouncer_processes > 1)
    try:
        wait_port(port, proc)
        if pooler.group:
            wait_for(lambda: len(process_tree(proc.pid)) > case.pgbouncer_processes,
                     f"{case.pgbouncer_processes} PgBouncer processes")
    except RuntimeError as exc:
        pooler.stop()
        raise RuntimeError(f"{kind} did not start: {exc}\n{pooler.stderr_tail()}") from exc
    return pooler


# -- pgbench -------------------------------------------------------------------------------


@dataclass
class RunResult:
    target: str  # direct | pgbouncer | pgpilot
    round: int
    ok: bool = True
    tps: float = float("nan")
    txns: int = 0
    lat_avg_ms: float = float("nan")
    lat_p99_ms: float = float("nan")
    cpu_s: float = float("nan")
    cpu_per_100k: float = float("nan")
    peak_rss_kb: int = 0
    rss_kb: int = 0
    errors: int = 0
    error_text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def pgbench_cmd(case: Case, port: int, seconds: float, log_prefix: Path | None,
                user: str = BENCH_USER) -> list[str]:
    cmd = ["pgbench", "-n", "-h", HOST, "-p", str(port), "-U", user,
           "-c", str(case.clients), "-j", str(min(case.threads, case.clients)),
           "-T", str(max(1, round(seconds))), *case.args]
    if log_prefix is not None:
        cmd += ["-l", f"--log-prefix={log_prefix}"]
    return [*cmd, BENCH_DB]


def pgbench_env(client_tls: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env["PGPASSWORD"] = BENCH_PASSWORD
    env["PGSSLMODE"] = "require" if client_tls else "disable"
    env["PGAPPNAME"] = ""
    return env


def read_latencies(log_dir: Path) -> list[float]:
    """Per-transaction latencies (ms) from pgbench -l files (third column, microseconds)."""
    out: list[float] = []
    for path in log_dir.iterdir():
        with path.open() as fh:
            for line in fh:
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[2].isdigit():
                    out.append(int(parts[2]) / 1000.0)
    return out


def parse_pgbench(stdout: str, stderr: str, rc: int, res: RunResult) -> None:
    m = re.search(r"number of transactions actually processed: (\d+)", stdout)
    res.txns = int(m.group(1)) if m else 0
    m = re.search(r"^tps = ([\d.]+)", stdout, re.M)
    res.tps = float(m.group(1)) if m else float("nan")
    failed = re.search(r"number of failed transactions: (\d+)", stdout)
    aborted = len(re.findall(r"client \d+ (?:script \d+ )?aborted", stderr))
    res.errors = (int(failed.group(1)) if failed else 0) + aborted
    res.extra["aborted_clients"] = aborted
    if rc != 0 or res.txns == 0 or aborted:
        # A run where clients gave up is a failure, whatever tps the others reached.
        res.ok = res.txns > 0 and res.tps == res.tps and not aborted
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        res.error_text = "; ".join(dict.fromkeys(
            re.sub(r"client \d+", "client N", ln) for ln in lines))[:500] or f"exit {rc}"


def run_pgbench(case: Case, port: int, seconds: float, tmp: Path, with_log: bool = True,
                user: str = BENCH_USER) -> tuple[str, str, int, list[float]]:
    log_dir = Path(tempfile.mkdtemp(prefix="pgbench-log-", dir=tmp))
    cmd = pgbench_cmd(case, port, seconds, log_dir / "tx" if with_log else None, user)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env=pgbench_env(case.client_tls),
                              timeout=seconds + 300, cwd=log_dir)
        lats = read_latencies(log_dir) if with_log else []
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    return proc.stdout, proc.stderr, proc.returncode, lats


def measure_pgbench(case: Case, target: str, rnd: int, up: Upstream, secret: str,
                    st: Settings, tmp: Path) -> RunResult:
    res = RunResult(target, rnd)
    pooler: Pooler | None = None
    if target == "pgbouncer" and case.pgbouncer_args is not None:
        case = dataclasses.replace(case, args=case.pgbouncer_args)
    try:
        seconds = st.duration
        user = BENCH_USER
        if target == "direct":
            port = up.port
            if case.auth != "trust" and up.embedded is not None:
                user = BENCH_SCRAM_USER
            # pgbench's -T clock includes connecting, and 1,000 PostgreSQL backends take
            # seconds to fork; its tps excludes that time, the window is extended for it.
            seconds += case.clients / 150
        else:
            pooler = start_pooler(target, case, up, secret, tmp)
            port = pooler.port
        if st.warmup > 0 and target != "direct":
            run_pgbench(case, port, st.warmup, tmp, with_log=False)
        cpu0 = cpu_seconds(pooler.pid) if pooler else 0.0
        out, err, rc, lats = run_pgbench(case, port, seconds, tmp, user=user)
        if pooler is not None:
            if pooler.proc.poll() is not None:
                raise RuntimeError(f"{target} exited during the run:\n{pooler.stderr_tail()}")
            res.cpu_s = cpu_seconds(pooler.pid) - cpu0
            res.peak_rss_kb = proc_status_kb(pooler.pid, "VmHWM")
            res.rss_kb = proc_status_kb(pooler.pid, "VmRSS")
        parse_pgbench(out, err, rc, res)
        if lats:
            lats.sort()
            res.lat_avg_ms = sum(lats) / len(lats)
            res.lat_p99_ms = percentile(lats, 99)
        if pooler is not None and res.txns:
            res.cpu_per_100k = res.cpu_s / res.txns * 100_000
    except Exception as exc:  # recorded, the run goes on
        res.ok = False
        res.error_text = str(exc)[:500]
    finally:
        if pooler is not None:
            pooler.stop()
            shutil.rmtree(pooler.workdir, ignore_errors=True)
    status = "ok" if res.ok else f"FAILED: {res.error_text[:160]}"
    log(f"  {case.name:22s} {target:9s} r{rnd}: tps {res.tps:9.1f}  avg {res.lat_avg_ms:7.2f} ms"
        f"  p99 {res.lat_p99_ms:7.2f} ms  cpu/100k {res.cpu_per_100k:6.2f} s"
        f"  rss {res.peak_rss_kb / 1024:6.1f} MB  err {res.errors}  {status}")
    return res


# -- the scale case: 10k clients, raw protocol load generator ------------------------------

_LOGIN_TIMEOUT = 60.0


class _Client(asyncio.Protocol):
    """A minimal PostgreSQL client: trust login, then simple-protocol queries."""

    __slots__ = ("buf", "errors", "transport", "waiter")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        ready = False
        while len(buf) - pos >= 5:
            mtype = buf[pos]
            (length,) = struct.unpack_from("!i", buf, pos + 1)
            if len(buf) - pos < length + 1:
                break
            if mtype == 0x45:  # ErrorResponse
                self.errors += 1
            elif mtype == 0x52 and length >= 8:  # Authentication
                (code,) = struct.unpack_from("!i", buf, pos + 5)
                if code != 0:
                    self.errors += 1
                    self._done(RuntimeError(f"auth method {code} asked; trust expected"))
            elif mtype == 0x5A:  # ReadyForQuery
                ready = True
            pos += length + 1
        del buf[:pos]
        if ready:
            self._done(None)

    def _done(self, exc: Exception | None) -> None:
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            if exc is None:
                w.set_result(None)
            else:
                w.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._done(ConnectionError("connection closed by the pooler"))

    async def roundtrip(self, payload: bytes) -> None:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        await self.waiter


def _startup(user: str, database: str) -> bytes:
    body = struct.pack("!i", 196608) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0"
        for k, v in (("user", user), ("database", database))) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def _query(sql: str) -> bytes:
    data = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(data) + 4) + data


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _loadgen(port: int, clients: int, active: int, duration: float, rows: int) -> None:
    loop = asyncio.get_running_loop()
    conns: list[_Client] = []
    errors = 0
    error_kinds: dict[str, int] = {}
    sem = asyncio.Semaphore(256)
    startup = _startup(BENCH_USER, BENCH_DB)

    async def connect() -> None:
        nonlocal errors
        async with sem:
            try:
                async with asyncio.timeout(_LOGIN_TIMEOUT):
                    _t, proto = await loop.create_connection(_Client, HOST, port)
                    await proto.roundtrip(startup)
                if proto.errors:
                    raise RuntimeError("ErrorResponse at login")
                conns.append(proto)
            except Exception as exc:
                errors += 1
                key = type(exc).__name__ + ": " + str(exc)[:80]
                error_kinds[key] = error_kinds.get(key, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(connect() for _ in range(clients)))
    _emit({"phase": "connected", "ok": len(conns), "errors": errors,
           "error_kinds": error_kinds, "seconds": time.perf_counter() - t0})
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"

    lats: list[float] = []
    q_errors = 0
    stop_at = time.perf_counter() + duration
    workers = conns[:active]

    async def work(c: _Client) -> None:
        nonlocal q_errors
        rnd = random.Random()
        while time.perf_counter() < stop_at and c.transport is not None:
            sql = f"SELECT abalance FROM pgbench_accounts WHERE aid = {rnd.randint(1, rows)}"
            before = c.errors
            t = time.perf_counter()
            try:
                await c.roundtrip(_query(sql))
            except Exception:
                q_errors += 1
                return
            lats.append((time.perf_counter() - t) * 1000)
            q_errors += c.errors - before

    t1 = time.perf_counter()
    await asyncio.gather(*(work(c) for c in workers))
    elapsed = time.perf_counter() - t1
    # The idle ones must still be there.
    still_open = sum(1 for c in conns if c.transport is not None)
    lats.sort()
    _emit({"phase": "done", "txns": len(lats), "tps": len(lats) / elapsed if elapsed else 0,
           "lat_avg_ms": sum(lats) / len(lats) if lats else float("nan"),
           "lat_p99_ms": percentile(lats, 99), "query_errors": q_errors,
           "still_open": still_open})
    await loop.run_in_executor(None, sys.stdin.readline)  # "close"
    for c in conns:
        if c.transport is not None:
            c.transport.write(b"X\0\0\0\4")
            c.transport.close()
    await asyncio.sleep(0.2)


def loadgen_main(args: argparse.Namespace) -> int:
    raise_nofile()
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_loadgen(args.port, args.clients, args.active, args.duration, args.rows))
    return 0


def warm_up(pooler: Pooler) -> None:
    """One client logs in and runs a query, so the pooler has its first server connection
    and caches before a baseline is read."""
    warm = subprocess.run(["psql", "-X", "-q", "-h", HOST, "-p", str(pooler.port),
                           "-U", BENCH_USER, "-d", BENCH_DB, "-c", "SELECT 1"],
                          capture_output=True, text=True, env=pgbench_env(), timeout=30)
    if warm.returncode != 0:
        raise RuntimeError(f"warm-up query failed: {warm.stderr.strip()}")


def start_loadgen(pooler: Pooler, clients: int, active: int, duration: float,
                  rows: int) -> subprocess.Popen[str]:
    """The scale case's load generator (``--loadgen``) on ``pooler``: it logs ``clients`` in,
    prints a JSON line, and waits for "go" on its stdin."""
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--loadgen",
         "--port", str(pooler.port), "--clients", str(clients), "--active", str(active),
         "--duration", str(duration), "--rows", str(rows)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def measure_scale(case: Case, target: str, rnd: int, up: Upstream, secret: str,
                  st: Settings, tmp: Path, rows: int) -> RunResult:
    res = RunResult(target, rnd)
    pooler: Pooler | None = None
    gen: subprocess.Popen[str] | None = None
    try:
        pooler = start_pooler(target, case, up, secret, tmp)
        warm_up(pooler)
        rss0 = proc_status_kb(pooler.pid, "VmRSS")
        cpu0 = cpu_seconds(pooler.pid)
        gen = start_loadgen(pooler, st.scale_clients, st.scale_active, st.scale_duration, rows)
        assert gen.stdin is not None and gen.stdout is not None
        connected = json.loads(gen.stdout.readline())
        time.sleep(0.5)
        rss_idle = proc_status_kb(pooler.pid, "VmRSS")
        gen.stdin.write("go\n")
        gen.stdin.flush()
        time.sleep(min(2.0, st.scale_duration / 2))
        servers_mid = up.server_connections()
        done = json.loads(gen.stdout.readline())
        servers_end = up.server_connections()
        res.cpu_s = cpu_seconds(pooler.pid) - cpu0
        res.peak_rss_kb = proc_status_kb(pooler.pid, "VmHWM")
        res.rss_kb = rss_idle
        gen.stdin.write("close\n")
        gen.stdin.flush()
        gen.wait(60)
        if pooler.proc.poll() is not None:
            raise RuntimeError(f"{target} exited during the run:\n{pooler.stderr_tail()}")
        res.txns = int(done["txns"])
        res.tps = float(done["tps"])
        res.lat_avg_ms = float(done["lat_avg_ms"])
        res.lat_p99_ms = float(done["lat_p99_ms"])
        lost = st.scale_clients - int(done["still_open"]) - int(connected["errors"])
        res.errors = int(connected["errors"]) + int(done["query_errors"]) + max(0, lost)
        clients_ok = int(connected["ok"])
        res.extra = {
            "clients_requested": st.scale_clients, "clients_connected": clients_ok,
            "connect_errors": connected["errors"], "connect_error_kinds": connected["error_kinds"],
            "connect_seconds": round(connected["seconds"], 2),
            "query_errors": done["query_errors"], "clients_lost": max(0, lost),
            "rss_before_kb": rss0, "rss_idle_kb": rss_idle,
            "bytes_per_idle_client": round((rss_idle - rss0) * 1024 / clients_ok)
            if clients_ok else None,
            "server_connections_mid": servers_mid, "server_connections_end": servers_end,
        }
        if res.txns:
            res.cpu_per_100k = res.cpu_s / res.txns * 100_000
        if res.errors:
            res.error_text = (f"{connected['errors']} login errors "
                              f"{connected['error_kinds']}, {done['query_errors']} query errors, "
                              f"{max(0, lost)} idle clients lost")
    except Exception as exc:
        res.ok = False
        res.error_text = str(exc)[:500]
    finally:
        if gen is not None and gen.poll() is None:
            gen.kill()
            gen.wait(10)
        if pooler is not None:
            pooler.stop()
            shutil.rmtree(pooler.workdir, ignore_errors=True)
    x = res.extra
    log(f"  {case.name:22s} {target:9s} r{rnd}: connected {x.get('clients_connected')} in "
        f"{x.get('connect_seconds')} s, tps {res.tps:8.1f}, p99 {res.lat_p99_ms:6.2f} ms, "
        f"rss idle {res.rss_kb / 1024:6.1f} MB, {x.get('bytes_per_idle_client')} B/client, "
        f"servers {x.get('server_connections_mid')}, errors {res.errors}"
        + ("" if res.ok else f"  FAILED: {res.error_text[:200]}"))
    return res


# -- summary -------------------------------------------------------------------------------


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    ok = [r for r in runs if r.ok]
    summary: dict[str, Any] = {
        "runs": len(runs), "ok_runs": len(ok),
        "tps": median([r.tps for r in ok]),
        "lat_avg_ms": median([r.lat_avg_ms for r in ok]),
        "lat_p99_ms": median([r.lat_p99_ms for r in ok]),
        "cpu_per_100k": median([r.cpu_per_100k for r in ok]),
        "peak_rss_kb": max((r.peak_rss_kb for r in ok), default=0),
        "errors": sum(r.errors for r in runs),
        "failures": sorted({r.error_text for r in runs if not r.ok or r.error_text}),
    }
    bpc = [r.extra["bytes_per_idle_client"] for r in ok
           if r.extra.get("bytes_per_idle_client") is not None]
    if bpc:
        summary["bytes_per_idle_client"] = median([float(b) for b in bpc])
        summary["rss_idle_kb"] = median([float(r.extra["rss_idle_kb"]) for r in ok])
        summary["server_connections_max"] = max(
            max(r.extra.get("server_connections_mid", 0), r.extra.get("server_connections_end", 0))
            for r in ok)
    return summary


def paired_rounds(bouncer: list[RunResult], pilot: list[RunResult]) -> dict[str, Any]:
    """Round-by-round comparison: each round's two runs ran back to back, so their ratio is
    less touched by the machine's drift than the ratio of medians over the whole case."""
    by_round = {r.round: r for r in bouncer if r.ok}
    pairs = [(by_round[p.round], p) for p in pilot if p.ok and p.round in by_round]
    tps = [ratio(p.tps, b.tps) for b, p in pairs]
    p99 = [ratio(p.lat_p99_ms, b.lat_p99_ms) for b, p in pairs]
    tps_mean, tps_lo, tps_hi = ratio_interval(tps)
    p99_mean, p99_lo, p99_hi = ratio_interval(p99)
    return {
        "rounds": len(pairs),
        "tps_geomean": tps_mean, "tps_ci95": [tps_lo, tps_hi],
        "tps_verdict": verdict(tps_lo, tps_hi, higher_is_better=True),
        "p99_geomean": p99_mean, "p99_ci95": [p99_lo, p99_hi],
        "p99_verdict": verdict(p99_lo, p99_hi, higher_is_better=False),
        "tps_ratios": [round(x, 3) for x in tps],
        "tps_ratio_median": median(tps),
        "tps_rounds_ahead": sum(1 for x in tps if x >= 1.0),
        "p99_ratios": [round(x, 3) for x in p99],
        "p99_ratio_median": median(p99),
        "p99_rounds_ahead": sum(1 for x in p99 if x <= 1.0),
    }


# Two-sided 95 % quantiles of Student's t, by degrees of freedom (1-30); 1.96 beyond.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
       2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
       2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of per-round ratios and its 95 % confidence interval.

    Ratios are averaged as logarithms (1.1x and 1/1.1x cancel), and the interval is the
    t interval of the mean log ratio: if it holds 1.0, the rounds cannot tell the two poolers
    apart; if it lies above or below, the difference is larger than the machine's noise."""
    logs = [math.log(r) for r in ratios if r == r and r > 0]
    if not logs:
        return float("nan"), float("nan"), float("nan")
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), float("nan"), float("nan")
    dof = len(logs) - 1
    half = (T95[dof - 1] if dof <= len(T95) else 1.96) * (
        statistics.stdev(logs) / math.sqrt(len(logs)))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def verdict(lo: float, hi: float, higher_is_better: bool) -> str:
    """'ahead', 'behind' or 'level' for pgpilot, from a ratio's 95 % interval."""
    if lo != lo or hi != hi:
        return "–"
    if lo > 1.0:
        return "ahead" if higher_is_better else "behind"
    if hi < 1.0:
        return "behind" if higher_is_better else "ahead"
    return "level"


def ratio(a: float, b: float) -> float:
    if a != a or b != b or not b:
        return float("nan")
    return a / b


def fmt(v: Any, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return format(v, spec)


def paired_cell(pr: dict[str, Any], key: str) -> str:
    """'1.03x [0.99-1.07] level, 6/10': a paired ratio, its interval, verdict, rounds ahead."""
    n = pr.get("rounds", 0)
    if not n:
        return "–"
    ahead = f"{pr[f'{key}_rounds_ahead']}/{n}"
    lo, hi = pr[f"{key}_ci95"]
    interval = f" [{fmt(lo, '.2f')}-{fmt(hi, '.2f')}]" if lo == lo else ""
    return f"{fmt(pr[f'{key}_geomean'], '.2f')}x{interval} {pr[f'{key}_verdict']}, {ahead}"


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    out = ["# pgpilot vs PgBouncer: pooler benchmark", "",
           f"Run {report['started']} with `{report['command']}`.", "",
           "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".", "",
           "Every case ran the direct (no pooler) reference once, then PgBouncer and pgpilot "
           f"alternately for {report['settings']['rounds']} rounds "
           f"({report['settings']['duration']:g} s measured per run after "
           f"{report['settings']['warmup']:g} s of warm-up; a fresh pooler process per run). "
           "Values are medians over the rounds; peak RSS is the maximum. Transaction pooling, "
           "pool of 20 unless noted. The poolers, pgbench and PostgreSQL share the same "
           f"{env['cpus']} cores, so pooler CPU also slows the database: compare ratios, "
           "not absolute numbers. Other work on the machine (see the load averages) adds "
           "noise that the alternation spreads over both poolers.", "",
           "## Ratios (pgpilot / PgBouncer)", "",
           "tps: higher is better; p99, CPU and RSS: lower is better. The first columns are "
           "ratios of the medians; the paired columns compare each round's two runs, which "
           "ran back to back: the geometric mean of those ratios with its 95 % confidence "
           "interval, what the interval says (ahead or behind when it excludes 1.0, level "
           "when the rounds cannot tell the poolers apart), and in how many rounds pgpilot "
           "was ahead (tps at least PgBouncer's, p99 at most).", "",
           "| case | tps | p99 latency | CPU / tx | peak RSS | paired tps | paired p99 |",
           "|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        r = c.get("ratios")
        if not r:
            continue
        pr = c.get("paired") or {}
        paired_tps, paired_p99 = paired_cell(pr, "tps"), paired_cell(pr, "p99")
        out.append(f"| {c['name']} | {fmt(r['tps'], '.2f')}x | {fmt(r['lat_p99_ms'], '.2f')}x |"
                   f" {fmt(r['cpu_per_100k'], '.2f')}x | {fmt(r['peak_rss_kb'], '.2f')}x |"
                   f" {paired_tps} | {paired_p99} |")
    out += ["", "## Results", "",
            "| case | target | tps | avg ms | p99 ms | CPU s / 100k tx | peak RSS MB | errors |",
            "|---|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        for target in ("direct", *POOLERS):
            s = c["summary"].get(target)
            if s is None:
                continue
            bad = "" if s["ok_runs"] == s["runs"] else f" ({s['runs'] - s['ok_runs']} failed)"
            out.append(
                f"| {c['name']} | {target}{bad} | {fmt(s['tps'])} | {fmt(s['lat_avg_ms'], '.2f')}"
                f" | {fmt(s['lat_p99_ms'], '.2f')} | {fmt(s['cpu_per_100k'], '.2f')} | "
                f"{fmt(s['peak_rss_kb'] / 1024 if s['peak_rss_kb'] else None)} | {s['errors']} |")
    scale = [c for c in report["cases"] if c["kind"] == "scale"]
    if scale:
        out += ["", "## Scale: idle clients", "",
                "| case | pooler | clients connected | login errors | query errors | "
                "server conns (max seen) | RSS before MB | RSS with clients MB | "
                "bytes / idle client | tps (100 active) | p99 ms |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in scale:
            for target in POOLERS:
                for r in c["runs"].get(target, []):
                    x = r["extra"]
                    if not x:
                        out.append(f"| {c['name']} r{r['round']} | {target} | failed: "
                                   f"{r['error_text'][:120]} |||||||||")
                        continue
                    out.append(
                        f"| {c['name']} r{r['round']} | {target} | {x['clients_connected']} | "
                        f"{x['connect_errors']} | {x['query_errors']} | "
                        f"{max(x['server_connections_mid'], x['server_connections_end'])} | "
                        f"{x['rss_before_kb'] / 1024:.1f} | {x['rss_idle_kb'] / 1024:.1f} | "
                        f"{x['bytes_per_idle_client']} | {fmt(r['tps'])} | "
                        f"{fmt(r['lat_p99_ms'], '.2f')} |")
    notes = [(c["name"], c["note"]) for c in report["cases"] if c.get("note")]
    failures = [(c["name"], t, f) for c in report["cases"] for t, s in c["summary"].items()
                for f in s["failures"] if f]
    if notes or failures:
        out += ["", "## Notes and failures", ""]
        out += [f"- **{n}**: {note}" for n, note in notes]
        out += [f"- **{n}** {t}: `{f[:300]}`" for n, t, f in failures]
    return "\n".join(out) + "\n"


def print_table(report: dict[str, Any]) -> None:
    hdr = (f"{'case':22s} {'target':10s} {'tps':>9s} {'avg ms':>8s} {'p99 ms':>8s} "
           f"{'cpu/100k':>9s} {'rss MB':>7s} {'err':>5s}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for c in report["cases"]:
        for target in ("direct", *POOLERS):
            s = c["summary"].get(target)
            if s is None:
                continue
            print(f"{c['name']:22s} {target:10s} {fmt(s['tps']):>9s} "
                  f"{fmt(s['lat_avg_ms'], '.2f'):>8s} {fmt(s['lat_p99_ms'], '.2f'):>8s} "
                  f"{fmt(s['cpu_per_100k'], '.2f'):>9s} "
                  f"{fmt(s['peak_rss_kb'] / 1024 if s['peak_rss_kb'] else None):>7s} "
                  f"{s['errors']:>5d}")
            if "bytes_per_idle_client" in s:
                print(f"{'':22s} {'':10s} bytes/idle client {s['bytes_per_idle_client']:.0f}, "
                      f"server conns max {s['server_connections_max']}")
        r = c.get("ratios")
        if r:
            print(f"{'':22s} {'ratio P/B':10s} {fmt(r['tps'], '.2f'):>8s}x "
                  f"{'':8s} {fmt(r['lat_p99_ms'], '.2f'):>7s}x {fmt(r['cpu_per_100k'], '.2f'):>8s}x"
                  f" {fmt(r['peak_rss_kb'], '.2f'):>6s}x")
        pr = c.get("paired")
        if pr and pr["rounds"]:
            print(f"{'':22s} {'paired':10s} tps {paired_cell(pr, 'tps')}; "
                  f"p99 {paired_cell(pr, 'p99')}")
    print()


# -- main ----------------------------------------------------------------------------------


def export_revision(rev: str, dest: Path) -> str:
    """``git archive`` a revision's src/ into ``dest`` (the working tree is left alone)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"],
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return str(dest / "src")


def build_fast_path(src: str) -> str:
    """Compile the pooler's C fast path in ``src`` if the revision has one and it is missing
    or older than its source (as ``pip install`` would). Returns "on", "off" or "absent"."""
    import sysconfig

    c_file = Path(src) / "pgpilot" / "proxy" / "_fastpath.c"
    if not c_file.exists():
        return "absent"
    target = c_file.with_name("_fastpath" + sysconfig.get_config_var("EXT_SUFFIX"))
    # _fastpath.c includes the engine's files (engine/, since the split): any newer rebuilds.
    newest = max(f.stat().st_mtime for f in [c_file, *c_file.parent.glob("engine/*.[ch]")])
    if not target.exists() or target.stat().st_mtime < newest:
        cc = os.environ.get("CC", "cc")
        done = subprocess.run([cc, "-O2", "-shared", "-fPIC",
                               f"-I{sysconfig.get_paths()['include']}", str(c_file),
                               "-o", str(target)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"warning: the C fast path did not compile:\n{done.stderr[-2000:]}")
            return "off"
    return "on"


def environment(up: Upstream, rev: str | None, src_dir: str | None = None) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev or "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = "" if rev else " + working tree"
    if src_dir:
        dirty = f" (package from {src_dir})"
    try:
        import uvloop

        uv = str(getattr(uvloop, "__version__", "?"))
    except ImportError:
        uv = "absent"
    autogroup = "?"
    with contextlib.suppress(OSError):
        autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
    return {
        "cpus": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(),
        "python": platform.python_version(), "uvloop (scale case load generator)": uv,
        "pgpilot": f"git {commit}{dirty}" if commit else "?",
        "pgbouncer": tool_version(["pgbouncer", "--version"]),
        "postgresql": up.psql("SHOW server_version"),
        "pgbench": tool_version(["pgbench", "--version"]),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "sched_autogroup_enabled": autogroup,
    }


def iter_order(case: Case, rounds: int) -> Iterator[tuple[str, int]]:
    if case.direct:
        yield "direct", 1
    for rnd in range(1, rounds + 1):
        for p in POOLERS:
            if p in case.poolers:
                yield p, rnd


def render_again(path: Path) -> int:
    """Recompute each case's paired comparison from the runs an earlier report kept."""
    report = json.loads(path.read_text())
    for c in report["cases"]:
        runs = {t: [RunResult(**r) for r in rs] for t, rs in c["runs"].items()}
        if "pgbouncer" in runs and "pgpilot" in runs:
            c["paired"] = paired_rounds(runs["pgbouncer"], runs["pgpilot"])
    write_report(report, path)
    return 0


def write_report(report: dict[str, Any], path: Path) -> None:
    """The report as JSON at ``path``, as Markdown beside it (.md), and as a table here."""
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    path.with_suffix(".md").write_text(render_markdown(report))
    print_table(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short runs (3 s, 1 round, 2,000 scale clients): a smoke test")
    parser.add_argument("--cases", nargs="+", choices=CASE_NAMES, metavar="CASE",
                        help=f"cases to run (default all): {', '.join(CASE_NAMES)}")
    parser.add_argument("--dsn", help="use this PostgreSQL (on 127.0.0.1) instead of an "
                        "embedded one; the user must be a superuser")
    parser.add_argument("--data-dir", help="embedded PostgreSQL data folder (kept, reused)")
    parser.add_argument("--duration", type=float, help="measured seconds per run (default 8)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds per run (default 2)")
    parser.add_argument("--rounds", type=int, help="A/B rounds per case (default 3)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale factor")
    parser.add_argument("--scale-clients", type=int, help="idle clients (default 10000)")
    parser.add_argument("--pgpilot-rev", metavar="REV",
                        help="benchmark this git revision of pgpilot (exported with git "
                        "archive) instead of the working tree's src/")
    parser.add_argument("--pgpilot-src", metavar="DIR",
                        help="benchmark the pgpilot package under DIR (a src/ folder, e.g. a "
                        "scratch copy with a proposed change)")
    parser.add_argument("--output", default=str(RESULTS),
                        help="folder for pooler.json and pooler.md")
    parser.add_argument("--render", metavar="JSON",
                        help="run nothing: recompute the paired comparison of an earlier "
                        "run's JSON (e.g. one written before the intervals were) and write "
                        "it and its Markdown again, beside it")
    # The load generator of the scale case runs as its own process: this file, --loadgen.
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--active", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=100_000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loadgen:
        args.duration = args.duration or 10.0
        return loadgen_main(args)
    if args.render:
        return render_again(Path(args.render))

    quick = args.quick
    st = Settings(
        duration=args.duration or (3.0 if quick else 8.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if quick else 2.0),
        rounds=args.rounds or (1 if quick else 3),
        scale=args.scale,
        scale_clients=args.scale_clients or (2000 if quick else 10_000),
        scale_active=100,
        scale_duration=3.0 if quick else 8.0,
    )
    cases = [c for c in CASES if not args.cases or c.name in args.cases]
    for tool in ("pgbench", "psql", "pgbouncer"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (apt-get install postgresql-client pgbouncer)")
    raise_nofile()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="pgpilot-bench-"))
    tmp.chmod(0o755)
    src = str(Path(args.pgpilot_src).resolve()) if args.pgpilot_src else str(ROOT / "src")
    if args.pgpilot_rev:
        # Resolved once: the commit exported is the commit reported.
        args.pgpilot_rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", args.pgpilot_rev + "^{commit}"],
            capture_output=True, text=True, check=True).stdout.strip()
        src = export_revision(args.pgpilot_rev, tmp / "pgpilot-src")
    fast_path = build_fast_path(src)
    os.environ["PYTHONPATH"] = src + os.pathsep + os.environ.get("PYTHONPATH", "")
    sys.path.insert(0, src)
    up: Upstream | None = None
    report: dict[str, Any] = {}
    try:
        global TLS
        if any(c.client_tls or c.server_tls for c in cases):
            TLS = make_tls_files(tmp / "tls")
        up = start_upstream(args, tmp, server_tls=any(c.server_tls for c in cases))
        secret = prepare_data(up, st.scale, reuse=bool(args.data_dir or args.dsn))
        rows = st.scale * 100_000
        report = {
            "started": started,
            "command": "python bench/pooler.py " + " ".join(sys.argv[1:] if argv is None
                                                             else argv),
            "environment": {**environment(up, args.pgpilot_rev, args.pgpilot_src),
                            "pgpilot fast path (C)": fast_path},
            "settings": asdict(st), "cases": [],
        }
        log("environment: " + json.dumps(report["environment"]))
        for case in cases:
            log(f"case {case.name}: {case.title}")
            runs: dict[str, list[RunResult]] = {}
            for target, rnd in iter_order(case, st.rounds):
                if case.kind == "scale":
                    res = measure_scale(case, target, rnd, up, secret, st, tmp, rows)
                else:
                    res = measure_pgbench(case, target, rnd, up, secret, st, tmp)
                runs.setdefault(target, []).append(res)
            summary = {t: summarize(rs) for t, rs in runs.items()}
            entry: dict[str, Any] = {
                "name": case.name, "title": case.title, "kind": case.kind,
                "clients": case.clients, "pool_size": case.pool_size, "auth": case.auth,
                "pgbench_args": list(case.args), "note": case.note,
                "summary": summary,
                "runs": {t: [asdict(r) for r in rs] for t, rs in runs.items()},
            }
            if "pgbouncer" in summary and "pgpilot" in summary:
                b, p = summary["pgbouncer"], summary["pgpilot"]
                entry["ratios"] = {k: ratio(p[k], b[k]) for k in
                                   ("tps", "lat_avg_ms", "lat_p99_ms", "cpu_per_100k",
                                    "peak_rss_kb")}
                entry["paired"] = paired_rounds(runs["pgbouncer"], runs["pgpilot"])
                if "bytes_per_idle_client" in p and "bytes_per_idle_client" in b:
                    entry["ratios"]["bytes_per_idle_client"] = ratio(
                        p["bytes_per_idle_client"], b["bytes_per_idle_client"])
            report["cases"].append(entry)
        report["elapsed_s"] = round(time.monotonic() - t_start, 1)
        report["environment"]["load average at end"] = " ".join(
            f"{x:.2f}" for x in os.getloadavg())
    finally:
        if up is not None and up.embedded is not None:
            up.embedded.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(report, out_dir / "pooler.json")
    log(f"done in {report.get('elapsed_s')} s; wrote {out_dir / 'pooler.json'} and "
        f"{out_dir / 'pooler.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
