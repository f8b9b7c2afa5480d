"""Client libraries' own test suites, run directly, through PgBouncer and through pgpilot.

``python bench/client_suites.py [--suite S ...] [--target T ...] [--mode M ...] [-k EXPR]``

The measurement for issue 22 ("an application cannot tell, by any query it runs, that it goes
through the pooler"): the test suites that asyncpg and SQLAlchemy ship in their source
distributions are run against three targets, and the failures that appear only through a
pooler are the pooler's bugs.

What it does, all on 127.0.0.1:

1. Downloads the sdists of the *installed* asyncpg and SQLAlchemy versions
   (``pip download --no-binary :all: --no-deps``) into ``--work-dir`` (default
   ``~/.cache/pgpilot/client-suites``), unpacks them, and makes a virtualenv there
   (``--system-site-packages``, so the installed drivers and pgpilot are the ones tested) with
   what the suites need that the machine lacks (asyncpg's tests import ``distro``).
2. For every (suite, target, mode): creates a fresh database on the PostgreSQL given by
   ``--pg-host/--pg-port/--pg-user`` (trust auth, a superuser), starts the pooler (PgBouncer
   from ``--pgbouncer``, as ``nobody`` when run as root; pgpilot as
   ``python -m pgpilot proxy --config FILE`` from the working tree, so the commit and the
   uncommitted changes of ``src/`` are recorded) on a free port with one pgbouncer.ini for
   both, runs the suite under pytest with ``--junitxml`` (one pytest process per asyncpg test
   file / per SQLAlchemy test path, so that a crash costs one chunk), stops the pooler and
   drops the database. Each run is bounded: ``--timeout`` for the whole run (SIGINT, then
   SIGKILL); ``--test-timeout`` per test (asyncpg's own ``TEST_TIMEOUT`` inside its event
   loop; a test that has not finished 30 s later is recorded as hung, pytest is interrupted
   and the chunk resumed after it; see ``SUITE_PLUGIN``).
3. Merges the run into ``bench/results/client-suites.json`` (keyed by suite/target/mode, so
   runs made one at a time add up), re-renders ``bench/results/client-suites.md`` and prints
   the tests that fail through a pooler but pass directly, grouped by a normalized failure
   message, and those that fail through pgpilot but pass through PgBouncer.

The suites:

- ``asyncpg``: ``tests/`` of the asyncpg sdist. ``asyncpg._testbase`` starts a temporary
  cluster unless ``PGHOST`` is set; with it (and PGPORT/PGUSER/PGDATABASE) it uses the running
  server (``RunningCluster``) and skips the tests that edit pg_hba.conf or restart the server.
  Deselected in every target alike: the tests that still build clusters of their own (hot
  standby, target_session_attrs reconnect; they would not go through the pooler anyway) and
  ``test__sourcecode`` (flake8/mypy over asyncpg's source). Run with ``python -P`` so that
  ``import asyncpg`` is the installed, compiled package, not the sdist's uncompiled source.
  One patch, applied for every target alike: the two pool tests of
  ``test_cache_invalidation.py`` open their pool with ``database='postgres'`` while the
  connection that alters the table uses PGDATABASE (the same database when asyncpg runs its
  own cluster); the patch drops that argument so that both use the run's database.
- ``sqlalchemy-psycopg`` / ``sqlalchemy-asyncpg``: SQLAlchemy's own pytest plugin with
  ``--dburi postgresql+psycopg://...`` / ``postgresql+asyncpg://...`` over ``--sqla-paths``
  (default: ``test/dialect/postgresql test/sql test/engine`` with ``--backend-only``, i.e.
  the tests marked as talking to the database; the compile-only tests prove nothing about a
  pooler). ``test/orm`` (2,268 more backend tests, mostly ORM logic over the same SQL) is
  left out by default: with it, a run through a pooler on a shared, loaded 2-core machine
  took longer than the 15 minutes a run may take; add it with ``--sqla-paths``. The
  database gets what SQLAlchemy's README.unittests asks for: UTF8, schemas
  ``test_schema`` and ``test_schema_2``, hstore and citext, English text search.

Pytest runs with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1`` (the machine's pytest-asyncio,
hypothesis, pgpilot's own plugin ... stay out) and this script's own small plugin.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_OUTPUT = RESULTS / "client-suites"
DEFAULT_WORK_DIR = Path.home() / ".cache" / "pgpilot" / "client-suites"

SUITES = ("asyncpg", "sqlalchemy-psycopg", "sqlalchemy-asyncpg")
TARGETS = ("direct", "pgbouncer", "pgpilot")
MODES = ("transaction", "session")
POOLERS = ("pgbouncer", "pgpilot")

# Tests that need a cluster of their own (they initdb/start one, or edit pg_hba.conf of the
# one they test); node id prefixes, deselected in every target alike.
ASYNCPG_DESELECT = (
    "tests/test__sourcecode.py",  # flake8 + mypy over asyncpg's source, no database
    "tests/test__environment.py",  # compares env vars with versions, no pooler content
    "tests/test_pool.py::TestHotStandby",  # primary + hot standby clusters
    "tests/test_pool.py::TestPoolReconnectWithTargetSessionAttrs",  # TempCluster, stop()
    "tests/test_connect.py::TestConnectionAttributes",  # HotStandbyTestCase
    "tests/test_connect.py::TestGssAuthentication",  # Kerberos realm + TempCluster
    "tests/test_codecs.py::TestCodecsLargeOIDs",  # TempCluster with reset_wal
)
# Extra packages the suites import that the machine may lack (from the sdists' test groups).
SUITE_REQUIREMENTS = {
    "asyncpg": ("distro~=1.9.0", "pytest"),
    "sqlalchemy": ("pytest>=7.0.0,<10", "greenlet"),
}
# Databases asyncpg's tests create and drop themselves (test_cache_invalidation,
# test_introspection). Through a pooler their DROP can fail (the pooler still holds idle
# server connections to them), which would break the next run's setUpClass: they are dropped
# before and after every asyncpg run (with the pooler stopped). pgpilot's tests use neither.
ASYNCPG_SCRATCH_DBS = ("testdb", "asyncpg_intro_test")
# (file, text, replacement) applied to the unpacked asyncpg sdist; see the module docstring.
ASYNCPG_PATCHES = (
    ("tests/test_cache_invalidation.py", "self.create_pool(database='postgres',",
     "self.create_pool("),
)
# The pytest plugin loaded into every suite run (-p client_suites_plugin, from PYTHONPATH):
# - writes each test's start and outcome to CLIENT_SUITES_PROGRESS, so the runner sees a test
#   that hangs (no test finished for --test-timeout plus slack), interrupts pytest (SIGINT: it
#   still writes its JUnit XML), records that test as hung and resumes the chunk after it;
# - deselects the node ids listed in CLIENT_SUITES_SKIP (those done before the resumption);
# - for asyncpg, sets its test metaclass' TEST_TIMEOUT, so that a slow async test is
#   cancelled inside its event loop and fails as "test timed out" without a restart.
# (pytest-timeout is not used: its SIGALRM, raised inside an event loop, was swallowed by
# asyncio tasks, or broke pytest's reporting on CPython 3.11: INTERNALERROR.)
SUITE_PLUGIN = """\
import os

import pytest

_PROGRESS = os.environ["CLIENT_SUITES_PROGRESS"]
_SKIP = os.environ.get("CLIENT_SUITES_SKIP")
_TIMEOUT = os.environ.get("CLIENT_SUITES_ASYNCPG_TEST_TIMEOUT")

if _TIMEOUT:
    from asyncpg import _testbase

    _testbase.TestCaseMeta.TEST_TIMEOUT = float(_TIMEOUT)


def _note(line):
    with open(_PROGRESS, "a") as f:
        f.write(line + "\\n")


def pytest_collection_modifyitems(config, items):
    if not _SKIP:
        return
    with open(_SKIP) as f:
        skip = set(f.read().splitlines())
    keep = [i for i in items if i.nodeid not in skip]
    config.hook.pytest_deselected(items=[i for i in items if i.nodeid in skip])
    items[:] = keep


def pytest_runtest_logstart(nodeid, location):
    _note("start " + nodeid)


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _note(report.when + " " + report.outcome + " " + report.nodeid)


def pytest_runtest_logfinish(nodeid, location):
    _note("finish " + nodeid)
"""
SQLA_DEFAULT_PATHS = ("test/dialect/postgresql", "test/sql", "test/engine")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} not open after {timeout:.0f}s")


def run_quiet(cmd: list[str], cwd: Path | None = None, timeout: float = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


# -- sources and environment --------------------------------------------------------------


def fetch_sdist(package: str, work_dir: Path) -> Path:
    """The unpacked sdist of the installed version of ``package`` (downloaded once)."""
    ver = dist_version(package)
    dl = work_dir / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    archives = [p for p in dl.glob("*.tar.gz") if p.name.lower() == f"{package}-{ver}.tar.gz"]
    if not archives:
        log(f"downloading the {package} {ver} sdist")
        run_quiet([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                   "-d", str(dl), f"{package}=={ver}"])
        archives = [p for p in dl.glob("*.tar.gz")
                    if p.name.lower() == f"{package}-{ver}.tar.gz"]
    if not archives:
        raise RuntimeError(f"no sdist {package}-{ver}.tar.gz in {dl}")
    src = work_dir / "src"
    dest = src / archives[0].name[: -len(".tar.gz")]
    if not dest.is_dir():
        src.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as tar:
            tar.extractall(src, filter="data")
    if package == "asyncpg":
        for rel, old, new in ASYNCPG_PATCHES:
            path = dest / rel
            path.write_text(path.read_text().replace(old, new))
    return dest


def suite_venv(work_dir: Path) -> Path:
    """A virtualenv over the machine's site-packages, plus the suites' missing requirements."""
    venv = work_dir / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"creating {venv}")
        run_quiet([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    stamp = venv / "requirements.done"
    wanted = sorted({r for reqs in SUITE_REQUIREMENTS.values() for r in reqs})
    if not stamp.exists() or stamp.read_text().split() != wanted:
        log(f"installing into the suites' venv what is missing of: {' '.join(wanted)}")
        run_quiet([str(python), "-m", "pip", "install", "-q", *wanted])
        stamp.write_text("\n".join(wanted))
    return python


def git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    return ""


def source_revision() -> dict[str, Any]:
    """HEAD plus what the working tree of src/ adds (pgpilot runs from the working tree)."""
    diff = git("diff", "HEAD", "--", "src")
    changed = [line.split(maxsplit=1)[-1]
               for line in git("status", "--porcelain", "--", "src").splitlines()]
    fast_c = ROOT / "src" / "pgpilot" / "proxy" / "_fastpath.c"
    so = sorted(fast_c.parent.glob("_fastpath*.so"))
    sources = [fast_c, *fast_c.parent.glob("engine/*.[ch]")] if fast_c.exists() else []
    stale = bool(so and sources) and so[0].stat().st_mtime < max(
        f.stat().st_mtime for f in sources)
    return {
        "commit": git("rev-parse", "HEAD"),
        "src_changed_files": changed,
        "src_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
        "fastpath_so_older_than_c": stale,
    }


# -- the database ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    user: str

    def connect(self, dbname: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user, dbname=dbname,
                               autocommit=True, connect_timeout=10)


def create_database(up: Upstream, name: str, suite: str) -> None:
    with up.connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' TEMPLATE template0")
    if suite.startswith("sqlalchemy"):
        with up.connect(name) as conn:
            for sql in ("CREATE SCHEMA test_schema", "CREATE SCHEMA test_schema_2",
                        "CREATE EXTENSION IF NOT EXISTS hstore",
                        "CREATE EXTENSION IF NOT EXISTS citext",
                        f"ALTER DATABASE \"{name}\" SET default_text_search_config "
                        "= 'pg_catalog.english'"):
                conn.execute(sql)


def database_exists(up: Upstream, name: str) -> bool:
    with up.connect() as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() \
            is not None


def drop_database(up: Upstream, name: str) -> None:
    with contextlib.suppress(Exception), up.connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- poolers --------------------------------------------------------------------------------


@dataclass
class Pooler:
    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    cmd: list[str] = field(default_factory=list)
    popen_kwargs: dict[str, Any] = field(default_factory=dict)
    crashes: list[dict[str, Any]] = field(default_factory=list)

    def launch(self) -> None:
        with (self.workdir / "stderr.log").open("ab") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=err,
                                         cwd=self.workdir, start_new_session=True,
                                         **self.popen_kwargs)
        try:
            wait_port(self.port, self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{self.kind} did not start: {exc}\n{self.log_tail()}") from exc

    def revive(self, before_chunk: str) -> None:
        """Restart a pooler that died (same config, same port), noting the crash: PgBouncer
        1.18 aborts on some cancel races, and the rest of the suite should still run."""
        if self.proc.poll() is None:
            return
        crash = {"returncode": self.proc.returncode, "before_chunk": before_chunk,
                 "log_tail": self.log_tail(8)}
        self.crashes.append(crash)
        log(f"{self.kind} exited ({self.proc.returncode}) before {before_chunk}: restarting")
        self.launch()

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGTERM: pgpilot's shutdown; PgBouncer's immediate shutdown.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            lines = (self.workdir / "stderr.log").read_text(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        return ""


def pooler_ini(kind: str, mode: str, port: int, up: Upstream, dbname: str, userlist: Path,
               pool_size: int, extra: list[str]) -> str:
    """One pgbouncer.ini, read by both poolers (pgpilot gets max_prepared_statements too)."""
    server = f"host={up.host} port={up.port}"
    lines = [
        "[databases]",
        f"{dbname} = {server} dbname={dbname}",
        f"* = {server}",  # other names (tests probing a missing database) reach PostgreSQL
        "",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {userlist}",
        f"auth_user = {up.user}",  # users the tests create are looked up with auth_query
        f"pool_mode = {mode}",
        f"default_pool_size = {pool_size}",
        "min_pool_size = 0",
        "reserve_pool_size = 0",
        "max_client_conn = 200",
        "ignore_startup_parameters = extra_float_digits",
        "log_connections = 0",
        "log_disconnections = 0",
        "stats_period = 60",
    ]
    if kind == "pgbouncer":
        lines += ["pidfile =", "logfile ="]
    else:
        lines.append("max_prepared_statements = 200")
        lines += extra
    return "\n".join(lines) + "\n"


def start_pooler(kind: str, mode: str, up: Upstream, dbname: str, base: Path, pool_size: int,
                 pgbouncer: str, extra: list[str]) -> Pooler:
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=base))
    workdir.chmod(0o755)
    userlist = workdir / "userlist.txt"
    userlist.write_text(f'"{up.user}" ""\n')
    port = free_port()
    ini = workdir / "pgbouncer.ini"
    ini.write_text(pooler_ini(kind, mode, port, up, dbname, userlist, pool_size, extra))
    for p in (userlist, ini):
        p.chmod(0o644)
    kwargs: dict[str, Any] = {}
    if kind == "pgbouncer":
        cmd = [pgbouncer, str(ini)]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            kwargs["user"] = "nobody"
    else:
        cmd = [sys.executable, "-m", "pgpilot", "proxy", "--config", str(ini), "-q"]
    pooler = Pooler(kind, port, None, workdir, cmd, kwargs)  # type: ignore[arg-type]
    pooler.launch()
    return pooler


# -- the suites -----------------------------------------------------------------------------


@dataclass
class Plan:
    """One pytest process per chunk (an asyncpg test file, a SQLAlchemy test path), so that a
    crash or a hang of one chunk costs only that chunk; all chunks share one deadline."""

    suite: str
    target: str
    mode: str  # "-" for direct
    cmd: list[str]  # without the chunk's paths and --junitxml
    chunks: list[str]
    cwd: Path
    env: dict[str, str]
    selection: dict[str, Any] = field(default_factory=dict)


def pytest_base(python: Path, keyword: str | None, unsafe_path: bool) -> list[str]:
    """--tb=line: the short/long/native tracebacks parse source with ast, which on CPython
    3.11.7, after some asyncpg failures, raises "SystemError: AST constructor recursion depth
    mismatch" inside pytest's reporting (INTERNALERROR: the rest of the chunk is lost)."""
    cmd = [str(python)]
    if not unsafe_path:
        cmd.append("-P")  # no cwd on sys.path: the installed package, not the sdist's source
    cmd += ["-m", "pytest", "-p", "client_suites_plugin", "-p", "no:cacheprovider",
            "-o", "junit_family=xunit1", "-rN", "--tb=line"]
    if keyword:
        cmd += ["-k", keyword]
    return cmd


def plan_run(args: argparse.Namespace, suite: str, target: str, mode: str, python: Path,
             src: Path, host: str, port: int, dbname: str) -> Plan:
    env = dict(os.environ)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    plugins = src.parent.parent / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "client_suites_plugin.py").write_text(SUITE_PLUGIN)
    env["PYTHONPATH"] = str(plugins)
    for var in ("PGPASSWORD", "PGSERVICE", "PGOPTIONS", "PGSSLMODE", "PGTARGETSESSIONATTRS"):
        env.pop(var, None)
    if suite == "asyncpg":
        env.update(PGHOST=host, PGPORT=str(port), PGUSER=args.pg_user, PGDATABASE=dbname)
        env.pop("USE_UVLOOP", None)
        env["CLIENT_SUITES_ASYNCPG_TEST_TIMEOUT"] = f"{args.test_timeout:g}"
        cmd = pytest_base(python, args.k, unsafe_path=False)
        for prefix in ASYNCPG_DESELECT:
            cmd += ["--deselect", prefix]
        chunks = [f"tests/{p.name}" for p in sorted((src / "tests").glob("test_*.py"))
                  if f"tests/{p.name}" not in ASYNCPG_DESELECT]
        selection = {"paths": ["tests"], "deselect": list(ASYNCPG_DESELECT), "k": args.k,
                     "patches": [f"{f}: {a!r} -> {b!r}" for f, a, b in ASYNCPG_PATCHES]}
    else:
        driver = suite.split("-", 1)[1]
        uri = f"postgresql+{driver}://{args.pg_user}@{host}:{port}/{dbname}"
        cmd = pytest_base(python, args.k, unsafe_path=True)
        cmd += [f"--dburi={uri}", "--maxfail=100000"]
        if args.sqla_backend_only:
            cmd.append("--backend-only")
        chunks = list(args.sqla_paths)
        selection = {"paths": chunks, "backend_only": args.sqla_backend_only, "k": args.k}
    return Plan(suite, target, mode, cmd, chunks, src, env, selection)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def run_watched(cmd: list[str], plan: Plan, env: dict[str, str], deadline: float,
                progress: Path, hang_after: float, log_path: Path) -> tuple[int, str | None]:
    """Run one pytest until it ends, or no test has finished for ``hang_after`` seconds
    ("hang"), or ``deadline`` (monotonic) passes ("deadline"); then SIGINT (pytest still writes
    its JUnit XML) and, 60 s later, SIGKILL. Returns (returncode, reason or None)."""
    with log_path.open("ab") as out:
        out.write(f"\n### {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, cwd=plan.cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    reason: str | None = None
    last_size, last_change = -1, time.monotonic()
    try:
        while proc.poll() is None:
            now = time.monotonic()
            size = progress.stat().st_size if progress.exists() else 0
            if size != last_size:
                last_size, last_change = size, now
            if now >= deadline:
                reason = "deadline"
            elif now - last_change > hang_after:
                reason = "hang"
            if reason:
                log(f"{reason}: SIGINT to pytest ({' '.join(cmd[-1:])})")
                # A driver may catch the first KeyboardInterrupt (psycopg cancels the query
                # and waits for the server again): a second one, then SIGKILL.
                for sig, wait in ((signal.SIGINT, 20), (signal.SIGINT, 40), (signal.SIGKILL, 10)):
                    _signal_group(proc, sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(wait)
                        break
                break
            time.sleep(0.5)
    except BaseException:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(10)
        raise
    return proc.returncode, reason


def read_progress(path: Path) -> tuple[list[str], set[str], dict[str, str]]:
    """(node ids started, in order; those finished; {node id: worst outcome reported}) from
    a progress file (a test with subtests reports several outcomes)."""
    started: list[str] = []
    finished: set[str] = set()
    outcomes: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            word, _, rest = line.partition(" ")
            if word == "start":
                started.append(rest)
            elif word == "finish":
                finished.add(rest)
            elif word in ("setup", "call", "teardown"):
                outcome, _, nodeid = rest.partition(" ")
                if outcomes.get(nodeid) in (None, "passed"):
                    outcomes[nodeid] = outcome
    return started, finished, outcomes


def nodeid_case(nodeid: str, status: str, message: str) -> ET.Element:
    """A JUnit <testcase> for a pytest node id, named as pytest's JUnit XML would name it."""
    path, _, rest = nodeid.partition("::")
    parts = rest.split("::")
    classname = ".".join([path.removesuffix(".py").replace("/", "."), *parts[:-1]])
    case = ET.Element("testcase", classname=classname, name=parts[-1])
    if status != "passed":
        ET.SubElement(case, {"failed": "failure", "skipped": "skipped"}.get(status, "error"),
                      message=message)
    return case


def run_chunks(plan: Plan, timeout: float, hang_after: float, base: Path, tag: str,
               log_path: Path, pooler: Pooler | None) -> tuple[list[tuple[str, Path | ET.Element]],
                                        list[dict[str, Any]], bool]:
    """Run every chunk, resuming a chunk after a test that hangs. Returns the JUnit files and
    extra <testcase>s (hung tests, outcomes of a pytest that had to be killed) per chunk, the
    per-chunk notes, and whether the run's deadline cut it short."""
    deadline = time.monotonic() + timeout
    results: list[tuple[str, Path | ET.Element]] = []
    notes: list[dict[str, Any]] = []
    timed_out = False
    for i, chunk in enumerate(plan.chunks):
        note: dict[str, Any] = {"chunk": chunk, "seconds": 0.0, "attempts": 0}
        notes.append(note)
        done: set[str] = set()
        attempt = 0
        while True:
            if time.monotonic() >= deadline:
                timed_out = True
                note["cut_by_run_timeout"] = True
                results.append((chunk, ET.Element("testcase", classname="pytest",
                                                  name="run-timeout")))
                break
            if pooler is not None:
                pooler.revive(chunk if not attempt else f"{chunk} (attempt {attempt + 1})")
            stem = f"{tag}.{i:02d}.{attempt}"
            junit, progress, skip = (base / f"{stem}.xml", base / f"{stem}.progress",
                                     base / f"{stem}.skip")
            env = dict(plan.env, CLIENT_SUITES_PROGRESS=str(progress))
            if done:
                skip.write_text("\n".join(sorted(done)) + "\n")
                env["CLIENT_SUITES_SKIP"] = str(skip)
            started_at = time.monotonic()
            rc, reason = run_watched([*plan.cmd, f"--junitxml={junit}", chunk], plan, env,
                                     deadline, progress, hang_after, log_path)
            note["seconds"] = round(note["seconds"] + time.monotonic() - started_at, 1)
            note["attempts"] = attempt + 1
            note.setdefault("returncodes", []).append(rc)
            started, finished, reported = read_progress(progress)
            if junit.exists():
                results.append((chunk, junit))
            else:  # killed: keep what the progress file says, without messages
                note.setdefault("killed_attempts", []).append(attempt)
                results += [(chunk, nodeid_case(n, o, "(pytest killed: message lost)"))
                            for n, o in reported.items()]
            done |= set(started)
            if reason is None and rc == 3:  # INTERNALERROR: resume after the test it hit
                reason = "internal"
            if reason in ("hang", "internal"):
                running = [n for n in started if n not in finished]
                hung = running[-1] if running else None
                note.setdefault(reason, []).append(hung)
                if hung is not None:
                    msg = (f"hung: no test finished for {hang_after:.0f}s, pytest interrupted "
                           "(the chunk resumed after this test)" if reason == "hang" else
                           "pytest INTERNALERROR while running or reporting this test "
                           "(the chunk resumed after it)")
                    results.append((chunk, nodeid_case(hung, "error", msg)))
                if hung is None or attempt >= 30:
                    break
                attempt += 1
                continue
            if reason == "deadline":
                timed_out = True
                note["cut_by_run_timeout"] = True
            break
    return results, notes, timed_out


# -- results --------------------------------------------------------------------------------


def first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


_SERVER_VERSION_SUFFIX = re.compile(r"(_postgresql\+\w+?)_\d+(?:_\d+)*(?=::)")


def parse_junit(files: list[tuple[str, Path | ET.Element]]) -> dict[str, Any]:
    """Counts, the non-passing tests ({id: {status, message}}) and a hash of the set of test
    ids of one JUnit XML file. A test of a complete run that is not among its outcomes passed;
    the hash tells whether two runs ran the same tests."""
    outcomes: dict[str, dict[str, str]] = {}
    seen: dict[str, str] = {}
    counts = Counter(tests=0, passed=0, failed=0, errors=0, skipped=0)
    cases = [(chunk, case) for chunk, item in files
             for case in (item.iter("testcase") if isinstance(item, ET.Element)
                          else ET.parse(item).getroot().iter("testcase"))]
    for chunk, case in cases:
        file = case.get("file")
        classname = case.get("classname", "")
        test_id = f"{classname}::{case.get('name', '')}"
        if classname == "pytest" and case.get("name") == "internal":
            continue  # INTERNALERROR: the test it hit is recorded by run_chunks
        if classname == "pytest":  # run-timeout
            test_id = f"{chunk}::pytest-{case.get('name', '')}"
            if case.get("name") == "run-timeout":
                ET.SubElement(case, "error", message=f"run timeout: (rest of) {chunk} not run")
        if (file and not file.startswith("<")  # "<string>": SQLAlchemy's generated tests
                and not classname.startswith(file.replace("/", ".").removesuffix(".py"))):
            test_id = f"{file}::{test_id}"
        # SQLAlchemy suffixes class names with the server version the connection reports
        # ("Test_postgresql+psycopg_15_20"); ids compare across targets without it.
        test_id = _SERVER_VERSION_SUFFIX.sub(r"\1", test_id)
        status, message = "passed", ""
        for kind, label in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = case.find(kind)
            if node is not None:
                status = label
                message = node.get("message") or first_line(node.text or "")
                break
        if test_id in seen and status == "passed":
            continue  # a second entry (teardown) of a test already recorded
        if test_id in seen:
            counts[_count_key(seen[test_id])] -= 1
        else:
            counts["tests"] += 1
        seen[test_id] = status
        counts[_count_key(status)] += 1
        if status != "passed":
            outcomes[test_id] = {"status": status, "message": message[:1000]}
    ids = hashlib.sha1("\n".join(sorted(seen)).encode()).hexdigest()[:12]
    return {"counts": dict(counts), "outcomes": outcomes, "test_ids_sha1": ids}


def _count_key(status: str) -> str:
    return {"error": "errors"}.get(status, status)


_NORMALIZE = (
    (re.compile(r"\[SQL: .*", re.S), ""),
    (re.compile(r"\(Background on this error at: [^)]*\)"), ""),
    (re.compile(r"__asyncpg_\w+?_[0-9a-f]+__"), "__asyncpg_X__"),
    (re.compile(r"pgpilot_[0-9a-zA-Z_]+"), "pgpilot_X"),
    (re.compile(r"0x[0-9a-fA-F]+"), "0xN"),
    (re.compile(r"<\w*\[\d+ chars\][^,]*>"), "<…>"),  # unittest's shortened reprs
    (re.compile(r"<[\w.]+ object at 0xN>"), "<…>"),
    (re.compile(r"<Function [^>]*>"), "<Function …>"),
    (re.compile(r"'[^']{0,80}'"), "'…'"),
    (re.compile(r'"[^"]{0,80}"'), '"…"'),
    (re.compile(r"\b\d+(\.\d+)?\b"), "N"),
    (re.compile(r"\s+"), " "),
)


def category(message: str) -> str:
    """A failure message with its names and numbers taken out, to group failures by cause."""
    text = first_line(message)
    for pattern, repl in _NORMALIZE:
        text = pattern.sub(repl, text)
    return text.strip()[:180] or "(no message)"


def run_key(suite: str, target: str, mode: str) -> str:
    return f"{suite}/{target}" if target == "direct" else f"{suite}/{target}/{mode}"


def load_report(path: Path) -> dict[str, Any]:
    if path.exists():
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    return {"runs": {}}


def pooler_only(report: dict[str, Any], key: str, base_key: str) -> dict[str, dict[str, str]]:
    """Tests that fail (failed or error) in run ``key`` but pass in run ``base_key`` (are not
    among its outcomes; exact when both ran the same tests, see ``same_tests``)."""
    runs = report["runs"]
    if key not in runs or base_key not in runs:
        return {}
    base = runs[base_key]["outcomes"]
    return {tid: o for tid, o in runs[key]["outcomes"].items()
            if o["status"] in ("failed", "error") and tid not in base}


def same_tests(report: dict[str, Any], key: str, base_key: str) -> bool:
    a, b = report["runs"][key], report["runs"][base_key]
    return (a.get("test_ids_sha1") == b.get("test_ids_sha1") and not a.get("timed_out")
            and not b.get("timed_out"))


def group(failures: dict[str, dict[str, str]]) -> list[tuple[str, list[tuple[str, str]]]]:
    by_cat: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for tid, o in sorted(failures.items()):
        by_cat[category(o["message"])].append((tid, first_line(o["message"])[:300]))
    return sorted(by_cat.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def comparisons(report: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    """(title, run key, baseline key, label) for every pooler run that has its baseline."""
    runs = report["runs"]
    for key in sorted(runs):
        r = runs[key]
        if r["target"] == "direct":
            continue
        direct = run_key(r["suite"], "direct", "-")
        if direct in runs:
            yield (f"{key}: fails here, passes directly", key, direct, "pooler-only")
        if r["target"] == "pgpilot":
            bouncer = run_key(r["suite"], "pgbouncer", r["mode"])
            if bouncer in runs:
                yield (f"{key}: fails here, passes through PgBouncer", key, bouncer,
                       "worse than PgBouncer")


def cell(run: dict[str, Any] | None) -> str:
    if run is None:
        return "–"
    c = run["counts"]
    text = f"{c['passed']} / {c['failed']} / {c['errors']} / {c['skipped']}"
    if run.get("timed_out"):
        text += " (timed out)"
    return text


def render_markdown(report: dict[str, Any], examples: int = 3) -> str:
    runs = report["runs"]
    columns = [("direct", "-")] + [(t, m) for m in MODES for t in POOLERS]
    columns = [(t, m) for t, m in columns
               if any(r["target"] == t and r["mode"] == m for r in runs.values())]
    out = ["# Client libraries' test suites through the poolers", "",
           "Made by `python bench/client_suites.py` (see its docstring for what runs and what "
           "is deselected). Cells: passed / failed / errors / skipped.", ""]
    head = ["suite"] + [t if t == "direct" else f"{t} ({m})" for t, m in columns]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = sorted({r["suite"] for r in runs.values()},
                   key=lambda n: (SUITES.index(n.split("[")[0]), n))
    for suite in names:
        row = [suite] + [cell(runs.get(run_key(suite, t, m))) for t, m in columns]
        out.append("| " + " | ".join(row) + " |")
    out += ["", "## Runs", "",
            "| run | pgpilot commit (+ uncommitted src files, diff hash) | pool size | duration "
            "| pooler died (restarted) | command |", "|---|---|---|---|---|---|"]
    for key in sorted(runs):
        r = runs[key]
        rev = ""
        if r["target"] == "pgpilot":
            src = r["source"]
            dirty = len(src["src_changed_files"])
            rev = f"{src['commit'][:9]}" + (f" (+{dirty} files, {src['src_diff_sha1']})"
                                              if dirty else "")
        crashes = "<br>".join(
            f"before {c['before_chunk']}: "
            + (first_line(c["log_tail"].splitlines()[-1]) if c["log_tail"] else "").replace(
                "|", "/")[:160]
            for c in r.get("pooler_crashes", []))
        out.append(f"| {key} | {rev} | {r.get('pool_size') or ''} | {r['seconds']:.0f}s "
                   f"| {crashes} | `{r['command_line']}` |")
    for title, key, base, _label in comparisons(report):
        fails = pooler_only(report, key, base)
        out += ["", f"## {title}: {len(fails)}", ""]
        if not same_tests(report, key, base):
            out += ["(the two runs did not run the same set of tests: a timeout, another -k "
                    "or another collection; tests missing from one are not compared)", ""]
        if not fails:
            continue
        out += ["| tests | failure (normalized) | examples |", "|---|---|---|"]
        for cat, items in group(fails):
            ex = "<br>".join(f"`{tid}`: {msg.replace('|', '/')}"
                             for tid, msg in items[:examples])
            out.append(f"| {len(items)} | {cat.replace('|', '/')} | {ex} |")
    return "\n".join(out) + "\n"


def print_differences(report: dict[str, Any], keys: set[str]) -> None:
    for title, key, base, _label in comparisons(report):
        if key not in keys:
            continue
        fails = pooler_only(report, key, base)
        same = "" if same_tests(report, key, base) else " (not the same set of tests!)"
        print(f"\n== {title}: {len(fails)}{same}")
        for cat, items in group(fails):
            print(f"  {len(items):5d}  {cat}")
            for tid, msg in items[:3]:
                print(f"           {tid}\n             {msg[:220]}")


def write_report(report: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    output.with_suffix(".md").write_text(render_markdown(report))


# -- main -----------------------------------------------------------------------------------


def one_run(args: argparse.Namespace, suite: str, target: str, mode: str, python: Path,
            srcs: dict[str, Path], up: Upstream, base: Path) -> dict[str, Any]:
    tag = re.sub(r"[^a-z0-9]+", "_", f"{suite}_{target}_{mode}")
    dbname = f"cs_{tag}_{os.getpid()}"
    log_path = base / f"{tag}.log"
    src = srcs["asyncpg" if suite == "asyncpg" else "sqlalchemy"]
    pooler: Pooler | None = None
    revision = source_revision() if target == "pgpilot" else None
    pool_size = args.pool_size or (5 if mode == "transaction" else 40)
    create_database(up, dbname, suite)
    scratch = ASYNCPG_SCRATCH_DBS if suite == "asyncpg" else ()
    for name in scratch:
        if database_exists(up, name):
            log(f"dropping database {name}, left behind by an earlier asyncpg run")
            drop_database(up, name)
    try:
        host, port = up.host, up.port
        if target != "direct":
            pooler = start_pooler(target, mode, up, dbname, base, pool_size, args.pgbouncer,
                                  args.pgpilot_set)
            host, port = "127.0.0.1", pooler.port
        plan = plan_run(args, suite, target, mode, python, src, host, port, dbname)
        shown = " ".join(plan.cmd).replace(str(python), "python")
        log(f"{run_key(suite, target, mode)}: {shown} --junitxml=... CHUNK  for CHUNK in "
            f"{' '.join(plan.chunks)}  (cwd {src}, log {log_path})")
        started = time.monotonic()
        hang_after = args.test_timeout + 30
        junits, notes, timed_out = run_chunks(plan, args.timeout, hang_after, base, tag,
                                              log_path, pooler)
        seconds = time.monotonic() - started
        pooler_log = pooler.log_tail(40) if pooler else ""
        pooler_alive = pooler is None or pooler.proc.poll() is None
    finally:
        if pooler is not None:
            pooler.stop()
        drop_database(up, dbname)
        left = [name for name in scratch if database_exists(up, name)]
        for name in left:
            drop_database(up, name)
    if not junits:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"no JUnit XML from {run_key(suite, target, mode)}:\n{tail}")
    parsed = parse_junit(junits)
    result: dict[str, Any] = {
        "suite": suite, "target": target, "mode": mode,
        "package_version": dist_version("asyncpg" if suite == "asyncpg" else "sqlalchemy"),
        "driver_versions": {d: dist_version(d) for d in ("asyncpg", "psycopg")},
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1), "chunks": notes, "timed_out": timed_out,
        "pool_size": pool_size if target != "direct" else None,
        "pooler_alive_at_end": pooler_alive,
        "pooler_crashes": pooler.crashes if pooler else [],
        "scratch_databases_left_by_the_suite": left,
        "pooler_log_tail": pooler_log,
        "command_line": "python bench/client_suites.py " + " ".join(
            [f"--suite {suite}", f"--target {target}"]
            + ([f"--mode {mode}"] if target != "direct" else [])
            + ([f"-k {args.k!r}"] if args.k else [])
            + ([f"--sqla-paths {' '.join(args.sqla_paths)}"]
               if suite != "asyncpg" and tuple(args.sqla_paths) != SQLA_DEFAULT_PATHS else [])
            + ([f"--label {args.label}"] if args.label else [])),
        "pytest_command": " ".join(plan.cmd).replace(str(python), "python")
        + " --junitxml=FILE CHUNK",
        "test_timeout": args.test_timeout, "hang_after": hang_after,
        "selection": plan.selection,
        "source": revision,
        **parsed,
    }
    if target == "pgbouncer":
        result["pgbouncer_version"] = first_line(run_quiet([args.pgbouncer, "--version"]))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", action="append", choices=SUITES,
                    help="suite to run (repeatable; default: all)")
    ap.add_argument("--target", action="append", choices=TARGETS,
                    help="target (repeatable; default: all three)")
    ap.add_argument("--mode", action="append", choices=MODES,
                    help="pool mode of both poolers (repeatable; default: transaction)")
    ap.add_argument("-k", default=None, help="pytest -k expression, passed through")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run (900)")
    ap.add_argument("--test-timeout", type=float, default=60,
                    help="seconds per test (60): asyncpg's TEST_TIMEOUT; a test that has not "
                    "finished 30 s later is recorded as hung and its chunk resumed after it")
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                    help="results path without suffix (.json and .md are written)")
    ap.add_argument("--fresh", action="store_true",
                    help="start a new results file instead of merging into it")
    ap.add_argument("--pg-host", default="127.0.0.1")
    ap.add_argument("--pg-port", type=int, default=5432)
    ap.add_argument("--pg-user", default="postgres")
    ap.add_argument("--pgbouncer", default=shutil.which("pgbouncer") or "/usr/sbin/pgbouncer")
    ap.add_argument("--pool-size", type=int, default=None,
                    help="default_pool_size of both poolers (5 in transaction, 40 in session)")
    ap.add_argument("--pgpilot-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra [pgbouncer] line for pgpilot only (repeatable)")
    ap.add_argument("--sqla-paths", nargs="+", default=list(SQLA_DEFAULT_PATHS),
                    help=f"SQLAlchemy test paths ({' '.join(SQLA_DEFAULT_PATHS)})")
    ap.add_argument("--sqla-all-tests", dest="sqla_backend_only", action="store_false",
                    help="run SQLAlchemy's compile-only tests too (default: --backend-only)")
    ap.add_argument("--label", default=None,
                    help="name for this selection in the results, shown as suite[LABEL] "
                    "(e.g. --sqla-paths test/orm --label orm), so it does not replace the "
                    "default selection's runs")
    ap.add_argument("--render", action="store_true",
                    help="only re-render the Markdown from the JSON and print differences")
    args = ap.parse_args(argv)

    report = {"runs": {}} if args.fresh else load_report(args.output.with_suffix(".json"))
    if args.render:
        write_report(report, args.output)
        print_differences(report, set(report["runs"]))
        return 0

    suites = args.suite or list(SUITES)
    targets = args.target or list(TARGETS)
    modes = args.mode or ["transaction"]
    work_dir = args.work_dir.expanduser()
    work_dir.mkdir(parents=True, exist_ok=True)
    srcs = {"asyncpg": fetch_sdist("asyncpg", work_dir),
            "sqlalchemy": fetch_sdist("sqlalchemy", work_dir)}
    python = suite_venv(work_dir)
    up = Upstream(args.pg_host, args.pg_port, args.pg_user)
    runs_dir = work_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    runs_dir.mkdir(parents=True)
    runs_dir.chmod(0o755)

    done: set[str] = set()
    failed = False
    for suite in suites:
        for target in targets:
            for mode in (["-"] if target == "direct" else modes):
                name = f"{suite}[{args.label}]" if args.label else suite
                key = run_key(name, target, mode)
                try:
                    result = one_run(args, suite, target, mode, python, srcs, up, runs_dir)
                    result["suite"] = name
                except (RuntimeError, OSError) as exc:
                    log(f"{key}: {exc}")
                    failed = True
                    continue
                c = result["counts"]
                log(f"{key}: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                    f"{c['skipped']} skipped in {result['seconds']:.0f}s"
                    + (" (TIMED OUT)" if result["timed_out"] else ""))
                # Merge into what is on disk now (another run may have written meanwhile).
                report = ({"runs": {}} if args.fresh and not done
                          else load_report(args.output.with_suffix(".json")))
                report["runs"][key] = result
                write_report(report, args.output)
                done.add(key)
    print_differences(report, done)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
