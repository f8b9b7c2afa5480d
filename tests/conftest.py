"""Shared fixtures: a real PostgreSQL (``PGPILOT_TEST_DSN`` or an embedded one) and Redis.

Under CI (``CI=true``) a missing service is a failure, never a skip.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgpilot.embedded import EmbeddedPostgres
from pgpilot.testbed import ReplicationCluster

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def service_missing(what: str) -> None:
    """Fail under CI, skip elsewhere: CI must never pass by skipping."""
    if IN_CI:
        pytest.fail(f"{what} is required under CI but is not available")
    pytest.skip(f"{what} is not available")


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A DSN to a real PostgreSQL superuser connection (trust or password in the DSN)."""
    dsn = os.environ.get("PGPILOT_TEST_DSN")
    if dsn:
        yield dsn
        return
    with tempfile.TemporaryDirectory(prefix="pgpilot-test-pg-") as tmp:
        # The new folder itself is the data folder: as root, the server's user gets it, and
        # no folder above it (mode 0700 from mkdtemp) needs opening.
        pg = EmbeddedPostgres(Path(tmp))
        try:
            pg.start()
        except Exception as exc:  # pragma: no cover - depends on the machine
            service_missing(f"embedded PostgreSQL ({exc})")
        try:
            yield pg.dsn("postgres")
        finally:
            pg.stop()


@pytest.fixture(scope="session")
def pg_params(pg_dsn: str) -> dict[str, str]:
    """``pg_dsn`` split into host, port, user, password, dbname."""
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(pg_dsn)
    return {
        "host": str(info.get("host") or "127.0.0.1"),
        "port": str(info.get("port") or "5432"),
        "user": str(info.get("user") or os.environ.get("USER", "postgres")),
        "password": str(info.get("password") or ""),
        "dbname": str(info.get("dbname") or "postgres"),
    }


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class EphemeralRedis:
    """A ``redis-server`` of the test's own on a free port, keeping nothing on disk: for tests
    that stop, pause or cluster it, and for a run without a configured Redis."""

    def __init__(self, *args: str) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not on PATH")
        from pgpilot.embedded import free_port

        self.port = free_port()
        if "--cluster-enabled" in args:
            # A cluster node also listens on its port + 10000 (the cluster bus): both must
            # be free ports below 65536.
            while self.port > 55535 or not _port_is_free(self.port + 10000):
                self.port = free_port()
        self.folder = tempfile.mkdtemp(prefix="pgpilot-test-redis-")
        self._command = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                         "--appendonly", "no", "--dir", self.folder, *args]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EphemeralRedis:
        self.process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis URL: ``PGPILOT_TEST_REDIS``; unset, the machine's on 127.0.0.1:6379 (db 15), or
    an ephemeral ``redis-server`` when nothing listens there (as the embedded PostgreSQL)."""
    configured = os.environ.get("PGPILOT_TEST_REDIS")
    url = configured or "redis://127.0.0.1:6379/15"
    host, port = "127.0.0.1", 6379
    try:
        from urllib.parse import urlparse

        parsed = urlparse(url)
        host, port = parsed.hostname or host, parsed.port or port
        with socket.create_connection((host, port), timeout=2):
            pass
    except OSError:
        if configured:
            service_missing(f"Redis at {host}:{port}")
        try:
            server = EphemeralRedis().start()
        except (OSError, RuntimeError) as exc:
            service_missing(f"Redis at {host}:{port}, and no ephemeral one ({exc})")
        try:
            yield server.url
        finally:
            server.stop()
        return
    yield url


@pytest.fixture(scope="session")
def replication_cluster_session() -> Iterator[ReplicationCluster]:
    """One primary and two streaming replicas (:class:`pgpilot.testbed.ReplicationCluster`)
    for the whole test session; use ``replication_cluster``, which resets it for each test."""
    cluster = ReplicationCluster(replicas=2)
    try:
        cluster.start()
    except Exception as exc:  # pragma: no cover - depends on the machine
        service_missing(f"a PostgreSQL replication test bed ({exc})")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def replication_cluster(
    replication_cluster_session: ReplicationCluster,
) -> ReplicationCluster:
    """The session's replication cluster, brought back to no lag, every node up and the
    original primary (rebuilt after a promotion) before the test."""
    replication_cluster_session.reset()
    return replication_cluster_session
