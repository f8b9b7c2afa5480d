"""Password authentication, checked against computations that are not the pooler's own.

Client side: every exchange ``client_auth_for`` picks (auth_type plain / md5 / scram-sha-256
against plain, md5 and SCRAM secrets) is driven by an independent client (scramp's ScramClient,
a libpq-style SCRAM client written here, md5 computed here) and, at the end, by the real
clients themselves (psycopg, i.e. libpq, and asyncpg) over a socket. Secrets are also made by
libpq (``PQencryptPasswordConn``). Server side: :class:`ServerLogin` answers scramp's
ScramServer, a SCRAM server written here, and md5 computed here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import pq
from scramp import ScramClient, ScramMechanism
from scramp.utils import ScramException, saslprep

from pgpilot.proxy.auth import (
    AuthFailed,
    CleartextAuth,
    ClientAuth,
    Md5Auth,
    ScramAuth,
    ServerLogin,
    check_plain,
    client_auth_for,
    is_md5_secret,
    md5_secret,
    parse_scram_secret,
    scram_secret,
)
from pgpilot.wire import messages as m
from pgpilot.wire.errors import ProtocolError
from pgpilot.wire.framing import MessageReader, SSLRequest, StartupMessage, StartupReader

USER = "bob"
PASSWORD = "Tr0ub4dor&3-horse"
WRONG = "correct-battery-staple"

# -- independent computations ---------------------------------------------------------------


def libpq_secret(password: str, algorithm: str, user: str = USER) -> str:
    """The secret libpq computes (PQencryptPasswordConn); needs no server."""
    conn = pq.PGconn.connect_start(b"host=127.0.0.1 port=1 dbname=x")
    try:
        return conn.encrypt_password(password.encode(), user.encode(),
                                     algorithm.encode()).decode()
    finally:
        conn.finish()


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_answer(user: str, password: str, salt: bytes) -> str:
    """What a client answers to AuthenticationMD5Password, per the protocol docs."""
    return "md5" + md5_hex(md5_hex((password + user).encode()).encode() + salt)


def hmac256(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, "sha256").digest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def secret_strings() -> dict[str, str]:
    """PASSWORD as each form an auth file may hold, made by libpq where it can."""
    return {
        "plain": PASSWORD,
        "md5": libpq_secret(PASSWORD, "md5"),
        "scram": libpq_secret(PASSWORD, "scram-sha-256"),
    }


SECRETS = secret_strings()


class LibpqScramClient:
    """SCRAM-SHA-256 the way libpq does it: empty user name, no channel binding."""

    def __init__(self, password: str, flag: str = "n", nonce: str = "rOprNGfwEbeRWgbNEkqO") -> None:
        self.password = password
        self.gs2 = f"{flag},,"
        self.nonce = nonce
        self.first_bare = f"n=,r={nonce}"
        self.server_signature = b""

    def first(self) -> bytes:
        return (self.gs2 + self.first_bare).encode()

    def final(self, server_first: bytes, *, cbind: str | None = None) -> bytes:
        attrs = dict(a.split("=", 1) for a in server_first.decode().split(","))
        assert attrs["r"].startswith(self.nonce)
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(),
                                     base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = hmac256(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c={cbind or b64(self.gs2.encode())},r={attrs['r']}"
        auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac256(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.server_signature = hmac256(hmac256(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={b64(proof)}".encode()


def password_body(password: str) -> bytes:
    return m.password_message(password)[5:]


def sasl_initial_body(data: bytes, mech: str = "SCRAM-SHA-256") -> bytes:
    return m.sasl_initial_response(mech, data)[5:]


def sasl_body(data: bytes) -> bytes:
    return m.sasl_response(data)[5:]


def request_of(wire: bytes) -> m.AuthRequest:
    got = MessageReader().feed(wire)
    assert len(got) == 1 and got[0][0] == m.B.AUTHENTICATION
    body = got[0][1]
    assert body is not None
    return m.parse_auth_request(body)


def exception_texts(exc: BaseException) -> Iterator[str]:
    """The exception and everything chained to it, as a log line with traceback would show."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield str(cur)
        yield repr(cur)
        cur = cur.__cause__ or cur.__context__


def assert_no_password(exc: BaseException, *passwords: str) -> None:
    for text in exception_texts(exc):
        for pw in passwords:
            assert pw not in text, f"password leaked into {text!r}"


# -- drivers: one whole exchange with an independent client ------------------------------------

def run_cleartext(ex: ClientAuth, password: str) -> None:
    assert request_of(ex.start()).code == m.AUTH_CLEARTEXT
    assert ex.step(password_body(password)) == (b"", True)


def run_md5(ex: ClientAuth, password: str, user: str = USER) -> None:
    req = request_of(ex.start())
    assert req.code == m.AUTH_MD5 and len(req.data) == 4
    assert ex.step(password_body(md5_answer(user, password, req.data))) == (b"", True)


def run_scramp(ex: ClientAuth, password: str) -> None:
    req = request_of(ex.start())
    assert req.code == m.AUTH_SASL and req.mechanisms == ["SCRAM-SHA-256"]
    client = ScramClient(["SCRAM-SHA-256"], USER, password)
    out, done = ex.step(sasl_initial_body(client.get_client_first().encode()))
    cont = request_of(out)
    assert cont.code == m.AUTH_SASL_CONTINUE and not done
    client.set_server_first(cont.data.decode())
    out, done = ex.step(sasl_body(client.get_client_final().encode()))
    final = request_of(out)
    assert final.code == m.AUTH_SASL_FINAL and done
    client.set_server_final(final.data.decode())  # the pooler proves it knows the secret


def run_libpq_scram(ex: ClientAuth, password: str, flag: str = "n") -> None:
    assert request_of(ex.start()).code == m.AUTH_SASL
    client = LibpqScramClient(password, flag)
    out, done = ex.step(sasl_initial_body(client.first()))
    assert not done
    out, done = ex.step(sasl_body(client.final(request_of(out).data)))
    assert done
    final = request_of(out)
    assert final.code == m.AUTH_SASL_FINAL
    assert final.data == b"v=" + base64.b64encode(client.server_signature)


# -- which exchange for which auth_type and secret --------------------------------------------

EXCHANGES = [
    # (auth_type, secret form, exchange class)
    ("plain", "plain", CleartextAuth),
    ("plain", "md5", CleartextAuth),
    ("plain", "scram", CleartextAuth),
    ("md5", "plain", Md5Auth),
    ("md5", "md5", Md5Auth),
    ("md5", "scram", ScramAuth),  # a SCRAM secret cannot answer md5
    ("scram-sha-256", "plain", ScramAuth),
    ("scram-sha-256", "md5", ScramAuth),  # an md5 secret cannot do SCRAM: a mock, fails
    ("scram-sha-256", "scram", ScramAuth),
]


def drive(ex: ClientAuth, password: str) -> None:
    if isinstance(ex, CleartextAuth):
        run_cleartext(ex, password)
    elif isinstance(ex, Md5Auth):
        run_md5(ex, password)
    else:
        run_scramp(ex, password)


@pytest.mark.parametrize(("auth_type", "form", "cls"), EXCHANGES)
def test_client_auth_for_picks_the_exchange(auth_type: str, form: str,
                                            cls: type[ClientAuth]) -> None:
    assert type(client_auth_for(auth_type, USER, SECRETS[form])) is cls


# (auth_type, secret form) pairs no password can pass: SCRAM against a stored md5 secret
# (as PostgreSQL and PgBouncer 1.23: no md5 fallback).
NO_EXCHANGE = {("scram-sha-256", "md5")}


@pytest.mark.parametrize(("auth_type", "form", "cls"), EXCHANGES)
def test_right_password_is_accepted(auth_type: str, form: str, cls: type[ClientAuth]) -> None:
    if (auth_type, form) in NO_EXCHANGE:
        with pytest.raises(AuthFailed):
            drive(client_auth_for(auth_type, USER, SECRETS[form]), PASSWORD)
        return
    drive(client_auth_for(auth_type, USER, SECRETS[form]), PASSWORD)


@pytest.mark.parametrize(("auth_type", "form", "cls"), EXCHANGES)
def test_wrong_password_fails_without_showing_it(auth_type: str, form: str,
                                                  cls: type[ClientAuth]) -> None:
    ex = client_auth_for(auth_type, USER, SECRETS[form])
    with pytest.raises(AuthFailed) as info:
        drive(ex, WRONG)
    assert info.value.sqlstate == "28P01"
    assert USER in str(info.value)
    assert_no_password(info.value, WRONG, PASSWORD, SECRETS[form])


@pytest.mark.parametrize("form", ["plain", "scram"])
@pytest.mark.parametrize("flag", ["n", "y"])
def test_scram_as_libpq_sends_it(form: str, flag: str) -> None:
    """libpq's client-first-message has an empty user name (``n=,r=...``)."""
    run_libpq_scram(client_auth_for("scram-sha-256", USER, SECRETS[form]), PASSWORD, flag)
    with pytest.raises(AuthFailed) as info:
        run_libpq_scram(client_auth_for("scram-sha-256", USER, SECRETS[form]), WRONG, flag)
    assert_no_password(info.value, WRONG, PASSWORD)


def test_scram_user_name_inside_scram_is_ignored() -> None:
    """As PostgreSQL: the startup packet's user counts, not SCRAM's ``n=``."""
    ex = ScramAuth(USER, SECRETS["scram"])
    ex.start()
    client = ScramClient(["SCRAM-SHA-256"], "somebody-else", PASSWORD)
    out, _ = ex.step(sasl_initial_body(client.get_client_first().encode()))
    client.set_server_first(request_of(out).data.decode())
    out, done = ex.step(sasl_body(client.get_client_final().encode()))
    assert done
    client.set_server_final(request_of(out).data.decode())


def test_scram_against_the_secret_uses_its_salt_and_iterations() -> None:
    secret = scram_secret(PASSWORD, salt=b"0123456789abcdef", iterations=5000)
    ex = ScramAuth(USER, secret)
    ex.start()
    client = LibpqScramClient(PASSWORD)
    out, _ = ex.step(sasl_initial_body(client.first()))
    attrs = dict(a.split("=", 1) for a in request_of(out).data.decode().split(","))
    assert attrs["s"] == b64(b"0123456789abcdef") and attrs["i"] == "5000"
    assert attrs["r"].startswith(client.nonce) and len(attrs["r"]) > len(client.nonce)
    ex.step(sasl_body(client.final(request_of(out).data)))


@settings(max_examples=15, deadline=None)
@given(password=st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                        min_size=1, max_size=16))
def test_scram_any_password(password: str) -> None:
    try:
        prepared: str | None = saslprep(password)
    except ScramException:
        prepared = None  # PostgreSQL and libpq then use the password as it is
    for secret in (password, scram_secret(password)):
        if prepared:  # scramp's client applies SASLprep itself and refuses what it prohibits
            run_scramp(ScramAuth(USER, secret), password)
        run_libpq_scram(ScramAuth(USER, secret), password if prepared is None else prepared)


def test_non_ascii_password_follows_saslprep_as_libpq_does() -> None:
    """U+00A0 maps to a space under SASLprep, for libpq's secret and for ours alike."""
    password = "pass\u00a0word"
    secret = libpq_secret(password, "scram-sha-256")
    assert check_plain(USER, password, secret)
    assert check_plain(USER, "pass word", secret)
    run_scramp(ScramAuth(USER, secret), password)
    run_libpq_scram(ScramAuth(USER, password), "pass word")
    # A password SASLprep refuses (a control character) is used as it is.
    odd = "tab\there\u00e9\u0007"
    assert check_plain(USER, odd, libpq_secret(odd, "scram-sha-256"))


# -- malformed SCRAM from a client --------------------------------------------------------------

NONCE = "rOprNGfwEbeRWgbNEkqO"

BAD_CLIENT_FIRST = {
    "channel binding required": b"p=tls-server-end-point,,n=,r=" + NONCE.encode(),
    "unknown flag": b"x,,n=,r=" + NONCE.encode(),
    "authzid": b"n,a=someone,n=,r=" + NONCE.encode(),
    "no comma after flag": b"n;,n=,r=" + NONCE.encode(),
    "no user attribute": b"n,,r=" + NONCE.encode(),
    "mandatory extension": b"n,,n=,m=ext,r=" + NONCE.encode(),
    "no nonce": b"n,,n=",
    "empty nonce": b"n,,n=,r=",
    "nonce not printable": b"n,,n=,r=ab\x7fcd",
    "bad extension": b"n,,n=,r=abc,garbage",
    "not UTF-8": b"n,,n=\xff,r=abc",
    "empty": b"",
}


@pytest.mark.parametrize("data", BAD_CLIENT_FIRST.values(), ids=BAD_CLIENT_FIRST.keys())
def test_malformed_client_first_is_a_protocol_error(data: bytes) -> None:
    ex = ScramAuth(USER, SECRETS["scram"])
    ex.start()
    with pytest.raises(ProtocolError):
        ex.step(sasl_initial_body(data))


def test_client_first_extensions_are_skipped() -> None:
    ex = ScramAuth(USER, PASSWORD)
    ex.start()
    out, done = ex.step(sasl_initial_body(b"n,,n=,r=" + NONCE.encode() + b",x=ext"))
    assert request_of(out).code == m.AUTH_SASL_CONTINUE and not done


def test_unknown_sasl_mechanism_is_a_protocol_error() -> None:
    ex = ScramAuth(USER, PASSWORD)
    ex.start()
    with pytest.raises(ProtocolError):
        ex.step(sasl_initial_body(LibpqScramClient(PASSWORD).first(), "SCRAM-SHA-256-PLUS"))


def scram_to_final(secret: str = PASSWORD) -> tuple[ScramAuth, LibpqScramClient, bytes]:
    ex = ScramAuth(USER, secret)
    ex.start()
    client = LibpqScramClient(PASSWORD)
    out, _ = ex.step(sasl_initial_body(client.first()))
    server_first = request_of(out).data
    return ex, client, client.final(server_first)


def bad_finals(good: bytes) -> dict[str, bytes]:
    text = good.decode()
    without_proof, proof = text.rsplit(",p=", 1)
    cbind, nonce = without_proof.split(",", 1)
    return {
        "cbind of another flag": f"c=eSws,{nonce},p={proof}".encode(),
        "cbind garbage": f"c=Zm9v,{nonce},p={proof}".encode(),
        "wrong nonce": f"{cbind},r={NONCE}xyz,p={proof}".encode(),
        "no proof": without_proof.encode(),
        "proof not last": f"{without_proof},p={proof},x=1".encode(),
        "proof not base64": f"{without_proof},p=!!!!".encode(),
        "proof with excess padding": f"{without_proof},p={proof}=".encode(),
        "proof too short": f"{without_proof},p={b64(b'short')}".encode(),
        "not UTF-8": good + b"\xff",
        "only a comma": b",",
        "empty": b"",
    }


@pytest.mark.parametrize("name", bad_finals(f"c=biws,r=x,p={b64(bytes(32))}".encode()).keys())
def test_malformed_client_final_is_a_protocol_error(name: str) -> None:
    ex, _, good = scram_to_final()
    with pytest.raises(ProtocolError):
        ex.step(sasl_body(bad_finals(good)[name]))


def test_client_final_extensions_before_the_proof_are_accepted() -> None:
    client = LibpqScramClient(PASSWORD)
    # A final with an extension: the proof covers it (it is in AuthMessage).
    ex2 = ScramAuth(USER, PASSWORD)
    ex2.start()
    out, _ = ex2.step(sasl_initial_body(client.first()))
    server_first = request_of(out).data
    attrs = dict(a.split("=", 1) for a in server_first.decode().split(","))
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), base64.b64decode(attrs["s"]),
                                 int(attrs["i"]))
    client_key = hmac256(salted, b"Client Key")
    without_proof = f"c=biws,r={attrs['r']},x=extension"
    auth_message = f"{client.first_bare},{server_first.decode()},{without_proof}".encode()
    sig = hmac256(hashlib.sha256(client_key).digest(), auth_message)
    proof = bytes(a ^ b for a, b in zip(client_key, sig, strict=True))
    _, done = ex2.step(sasl_body(f"{without_proof},p={b64(proof)}".encode()))
    assert done


def test_sasl_message_after_the_end_is_a_protocol_error() -> None:
    ex, _, final = scram_to_final()
    ex.step(sasl_body(final))
    with pytest.raises(ProtocolError):
        ex.step(sasl_body(final))


@pytest.mark.parametrize("body", [b"", b"no terminator", b"pw\x00trailing", b"\xff\x00"])
@pytest.mark.parametrize("cls", [CleartextAuth, Md5Auth])
def test_malformed_password_message_is_a_protocol_error(body: bytes,
                                                        cls: type[ClientAuth]) -> None:
    ex = cls(USER, PASSWORD)  # type: ignore[call-arg]
    ex.start()
    with pytest.raises(ProtocolError):
        ex.step(body)


def test_md5_salt_is_fresh_for_every_exchange() -> None:
    salts = {request_of(Md5Auth(USER, PASSWORD).start()).data for _ in range(20)}
    assert len(salts) == 20


def test_md5_answer_for_another_salt_fails() -> None:
    ex = Md5Auth(USER, PASSWORD)
    salt = request_of(ex.start()).data
    other = bytes(b ^ 1 for b in salt)
    with pytest.raises(AuthFailed):
        ex.step(password_body(md5_answer(USER, PASSWORD, other)))


def test_md5_secret_of_another_user_fails() -> None:
    ex = client_auth_for("md5", "alice", SECRETS["md5"])  # bob's md5 secret
    with pytest.raises(AuthFailed):
        run_md5(ex, PASSWORD, user="alice")


def test_stored_secret_is_not_a_password() -> None:
    """Sending the stored hash itself as the password must not log in."""
    for auth_type in ("plain", "md5", "scram-sha-256"):
        for form in ("md5", "scram"):
            with pytest.raises(AuthFailed):
                drive(client_auth_for(auth_type, USER, SECRETS[form]), SECRETS[form])


@pytest.mark.parametrize("auth_type", ["plain", "md5", "scram-sha-256"])
def test_empty_password_never_logs_in(auth_type: str) -> None:
    """As PgBouncer ("disallow empty passwords") and PostgreSQL."""
    with pytest.raises(AuthFailed):
        drive(client_auth_for(auth_type, USER, ""), "")
    if auth_type != "plain":
        with pytest.raises(AuthFailed):
            run_libpq_scram(ScramAuth(USER, ""), "")
    with pytest.raises(AuthFailed):
        run_cleartext(CleartextAuth(USER, SECRETS["plain"]), "")


def test_md5_exchange_refuses_a_scram_secret() -> None:
    with pytest.raises(ValueError):
        Md5Auth(USER, SECRETS["scram"])


@pytest.mark.parametrize("auth_type", ["trust", "any", "cert", ""])
def test_auth_type_without_password_exchange(auth_type: str) -> None:
    with pytest.raises(ValueError):
        client_auth_for(auth_type, USER, PASSWORD)


# -- secrets -------------------------------------------------------------------------------------

def test_secret_helpers_agree_with_libpq() -> None:
    assert md5_secret(USER, PASSWORD) == SECRETS["md5"]
    assert is_md5_secret(SECRETS["md5"]) and not is_md5_secret(PASSWORD)
    assert not is_md5_secret("md5" + "G" * 32)
    parsed = parse_scram_secret(SECRETS["scram"])
    assert parsed is not None and parsed.iterations == 4096 and len(parsed.salt) == 16
    ours = scram_secret(PASSWORD, salt=parsed.salt, iterations=parsed.iterations)
    assert ours == SECRETS["scram"]
    for form in ("plain", "md5", "scram"):
        assert check_plain(USER, PASSWORD, SECRETS[form])
        assert not check_plain(USER, WRONG, SECRETS[form])
        assert not check_plain(USER, "", SECRETS[form])


@pytest.mark.parametrize("secret", [
    "SCRAM-SHA-256$4096:c2FsdA==$short:short",
    "SCRAM-SHA-256$x:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
    "SCRAM-SHA-256$0:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
    "SCRAM-SHA-256$-1:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
    "SCRAM-SHA-256$4096:!!$" + b64(bytes(32)) + ":" + b64(bytes(32)),
    "SCRAM-SHA-256$4096:c2FsdA==$" + b64(bytes(32)),
    "SCRAM-SHA-256$4096:c2FsdA==$" + b64(bytes(31)) + ":" + b64(bytes(32)),
    "SCRAM-SHA-1$4096:c2FsdA==$" + b64(bytes(32)) + ":" + b64(bytes(32)),
])
def test_malformed_scram_secret_is_not_a_scram_secret(secret: str) -> None:
    assert parse_scram_secret(secret) is None


# -- real clients over a socket ---------------------------------------------------------------

async def serve_login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      auth_type: str, secret: str) -> None:
    """Just enough of a server: startup, the exchange, then AuthenticationOk or 28P01."""
    startup = StartupReader()
    try:
        while True:
            data = await reader.read(4096)
            if not data:
                return
            startup.feed(data)
            pkt = startup.next_packet()
            if isinstance(pkt, SSLRequest):
                writer.write(b"N")
            elif isinstance(pkt, StartupMessage):
                break
        ex = client_auth_for(auth_type, pkt.user, secret)
        writer.write(ex.start())
        msgs = MessageReader({m.F.PASSWORD})
        pending = msgs.feed(startup.take_rest())
        done = False
        while not done:
            if not pending:
                data = await reader.read(4096)
                if not data:
                    return
                pending = msgs.feed(data)
            mtype, body = pending.pop(0)
            assert mtype == m.F.PASSWORD and body is not None
            try:
                out, done = ex.step(body)
            except AuthFailed as exc:
                writer.write(m.error_response(exc.sqlstate, str(exc), severity="FATAL"))
                return
            writer.write(out)
        writer.write(m.auth_ok() + m.parameter_status("server_version", "16.4")
                     + m.parameter_status("client_encoding", "UTF8")
                     + m.parameter_status("standard_conforming_strings", "on")
                     + m.parameter_status("integer_datetimes", "on")
                     + m.backend_key_data(42, 4242) + m.ready_for_query())
        await writer.drain()
        await reader.read(4096)  # Terminate
    finally:
        writer.close()


async def login_result(auth_type: str, secret: str, password: str) -> tuple[str, str]:
    server = await asyncio.start_server(
        lambda r, w: serve_login(r, w, auth_type, secret), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    results = []
    async with server:
        try:
            conn = await psycopg.AsyncConnection.connect(
                host="127.0.0.1", port=port, user=USER, dbname="db", password=password,
                sslmode="disable", connect_timeout=5)
            await conn.close()
            results.append("ok")
        except psycopg.OperationalError as exc:
            assert "password authentication failed" in str(exc), exc
            results.append("failed")
        try:
            aconn = await asyncpg.connect(host="127.0.0.1", port=port, user=USER,
                                          database="db", password=password, ssl=False,
                                          timeout=5)
            await aconn.close(timeout=5)
            results.append("ok")
        except asyncpg.InvalidPasswordError:
            results.append("failed")
    return results[0], results[1]


@pytest.mark.parametrize(("auth_type", "form", "cls"), EXCHANGES)
async def test_real_clients_log_in(auth_type: str, form: str, cls: type[ClientAuth]) -> None:
    """psycopg (libpq) and asyncpg, with the right and a wrong password."""
    right = ("failed", "failed") if (auth_type, form) in NO_EXCHANGE else ("ok", "ok")
    assert await login_result(auth_type, SECRETS[form], PASSWORD) == right
    assert await login_result(auth_type, SECRETS[form], WRONG) == ("failed", "failed")


# -- ServerLogin: the pooler logging in to a server ------------------------------------------

def test_server_login_trust() -> None:
    assert ServerLogin(USER, None).answer(m.AuthRequest(m.AUTH_OK)) is None
    assert ServerLogin(USER, PASSWORD).answer(m.AuthRequest(m.AUTH_OK)) is None


def test_server_login_cleartext() -> None:
    reply = ServerLogin(USER, PASSWORD).answer(request_of(m.auth_cleartext()))
    assert reply is not None
    got = MessageReader().feed(reply)
    assert got[0][0] == m.F.PASSWORD and got[0][1] is not None
    assert m.parse_password_message(got[0][1]) == PASSWORD


@pytest.mark.parametrize("stored", ["plain", "md5"])
def test_server_login_md5(stored: str) -> None:
    salt = b"\x01\xfe\x00\x7f"
    login = ServerLogin(USER, SECRETS[stored])
    reply = login.answer(request_of(m.auth_md5(salt)))
    assert reply == m.password_message(md5_answer(USER, PASSWORD, salt))


def test_server_login_md5_needs_a_four_byte_salt() -> None:
    with pytest.raises(ProtocolError):
        ServerLogin(USER, PASSWORD).answer(m.AuthRequest(m.AUTH_MD5, b"abc"))


def scramp_server(password: str) -> tuple[object, ScramMechanism]:
    mech = ScramMechanism("SCRAM-SHA-256")
    info = mech.make_auth_info(password)
    return mech.make_server(lambda _user: info), mech


def test_server_login_scram_against_scramp() -> None:
    server, _ = scramp_server(PASSWORD)
    login = ServerLogin(USER, PASSWORD)
    first = login.answer(request_of(m.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])))
    assert first is not None
    mech, data = m.parse_sasl_initial_response(first[5:])
    assert mech == "SCRAM-SHA-256"
    server.set_client_first(data.decode())  # type: ignore[attr-defined]
    server_first = server.get_server_first()  # type: ignore[attr-defined]
    final = login.answer(m.AuthRequest(m.AUTH_SASL_CONTINUE, server_first.encode()))
    assert final is not None and final[0] == m.F.PASSWORD
    server.set_client_final(final[5:].decode())  # type: ignore[attr-defined]  # proof checked
    server_final = server.get_server_final()  # type: ignore[attr-defined]
    assert login.answer(m.AuthRequest(m.AUTH_SASL_FINAL, server_final.encode())) is None
    assert login.answer(m.AuthRequest(m.AUTH_OK)) is None


def test_server_login_scram_wrong_password_is_refused_by_the_server() -> None:
    server, _ = scramp_server(WRONG)
    login = ServerLogin(USER, PASSWORD)
    first = login.answer(m.AuthRequest(m.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"))
    assert first is not None
    server.set_client_first(m.parse_sasl_initial_response(first[5:])[1].decode())  # type: ignore[attr-defined]
    final = login.answer(m.AuthRequest(m.AUTH_SASL_CONTINUE,
                                       server.get_server_first().encode()))  # type: ignore[attr-defined]
    assert final is not None
    with pytest.raises(ScramException):
        server.set_client_final(final[5:].decode())  # type: ignore[attr-defined]
    # PostgreSQL then sends ErrorResponse 28P01; scramp's own error answer is refused too.
    with pytest.raises(AuthFailed) as info:
        login.answer(m.AuthRequest(m.AUTH_SASL_FINAL, b"e=invalid-proof"))
    assert_no_password(info.value, PASSWORD)


class HandScramServer:
    """A SCRAM server written here, with any iteration count (PostgreSQL allows < 4096)."""

    def __init__(self, password: str, iterations: int) -> None:
        self.salt = b"saltsaltsaltsalt"
        self.iterations = iterations
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), self.salt, iterations)
        self.stored_key = hashlib.sha256(hmac256(salted, b"Client Key")).digest()
        self.server_key = hmac256(salted, b"Server Key")
        self.first_bare = ""
        self.server_first = ""

    def first(self, client_first: bytes) -> bytes:
        text = client_first.decode()
        assert text.startswith("n,,")
        self.first_bare = text[3:]
        nonce = dict(a.split("=", 1) for a in self.first_bare.split(","))["r"]
        self.server_first = f"r={nonce}SERVERNONCE,s={b64(self.salt)},i={self.iterations}"
        return self.server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        without_proof, proof_b64 = client_final.decode().rsplit(",p=", 1)
        assert without_proof.startswith("c=biws,r=")
        auth_message = f"{self.first_bare},{self.server_first},{without_proof}".encode()
        sig = hmac256(self.stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof_b64), sig,
                                                  strict=True))
        assert hashlib.sha256(client_key).digest() == self.stored_key, "wrong proof"
        return b"v=" + base64.b64encode(hmac256(self.server_key, auth_message))


def hand_login(login: ServerLogin, server: HandScramServer) -> bytes:
    """Run SASL and SASLContinue; the client-final-message's body."""
    first = login.answer(m.AuthRequest(m.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"))
    assert first is not None
    server_first = server.first(m.parse_sasl_initial_response(first[5:])[1])
    final = login.answer(m.AuthRequest(m.AUTH_SASL_CONTINUE, server_first))
    assert final is not None
    return final[5:]


@pytest.mark.parametrize("iterations", [1, 100, 4096])
def test_server_login_scram_any_iteration_count(iterations: int) -> None:
    server = HandScramServer(PASSWORD, iterations)
    login = ServerLogin(USER, PASSWORD)
    server_final = server.final(hand_login(login, server))
    assert login.answer(m.AuthRequest(m.AUTH_SASL_FINAL, server_final)) is None
    assert login.answer(m.AuthRequest(m.AUTH_OK)) is None


def test_server_login_scram_against_our_own_client_side() -> None:
    ex = ScramAuth(USER, SECRETS["scram"])
    login = ServerLogin(USER, PASSWORD)
    first = login.answer(request_of(ex.start()))
    assert first is not None
    out, _ = ex.step(first[5:])
    final = login.answer(request_of(out))
    assert final is not None
    out, done = ex.step(final[5:])
    assert done and login.answer(request_of(out)) is None


def test_server_login_refuses_a_wrong_server_signature() -> None:
    server = HandScramServer(PASSWORD, 4096)
    login = ServerLogin(USER, PASSWORD)
    server.final(hand_login(login, server))
    with pytest.raises(AuthFailed):
        login.answer(m.AuthRequest(m.AUTH_SASL_FINAL, b"v=" + base64.b64encode(bytes(32))))


def test_server_login_refuses_auth_ok_without_sasl_final() -> None:
    """A server that skips SASLFinal has not proved it knows the password."""
    server = HandScramServer(PASSWORD, 4096)
    login = ServerLogin(USER, PASSWORD)
    hand_login(login, server)
    with pytest.raises(AuthFailed):
        login.answer(m.AuthRequest(m.AUTH_OK))


BAD_SERVER_FIRST = {
    "not UTF-8": b"r=\xff,s=c2FsdA==,i=4096",
    "foreign nonce": b"r=somebodyelse,s=c2FsdA==,i=4096",
    "missing salt": b"r={nonce}x,i=4096",
    "salt not base64": b"r={nonce}x,s=!!,i=4096",
    "zero iterations": b"r={nonce}x,s=c2FsdA==,i=0",
    "huge iterations": b"r={nonce}x,s=c2FsdA==,i=99999999999",
    "iterations not a number": b"r={nonce}x,s=c2FsdA==,i=lots",
    "nonce not extended": b"r={nonce},s=c2FsdA==,i=4096",
    "empty": b"",
}


@pytest.mark.parametrize("data", BAD_SERVER_FIRST.values(), ids=BAD_SERVER_FIRST.keys())
def test_server_login_malformed_server_first_is_a_protocol_error(data: bytes) -> None:
    login = ServerLogin(USER, PASSWORD)
    first = login.answer(m.AuthRequest(m.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"))
    assert first is not None
    bare = m.parse_sasl_initial_response(first[5:])[1].decode()[3:]
    nonce = dict(a.split("=", 1) for a in bare.split(","))["r"]
    with pytest.raises(ProtocolError) as info:
        login.answer(m.AuthRequest(m.AUTH_SASL_CONTINUE,
                                   data.replace(b"{nonce}", nonce.encode())))
    assert_no_password(info.value, PASSWORD)


def test_server_login_sasl_out_of_order() -> None:
    with pytest.raises(ProtocolError):
        ServerLogin(USER, PASSWORD).answer(m.AuthRequest(m.AUTH_SASL_CONTINUE, b"r=x"))
    with pytest.raises(ProtocolError):
        ServerLogin(USER, PASSWORD).answer(m.AuthRequest(m.AUTH_SASL_FINAL, b"v=x"))
    login = ServerLogin(USER, PASSWORD)
    login.answer(m.AuthRequest(m.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"))
    with pytest.raises(ProtocolError):
        login.answer(m.AuthRequest(m.AUTH_SASL_FINAL, b"v=x"))


@pytest.mark.parametrize("req", [
    m.AuthRequest(m.AUTH_CLEARTEXT),
    m.AuthRequest(m.AUTH_MD5, b"salt"),
    m.AuthRequest(m.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"),
])
def test_server_login_without_password(req: m.AuthRequest) -> None:
    for password in (None, ""):
        with pytest.raises(AuthFailed):
            ServerLogin(USER, password).answer(req)


def test_server_login_with_only_a_hash() -> None:
    # md5 can be answered from the md5 secret; cleartext and SCRAM cannot.
    for form in ("md5", "scram"):
        login = ServerLogin(USER, SECRETS[form])
        with pytest.raises(AuthFailed):
            login.answer(m.AuthRequest(m.AUTH_CLEARTEXT))
        with pytest.raises(AuthFailed):
            ServerLogin(USER, SECRETS[form]).answer(
                m.AuthRequest(m.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"))
    with pytest.raises(AuthFailed):
        ServerLogin(USER, SECRETS["scram"]).answer(m.AuthRequest(m.AUTH_MD5, b"salt"))


@pytest.mark.parametrize("req", [
    m.AuthRequest(m.AUTH_SASL, b"SCRAM-SHA-256-PLUS\x00\x00"),
    m.AuthRequest(m.AUTH_SASL, b"\xff\xfe\x00\x00"),
    m.AuthRequest(7),  # GSSAPI
    m.AuthRequest(9),  # SSPI
    m.AuthRequest(2),  # Kerberos V5
])
def test_server_login_unsupported_methods(req: m.AuthRequest) -> None:
    with pytest.raises(AuthFailed) as info:
        ServerLogin(USER, PASSWORD).answer(req)
    assert_no_password(info.value, PASSWORD)


def test_server_login_sends_an_escaped_user_name() -> None:
    login = ServerLogin("we,ird=user", PASSWORD)
    first = login.answer(m.AuthRequest(m.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"))
    assert first is not None
    data = m.parse_sasl_initial_response(first[5:])[1]
    assert data.startswith(b"n,,n=we=2Cird=3Duser,r=")


def _server_first_salt(auth: ScramAuth) -> bytes:
    import base64 as b64

    client_first = b"n,,n=,r=" + b"clientnonce123456789012"
    reply, done = auth.step(m.sasl_initial_response("SCRAM-SHA-256", client_first)[5:])
    assert not done
    text = reply[9:].decode()  # after 'R', length and the SASLContinue code
    fields = dict(part.split("=", 1) for part in text.split(","))
    return b64.b64decode(fields["s"])


def test_plain_password_secret_is_derived_once_and_unknown_users_look_real() -> None:
    from pgpilot.proxy.auth import mock_scram_secret

    # The same plain password gives the same salt at every login (derived once, cached) ...
    assert _server_first_salt(ScramAuth("alice", "pw-1")) == \
        _server_first_salt(ScramAuth("alice", "pw-1"))
    # ... and a made-up user gets a salt of its own, stable, unlike other names'.
    ghost = _server_first_salt(ScramAuth("ghost", mock_scram_secret("ghost")))
    assert ghost == _server_first_salt(ScramAuth("ghost", mock_scram_secret("ghost")))
    assert ghost != _server_first_salt(ScramAuth("other", mock_scram_secret("other")))
    assert len(ghost) == 16
