"""TLS on both sides of the pooler, with certificates the tests make themselves.

Client side: ``client_tls_sslmode`` disable / prefer / require / verify-ca against psycopg's
``sslmode`` values. Server side: ``server_tls_sslmode`` against an embedded PostgreSQL with
``ssl = on`` (pg_stat_ssl seen through the pooler says the server connection is encrypted), and
``require`` / ``verify-*`` failing with a clear error when TLS is impossible or not trusted.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.conftest import service_missing

from pgpilot.embedded import SERVER_USER, EmbeddedPostgres, EmbeddedPostgresError
from pgpilot.embedded import _bin_dir as _wheel_bin_dir
from pgpilot.wire import messages as m

# -- certificates -------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _issue(subject: str, issuer_key: ec.EllipticCurvePrivateKey | None,
           issuer: x509.Name | None, *, ca: bool, key_path: Path, cert_path: Path,
           client: bool = False) -> ec.EllipticCurvePrivateKey:
    """A key and certificate; self-signed when no issuer is given."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject))
               .issuer_name(issuer or _name(subject))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True)
    elif not client:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return key


class Certs:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate ("postgres"),
    and a second CA nobody used (for the negative cases)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ca, self.ca_key = folder / "ca.crt", folder / "ca.key"
        ca_key = _issue("pgpilot test CA", None, None, ca=True, key_path=self.ca_key,
                        cert_path=self.ca)
        self.cert, self.key = folder / "server.crt", folder / "server.key"
        _issue("localhost", ca_key, _name("pgpilot test CA"), ca=False, key_path=self.key,
               cert_path=self.cert)
        self.client_cert, self.client_key = folder / "client.crt", folder / "client.key"
        _issue("postgres", ca_key, _name("pgpilot test CA"), ca=False, client=True,
               key_path=self.client_key, cert_path=self.client_cert)
        self.other_ca = folder / "other-ca.crt"
        _issue("someone else's CA", None, None, ca=True, key_path=folder / "other-ca.key",
               cert_path=self.other_ca)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


def _tls_proxy(proxy_factory: Any, certs: Certs, mode: str, **settings: Any) -> Any:
    return proxy_factory(client_tls_sslmode=mode, client_tls_cert_file=str(certs.cert),
                         client_tls_key_file=str(certs.key), **settings)


def startup_error(port: int, dbname: str = "test") -> dict[str, str]:
    """Log in in clear text by hand; the fields of the ErrorResponse the pooler answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(m.startup_message({"user": "postgres", "database": dbname}))
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    while data:  # AuthenticationOk may come first (trust), then the error
        (length,) = struct.unpack("!i", data[1:5])
        if data[:1] == b"E":
            return m.parse_error_fields(data[5:1 + length])
        data = data[1 + length:]
    raise AssertionError("no ErrorResponse from the pooler")


def _ssl_in_use(conn: psycopg.Connection[Any]) -> bool:
    return bool(conn.pgconn.ssl_in_use)


# -- client side ----------------------------------------------------------------------------


def test_client_require_accepts_tls_and_refuses_clear_text(proxy_factory: Any,
                                                           certs: Certs) -> None:
    proxy = _tls_proxy(proxy_factory, certs, "require")
    with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as conn:
        assert _ssl_in_use(conn)
        assert conn.execute("select 41 + 1").fetchone() == (42,)
    # The client can check the pooler's certificate against the CA, and its name.
    for mode in ("verify-ca", "verify-full"):
        with psycopg.connect(proxy.dsn(sslmode=mode, sslrootcert=str(certs.ca)),
                             autocommit=True) as conn:
            assert _ssl_in_use(conn)
            assert conn.execute("select 1").fetchone() == (1,)
    # A certificate from a CA the client does not trust is refused by the client.
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(proxy.dsn(sslmode="verify-ca", sslrootcert=str(certs.other_ca)))
    # Clear text is refused after the StartupMessage, in PostgreSQL's words.
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        psycopg.connect(proxy.dsn(sslmode="disable"))
    assert startup_error(proxy.port)["C"] == "28000"
    # ...and the pooler is none the worse for it.
    with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_client_prefer_serves_both(proxy_factory: Any, certs: Certs) -> None:
    proxy = _tls_proxy(proxy_factory, certs, "prefer")
    with psycopg.connect(proxy.dsn(sslmode="prefer"), autocommit=True) as conn:
        assert _ssl_in_use(conn)
        assert conn.execute("select 1").fetchone() == (1,)
    with psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as conn:
        assert not _ssl_in_use(conn)
        assert conn.execute("select 1").fetchone() == (1,)


def test_client_disable_answers_no(proxy_factory: Any) -> None:
    proxy = proxy_factory(client_tls_sslmode="disable")
    with psycopg.connect(proxy.dsn(sslmode="prefer"), autocommit=True) as conn:
        assert not _ssl_in_use(conn)
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(proxy.dsn(sslmode="require"))


def test_client_verify_ca_needs_a_client_certificate(proxy_factory: Any, certs: Certs) -> None:
    proxy = _tls_proxy(proxy_factory, certs, "verify-ca", client_tls_ca_file=str(certs.ca))
    with psycopg.connect(proxy.dsn(sslmode="verify-full", sslrootcert=str(certs.ca),
                                   sslcert=str(certs.client_cert),
                                   sslkey=str(certs.client_key)), autocommit=True) as conn:
        assert _ssl_in_use(conn)
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        # No client certificate: the handshake fails (libpq names the TLS alert).
        psycopg.connect(proxy.dsn(sslmode="require", sslcert="/nonexistent.crt",
                                  sslkey="/nonexistent.key"), connect_timeout=5)


def test_broken_tls_handshake_harms_nobody(proxy_factory: Any, certs: Certs) -> None:
    proxy = _tls_proxy(proxy_factory, certs, "require")
    with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as other:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(struct.pack("!ii", 8, 80877103))
            assert sock.recv(1) == b"S"
            sock.sendall(b"this is not a TLS ClientHello" * 10)
            sock.settimeout(5)
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass
        assert other.execute("select 2").fetchone() == (2,)
    with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as conn:
        assert conn.execute("select 3").fetchone() == (3,)


def test_unusable_key_stops_the_start(proxy_factory: Any, certs: Certs, tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    with pytest.raises(OSError):
        proxy_factory(client_tls_sslmode="require", client_tls_cert_file=str(certs.cert),
                      client_tls_key_file=str(bad))


# -- server side ----------------------------------------------------------------------------


def _bin_dir_with_tls() -> Path | None:
    """A PostgreSQL build with OpenSSL: the embedded wheel's if it has it (None), else the
    system's (the wheel's build has no TLS at the time of writing)."""
    for pg_config in (str(_wheel_bin_dir() / "pg_config"), shutil.which("pg_config")):
        if not pg_config or not os.path.exists(pg_config):
            continue
        out = subprocess.run([pg_config, "--configure", "--bindir"], capture_output=True,
                             text=True, check=False).stdout
        if "openssl" in out:
            bindir = Path(out.strip().splitlines()[-1])
            return None if bindir == _wheel_bin_dir() else bindir
    service_missing("a PostgreSQL build with OpenSSL (for server-side TLS)")
    return None


@pytest.fixture(scope="module")
def tls_pg(certs: Certs) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of its own with ssl = on and our server certificate."""
    # Outside pytest's numbered temp folders, which concurrent pytest runs may prune (and
    # which, as root, the server's user cannot reach): the new folder is the data folder.
    folder = tempfile.TemporaryDirectory(prefix="pgpilot-tls-pg-")
    data = Path(folder.name)
    pg = EmbeddedPostgres(data, bin_dir=_bin_dir_with_tls(),
                          settings={"ssl": "on", "ssl_cert_file": "server.crt",
                                    "ssl_key_file": "server.key"})
    try:
        pg.init()
        for src, name in ((certs.cert, "server.crt"), (certs.key, "server.key")):
            shutil.copy(src, data / name)
            (data / name).chmod(0o600)
            if os.geteuid() == 0:
                shutil.chown(data / name, SERVER_USER, SERVER_USER)
        pg.start()
    except EmbeddedPostgresError as exc:
        pytest.fail(f"embedded PostgreSQL with ssl = on did not start: {exc}")
    try:
        yield pg
    finally:
        pg.stop()
        folder.cleanup()


@pytest.fixture(scope="module")
def tls_postgres(tls_pg: EmbeddedPostgres) -> dict[str, str]:
    return {"host": "127.0.0.1", "port": str(tls_pg.port), "user": "postgres", "password": "",
            "dbname": "postgres"}


SSL_IN_USE = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"


@pytest.mark.parametrize("mode", ["prefer", "require", "verify-ca", "verify-full"])
def test_server_tls_modes_encrypt(proxy_factory: Any, certs: Certs,
                                  tls_postgres: dict[str, str], mode: str) -> None:
    proxy = proxy_factory(upstream=tls_postgres, server_tls_sslmode=mode,
                          server_tls_ca_file=str(certs.ca))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute(SSL_IN_USE).fetchone() == (True,)
        # Cancel requests still reach a TLS server (sent in clear, as libpq does).
        assert conn.execute("select 5").fetchone() == (5,)


def test_server_allow_retries_with_tls_when_clear_text_is_refused(
        proxy_factory: Any, tls_pg: EmbeddedPostgres, tls_postgres: dict[str, str]) -> None:
    """server_tls_sslmode = allow, as libpq's sslmode=allow: clear text first, and TLS when
    PostgreSQL refuses the clear-text login (here: pg_hba.conf has only hostssl lines)."""
    hba = tls_pg.data_dir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("local all all trust\nhostssl all all 127.0.0.1/32 trust\n"
                   "hostnossl all all 127.0.0.1/32 reject\n")
    tls_pg.psql("select pg_reload_conf()")
    try:
        proxy = proxy_factory(upstream=tls_postgres, server_tls_sslmode="allow")
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            assert conn.execute(SSL_IN_USE).fetchone() == (True,)
    finally:
        hba.write_text(original)
        tls_pg.psql("select pg_reload_conf()")
    # Where clear text is accepted, allow stays in clear text.
    proxy = proxy_factory(upstream=tls_postgres, server_tls_sslmode="allow")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute(SSL_IN_USE).fetchone() == (False,)


def test_server_tls_disable_stays_clear(proxy_factory: Any,
                                        tls_postgres: dict[str, str]) -> None:
    proxy = proxy_factory(upstream=tls_postgres, server_tls_sslmode="disable")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute(SSL_IN_USE).fetchone() == (False,)


def test_server_verify_ca_refuses_an_untrusted_certificate(
        proxy_factory: Any, certs: Certs, tls_postgres: dict[str, str]) -> None:
    # As PgBouncer, the client waits while the pool retries; query_timeout ends the wait,
    # and the client is told the last failure.
    proxy = proxy_factory(upstream=tls_postgres, server_tls_sslmode="verify-ca",
                          server_tls_ca_file=str(certs.other_ca), query_timeout=1)
    with pytest.raises(psycopg.OperationalError, match=r"(?s)query_timeout.*certificate "
                       "verify failed"):
        psycopg.connect(proxy.dsn(), connect_timeout=10)


def test_server_require_without_tls_on_the_server_fails_clearly(
        proxy_factory: Any, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        if c.execute("show ssl").fetchone() == ("on",):
            pytest.skip("the test PostgreSQL has ssl = on")
    proxy = proxy_factory(server_tls_sslmode="require", query_timeout=1)
    with pytest.raises(psycopg.OperationalError, match=r"(?s)query_timeout.*does not support SSL"):
        psycopg.connect(proxy.dsn(), connect_timeout=10)
    error = startup_error(proxy.port)
    assert error["C"] == "57014" and "server_tls_sslmode = require" in error["H"]
    # prefer falls back to clear text against the same server.
    proxy = proxy_factory(server_tls_sslmode="prefer")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute(SSL_IN_USE).fetchone() == (False,)


def test_tls_both_sides_in_the_real_process(tmp_path: Path, certs: Certs,
                                            tls_postgres: dict[str, str]) -> None:
    """``pgpilot proxy`` runs on uvloop (the in-thread test pooler on asyncio's loop): both
    TLS upgrades work there too."""
    import signal

    from tests.proxy.conftest import write_config
    from tests.proxy.test_operations import ProxyProcess

    path, port = write_config(tmp_path, tls_postgres, {
        "server_tls_sslmode": "verify-full", "server_tls_ca_file": str(certs.ca),
        "client_tls_sslmode": "require", "client_tls_cert_file": str(certs.cert),
        "client_tls_key_file": str(certs.key)})
    process = ProxyProcess(path, port, tmp_path)
    try:
        with psycopg.connect(process.dsn() + "?sslmode=verify-full&sslrootcert="
                             + str(certs.ca), autocommit=True) as conn:
            assert _ssl_in_use(conn)
            assert conn.execute(SSL_IN_USE).fetchone() == (True,)
    finally:
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(30) == 0


def test_auth_type_cert(proxy_factory: Any, certs: Certs) -> None:
    """auth_type = cert: the client certificate's CommonName must be the user name."""
    proxy = _tls_proxy(proxy_factory, certs, "verify-ca", client_tls_ca_file=str(certs.ca),
                       auth_type="cert")
    with_cert = {"sslmode": "verify-ca", "sslrootcert": str(certs.ca),
                 "sslcert": str(certs.client_cert), "sslkey": str(certs.client_key)}
    with psycopg.connect(proxy.dsn(**with_cert), autocommit=True) as conn:  # CN = postgres
        assert conn.execute("select current_user").fetchone() == ("postgres",)
    with pytest.raises(psycopg.OperationalError, match="CommonName does not match"):
        psycopg.connect(proxy.dsn(user="someone_else", **with_cert))
    # Without a verified certificate (require does not ask for one) nobody logs in.
    proxy = _tls_proxy(proxy_factory, certs, "require", auth_type="cert")
    with pytest.raises(psycopg.OperationalError, match="no verified client certificate"):
        psycopg.connect(proxy.dsn(**with_cert))


def test_data_pipelined_after_ssl_request_is_refused(proxy_factory: Any, certs: Certs) -> None:
    """Bytes sent with the SSLRequest, before the pooler answered, could be a MITM's
    injection (CVE-2021-23214): refused as PostgreSQL does, never run."""
    proxy = _tls_proxy(proxy_factory, certs, "prefer")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(struct.pack("!ii", 8, 80877103)
                     + m.startup_message({"user": "postgres", "database": "test"}))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data[:1] == b"E"
    fields = m.parse_error_fields(data[5:])
    assert fields["C"] == "08P01" and "unencrypted data after SSL request" in fields["M"]


def test_require_with_a_ca_file_reads_the_client_certificate(proxy_factory: Any,
                                                              certs: Certs) -> None:
    """client_tls_sslmode = require and client_tls_ca_file, as PgBouncer: a certificate the
    client sends is verified and serves auth_type = cert; a client without one still
    connects (and cert auth tells it what is missing)."""
    proxy = _tls_proxy(proxy_factory, certs, "require", client_tls_ca_file=str(certs.ca),
                       auth_type="cert")
    with psycopg.connect(proxy.dsn(sslmode="verify-full", sslrootcert=str(certs.ca),
                                   sslcert=str(certs.client_cert),
                                   sslkey=str(certs.client_key)), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="no verified client certificate"):
        psycopg.connect(proxy.dsn(sslmode="require", sslcert="/nonexistent.crt",
                                  sslkey="/nonexistent.key"), connect_timeout=5)
