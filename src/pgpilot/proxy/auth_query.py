"""auth_user / auth_query / auth_dbname: secrets of users not in auth_file, read from PostgreSQL.

As PgBouncer: a client whose user is not in ``auth_file``, logging in to a database that has
an ``auth_user`` (its own, else the global one), has its secret fetched with ``auth_query``
(default: ``pg_authid``'s ``rolpassword``) over a server connection of the pool
(``auth_dbname`` or the client's database, ``auth_user``), which is pooled like any other.
The secret is then used exactly as a userlist secret: plain, md5 or SCRAM, with SCRAM
pass-through to the server when the server wants SCRAM and only the secret is known.

What pgpilot adds or does differently (docs/pooler.md, "Differences from PgBouncer"):

* the query runs in a transaction with ``search_path = pg_catalog, pg_temp`` (the fix of
  PgBouncer 1.25.1's CVE-2025-12819: a role could otherwise shadow ``pg_authid`` or a
  function the query calls);
* the user name goes into the query as a quoted literal in place of ``$1`` (simple query
  protocol), never as text the query could execute;
* a user auth_query does not find goes through the same mock exchange as an unknown user of
  auth_file ("password authentication failed"), so a client cannot learn which roles exist;
  PgBouncer answers "no such user" (its own TODO calls this a leak). With ``auth_type =
  trust`` there is no exchange to mock, and the answer is "no such user", as PgBouncer's;
* answers are kept :data:`CACHE_SECONDS` (concurrent logins of one user share one query), so
  a changed or revoked password applies within that time;
* a query that fails, or a server that cannot be reached, ends the login with a clear error
  (and the log line says why), never with a hang: at most ``query_wait_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING

from pgpilot.proxy.config import RESERVED_DATABASE_NAMES
from pgpilot.proxy.states import ServerState

if TYPE_CHECKING:
    from pgpilot.proxy.client import ClientConnection
    from pgpilot.proxy.config import DatabaseConfig
    from pgpilot.proxy.pool import Pool
    from pgpilot.proxy.pooler import Pooler
    from pgpilot.proxy.server import ServerConnection

log = logging.getLogger("pgpilot.proxy")

CACHE_SECONDS = 1.0
SAFE_SEARCH_PATH = "pg_catalog, pg_temp"
_PLACEHOLDER = re.compile(r"\$1(?![0-9])")


class AuthQueryError(Exception):
    """The secret could not be read: ``message`` is what the client is told (SQLSTATE
    ``sqlstate``); the log line says more."""

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


def sql_literal(value: str) -> str:
    """``value`` as an SQL string literal, whatever standard_conforming_strings says."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def query_text(auth_query: str, user: str) -> str:
    """The statements sent for one lookup: the auth_query with ``$1`` bound to ``user``, in a
    transaction with a search_path no role can plant objects in."""
    if "\x00" in user:
        raise AuthQueryError("invalid user name")
    bound = _PLACEHOLDER.sub(lambda _m: sql_literal(user), auth_query.strip().rstrip(";"))
    return (f"BEGIN; SET LOCAL search_path TO {SAFE_SEARCH_PATH}; {bound}; COMMIT")


class _Waiter:
    """Stands in a pool's line for a lookup (the pool's client interface: attach,
    start_waiting, fail, gone, wait_started), runs the query on the server it is lent and
    gives the server straight back."""

    def __init__(self, pool: Pool, sql: str) -> None:
        self.pool = pool
        self.sql = sql
        self.gone = False
        self.wait_started = 0.0
        self.result: asyncio.Future[list[list[bytes | None]]] = \
            asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        return f"auth_query({self.pool.name})"

    def start_waiting(self) -> None:
        pass

    def fail(self, sqlstate: str, text: str) -> None:
        self.gone = True
        if not self.result.done():
            self.result.set_exception(AuthQueryError(text, sqlstate))

    def attach(self, server: ServerConnection) -> None:
        if self.gone:
            self.pool.give_out(server)
            return
        rows: list[list[bytes | None]] = []
        if server.state is not ServerState.TESTED:
            server.set_state(ServerState.TESTED)

        def done(srv: ServerConnection, error: str | None) -> None:
            self.gone = True
            if srv.state is not ServerState.CLOSED:
                self.pool.release(srv, client_closed=False)
            if self.result.done():
                return
            if error is not None:
                self.result.set_exception(AuthQueryError(f"auth_query failed: {error}"))
            else:
                self.result.set_result(rows)

        server.run_internal(self.sql, done, rows)


class AuthQuery:
    """The pooler's auth_query lookups and their short-lived answers."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        # (client database, user) -> (when read, secret or None for "no such user")
        self._cache: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[str | None]] = {}
        # user -> the secret last read for it: server logins as that user (SCRAM
        # pass-through) use it, as they use auth_file's.
        self.last_secrets: dict[str, str] = {}

    def auth_user_for(self, db: DatabaseConfig) -> str | None:
        return db.auth_user or self.pooler.config.auth_user

    def wanted(self, client: ClientConnection) -> bool:
        """Must ``client``'s secret come from auth_query (and is it not known yet)? Admin
        console logins use the global auth_user (and auth_dbname), as PgBouncer's."""
        cfg = self.pooler.config
        if cfg.auth_type == "any" or client.user in cfg.auth_users:
            return False
        if client.is_admin:
            if not cfg.auth_user or (client.admin is not None and client.admin.own_user):
                return False
        else:
            db = cfg.database_for(client.database)
            if db is None or self.auth_user_for(db) is None:
                return False
        return self.cached(client.database, client.user) is None

    def forget(self) -> None:
        """RELOAD: the answers read under the previous auth_query / auth_user / auth_dbname
        are not this configuration's; the next logins read theirs again."""
        self._cache.clear()

    def cached(self, database: str, user: str) -> tuple[str | None] | None:
        """(secret or None,) if an answer is known and fresh, else None."""
        entry = self._cache.get((database, user))
        if entry is None or time.monotonic() - entry[0] > CACHE_SECONDS:
            return None
        return (entry[1],)

    def secret_for(self, database: str, user: str) -> str | None:
        entry = self.cached(database, user)
        return entry[0] if entry is not None else None

    def start(self, client: ClientConnection) -> asyncio.Task[None]:
        """Look ``client``'s secret up, then authenticate it again (or fail it)."""

        async def run() -> None:
            try:
                await self.lookup(client.database, client.user)
            except AuthQueryError as exc:
                if not client.gone:
                    client.fail(exc.sqlstate, exc.message)
                return
            except asyncio.CancelledError:
                return
            if not client.gone:
                client._login_task = None
                client.authenticate()

        return asyncio.get_running_loop().create_task(run())

    async def lookup(self, database: str, user: str) -> str | None:
        key = (database, user)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(database, user))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    def _auth_pool(self, database: str) -> tuple[Pool, str]:
        """The pool the lookup runs in, and the auth_query to run."""
        cfg = self.pooler.config
        db = cfg.database_for(database)
        auth_user = self.auth_user_for(db) if db is not None else cfg.auth_user
        assert auth_user is not None
        query = (db.auth_query if db is not None else None) or cfg.auth_query
        auth_dbname = (db.auth_dbname if db is not None else None) or cfg.auth_dbname
        if not auth_dbname:
            if db is None:  # the admin console's virtual database
                auth_dbname = database
            else:
                return self.pooler.get_pool(db, database, auth_user), query
        if auth_dbname in RESERVED_DATABASE_NAMES:
            log.error('cannot use the reserved "%s" database as an auth_dbname', auth_dbname)
            raise AuthQueryError("bouncer config error")
        auth_db = cfg.database_for(auth_dbname)
        if auth_db is None:
            log.error('authentication database "%s" is not configured.', auth_dbname)
            raise AuthQueryError("bouncer config error")
        if auth_dbname in self.pooler.admin_console.disabled_databases:
            raise AuthQueryError(f'authentication database "{auth_dbname}" is disabled')
        return self.pooler.get_pool(auth_db, auth_dbname, auth_user), query

    async def _fetch(self, database: str, user: str) -> str | None:
        cfg = self.pooler.config
        pool, query = self._auth_pool(database)
        waiter = _Waiter(pool, query_text(query, user))
        pool.request(waiter)  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(cfg.query_wait_timeout or None):
                rows = await waiter.result
        except TimeoutError:
            waiter.gone = True
            pool.cancel_wait(waiter)  # type: ignore[arg-type]
            log.warning("auth_query for %s: no server of %s within query_wait_timeout",
                        database, pool.name)
            raise AuthQueryError("auth_query: no server connection for the authentication "
                                 "query (query_wait_timeout)") from None
        except AuthQueryError as exc:
            log.warning("auth_query for %s in %s failed: %s", database, pool.name, exc.message)
            raise
        if rows and len(rows[0]) != 2:
            log.warning("auth_query must return 2 columns (name, secret), not %d",
                        len(rows[0]))
            raise AuthQueryError("auth_query returned an unexpected result")
        secret: str | None = None
        if rows:
            value = rows[0][1]
            # NULL (expired or no password): the user exists but no password matches.
            secret = value.decode("utf-8", "replace") if value is not None else ""
            if secret:
                self.last_secrets[user] = secret
        self._cache[(database, user)] = (time.monotonic(), secret)
        if len(self._cache) > 10_000:
            now = time.monotonic()
            self._cache = {k: v for k, v in self._cache.items()
                           if now - v[0] <= CACHE_SECONDS}
        return secret
