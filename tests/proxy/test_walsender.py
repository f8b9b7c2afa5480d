"""Replication connections through the pooler (walsender.py): a ``replication=database``
client gets a server of its own, started with its parameters and options, counted in the
pool, closed when it leaves; a full pool makes room or makes it wait; a login PostgreSQL
refuses is told with PostgreSQL's reason and holds nobody else back. Real PostgreSQL."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from tests.proxy.conftest import RunningProxy, wait_until

ProxyFactory = Callable[..., RunningProxy]


def via(proxy: RunningProxy, pg_params: dict[str, str], **kw: str) -> psycopg.Connection:
    params: dict[str, object] = {"host": "127.0.0.1", "port": proxy.port, "dbname": "test",
                                 "user": pg_params["user"], "autocommit": True}
    if pg_params.get("password"):
        params["password"] = pg_params["password"]
    params.update(kw)
    return psycopg.connect(**params)  # type: ignore[arg-type]


def walsenders(pg_params: dict[str, str], app: str) -> int:
    """WAL sender processes PostgreSQL runs for application_name ``app``."""
    with psycopg.connect(**pg_params, autocommit=True) as direct:  # type: ignore[arg-type]
        row = direct.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                             "'walsender' AND application_name = %s", (app,)).fetchone()
    assert row is not None
    return int(row[0])


def test_logical_replication_client_gets_a_server_of_its_own(
        proxy_factory: ProxyFactory, pg_params: dict[str, str],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    proxy = proxy_factory(default_pool_size=1)
    app = f"repl_{secrets.token_hex(4)}"
    with via(proxy, pg_params) as normal:
        assert normal.execute("SELECT 1").fetchone() == (1,)  # the pool's one server, idle
        # The full pool makes room: its idle server is closed for the replication client.
        with via(proxy, pg_params, replication="database", application_name=app,
                 options="-c enable_seqscan=off -c extra_float_digits=3") as repl:
            row = repl.execute("IDENTIFY_SYSTEM").fetchone()
            assert row is not None and row[3] == pg_params["dbname"]
            # Started with the client's parameters and its options string as sent: settings
            # a pooled server could not carry (not reported, so not tracked) apply.
            assert repl.execute("SHOW enable_seqscan").fetchone() == ("off",)
            assert repl.execute("SHOW extra_float_digits").fetchone() == ("3",)
            assert repl.execute("SHOW application_name").fetchone() == (app,)
            assert walsenders(pg_params, app) == 1
            with via(proxy, pg_params, dbname="pgbouncer") as console:
                for what in ("CLIENTS", "SERVERS"):  # PgBouncer's replication column
                    cur = console.execute(f"SHOW {what}")
                    names = [d.name for d in cur.description or ()]
                    kinds = {r[names.index("replication")] for r in cur.fetchall()}
                    assert "logical" in kinds, (what, kinds)
        assert "closing because: evicted" in caplog.text
        # Its server goes with it, and the pool serves others again.
        wait_until(lambda: walsenders(pg_params, app) == 0)
        assert normal.execute("SELECT 2").fetchone() == (2,)


def test_replication_client_waits_while_the_pool_is_full(
        proxy_factory: ProxyFactory, pg_params: dict[str, str]) -> None:
    proxy = proxy_factory(default_pool_size=1)
    app = f"repl_{secrets.token_hex(4)}"
    first = via(proxy, pg_params, replication="database", application_name=app)
    results: list[object] = []

    def second() -> None:
        try:
            with via(proxy, pg_params, replication="database", application_name=app) as conn:
                results.append(conn.execute("IDENTIFY_SYSTEM").fetchone())
        except Exception as exc:  # surfaced below
            results.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    with via(proxy, pg_params, dbname="pgbouncer") as console:
        def waiting() -> bool:
            rows = console.execute("SHOW CLIENTS").fetchall()
            names = [d.name for d in console.execute("SHOW CLIENTS").description or ()]
            state = names.index("state")
            return any(r[state] == "waiting" for r in rows)
        wait_until(waiting)
    assert not results and walsenders(pg_params, app) == 1  # the pool holds one server
    first.close()
    thread.join(timeout=20)
    assert len(results) == 1 and isinstance(results[0], tuple), results


def test_refused_replication_login_is_told_and_holds_nobody_back(
        proxy_factory: ProxyFactory, pg_params: dict[str, str]) -> None:
    proxy = proxy_factory()
    # A physical replication connection needs a 'replication' line in pg_hba.conf, which
    # the test server has not: PostgreSQL refuses the server login.
    with pytest.raises(psycopg.OperationalError) as err:
        via(proxy, pg_params, replication="true")
    text = str(err.value)
    assert "server login failed" in text and "replication connection" in text, text
    # No login backoff for the pool: the next clients are served at once.
    with via(proxy, pg_params) as normal:
        assert normal.execute("SELECT 1").fetchone() == (1,)
    with via(proxy, pg_params, replication="database") as repl:
        assert repl.execute("IDENTIFY_SYSTEM").fetchone() is not None


def test_bad_replication_value_is_refused(proxy_factory: ProxyFactory,
                                          pg_params: dict[str, str]) -> None:
    proxy = proxy_factory()
    with pytest.raises(psycopg.OperationalError) as err:
        via(proxy, pg_params, replication="sometimes")
    assert 'invalid value for parameter "replication"' in str(err.value)


def test_hba_replication_rules_match_physical_connections_only(
        proxy_factory: ProxyFactory, pg_params: dict[str, str], tmp_path: Path) -> None:
    """As in PostgreSQL: an hba line for the `replication` database matches physical
    replication connections; a logical one matches its database's lines."""
    hba = tmp_path / "pgbouncer_hba.conf"
    hba.write_text("host replication all 127.0.0.1/32 reject\n"
                   "host all all 127.0.0.1/32 trust\n")
    proxy = proxy_factory(auth_type="hba", auth_hba_file=str(hba))
    with via(proxy, pg_params, replication="database") as repl:
        assert repl.execute("IDENTIFY_SYSTEM").fetchone() is not None
    with pytest.raises(psycopg.OperationalError) as err:
        via(proxy, pg_params, replication="true")
    assert "login rejected" in str(err.value)  # the pooler's hba, before any server
