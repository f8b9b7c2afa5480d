"""Logins served by the fast path's engine: its listener, its SSLRequest answer, its SCRAM.

With the extension built and no client TLS, the engine accepts clients itself and runs the
SCRAM-SHA-256 exchange in C (``engine/scram.c``); with ``fast_path = 0`` the same logins go through
asyncio and ``auth.ScramAuth``. These tests drive both with raw protocol bytes, good and
malformed, and require the same answers from each: the same messages, the same SQLSTATEs and
texts for every refusal, a ServerSignature that proves the pooler holds the secret.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import resource
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.proxy.conftest import RunningProxy, forced_user_databases, wait_until, write_config
from tests.proxy.test_auth import BAD_CLIENT_FIRST, bad_finals
from tests.proxy.test_operations import ProxyProcess

from pgpilot.proxy import fastpath
from pgpilot.proxy.auth import ScramAuth
from pgpilot.proxy.client import ClientConnection
from pgpilot.proxy.states import ClientState

pytestmark = pytest.mark.skipif(not fastpath.available() and os.environ.get("CI") != "true",
                                reason="fast path not built (no C compiler at install)")

PASSWORD = "carol-Secret3"
SALT = b"0123456789abcdef"


def scram_secret(password: str, salt: bytes = SALT, iterations: int = 4096) -> str:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    stored = hashlib.sha256(client_key).digest()
    return (f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server_key)}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def proxies(proxy_factory: Callable[..., RunningProxy],
            pg_params: dict[str, str]) -> dict[str, RunningProxy]:
    """The same SCRAM setup three times: served by the engine, by the engine along login
    routes (no connection logging, so the engine may log clients in alone, see
    fastpath.LoginRoute), and by Python (fast_path = 0)."""
    made = {}
    for name, fast, logging in (("engine", 1, 1), ("routed", 1, 0), ("python", 0, 1)):
        made[name] = proxy_factory(
            auth_type="scram-sha-256", fast_path=fast, log_connections=logging,
            log_disconnections=logging,
            userlist={pg_params["user"]: "", "carol": scram_secret(PASSWORD),
                      "plainpw": PASSWORD, "empty": ""},
            databases=forced_user_databases(pg_params))
    warm_routes(made["routed"], "carol", "plainpw")
    return made


def warm_routes(proxy: RunningProxy, *users: str) -> None:
    """Log each user in once through Python, so that the engine has a route for the same
    StartupMessage (this module's startup_packet(user)) from then on."""
    for user in users:
        assert login(proxy.port, user)[-1] == (b"Z", b"I")
    assert proxy.pooler is not None and proxy.pooler.fast is not None
    fast = proxy.pooler.fast
    assert proxy.call(lambda: {startup_packet(u) for u in users} <= set(fast.routes))


# -- a raw client ---------------------------------------------------------------------------

def startup_packet(user: str, database: str = "test") -> bytes:
    body = struct.pack("!I", 196608) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in (("user", user),
                                                             ("database", database))) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def sasl_initial(data: bytes, mech: bytes = b"SCRAM-SHA-256") -> bytes:
    return message(b"p", mech + b"\0" + struct.pack("!i", len(data)) + data)


class Raw:
    """A protocol-level client: sends bytes, reads whole messages."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read(self) -> tuple[bytes, bytes]:
        head = self.read_exact(5)
        return head[:1], self.read_exact(struct.unpack("!I", head[1:])[0] - 4)

    def read_until_end(self) -> list[tuple[bytes, bytes]]:
        """Messages until ReadyForQuery or an ErrorResponse followed by the close."""
        out = []
        while True:
            try:
                kind, body = self.read()
            except (EOFError, ConnectionResetError):
                return out
            out.append((kind, body))
            if kind == b"Z":
                return out

    def close(self) -> None:
        self.sock.close()


def error_fields(body: bytes) -> dict[str, str]:
    return {part[:1].decode(): part[1:].decode() for part in body.split(b"\0") if part}


def auth_code(body: bytes) -> int:
    return int(struct.unpack("!I", body[:4])[0])


class Scram:
    """The client side of SCRAM-SHA-256, with hooks to break each message."""

    def __init__(self, password: str = PASSWORD, flag: str = "n") -> None:
        self.password = password
        self.gs2 = f"{flag},,"
        self.nonce = b64(os.urandom(18))
        self.first_bare = f"n=,r={self.nonce}"
        self.server_signature = b""
        self.server_first = ""

    def first(self, extra: str = "") -> bytes:
        self.first_bare += extra  # extensions are part of AuthMessage
        return (self.gs2 + self.first_bare).encode()

    def final(self, server_first: bytes, extension: str = "") -> bytes:
        self.server_first = server_first.decode()
        attrs = dict(a.split("=", 1) for a in self.server_first.split(","))
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(),
                                     base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        without_proof = f"c={b64(self.gs2.encode())},r={attrs['r']}{extension}"
        auth_message = f"{self.first_bare},{self.server_first},{without_proof}".encode()
        signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.server_signature = hmac.digest(hmac.digest(salted, b"Server Key", "sha256"),
                                            auth_message, "sha256")
        return f"{without_proof},p={b64(proof)}".encode()


def outcome(messages: list[tuple[bytes, bytes]]) -> list[tuple[str, ...]]:
    """What a login ended with, comparable between the two proxies (no keys, no nonces)."""
    out: list[tuple[str, ...]] = []
    for kind, body in messages:
        if kind == b"E":
            f = error_fields(body)
            out.append(("E", f["S"], f["C"], f["M"]))
        elif kind == b"R":
            out.append(("R", str(auth_code(body))))
        elif kind in (b"S", b"Z"):
            out.append((kind.decode(), body.decode()))
        else:
            out.append((kind.decode(),))
    return out


def login(port: int, user: str = "carol", *, scram: Scram | None = None,
          first_extra: str = "", mangle_first: bytes | None = None,
          mangle_final: Callable[[bytes], bytes] | None = None, final_extension: str = "",
          mech: bytes = b"SCRAM-SHA-256", ssl_request: bool = False,
          chunked: bool = False, after_final: bytes = b"") -> list[tuple[bytes, bytes]]:
    """One login, broken where asked; every message the pooler answered with."""
    scram = scram or Scram()
    raw = Raw(port)
    send = (lambda data: [raw.send(data[i:i + 1]) for i in range(len(data))]) if chunked \
        else raw.send
    try:
        if ssl_request:
            send(struct.pack("!II", 8, 80877103))
            assert raw.read_exact(1) == b"N"
        send(startup_packet(user))
        kind, body = raw.read()
        got = [(kind, body)]
        if kind != b"R" or auth_code(body) != 10:
            return got + raw.read_until_end()
        assert body[4:] == b"SCRAM-SHA-256\0\0"
        send(sasl_initial(mangle_first if mangle_first is not None
                          else scram.first(first_extra), mech))
        kind, body = raw.read()
        got.append((kind, body))
        if kind != b"R":
            return got + raw.read_until_end()
        final = scram.final(body[4:], final_extension)
        if mangle_final is not None:
            final = mangle_final(final)
        send(message(b"p", final) + after_final)
        return got + raw.read_until_end()
    finally:
        raw.close()


def both(proxies: dict[str, RunningProxy], **kw: Any) -> list[tuple[str, ...]]:
    """The login's outcome, which must be the same from the engine (with and without a
    login route) and from Python."""
    engine = outcome(login(proxies["engine"].port, **kw))
    routed = outcome(login(proxies["routed"].port, **kw))
    python = outcome(login(proxies["python"].port, **kw))
    assert engine == routed == python
    return engine


# -- the tests ------------------------------------------------------------------------------

def test_engine_listener_runs_the_exchange_itself(proxies: dict[str, RunningProxy]) -> None:
    """Mid-login, the engine's client has a Conn for transport and no Python exchange; the
    Python pooler's has an asyncio transport and a ScramAuth."""
    seen = {}
    for name, proxy in proxies.items():
        raw = Raw(proxy.port)
        raw.send(startup_packet("carol"))
        kind, body = raw.read()
        assert kind == b"R" and auth_code(body) == 10

        def login_client(proxy: RunningProxy = proxy) -> ClientConnection | None:
            assert proxy.pooler is not None
            group = proxy.pooler.clients[ClientState.LOGIN]
            return next(iter(group)) if group else None

        if name == "routed":
            # Along a route the client has no Python object at all: the engine holds it.
            assert proxy.pooler is not None and proxy.pooler.fast is not None
            engine = proxy.pooler.fast.engine
            assert proxy.call(lambda e=engine, p=proxy: (e.phantoms, login_client(p))) \
                == (1, None)
            raw.close()
            continue
        client = wait_until(lambda p=proxy: p.call(lambda: login_client(p)))
        seen[name] = (fastpath.is_fast_conn(client.transport),
                      isinstance(client._auth, ScramAuth))
        raw.close()
    assert seen == {"engine": (True, False), "python": (False, True)}


@pytest.mark.parametrize("flag", ["n", "y"])
@pytest.mark.parametrize("ssl_request", [False, True])
def test_good_login(proxies: dict[str, RunningProxy], flag: str, ssl_request: bool) -> None:
    for proxy in proxies.values():
        scram = Scram(flag=flag)
        got = login(proxy.port, scram=scram, ssl_request=ssl_request)
        kinds = [k for k, _ in got]
        assert kinds[:4] == [b"R", b"R", b"R", b"R"] and kinds[-1] == b"Z", got
        assert [auth_code(b) for _, b in got[:4]] == [10, 11, 12, 0]
        # SASLFinal proves the pooler holds the secret: the client checks it.
        assert got[2][1][4:] == b"v=" + base64.b64encode(scram.server_signature)
        assert b"K" in kinds and b"E" not in kinds


def test_stored_plain_password_logs_in(proxies: dict[str, RunningProxy]) -> None:
    """auth_file holds the password itself: the SCRAM secret is derived from it."""
    result = both(proxies, user="plainpw")
    assert result[:4] == [("R", "10"), ("R", "11"), ("R", "12"), ("R", "0")]
    assert result[-1] == ("Z", "I")


def test_extensions_are_accepted(proxies: dict[str, RunningProxy]) -> None:
    result = both(proxies, first_extra=",x=ext", final_extension=",y=ext")
    assert result[-1] == ("Z", "I")


def test_login_sent_one_byte_at_a_time(proxies: dict[str, RunningProxy]) -> None:
    result = both(proxies, chunked=True, ssl_request=True)
    assert result[-1] == ("Z", "I")


def test_query_behind_final_message_gets_its_rows(proxies: dict[str, RunningProxy]) -> None:
    for proxy in proxies.values():
        scram = Scram()
        raw = Raw(proxy.port)
        try:
            raw.send(startup_packet("carol"))
            raw.read()
            raw.send(sasl_initial(scram.first()))
            _, body = raw.read()
            raw.send(message(b"p", scram.final(body[4:])) + message(b"Q", b"SELECT 41 + 1\0"))
            first = raw.read_until_end()
            assert first[-1] == (b"Z", b"I") and not any(k == b"E" for k, _ in first)
            second = raw.read_until_end()
            rows = [b for k, b in second if k == b"D"]
            assert len(rows) == 1 and rows[0].endswith(b"42"), second
        finally:
            raw.close()


@pytest.mark.parametrize("user", ["carol", "nobody-here", "empty"])
def test_wrong_password_is_28P01_for_every_user(proxies: dict[str, RunningProxy],
                                               user: str) -> None:
    """A wrong password, a user who does not exist, an empty secret: the same refusal, after
    the same exchange (no user enumeration)."""
    result = both(proxies, user=user, scram=Scram(password="wrong-password"))
    assert result == [("R", "10"), ("R", "11"), ("E", "FATAL", "28P01",
                                                 f'password authentication failed for user '
                                                 f'"{user}"')]


@pytest.mark.parametrize("name", ["engine", "routed"])
def test_failures_are_counted(proxies: dict[str, RunningProxy], name: str) -> None:
    proxy = proxies[name]
    login(proxy.port, scram=Scram(password="nope"))
    assert proxy.call(lambda: proxy.pooler.auth_failures) == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("data", BAD_CLIENT_FIRST.values(), ids=BAD_CLIENT_FIRST.keys())
def test_malformed_client_first(proxies: dict[str, RunningProxy], data: bytes) -> None:
    result = both(proxies, mangle_first=data)
    assert result[-1][:3] == ("E", "FATAL", "08P01")
    assert result[-1][3].startswith("protocol violation: ")


def test_unknown_mechanism(proxies: dict[str, RunningProxy]) -> None:
    result = both(proxies, mech=b"SCRAM-SHA-256-PLUS")
    assert result[-1][:3] == ("E", "FATAL", "08P01")


def break_final(name: str) -> Callable[[bytes], bytes]:
    """One of test_auth's malformed finals, or a well-formed one with a wrong proof."""
    def mangle(good: bytes) -> bytes:
        if name == "proof flipped":
            without_proof = good.decode().rsplit(",p=", 1)[0]
            return f"{without_proof},p={b64(bytes(32))}".encode()
        return bad_finals(good)[name]
    return mangle


@pytest.mark.parametrize("name", bad_finals(b"c=biws,r=x,p=" + base64.b64encode(bytes(32))).keys())
def test_malformed_client_final(proxies: dict[str, RunningProxy], name: str) -> None:
    result = both(proxies, mangle_final=break_final(name))
    assert result[-1][:3] == ("E", "FATAL", "08P01")


def test_wrong_proof_is_an_auth_failure(proxies: dict[str, RunningProxy]) -> None:
    result = both(proxies, mangle_final=break_final("proof flipped"))
    assert result[-1] == ("E", "FATAL", "28P01", 'password authentication failed for user '
                                                 '"carol"')


@pytest.mark.parametrize("what", ["query instead of SASL", "huge length", "tiny length"])
def test_wrong_message_during_the_exchange(proxies: dict[str, RunningProxy], what: str) -> None:
    outcomes = []
    for proxy in proxies.values():
        raw = Raw(proxy.port)
        try:
            raw.send(startup_packet("carol"))
            raw.read()
            if what == "query instead of SASL":
                raw.send(message(b"Q", b"SELECT 1\0"))
            elif what == "huge length":
                raw.send(b"p" + struct.pack("!I", 70_000) + b"x" * 100)
            else:
                raw.send(b"p" + struct.pack("!I", 3))
            outcomes.append(outcome(raw.read_until_end()))
        finally:
            raw.close()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][-1][:3] == ("E", "FATAL", "08P01")


def test_ssl_request_with_bytes_behind_it_is_refused(proxies: dict[str, RunningProxy]) -> None:
    """CVE-2021-23214: bytes sent before the answer to SSLRequest could be injected."""
    outcomes = []
    for proxy in proxies.values():
        raw = Raw(proxy.port)
        try:
            raw.send(struct.pack("!II", 8, 80877103) + startup_packet("carol"))
            outcomes.append(outcome(raw.read_until_end()))
        finally:
            raw.close()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] == [("E", "FATAL", "08P01",
                            "received unencrypted data after SSL request")]


def test_gssenc_request_is_refused_then_login_goes_on(proxies: dict[str, RunningProxy]) -> None:
    for proxy in proxies.values():
        raw = Raw(proxy.port)
        try:
            raw.send(struct.pack("!II", 8, 80877104))
            assert raw.read_exact(1) == b"N"
            raw.send(startup_packet("carol"))
            kind, body = raw.read()
            assert kind == b"R" and auth_code(body) == 10
        finally:
            raw.close()


@pytest.mark.parametrize("name", ["engine", "routed"])
def test_client_leaving_mid_exchange_leaves_nothing(proxies: dict[str, RunningProxy],
                                                    name: str) -> None:
    proxy = proxies[name]
    for _ in range(20):
        raw = Raw(proxy.port)
        raw.send(startup_packet("carol"))
        raw.read()
        raw.send(sasl_initial(Scram().first()))
        raw.read()
        raw.close()  # gone before the final message
    assert proxy.pooler is not None
    wait_until(lambda: proxy.call(lambda: sum(
        len(g) for s, g in proxy.pooler.clients.items()  # type: ignore[union-attr]
        if s is not ClientState.CLOSED) + proxy.pooler.fast.engine.phantoms) == 0)
    # And the pooler still logs clients in.
    with psycopg.connect(proxy.dsn(user="carol", password=PASSWORD)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("name", ["engine", "routed"])
def test_drivers_log_in_through_the_engine(proxies: dict[str, RunningProxy], name: str) -> None:
    """libpq (psycopg) with its SSLRequest and SCRAM, many times over, on one pool."""
    proxy = proxies[name]
    for _ in range(30):
        with psycopg.connect(proxy.dsn(user="carol", password=PASSWORD)) as conn:
            assert conn.execute("SELECT current_user").fetchone() is not None
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(user="carol", password="wrong"))


@pytest.mark.parametrize("name", ["engine", "routed"])
def test_password_never_in_the_log(proxies: dict[str, RunningProxy], name: str,
                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="pgpilot")
    proxy = proxies[name]
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(user="carol", password="hunter2-wrong"))
    with psycopg.connect(proxy.dsn(user="carol", password=PASSWORD)):
        pass
    for text in (record.getMessage() for record in caplog.records):
        assert "hunter2-wrong" not in text and PASSWORD not in text


@given(data=st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_engine_base64_matches_the_standard_one(data: bytes) -> None:
    """The engine's own base64 (salts, nonces, signatures in SCRAM messages)."""
    assert fastpath._fastpath.b64encode(data) == base64.b64encode(data)


# Built with OpenSSL, the engine hashes through it (any key length); without, with its own
# SHA-256 and HMAC (keys up to one block, SCRAM's are 32 bytes).
ENGINE_OPENSSL = hasattr(fastpath._fastpath, "OPENSSL_VERSION")


@given(key=st.binary(max_size=150 if ENGINE_OPENSSL else 64), data=st.binary(max_size=1000))
@settings(max_examples=300, deadline=None)
def test_engine_sha256_and_hmac_match_hashlib(key: bytes, data: bytes) -> None:
    """The engine's SHA-256 and HMAC-SHA-256 (the SCRAM proof and signature), against
    hashlib and hmac, over every length up to several blocks; its reused contexts give the
    same answer call after call, whatever key came before."""
    assert fastpath._fastpath.sha256(data) == hashlib.sha256(data).digest()
    assert fastpath._fastpath.hmac_sha256(key, data) == hmac.digest(key, data, "sha256")
    assert fastpath._fastpath.hmac_sha256(b"", data) == hmac.digest(b"", data, "sha256")


@pytest.mark.skipif(not ENGINE_OPENSSL, reason="engine built without OpenSSL")
def test_engine_hmac_is_openssls() -> None:
    """With OpenSSL the engine's HMAC is OpenSSL's: a key longer than a block (which the
    engine's own fallback refuses) is hashed first, as RFC 2104 says."""
    key = bytes(range(100))
    assert fastpath._fastpath.hmac_sha256(key, b"m") == hmac.digest(key, b"m", "sha256")


def test_out_of_descriptors_pauses_accepting_then_recovers(pg_params: dict[str, str],
                                                           tmp_path: Path) -> None:
    """accept() failing with EMFILE must neither spin nor stop the pooler: the engine's
    listener pauses, says so in the log, serves the clients it has, and accepts again once
    descriptors are free."""
    path, port = write_config(tmp_path, pg_params, {"logfile": str(tmp_path / "pgpilot.log")})
    process = ProxyProcess(path, port, tmp_path)
    pid = process.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        with psycopg.connect(process.dsn(), autocommit=True) as first:
            assert first.execute("SELECT 1").fetchone() == (1,)
            in_use = len(os.listdir(f"/proc/{pid}/fd"))
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 1, hard))
            waiting = [socket.create_connection(("127.0.0.1", port), timeout=5)
                       for _ in range(4)]  # the kernel accepts; the pooler's accept() cannot
            for sock in waiting:  # (with tcp_defer_accept, once a first packet is in)
                sock.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
            wait_until(lambda: "accept failed" in process.logfile.read_text())
            assert first.execute("SELECT 2").fetchone() == (2,)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            for sock in waiting:
                sock.close()
        wait_until(process.accepts)
        with psycopg.connect(process.dsn(), autocommit=True) as later:
            assert later.execute("SELECT 3").fetchone() == (3,)
        assert process.proc.poll() is None
    finally:
        process.proc.kill()
        process.proc.wait(10)


@pytest.mark.parametrize("routed", [False, True], ids=["engine", "routed"])
def test_login_timeout_cuts_a_client_stalled_in_the_engine_exchange(
        proxy_factory: Callable[..., RunningProxy], pg_params: dict[str, str],
        routed: bool) -> None:
    """client_login_timeout applies while the engine runs the SCRAM exchange: a client that
    stops answering after server-first-message is closed, and nothing of it is left. Along a
    login route the client has no Python object yet: the janitor has the engine claim it."""
    logging = 0 if routed else 1
    proxy = proxy_factory(auth_type="scram-sha-256", client_login_timeout=1,
                          log_connections=logging, log_disconnections=logging,
                          userlist={pg_params["user"]: "", "carol": scram_secret(PASSWORD)},
                          databases=forced_user_databases(pg_params))
    if routed:
        warm_routes(proxy, "carol")
    raw = Raw(proxy.port)
    try:
        raw.send(startup_packet("carol"))
        raw.read()
        raw.send(sasl_initial(Scram().first()))
        kind, body = raw.read()
        assert kind == b"R" and auth_code(body) == 11
        assert proxy.call(lambda: proxy.pooler.fast.engine.phantoms) == int(routed)  # type: ignore
        raw.sock.settimeout(15)
        rest = raw.read_until_end()  # the pooler's refusal, then the close
        assert rest and rest[-1][0] == b"E" and error_fields(rest[-1][1])["C"] == "08P01", rest
    finally:
        raw.close()
    assert proxy.pooler is not None
    wait_until(lambda: proxy.call(lambda: sum(
        len(g) for s, g in proxy.pooler.clients.items()  # type: ignore[union-attr]
        if s is not ClientState.CLOSED) + proxy.pooler.fast.engine.phantoms) == 0)


@given(first=st.binary(max_size=300), final=st.binary(max_size=300),
       startup_body=st.binary(min_size=4, max_size=64))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # one pooler for all
def test_garbage_from_clients_harms_nobody(proxies: dict[str, RunningProxy], first: bytes,
                                           final: bytes, startup_body: bytes) -> None:
    """Whatever a client sends as its startup packet or its SCRAM messages, the engine answers
    with an error or closes that one connection, and the next client logs in (along a login
    route: the same startup packet, garbage SCRAM messages)."""
    for port in (proxies["engine"].port, proxies["routed"].port):
        attempts = [
            [startup_packet("carol") + message(b"p", first), message(b"p", final)],
            [startup_packet("carol") + sasl_initial(first), message(b"p", final)],
            [struct.pack("!I", len(startup_body) + 4) + startup_body],  # a whole, odd packet
            # The startup packet alone first (the engine's route login, if it has a route),
            # its AuthenticationSASL read (None), then the garbage.
            [startup_packet("carol"), None, sasl_initial(first), message(b"p", final)],
        ]
        for sends in attempts:
            raw = Raw(port)
            raw.sock.settimeout(5)
            got: list[tuple[bytes, bytes]] = []
            try:
                with contextlib.suppress(OSError, EOFError):  # the pooler may close first
                    for data in sends:
                        if data is None:
                            got.append(raw.read())
                        else:
                            raw.send(data)
                    got += raw.read_until_end()
            finally:
                raw.close()
            assert all(kind in (b"R", b"E", b"Z", b"S", b"K") for kind, _ in got), got
        assert login(port)[-1] == (b"Z", b"I")


def test_sasl_response_sent_with_the_startup_packet(proxies: dict[str, RunningProxy]) -> None:
    """A client that sends its SASLInitialResponse in the same packet as its StartupMessage
    (Python reads both) still gets AuthenticationSASL first, then the exchange goes on."""
    outcomes = []
    for proxy in proxies.values():
        scram = Scram()
        raw = Raw(proxy.port)
        try:
            raw.send(startup_packet("carol") + sasl_initial(scram.first()))
            kind, body = raw.read()
            assert kind == b"R" and auth_code(body) == 10
            kind, body = raw.read()
            assert kind == b"R" and auth_code(body) == 11
            raw.send(message(b"p", scram.final(body[4:])))
            got = raw.read_until_end()
            assert got[0][1][4:] == b"v=" + base64.b64encode(scram.server_signature)
            outcomes.append(outcome(got))
        finally:
            raw.close()
    assert outcomes[0] == outcomes[1] and outcomes[0][-1] == ("Z", "I")
