"""TLS inside the compiled fast path (``engine/tls.c``): both sides encrypted by the engine.

What the engine must do as Python's ``ssl`` did, and show it did it itself: the server and
client connections are engine ``Conn`` objects with their TLS on (not asyncio SSL transports),
queries run through the fast path (the engine's counters move), big results and large
requests cross record boundaries intact, and each refusal libpq's modes define happens
(untrusted CA, wrong host for verify-full, expired certificate, clear text against require),
with SNI sent for a host name. ``fast_path_tls = 0`` keeps the old path.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from psycopg.rows import dict_row
from tests.conftest import service_missing
from tests.proxy import test_tls
from tests.proxy.test_tls import SSL_IN_USE, Certs, _name, _write_key

from pgpilot.proxy import fastpath
from pgpilot.wire import messages as m

# test_tls.py's fixtures: its certificates and its PostgreSQL with ssl = on.
certs = test_tls.certs
tls_pg = test_tls.tls_pg
tls_postgres = test_tls.tls_postgres

pytestmark = pytest.mark.skipif(not fastpath.tls_available(),
                                reason="the fast path was built without OpenSSL")


def _engine_transports(proxy: Any) -> tuple[list[Any], list[Any]]:
    """The transports of the pooler's servers and clients, read on its loop."""
    def read() -> tuple[list[Any], list[Any]]:
        pools = list(proxy.pooler.pools.values())
        return ([s.transport for p in pools for s in p.all_servers() if s.transport],
                [c.transport for p in pools for c in p.clients if c.transport])
    result: tuple[list[Any], list[Any]] = proxy.call(read)
    return result


def _fast_queries(proxy: Any) -> int:
    """Queries the engine forwarded alone (its counters, not yet folded into the pools')."""
    def read() -> int:
        total = 0
        for pool in proxy.pooler.pools.values():
            if pool.lane is not None:
                pool.lane.fold_stats()
            total += pool.stats.query_count
        return total
    result: int = proxy.call(read)
    return result


def _message_types(data: bytes) -> list[bytes]:
    types = []
    while len(data) >= 5:
        (length,) = struct.unpack("!i", data[1:5])
        types.append(data[:1])
        data = data[1 + length:]
    return types


def _client_tls_proxy(proxy_factory: Any, certs: Certs, mode: str, **settings: Any) -> Any:
    return proxy_factory(client_tls_sslmode=mode, client_tls_cert_file=str(certs.cert),
                         client_tls_key_file=str(certs.key), **settings)


# -- server side ----------------------------------------------------------------------------


def test_server_tls_runs_in_the_engine(proxy_factory: Any, certs: Certs,
                                        tls_postgres: dict[str, str]) -> None:
    proxy = proxy_factory(upstream=tls_postgres, server_tls_sslmode="verify-full",
                          server_tls_ca_file=str(certs.ca))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute(SSL_IN_USE).fetchone() == (True,)
        for i in range(50):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        servers, _ = _engine_transports(proxy)
        assert servers and all(fastpath.is_fast_conn(t) and t.tls for t in servers)
        assert all(t.tls_info.startswith("TLSv1.") for t in servers)
        # Big answers and big requests cross many TLS records, in both directions.
        big = conn.execute("select repeat('x', 3000000)").fetchone()
        assert big is not None and big[0] == "x" * 3_000_000
        rows = conn.execute("select g, md5(g::text) from generate_series(1, 20000) g").fetchall()
        assert rows == [(g, hashlib.md5(str(g).encode()).hexdigest())
                        for g in range(1, 20001)]
        payload = "y" * 1_500_000
        assert conn.execute("select length(%s::text)", (payload,)).fetchone() == (1_500_000,)
    assert _fast_queries(proxy) >= 50


def test_server_tls_off_in_the_engine_keeps_pythons_path(
        proxy_factory: Any, certs: Certs, tls_postgres: dict[str, str]) -> None:
    proxy = proxy_factory(upstream=tls_postgres, server_tls_sslmode="require",
                          fast_path_tls=0)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute(SSL_IN_USE).fetchone() == (True,)
        servers, _ = _engine_transports(proxy)
        assert servers and not any(fastpath.is_fast_conn(t) for t in servers)


def test_server_tls_pgbench_transaction_pool(proxy_factory: Any, certs: Certs,
                                             tls_pg: Any, tls_postgres: dict[str, str],
                                             tmp_path: Path) -> None:
    """Many clients, extended protocol with prepared statements (renamed by the engine),
    through an encrypted server pool: every transaction succeeds and reads what is there."""
    tls_pg.psql("drop table if exists tls_bench; create table tls_bench (id int primary key, "
                "v int); insert into tls_bench select g, g * 10 from generate_series(1, 100) g")
    script = tmp_path / "tx.sql"
    script.write_text("\\set id random(1, 100)\n"
                      "select v / 10 - :id as zero from tls_bench where id = :id \\gset\n"
                      "\\if :zero\nselect 1 / 0;\n\\endif\n")
    proxy = proxy_factory(upstream=tls_postgres, server_tls_sslmode="require",
                          default_pool_size=4, max_prepared_statements=100)
    out = subprocess.run(
        ["pgbench", "-n", "-c", "8", "-t", "200", "-M", "prepared", "-f", str(script),
         proxy.dsn()], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "actually processed: 1600/1600" in out.stdout
    servers, _ = _engine_transports(proxy)
    assert servers and all(fastpath.is_fast_conn(t) and t.tls for t in servers)


class FakeTLSServer:
    """Plays PostgreSQL up to the TLS handshake: answers SSLRequest with 'S', presents its
    certificate, and records the name the client asked for (SNI) and whether the handshake
    completed and the client went on (sent its StartupMessage); then hangs up."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.names: list[str | None] = []
        self.handshakes: list[bool] = []
        self.received: list[bytes] = []
        self.context.sni_callback = lambda _obj, name, _ctx: self.names.append(name)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    if conn.recv(8) != struct.pack("!ii", 8, 80877103):
                        continue
                    conn.sendall(b"S")
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        # Done, and the client went on: its StartupMessage (libpq checks
                        # verify-full's name after the handshake, then sends nothing).
                        data = tls.recv(65536)
                        self.received.append(data)
                        self.handshakes.append(bool(data))
                except (ssl.SSLError, OSError):
                    if len(self.handshakes) < len(self.names) or not self.names:
                        self.handshakes.append(False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _issue_leaf(certs: Certs, folder: Path, hosts: list[str], *, expired: bool = False,
                name: str = "leaf") -> tuple[Path, Path]:
    """A server certificate from the test CA for ``hosts`` (DNS names or addresses)."""
    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start, end = ((now - datetime.timedelta(days=3), now - datetime.timedelta(days=1))
                  if expired else (now - datetime.timedelta(minutes=5),
                                   now + datetime.timedelta(days=1)))
    alt: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
            .issuer_name(_name("pgpilot test CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


def _connect_through(proxy_factory: Any, cert: Path, key: Path, host: str, mode: str,
                     ca: Path, engine: int = 1) -> tuple[str, FakeTLSServer]:
    """A client's login through a pooler whose server is a fresh FakeTLSServer with ``cert``:
    the error the client gets, and the fake server, closed, with what it saw (each call its
    own server: a former pooler's late connections never reach it).
    ``engine``: fast_path_tls (0: Python's TLS, which must refuse the same way)."""
    fake = FakeTLSServer(cert, key)
    try:
        proxy = proxy_factory(upstream={"host": host, "port": str(fake.port),
                                        "user": "postgres", "password": "",
                                        "dbname": "postgres"},
                              server_tls_sslmode=mode, server_tls_ca_file=str(ca),
                              query_timeout=1, fast_path_tls=engine)
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(proxy.dsn(), connect_timeout=10)
    finally:
        fake.close()
    return str(info.value), fake


@pytest.mark.parametrize("engine", [1, 0])
def test_verify_full_refuses_a_certificate_for_another_host(
        proxy_factory: Any, certs: Certs, tmp_path: Path, engine: int) -> None:
    cert, key = _issue_leaf(certs, tmp_path, ["db.example.com"])
    message, fake = _connect_through(proxy_factory, cert, key, "127.0.0.1", "verify-full",
                                     certs.ca, engine)
    assert "certificate verify failed" in message and "mismatch" in message
    assert fake.handshakes and not any(fake.handshakes)
    # verify-ca trusts the same certificate (the CA is right; the name is not checked).
    message, fake = _connect_through(proxy_factory, cert, key, "127.0.0.1", "verify-ca",
                                     certs.ca, engine)
    assert "certificate verify failed" not in message
    assert any(fake.handshakes)


@pytest.mark.parametrize("engine", [1, 0])
def test_verify_full_checks_the_name_and_sends_it_as_sni(
        proxy_factory: Any, certs: Certs, tmp_path: Path, engine: int) -> None:
    cert, key = _issue_leaf(certs, tmp_path, ["localhost"])
    message, fake = _connect_through(proxy_factory, cert, key, "localhost", "verify-full",
                                     certs.ca, engine)
    assert "certificate verify failed" not in message
    assert any(fake.handshakes)
    assert "localhost" in fake.names  # SNI, as libpq sends it for a host name
    # An address is never sent as SNI (RFC 6066); the certificate names no 127.0.0.1.
    message, fake = _connect_through(proxy_factory, cert, key, "127.0.0.1", "verify-full",
                                     certs.ca, engine)
    assert "certificate verify failed" in message and "IP address mismatch" in message
    assert fake.names == [None] * len(fake.names)


@pytest.mark.parametrize("engine", [1, 0])
def test_verify_ca_refuses_an_expired_certificate(proxy_factory: Any, certs: Certs,
                                                  tmp_path: Path, engine: int) -> None:
    cert, key = _issue_leaf(certs, tmp_path, ["127.0.0.1"], expired=True)
    message, fake = _connect_through(proxy_factory, cert, key, "127.0.0.1", "verify-ca",
                                     certs.ca, engine)
    assert "certificate verify failed" in message and "expired" in message
    assert fake.handshakes and not any(fake.handshakes)
    # require does not check certificates (libpq's meaning): the handshake completes.
    message, fake = _connect_through(proxy_factory, cert, key, "127.0.0.1", "require",
                                     certs.ca, engine)
    assert "certificate verify failed" not in message
    assert any(fake.handshakes)


# -- client side ----------------------------------------------------------------------------


def test_client_tls_runs_in_the_engine(proxy_factory: Any, certs: Certs) -> None:
    proxy = _client_tls_proxy(proxy_factory, certs, "require")
    with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        for i in range(50):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        _, clients = _engine_transports(proxy)
        assert clients and all(fastpath.is_fast_conn(t) and t.tls for t in clients)
        assert all(t.tls_info.startswith("TLSv1.") for t in clients)
        big = conn.execute("select repeat('z', 2500000)").fetchone()
        assert big is not None and big[0] == "z" * 2_500_000
        payload = "w" * 1_200_000
        assert conn.execute("select md5(%s::text) = md5(repeat('w', 1200000))",
                            (payload,)).fetchone() == (True,)
        # A prepared statement (renamed by the engine in transaction pooling) and a cancel.
        for _ in range(3):
            assert conn.execute("select %s::int + 1", (1,), prepare=True).fetchone() == (2,)
    assert _fast_queries(proxy) >= 50
    # Clear text is still refused, by the engine's listener too.
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        psycopg.connect(proxy.dsn(sslmode="disable"))


def test_client_tls_close_sends_close_notify(proxy_factory: Any, certs: Certs) -> None:
    """The pooler ends an encrypted connection with close_notify: a clean end of stream
    (ssl raises SSLEOFError where it is missing)."""
    proxy = _client_tls_proxy(proxy_factory, certs, "require")
    context = ssl.create_default_context(cafile=str(certs.ca))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        raw.sendall(struct.pack("!ii", 8, 80877103))
        assert raw.recv(1) == b"S"
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(m.startup_message({"user": "postgres", "database": "no_such_db"}))
            data = b""
            while chunk := tls.recv(65536):  # b"" at close_notify
                data += chunk
    assert b"no_such_db" in data and _message_types(data)[-1:] == [b"E"]


def test_client_tls_resumes_sessions(proxy_factory: Any, certs: Certs) -> None:
    """A client that reconnects with its session resumes it (no full handshake)."""
    proxy = _client_tls_proxy(proxy_factory, certs, "require")
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # a session known at once, after
    session = None
    reused = []
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
            raw.sendall(struct.pack("!ii", 8, 80877103))
            assert raw.recv(1) == b"S"
            with context.wrap_socket(raw, server_hostname="localhost",
                                     session=session) as tls:
                reused.append(tls.session_reused)
                session = tls.session
                tls.sendall(m.startup_message({"user": "postgres", "database": "no_such_db"}))
                while tls.recv(65536):
                    pass
    assert reused == [False, True]


def test_client_tls_python_answered_ssl_request(proxy_factory: Any, certs: Certs) -> None:
    """An SSLRequest split over two reads is read by Python, which hands the handshake to
    the engine: the client is encrypted all the same."""
    proxy = _client_tls_proxy(proxy_factory, certs, "require")
    context = ssl.create_default_context(cafile=str(certs.ca))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = struct.pack("!ii", 8, 80877103)
        raw.sendall(request[:3])
        threading.Event().wait(0.2)
        raw.sendall(request[3:])
        assert raw.recv(1) == b"S"
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(m.startup_message({"user": "postgres", "database": "no_such_db"}))
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    assert b"no_such_db" in data and _message_types(data)[-1:] == [b"E"]


def test_both_sides_in_the_engine_with_pgbench(proxy_factory: Any, certs: Certs,
                                               tls_postgres: dict[str, str],
                                               tmp_path: Path) -> None:
    proxy = _client_tls_proxy(proxy_factory, certs, "require", upstream=tls_postgres,
                              server_tls_sslmode="require", default_pool_size=3)
    script = tmp_path / "one.sql"
    script.write_text("select 1;\n")
    out = subprocess.run(["pgbench", "-n", "-c", "6", "-t", "50", "-M", "extended", "-f",
                          str(script), proxy.dsn(sslmode="require")], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "number of transactions actually processed: 300/300" in out.stdout
    servers, _ = _engine_transports(proxy)
    assert servers and all(fastpath.is_fast_conn(t) and t.tls for t in servers)
    assert _fast_queries(proxy) >= 300


def test_tls_clients_follow_login_routes_and_clear_text_never_does(proxy_factory: Any,
                                                                   certs: Certs) -> None:
    """Engine logins (login routes) serve encrypted clients as plain ones; with TLS
    required, a client in clear text that sends the very same StartupMessage is still
    refused, never logged in by the route."""
    proxy = _client_tls_proxy(proxy_factory, certs, "require", log_connections=0,
                              log_disconnections=0)
    dsn = proxy.dsn(sslmode="require")
    for _ in range(3):  # the pool's first logins wait for a server; then a route is made
        with psycopg.connect(dsn, autocommit=True) as first:
            assert first.execute("select 1").fetchone() == (1,)
    assert proxy.call(lambda: len(proxy.pooler.fast.routes)) == 1
    with psycopg.connect(dsn, autocommit=True) as second:
        assert second.pgconn.ssl_in_use
        assert second.execute("select 2").fetchone() == (2,)
        assert proxy.call(lambda: proxy.pooler.fast.engine.phantoms) == 1
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        psycopg.connect(proxy.dsn(sslmode="disable"))


def test_renegotiation_is_refused(proxy_factory: Any, certs: Certs) -> None:
    """A TLS 1.2 client that asks to renegotiate gets OpenSSL's no_renegotiation alert; the
    pooler serves others as before."""
    openssl = shutil.which("openssl")
    if openssl is None:
        service_missing("the openssl command (for s_client)")
        return
    proxy = _client_tls_proxy(proxy_factory, certs, "require")
    # s_client speaks PostgreSQL's SSLRequest itself (-starttls postgres); "R" renegotiates.
    out = subprocess.run([openssl, "s_client", "-starttls", "postgres", "-tls1_2",
                          "-connect", f"127.0.0.1:{proxy.port}"], input="R\n",
                         capture_output=True, text=True, timeout=30, check=False)
    text = out.stdout + out.stderr
    assert "RENEGOTIATING" in text and "no renegotiation" in text
    with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_without_engine_tls_python_serves_tls_and_says_so(
        proxy_factory: Any, certs: Certs, tls_postgres: dict[str, str],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An extension built without OpenSSL: TLS on both sides runs on Python's path, as
    before, and the start says so once."""
    monkeypatch.setattr(fastpath, "tls_available", lambda: False)
    with caplog.at_level("INFO", logger="pgpilot.proxy"):
        proxy = _client_tls_proxy(proxy_factory, certs, "require", upstream=tls_postgres,
                                  server_tls_sslmode="require")
    assert any("built without OpenSSL" in r.getMessage() for r in caplog.records)
    with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute(SSL_IN_USE).fetchone() == (True,)
        servers, clients = _engine_transports(proxy)
        assert servers and not any(fastpath.is_fast_conn(t) for t in servers)
        assert clients and not any(fastpath.is_fast_conn(t) for t in clients)
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        psycopg.connect(proxy.dsn(sslmode="disable"))


def test_show_clients_and_servers_name_the_engines_tls(proxy_factory: Any, certs: Certs,
                                                       tls_postgres: dict[str, str]) -> None:
    proxy = _client_tls_proxy(proxy_factory, certs, "require", upstream=tls_postgres,
                              server_tls_sslmode="require", pool_mode="session")
    with psycopg.connect(proxy.dsn(sslmode="require", application_name="seen"),
                         autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        with psycopg.connect(proxy.dsn(dbname="pgbouncer", sslmode="require"), autocommit=True,
                             row_factory=dict_row) as console:
            clients = {r["application_name"]: r for r in console.execute("SHOW CLIENTS")}
            servers = list(console.execute("SHOW SERVERS"))
    assert clients["seen"]["tls"].startswith("TLSv1.")
    assert servers and all(r["tls"].startswith("TLSv1.") for r in servers)


# -- the pooler's own connections to a server (slow-query EXPLAIN, advisor) ---------------


class _ClearTextServer:
    """Answers SSLRequest with 'N' (as a man in the middle can) and records whatever the
    client then sends in clear text (a StartupMessage, a password)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(2)
            try:
                if conn.recv(8) == struct.pack("!ii", 8, 80877103):
                    conn.sendall(b"N")
                self.received += conn.recv(65536)
                conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
                self.received += conn.recv(65536)
            except OSError:
                pass

    def close(self) -> None:
        self._thread.join(5)
        self.sock.close()


def _pool_stub(host: str, port: int, **settings: Any) -> Any:
    import dataclasses
    import types

    from pgpilot.proxy.config import Config

    config = dataclasses.replace(Config(), **settings)
    return types.SimpleNamespace(
        db=types.SimpleNamespace(host=host, port=port), server_dbname="postgres",
        pooler=types.SimpleNamespace(config=config),
        server_credentials=lambda: ("postgres", "sekrit-password"))


def test_own_server_connections_follow_server_tls_sslmode(certs: Certs, tmp_path: Path) -> None:
    """The connections the pooler opens itself (slow-query EXPLAIN, the advisor's
    max_connections read: slow.conninfo_for) are made as its server connections are:
    verify-full refuses a certificate for another host and a server that answers 'N',
    instead of libpq's default (sslmode prefer: any certificate, or clear text, and the
    password sent either way)."""
    from pgpilot.proxy.advisor import _read_limits
    from pgpilot.proxy.slow import conninfo_for

    cert, key = _issue_leaf(certs, tmp_path, ["db.example.com"])
    fake = FakeTLSServer(cert, key)
    try:
        info = conninfo_for(_pool_stub("127.0.0.1", fake.port, server_tls_sslmode="verify-full",
                                       server_tls_ca_file=str(certs.ca)))
        assert info is not None
        with pytest.raises(psycopg.OperationalError, match="does not match"):
            _read_limits(info)
        # (libpq checks the name once the handshake is done: it then sends nothing)
        assert fake.received in ([], [b""])
    finally:
        fake.close()
    clear = _ClearTextServer()
    try:
        info = conninfo_for(_pool_stub("127.0.0.1", clear.port, server_tls_sslmode="require"))
        assert info is not None
        with pytest.raises(psycopg.OperationalError):
            _read_limits(info)
    finally:
        clear.close()
    assert b"sekrit-password" not in clear.received and b"user" not in clear.received


def test_engine_tls_settings_that_fail_never_leave_the_old_policy(
        proxy_factory: Any, certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    """RELOAD to a stricter client_tls_sslmode whose files the engine cannot use: the engine
    keeps neither its old context (no client certificate asked: verify-ca not enforced) nor
    its old "TLS not required" (a login route would log a clear-text client in): TLS goes
    to Python's path and the engine's routes refuse clear text."""
    import dataclasses

    proxy = _client_tls_proxy(proxy_factory, certs, "prefer")
    fast = proxy.pooler.fast
    assert proxy.call(lambda: fast.engine.client_tls) is not None
    assert proxy.call(lambda: fast.engine.client_tls_required) is False

    def unusable(config: Any) -> Any:
        raise OSError("cannot load the CA file")

    monkeypatch.setattr(fastpath, "engine_tls_contexts", unusable)
    stricter = dataclasses.replace(proxy.pooler.config, client_tls_sslmode="verify-ca",
                                   client_tls_ca_file=str(certs.ca))
    proxy.call(lambda: fast.configure_tls(stricter))
    assert proxy.call(lambda: fast.engine.client_tls_required) is True
    assert proxy.call(lambda: fast.engine.client_tls) is None
    assert fast.client_tls is None and fast.server_tls is None


def test_decrypted_startup_stays_its_clients_own_while_python_runs(
        proxy_factory: Any, certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine decrypts into one scratch buffer shared by every connection (and every
    engine of the process). A TLS client's StartupMessage that Python takes (claim, then
    startup_received) must be that client's bytes even when another encrypted client is
    read meanwhile (here: a nested engine run while Python claims the first; in a process
    with engines in several threads, any thread switch)."""
    import time as _time

    from pgpilot.proxy.client import ClientConnection

    seen: list[tuple[str, bytes]] = []
    nested = [False]
    original_claim = fastpath.Listener.claim
    original_startup = ClientConnection.startup_received

    def claim(self: Any, conn: Any, accepted: float) -> Any:
        if not nested[0]:
            nested[0] = True
            _time.sleep(0.5)  # the other client's StartupMessage arrives meanwhile
            self.fast.engine.run()
        return original_claim(self, conn, accepted)

    def startup_received(self: Any, protocol: int, params: dict[str, str],
                         packet: bytes | None = None) -> None:
        seen.append((params.get("database", ""), packet or b""))
        original_startup(self, protocol, params, packet)

    proxy = _client_tls_proxy(proxy_factory, certs, "require", log_connections=0,
                              log_disconnections=0)
    for _ in range(3):  # a login route: from now on the engine takes clients in alone
        with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    assert proxy.call(lambda: len(proxy.pooler.fast.routes)) == 1
    monkeypatch.setattr(fastpath.Listener, "claim", claim)
    monkeypatch.setattr(ClientConnection, "startup_received", startup_received)
    context = ssl.create_default_context(cafile=str(certs.ca))
    sessions = []
    for _ in range(2):
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        raw.sendall(struct.pack("!ii", 8, 80877103))
        assert raw.recv(1) == b"S"
        sessions.append(context.wrap_socket(raw, server_hostname="localhost"))
    try:
        first, second = sessions
        first.sendall(m.startup_message({"user": "postgres", "database": "first_db_aaaa"}))
        _time.sleep(0.1)
        second.sendall(m.startup_message({"user": "postgres", "database": "second_db_bbbbbbbb"}))
        deadline = _time.monotonic() + 10
        while len(seen) < 2 and _time.monotonic() < deadline:
            _time.sleep(0.05)
    finally:
        for tls in sessions:
            tls.close()
    assert nested[0] and len(seen) == 2
    for database, packet in seen:
        assert database.encode() in packet, (database, packet)
