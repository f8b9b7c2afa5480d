"""What the pooler's log says when a client goes: the client's own leaving is told as such,
a refusal names its reason."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import psycopg
import pytest
from tests.proxy.conftest import RunningProxy, wait_until, write_config

WHO = r"C-\d+\((?P<db>[^/]+)/postgres@127\.0\.0\.1:\d+\)"


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(record.levelname, record.getMessage()) for record in list(caplog.records)
            if record.name.startswith("pgpilot")]


def test_an_unknown_database_is_refused_with_its_reason_in_the_log(
        pg_params: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    path, port = write_config(tmp_path, pg_params, {})
    # No "*" fallback: only "test" is known.
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if not line.startswith("* = ")))
    proxy = RunningProxy(path, port).start()
    try:
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(proxy.dsn(dbname="nosuch"))
    finally:
        proxy.stop()
    # PgBouncer's words, told only after authentication (test_login.py has the order).
    assert "no such database: nosuch" in str(err.value)

    def refused() -> list[tuple[str, str]]:
        return [(level, text) for level, text in messages(caplog)
                if text.startswith("C-") and "(nosuch/" in text]

    lines = wait_until(refused)
    assert re.fullmatch(WHO + r" login failed: no such database: nosuch", lines[0][1])
    assert lines[0][0] == "WARNING"
    assert not any("closed by pooler" in text for _, text in messages(caplog))


def test_the_admin_console_client_closing_is_the_clients_doing(
        proxy_factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    proxy = proxy_factory()
    with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as conn:
        assert conn.execute("SHOW VERSION").fetchone()
    line = wait_until(lambda: [text for _, text in messages(caplog)
                               if "(pgbouncer/" in text and "closing because:" in text])
    assert re.fullmatch(WHO + r" closing because: client closed the connection \(age=\d+s\)",
                        line[0])


def test_a_client_the_pooler_closes_is_logged_with_the_reason(
        proxy_factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    proxy = proxy_factory(pool_mode="statement")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, \
            pytest.raises(psycopg.Error) as err:
        conn.execute("begin")
        conn.execute("select 1")
    assert "transaction blocks not allowed in statement pooling mode" in str(err.value)
    line = wait_until(lambda: [text for _, text in messages(caplog)
                               if "(test/" in text and "closing because:" in text])
    assert re.fullmatch(WHO + " closing because: transaction blocks not allowed in statement "
                        r"pooling mode \(age=\d+s\)", line[0])
