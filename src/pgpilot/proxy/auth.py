"""Password authentication, both ways: clients logging in to the pooler, the pooler to servers.

Client side, the pooler plays PostgreSQL: it challenges the client as ``auth_type`` says and
checks the answer against the secret from ``auth_file`` (plain, ``md5...`` or a SCRAM secret,
as PgBouncer's userlist.txt allows). Each method is a small exchange object:
``start()`` gives the first challenge, ``step(body)`` takes the client's answer and says what to
send next and whether it is over. Nothing here does I/O.

Server side, :class:`ServerLogin` answers PostgreSQL's challenges (trust, cleartext, md5,
SCRAM-SHA-256) with the password configured for that server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from scramp import ScramClient, ScramMechanism

from pgpilot.wire import messages as m
from pgpilot.wire.errors import ProtocolError


class AuthFailed(Exception):
    """The client's credentials were wrong (SQLSTATE 28P01); the message never holds them."""

    sqlstate = "28P01"


def md5_secret(user: str, password: str) -> str:
    """What PostgreSQL stores for an md5 password: ``md5`` + md5(password + user)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(secret: str, salt: bytes) -> str:
    """The answer to an md5 challenge, from the stored ``md5...`` secret."""
    return "md5" + hashlib.md5(secret[3:].encode() + salt).hexdigest()


def is_md5_secret(secret: str) -> bool:
    return len(secret) == 35 and secret.startswith("md5") and all(
        c in "0123456789abcdef" for c in secret[3:])


@dataclass(frozen=True, slots=True)
class ScramSecret:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes


def parse_scram_secret(secret: str) -> ScramSecret | None:
    """``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``, or None if not that form."""
    if not secret.startswith("SCRAM-SHA-256$"):
        return None
    try:
        head, keys = secret[len("SCRAM-SHA-256$"):].split("$", 1)
        iterations, salt = head.split(":", 1)
        stored, server = keys.split(":", 1)
        return ScramSecret(int(iterations), base64.b64decode(salt, validate=True),
                           base64.b64decode(stored, validate=True),
                           base64.b64decode(server, validate=True))
    except ValueError:
        return None


def check_plain(user: str, given: str, secret: str) -> bool:
    """Does the cleartext ``given`` match the stored ``secret`` (any of the three forms)?"""
    if is_md5_secret(secret):
        return hmac.compare_digest(md5_secret(user, given), secret)
    scram = parse_scram_secret(secret)
    if scram is not None:
        salted = hashlib.pbkdf2_hmac("sha256", given.encode(), scram.salt, scram.iterations)
        client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        return hmac.compare_digest(hashlib.sha256(client_key).digest(), scram.stored_key)
    return hmac.compare_digest(given.encode(), secret.encode())


class ClientAuth:
    """One authentication exchange with a client."""

    def start(self) -> bytes:
        raise NotImplementedError

    def step(self, body: bytes) -> tuple[bytes, bool]:
        """Take the client's PasswordMessage body; return (bytes to send, finished).

        Raises AuthFailed when the answer is wrong.
        """
        raise NotImplementedError


class CleartextAuth(ClientAuth):
    def __init__(self, user: str, secret: str) -> None:
        self.user = user
        self.secret = secret

    def start(self) -> bytes:
        return m.auth_cleartext()

    def step(self, body: bytes) -> tuple[bytes, bool]:
        given = m.parse_password_message(body)
        if not check_plain(self.user, given, self.secret):
            raise AuthFailed(f'password authentication failed for user "{self.user}"')
        return b"", True


class Md5Auth(ClientAuth):
    def __init__(self, user: str, secret: str) -> None:
        self.user = user
        self.salt = secrets.token_bytes(4)
        # The md5 exchange needs the md5 secret; a plain password gives it.
        self.secret = secret if is_md5_secret(secret) else md5_secret(user, secret)

    def start(self) -> bytes:
        return m.auth_md5(self.salt)

    def step(self, body: bytes) -> tuple[bytes, bool]:
        given = m.parse_password_message(body)
        if not hmac.compare_digest(given.encode(), md5_response(self.secret, self.salt).encode()):
            raise AuthFailed(f'password authentication failed for user "{self.user}"')
        return b"", True


class ScramAuth(ClientAuth):
    """SCRAM-SHA-256 (RFC 7677) against a plain password or a stored SCRAM secret."""

    def __init__(self, user: str, secret: str) -> None:
        self.user = user
        mech = ScramMechanism("SCRAM-SHA-256")
        parsed = parse_scram_secret(secret)
        if parsed is not None:
            info = (parsed.salt, parsed.stored_key, parsed.server_key, parsed.iterations)
        else:
            info = mech.make_auth_info(secret, iteration_count=4096)
        # The user name inside SCRAM is ignored, as PostgreSQL does: the startup packet's counts.
        self.server = mech.make_server(lambda _username: info)
        self.stage = 0

    def start(self) -> bytes:
        return m.auth_sasl(["SCRAM-SHA-256"])

    def step(self, body: bytes) -> tuple[bytes, bool]:
        try:
            if self.stage == 0:
                mech, data = m.parse_sasl_initial_response(body)
                if mech != "SCRAM-SHA-256":
                    raise ProtocolError(f"unsupported SASL mechanism {mech!r}")
                self.server.set_client_first(data.decode())
                self.stage = 1
                return m.auth_sasl_continue(self.server.get_server_first().encode()), False
            if self.stage == 1:
                self.server.set_client_final(body.decode())
                self.stage = 2
                return m.auth_sasl_final(self.server.get_server_final().encode()), True
        except ProtocolError:
            raise
        except Exception as exc:  # scramp raises ScramException on a bad proof
            raise AuthFailed(f'password authentication failed for user "{self.user}"') from exc
        raise ProtocolError("unexpected SASL message after authentication completed")


def client_auth_for(auth_type: str, user: str, secret: str) -> ClientAuth:
    """The exchange ``auth_type`` calls for, given what the auth file stores for the user."""
    if auth_type == "plain":
        return CleartextAuth(user, secret)
    if auth_type == "md5":
        # As PgBouncer: a stored SCRAM secret cannot answer md5, so SCRAM is used instead.
        if parse_scram_secret(secret) is not None:
            return ScramAuth(user, secret)
        return Md5Auth(user, secret)
    if auth_type == "scram-sha-256":
        # A stored md5 secret cannot do SCRAM; PgBouncer falls back to md5 for such users.
        if is_md5_secret(secret):
            return Md5Auth(user, secret)
        return ScramAuth(user, secret)
    raise ValueError(f"auth_type {auth_type!r} has no password exchange")


class ServerLogin:
    """Answers a PostgreSQL server's authentication requests for one login."""

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self.password = password
        self._scram: ScramClient | None = None

    def _need_password(self, method: str) -> str:
        if not self.password:
            raise AuthFailed(f"server asked for {method} authentication for user "
                             f'"{self.user}" but no password is configured for it')
        return self.password

    def answer(self, req: m.AuthRequest) -> bytes | None:
        """The reply to one Authentication message; None when nothing is to be sent."""
        if req.code == m.AUTH_OK:
            return None
        if req.code == m.AUTH_CLEARTEXT:
            pw = self._need_password("cleartext password")
            if is_md5_secret(pw) or parse_scram_secret(pw):
                raise AuthFailed("server wants a cleartext password, only a hash is known")
            return m.password_message(pw)
        if req.code == m.AUTH_MD5:
            pw = self._need_password("md5")
            if parse_scram_secret(pw):
                raise AuthFailed("server wants md5, only a SCRAM secret is known")
            secret = pw if is_md5_secret(pw) else md5_secret(self.user, pw)
            return m.password_message(md5_response(secret, req.data[:4]))
        if req.code == m.AUTH_SASL:
            pw = self._need_password("SCRAM-SHA-256")
            if "SCRAM-SHA-256" not in req.mechanisms:
                raise AuthFailed(f"server offers no supported SASL mechanism: {req.mechanisms}")
            if is_md5_secret(pw) or parse_scram_secret(pw):
                raise AuthFailed("server wants SCRAM-SHA-256; a plain password is needed")
            self._scram = ScramClient(["SCRAM-SHA-256"], self.user, pw)
            return m.sasl_initial_response("SCRAM-SHA-256", self._scram.get_client_first().encode())
        if req.code == m.AUTH_SASL_CONTINUE:
            if self._scram is None:
                raise ProtocolError("SASLContinue without SASL")
            self._scram.set_server_first(req.data.decode())
            return m.sasl_response(self._scram.get_client_final().encode())
        if req.code == m.AUTH_SASL_FINAL:
            if self._scram is None:
                raise ProtocolError("SASLFinal without SASL")
            try:
                self._scram.set_server_final(req.data.decode())
            except Exception as exc:
                raise AuthFailed("server's SCRAM signature is wrong") from exc
            return None
        raise AuthFailed(f"unsupported authentication method {req.code} requested by server")
