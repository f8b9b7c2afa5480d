"""Authentication both ways, with real PostgreSQL and real clients.

Client side: auth_type scram-sha-256 / md5 / plain / trust against userlist.txt secrets.
Server side: the pooler's own login to PostgreSQL servers whose pg_hba.conf requires
SCRAM-SHA-256 or md5 (embedded servers the test starts with their own pg_hba.conf).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from tests.proxy.conftest import RunningProxy, forced_user_databases, wait_until

from pgpilot.embedded import EmbeddedPostgres
from pgpilot.proxy.auth import md5_secret


def scram_secret(password: str, iterations: int = 4096) -> str:
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored = hashlib.sha256(client_key).digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server_key)}"


USERS = {
    "alice": "alice-Secret1",   # stored plain
    "bob": "bob-Secret2",       # stored md5
    "carol": "carol-Secret3",   # stored SCRAM
}


def userlist(upstream_user: str) -> dict[str, str]:
    return {
        upstream_user: "",
        "alice": USERS["alice"],
        "bob": md5_secret("bob", USERS["bob"]),
        "carol": scram_secret(USERS["carol"]),
    }


@pytest.fixture
def auth_proxy_factory(proxy_factory, pg_params):
    def make(auth_type: str) -> RunningProxy:
        # Every client user is sent to the test server as the upstream user.
        return proxy_factory(
            auth_type=auth_type, userlist=userlist(pg_params["user"]),
            databases=forced_user_databases(pg_params))
    return make


@pytest.mark.parametrize("auth_type", ["scram-sha-256", "md5", "plain"])
@pytest.mark.parametrize("user", ["alice", "bob", "carol"])
def test_client_auth_right_password(auth_proxy_factory, auth_type: str, user: str) -> None:
    # (cleartext works against every kind of stored secret as well)
    proxy = auth_proxy_factory(auth_type)
    if auth_type == "scram-sha-256" and user == "bob":
        # A stored md5 secret cannot do SCRAM: as PostgreSQL and PgBouncer, the right
        # password fails too (no md5 fallback).
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(proxy.dsn(user=user, password=USERS[user]))
        assert "password authentication failed" in str(err.value)
        return
    with psycopg.connect(proxy.dsn(user=user, password=USERS[user]), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize("auth_type", ["scram-sha-256", "md5", "plain"])
def test_wrong_password_28P01_no_server_no_password_in_log(
        auth_proxy_factory, auth_type: str, caplog: pytest.LogCaptureFixture) -> None:
    proxy = auth_proxy_factory(auth_type)
    caplog.set_level(logging.DEBUG, logger="pgpilot")
    wrong = "Wr0ng-Pa55word-xyzzy"
    for user in ("alice", "carol", "nobody"):
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(proxy.dsn(user=user, password=wrong))
        assert err.value.sqlstate == "28P01" or "password authentication failed" in str(err.value)
    assert proxy.server_count() == 0  # no server connection was spent on them
    assert wrong not in caplog.text
    assert "password authentication failed" in caplog.text


async def test_asyncpg_scram_login(auth_proxy_factory) -> None:
    proxy = auth_proxy_factory("scram-sha-256")
    conn = await asyncpg.connect(proxy.dsn(user="carol", password=USERS["carol"]))
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


def test_trust_requires_listed_user_only_when_auth_file(auth_proxy_factory) -> None:
    proxy = auth_proxy_factory("trust")
    with psycopg.connect(proxy.dsn(user="alice"), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(proxy.dsn(user="mallory"))
    assert '"trust" authentication failed' in str(err.value)  # PgBouncer's words


# -- server side: the pooler logging in to PostgreSQL ---------------------------------------

def _data_folder(prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A new folder in /tmp to be a data folder itself (pytest's own are under a 0700 folder
    the server's user cannot pass when the tests run as root)."""
    return tempfile.TemporaryDirectory(prefix=prefix)


@pytest.fixture(scope="module", params=["scram-sha-256", "md5"])
def password_server(request) -> Iterator[EmbeddedPostgres]:
    with _data_folder("pgpilot-pgauth-") as folder:
        pg = EmbeddedPostgres(Path(folder), auth=request.param, password="Upstream-Pw-9")
        try:
            pg.start()
        except Exception as exc:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"embedded PostgreSQL unavailable: {exc}")
        yield pg
        pg.stop()


def test_server_login_with_password_from_databases(proxy_factory, password_server) -> None:
    up = {"host": "127.0.0.1", "port": str(password_server.port), "user": "postgres",
          "password": "Upstream-Pw-9", "dbname": "postgres"}
    proxy = proxy_factory(upstream=up, userlist={"postgres": ""})
    with psycopg.connect(proxy.dsn(dbname="test"), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == ("postgres",)
        method = conn.execute(
            "select setting from pg_settings where name = 'password_encryption'").fetchone()
        assert method is not None


def test_server_login_with_password_from_auth_file(proxy_factory, password_server,
                                                   tmp_path: Path) -> None:
    up = {"host": "127.0.0.1", "port": str(password_server.port), "user": "postgres",
          "dbname": "postgres"}
    # No password in [databases]: it comes from userlist.txt (plain, or md5 for md5 servers).
    stored = "Upstream-Pw-9" if password_server.auth == "scram-sha-256" else \
        md5_secret("postgres", "Upstream-Pw-9")
    proxy = proxy_factory(upstream=up, userlist={"postgres": stored})
    with psycopg.connect(proxy.dsn(dbname="test"), autocommit=True) as conn:
        assert conn.execute("select 41 + 1").fetchone() == (42,)


def test_server_login_failure_reaches_the_client(proxy_factory, password_server) -> None:
    up = {"host": "127.0.0.1", "port": str(password_server.port), "user": "postgres",
          "password": "not-the-password", "dbname": "postgres"}
    proxy = proxy_factory(upstream=up, userlist={"postgres": ""})
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(proxy.dsn(dbname="test"))
    assert "password authentication failed" in str(err.value)
    assert "not-the-password" not in str(err.value)


@pytest.fixture(scope="module")
def scram_server() -> Iterator[EmbeddedPostgres]:
    with _data_folder("pgpilot-pgscram-") as folder:
        pg = EmbeddedPostgres(Path(folder), auth="scram-sha-256", password="Upstream-Pw-9")
        pg.start()
        yield pg
        pg.stop()


def test_scram_pass_through_with_only_the_secret(proxy_factory, scram_server) -> None:
    """auth_file holds the server's SCRAM secret, not the password: the key a client reveals
    when it logs in with SCRAM is what the pooler logs in to the server with (PgBouncer's
    SCRAM pass-through)."""
    secret = scram_server.psql(
        "select rolpassword from pg_authid where rolname = 'postgres'").split("\n")[2].strip()
    assert secret.startswith("SCRAM-SHA-256$")
    up = {"host": "127.0.0.1", "port": str(scram_server.port), "user": "postgres",
          "dbname": "postgres"}
    proxy = proxy_factory(upstream=up, userlist={"postgres": secret},
                          auth_type="scram-sha-256")
    dsn = proxy.dsn(dbname="test", password="Upstream-Pw-9")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == ("postgres",)
    # A wrong password never gets that far: 28P01 from the pooler itself.
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(proxy.dsn(dbname="test", password="wrong-one"))
    assert "password authentication failed" in str(err.value)


def test_scram_secret_without_a_client_key_fails_clearly(proxy_factory, scram_server) -> None:
    secret = scram_server.psql(
        "select rolpassword from pg_authid where rolname = 'postgres'").split("\n")[2].strip()
    up = {"host": "127.0.0.1", "port": str(scram_server.port), "user": "postgres",
          "dbname": "postgres"}
    # trust for clients: nobody proves the password, so there is no key to pass through.
    proxy = proxy_factory(upstream=up, userlist={"postgres": secret}, auth_type="trust")
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(proxy.dsn(dbname="test"))
    assert "only a SCRAM secret" in str(err.value)


def test_server_password_changed_fails_the_waiting_clients_after_one_login(
        proxy_factory, scram_server, caplog: pytest.LogCaptureFixture) -> None:
    """The server user's password changes while the pool's one server is busy: RECONNECT
    marks that server to close and a larger pool opens a new one, whose login PostgreSQL
    refuses. The clients waiting get PostgreSQL's error at once (the busy server cannot
    serve them any more: it is to close), after one login only: its closing must not let
    them open the next one before the pool's backoff (as PgBouncer's kill_pool_logins)."""
    import threading

    role = f"pwchange_{os.urandom(3).hex()}"
    scram_server.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'first-Pw-1'")
    up = {"host": "127.0.0.1", "port": str(scram_server.port), "user": "postgres",
          "dbname": "postgres"}
    forced = (f"host=127.0.0.1 port={scram_server.port} dbname=postgres user={role} "
              "password=first-Pw-1")
    proxy = proxy_factory(upstream=up, databases={"test": forced},
                          userlist={"postgres": "", role: ""}, default_pool_size=1,
                          server_login_retry=30, admin_users="postgres")
    caplog.set_level(logging.INFO, logger="pgpilot.proxy")
    with psycopg.connect(proxy.dsn(dbname="test"), autocommit=True) as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # the pool's only server, held
        scram_server.psql(f"ALTER ROLE {role} PASSWORD 'second-Pw-2'")
        errors: list[str] = []

        def query() -> None:
            try:
                with psycopg.connect(proxy.dsn(dbname="test"), autocommit=True) as conn:
                    conn.execute("SELECT 1")
                errors.append("served")
            except psycopg.OperationalError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=query) for _ in range(3)]
        for thread in threads:
            thread.start()
        with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as console:
            def waiting() -> bool:
                cur = console.execute("SHOW POOLS")
                names = [d.name for d in cur.description or ()]
                return any(row[names.index("cl_waiting")] == 3 for row in cur.fetchall())
            wait_until(waiting)
            console.execute("RECONNECT")
            console.execute("SET default_pool_size = 2")  # a new server: its login fails
        for thread in threads:
            thread.join(timeout=20)  # well within server_login_retry (30 s)
        assert len(errors) == 3, errors
        assert all("password authentication failed" in e for e in errors), errors
        holder.execute("ROLLBACK")
    assert caplog.text.count("server login failed") == 1, caplog.text
