"""Shared fixtures: a real PostgreSQL (``PGPILOT_TEST_DSN`` or an embedded one) and Redis.

Under CI (``CI=true``) a missing service is a failure, never a skip.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgpilot.embedded import EmbeddedPostgres

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


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("PGPILOT_TEST_REDIS", "redis://127.0.0.1:6379/15")
    host, port = "127.0.0.1", 6379
    try:
        from urllib.parse import urlparse

        parsed = urlparse(url)
        host, port = parsed.hostname or host, parsed.port or port
        with socket.create_connection((host, port), timeout=2):
            pass
    except OSError:
        service_missing(f"Redis at {host}:{port}")
    return url
