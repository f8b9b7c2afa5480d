"""Password authentication, both ways: clients logging in to the pooler, the pooler to servers.

Client side, the pooler plays PostgreSQL: it challenges the client as ``auth_type`` says and
checks the answer against the secret from ``auth_file`` (plain, ``md5...`` or a SCRAM secret,
as PgBouncer's userlist.txt allows). Each method is a small exchange object:
``start()`` gives the first challenge, ``step(body)`` takes the client's answer and says what to
send next and whether it is over. Nothing here does I/O.

Server side, :class:`ServerLogin` answers PostgreSQL's challenges (trust, cleartext, md5,
SCRAM-SHA-256) with the password configured for that server.

SCRAM-SHA-256 (RFC 5802 / RFC 7677) is done here as PostgreSQL does it rather than through
scramp's state machines, whose checks are stricter than PostgreSQL's: libpq sends an empty
user name (``n=,r=...``), which scramp's server refuses, and PostgreSQL allows iteration counts
below 4096, which scramp's client refuses. scramp still provides SASLprep.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from pgpilot.wire import messages as m
from pgpilot.wire.errors import ProtocolError

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_DEFAULT_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
SCRAM_SALT_LENGTH = 16  # as PostgreSQL generates
SCRAM_MAX_ITERATIONS = 10_000_000  # a server asking for more is refused (the loop would stall)
_SCRAM_KEY_LENGTH = 32
_SCRAM_NONCE_BYTES = 18  # as PostgreSQL: base64 of 18 random bytes


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


@functools.lru_cache(maxsize=4096)  # read at every login of the user: decoded once
def parse_scram_secret(secret: str) -> ScramSecret | None:
    """``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``, or None if not that form."""
    if not secret.startswith("SCRAM-SHA-256$"):
        return None
    try:
        head, keys = secret[len("SCRAM-SHA-256$"):].split("$", 1)
        iterations, salt = head.split(":", 1)
        stored, server = keys.split(":", 1)
        if not (iterations.isascii() and iterations.isdigit()):
            return None
        parsed = ScramSecret(int(iterations), base64.b64decode(salt, validate=True),
                             base64.b64decode(stored, validate=True),
                             base64.b64decode(server, validate=True))
    except ValueError:
        return None
    # As PostgreSQL's parse_scram_secret: both keys are SHA-256 sized.
    if (parsed.iterations < 1 or len(parsed.stored_key) != _SCRAM_KEY_LENGTH
            or len(parsed.server_key) != _SCRAM_KEY_LENGTH):
        return None
    return parsed


def _saslprep(password: str) -> str:
    """SASLprep as PostgreSQL (pg_saslprep) and libpq apply it to a password.

    ASCII passes unchanged; a password SASLprep refuses is used as it is.
    """
    if password.isascii():
        return password
    # Imported here: scramp brings asn1crypto, about 5 MB of every pooler process's memory,
    # for passwords that are almost always ASCII.
    from scramp.utils import ScramException, saslprep

    try:
        return str(saslprep(password))
    except ScramException:
        return password


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")  # one C call (hmac.new builds Python objects)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@functools.lru_cache(maxsize=1024)
def scram_salt_b64(salt: bytes) -> bytes:
    """A salt as server-first-message shows it (base64); kept, since a user's salt stays."""
    return base64.b64encode(salt)


@functools.lru_cache(maxsize=1024)
def _scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) of a password (PBKDF2 is costly: kept per process)."""
    salted = hashlib.pbkdf2_hmac("sha256", _saslprep(password).encode(), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return client_key, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key")


def _make_scram_secret(password: str, salt: bytes | None = None,
                       iterations: int = SCRAM_DEFAULT_ITERATIONS) -> ScramSecret:
    salt = secrets.token_bytes(SCRAM_SALT_LENGTH) if salt is None else salt
    _, stored_key, server_key = _scram_keys(password, salt, iterations)
    return ScramSecret(iterations, salt, stored_key, server_key)


@functools.lru_cache(maxsize=4096)
def _derived_scram_secret(password: str) -> ScramSecret:
    return _make_scram_secret(password)


_MOCK_KEY = secrets.token_bytes(32)


def mock_scram_secret(user: str) -> str:
    """A SCRAM secret for a user who does not exist: costs nothing to make, always fails, and
    shows each name a salt of its own that stays the same (as PostgreSQL's mock
    authentication), so neither timing nor salts tell which users exist."""
    salt = hmac.new(_MOCK_KEY, user.encode(), "sha256").digest()[:SCRAM_SALT_LENGTH]
    keys = hmac.new(_MOCK_KEY, b"keys:" + user.encode(), "sha512").digest()
    return (f"SCRAM-SHA-256${SCRAM_DEFAULT_ITERATIONS}:{_b64(salt)}"
            f"${_b64(keys[:32])}:{_b64(keys[32:])}")


def scram_secret(password: str, *, salt: bytes | None = None,
                 iterations: int = SCRAM_DEFAULT_ITERATIONS) -> str:
    """The SCRAM-SHA-256 secret PostgreSQL would store for ``password`` (random salt if None)."""
    s = _make_scram_secret(password, salt, iterations)
    return (f"SCRAM-SHA-256${s.iterations}:{_b64(s.salt)}"
            f"${_b64(s.stored_key)}:{_b64(s.server_key)}")


def check_plain(user: str, given: str, secret: str) -> bool:
    """Does the cleartext ``given`` match the stored ``secret`` (any of the three forms)?"""
    if is_md5_secret(secret):
        return hmac.compare_digest(md5_secret(user, given), secret)
    scram = parse_scram_secret(secret)
    if scram is not None:
        _, stored_key, _ = _scram_keys(given, scram.salt, scram.iterations)
        return hmac.compare_digest(stored_key, scram.stored_key)
    return hmac.compare_digest(given.encode(), secret.encode())


def _scram_printable(text: str) -> bool:
    """RFC 5802 ``printable``: %x21-2B / %x2D-7E (no comma), as PostgreSQL checks nonces."""
    return _PRINTABLE.fullmatch(text) is not None


_PRINTABLE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")


def _is_attr(part: str) -> bool:
    return len(part) >= 2 and part[1] == "=" and part[0].isascii() and part[0].isalpha()


class ClientAuth:
    """One authentication exchange with a client.

    As PgBouncer and PostgreSQL: an empty password never logs in, whether the client sends one
    or the auth file holds one.
    """

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
        if not given or not self.secret or not check_plain(self.user, given, self.secret):
            raise AuthFailed(f'password authentication failed for user "{self.user}"')
        return b"", True


class Md5Auth(ClientAuth):
    def __init__(self, user: str, secret: str) -> None:
        if parse_scram_secret(secret) is not None:
            # Taking it for a plain password would let the secret itself log in.
            raise ValueError("a SCRAM secret cannot answer an md5 exchange; use ScramAuth")
        self.user = user
        self.empty = not secret
        self.salt = secrets.token_bytes(4)
        # The md5 exchange needs the md5 secret; a plain password gives it.
        self.secret = secret if is_md5_secret(secret) else md5_secret(user, secret)

    def start(self) -> bytes:
        return m.auth_md5(self.salt)

    def step(self, body: bytes) -> tuple[bytes, bool]:
        given = m.parse_password_message(body)
        if self.empty or not hmac.compare_digest(given.encode(),
                                                 md5_response(self.secret, self.salt).encode()):
            raise AuthFailed(f'password authentication failed for user "{self.user}"')
        return b"", True


class ScramAuth(ClientAuth):
    """SCRAM-SHA-256 (RFC 7677) against a plain password or a stored SCRAM secret.

    Parsed as PostgreSQL's auth-scram.c does: the user name inside SCRAM is ignored (libpq
    sends none; the startup packet's counts), channel binding is not offered (flags ``n`` and
    ``y`` only), extensions are skipped. A malformed message is a :class:`ProtocolError`, a
    wrong proof :class:`AuthFailed`.
    """

    def __init__(self, user: str, secret: str) -> None:
        self.user = user
        self.empty = not secret
        parsed = parse_scram_secret(secret)
        # A plain password is turned into a SCRAM secret once per process (what PostgreSQL
        # stores when the password is set), not at every login: PBKDF2's 4096 rounds
        # would otherwise cost each new connection a millisecond or more of CPU.
        self.secret = parsed if parsed is not None else _derived_scram_secret(secret)
        self.stage = 0
        self._server_nonce = _b64(secrets.token_bytes(_SCRAM_NONCE_BYTES))
        self.client_key: bytes | None = None  # known once the client has proved itself
        self._gs2_header = ""
        self._nonce = ""
        self._client_first_bare = ""
        self._server_first = ""

    def start(self) -> bytes:
        return m.auth_sasl([SCRAM_SHA_256])

    def _malformed(self, detail: str) -> ProtocolError:
        return ProtocolError(f"malformed SCRAM message: {detail}")

    def _decode(self, data: bytes) -> str:
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise self._malformed("invalid UTF-8") from exc

    def _client_first(self, data: bytes) -> None:
        text = self._decode(data)
        if text[:1] == "p":
            raise ProtocolError("client requires SCRAM channel binding, which is not offered")
        if text[:1] not in ("n", "y") or text[1:2] != ",":
            raise self._malformed("unexpected channel-binding flag")
        if text[2:3] == "a":
            raise ProtocolError("client uses SCRAM authorization identity, which is not "
                                "supported")
        if text[2:3] != ",":
            raise self._malformed("comma expected after channel-binding flag")
        self._gs2_header = text[:3]
        bare = text[3:]
        parts = bare.split(",")
        if len(parts) < 2 or not parts[0].startswith("n="):
            raise self._malformed("user name attribute expected")
        if parts[1].startswith("m="):
            raise ProtocolError("client requires an unsupported SCRAM extension")
        if not parts[1].startswith("r="):
            raise self._malformed("nonce attribute expected")
        client_nonce = parts[1][2:]
        if not _scram_printable(client_nonce):
            raise self._malformed("invalid nonce")
        if not all(_is_attr(p) for p in parts[2:]):
            raise self._malformed("invalid attribute")
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        self._server_first = (f"r={self._nonce},s={_b64(self.secret.salt)},"
                              f"i={self.secret.iterations}")

    def _client_final(self, data: bytes) -> bytes:
        """Check client-final-message; the ServerSignature to send back."""
        parts = self._decode(data).split(",")
        expected_cbind = "c=" + _b64(self._gs2_header.encode())
        if len(parts) < 3 or parts[0] != expected_cbind:
            raise self._malformed("unexpected channel-binding attribute")
        if parts[1] != "r=" + self._nonce:
            raise self._malformed("nonce does not match")
        if not all(_is_attr(p) for p in parts[2:]):
            raise self._malformed("invalid attribute")
        proof_at = next((i for i in range(2, len(parts)) if parts[i].startswith("p=")), -1)
        if proof_at != len(parts) - 1:
            raise self._malformed("proof expected as the last attribute")
        try:
            proof = base64.b64decode(parts[-1][2:], validate=True)
        except binascii.Error as exc:
            raise self._malformed("invalid proof encoding") from exc
        if len(proof) != _SCRAM_KEY_LENGTH:
            raise self._malformed("invalid proof length")
        auth_message = ",".join(
            (self._client_first_bare, self._server_first, ",".join(parts[:-1]))).encode()
        client_signature = _hmac(self.secret.stored_key, auth_message)
        client_key = (int.from_bytes(proof, "big") ^ int.from_bytes(client_signature, "big")
                      ).to_bytes(_SCRAM_KEY_LENGTH, "big")
        if self.empty or not hmac.compare_digest(hashlib.sha256(client_key).digest(),
                                                 self.secret.stored_key):
            raise AuthFailed(f'password authentication failed for user "{self.user}"')
        # The proof gave away ClientKey: with the stored secret it lets the pooler log in to a
        # server that stores the same secret (PgBouncer's SCRAM pass-through).
        self.client_key = client_key
        return _hmac(self.secret.server_key, auth_message)

    def step(self, body: bytes) -> tuple[bytes, bool]:
        if self.stage == 0:
            mech, data = m.parse_sasl_initial_response(body)
            if mech != SCRAM_SHA_256:
                raise ProtocolError(f"unsupported SASL mechanism {mech!r}")
            self._client_first(data)
            self.stage = 1
            return m.auth_sasl_continue(self._server_first.encode()), False
        if self.stage == 1:
            signature = self._client_final(body)
            self.stage = 2
            return m.auth_sasl_final(b"v=" + base64.b64encode(signature)), True
        raise ProtocolError("unexpected SASL message after authentication completed")


def scram_secret_for(auth_type: str, secret: str) -> ScramSecret | None:
    """The SCRAM secret :func:`client_auth_for` would check a login against, or None when its
    exchange is not SCRAM or cannot succeed (an empty secret): what the fast path's engine
    needs to run the exchange itself."""
    if not secret:
        return None
    parsed = parse_scram_secret(secret)
    if auth_type == "md5":
        return parsed
    if auth_type == "scram-sha-256":
        if is_md5_secret(secret):  # cannot do SCRAM: the exchange fails (client_auth_for)
            return parse_scram_secret(mock_scram_secret(""))
        return parsed if parsed is not None else _derived_scram_secret(secret)
    return None


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
        # A stored md5 secret cannot do SCRAM: as PostgreSQL and PgBouncer 1.23, the login
        # fails (an exchange against a secret no password matches), there is no md5 fallback.
        if is_md5_secret(secret):
            return ScramAuth(user, mock_scram_secret(user))
        return ScramAuth(user, secret)
    raise ValueError(f"auth_type {auth_type!r} has no password exchange")


class ServerLogin:
    """Answers a PostgreSQL server's authentication requests for one login."""

    def __init__(self, user: str, password: str | None,
                 client_key: bytes | None = None) -> None:
        self.user = user
        self.password = password
        # With only a SCRAM secret as "password": the ClientKey a client of this user revealed
        # when it logged in to the pooler with SCRAM (pass-through, as PgBouncer).
        self.client_key = client_key
        # SCRAM state: set by SASL, SASLContinue and SASLFinal in turn.
        self._scram_stage = 0  # 0 none, 1 first sent, 2 final sent, 3 server verified
        self._client_nonce = ""
        self._client_first_bare = ""
        self._server_signature = b""

    def _need_password(self, method: str) -> str:
        if not self.password:
            raise AuthFailed(f"server asked for {method} authentication for user "
                             f'"{self.user}" but no password is configured for it')
        return self.password

    def answer(self, req: m.AuthRequest) -> bytes | None:
        """The reply to one Authentication message; None when nothing is to be sent."""
        if req.code == m.AUTH_OK:
            if self._scram_stage in (1, 2):
                # PostgreSQL always proves itself with SASLFinal before AuthenticationOk.
                raise AuthFailed("server ended SCRAM authentication without proving that it "
                                 "knows the password")
            return None
        if req.code == m.AUTH_CLEARTEXT:
            pw = self._need_password("cleartext password")
            if is_md5_secret(pw) or parse_scram_secret(pw):
                raise AuthFailed("wrong password type: server wants a cleartext password, "
                                 "only a hash is known")
            return m.password_message(pw)
        if req.code == m.AUTH_MD5:
            pw = self._need_password("md5")
            if parse_scram_secret(pw):
                raise AuthFailed("wrong password type: server wants md5, only a SCRAM "
                                 "secret is known")
            if len(req.data) != 4:
                raise ProtocolError("malformed AuthenticationMD5Password: salt is not 4 bytes")
            secret = pw if is_md5_secret(pw) else md5_secret(self.user, pw)
            return m.password_message(md5_response(secret, req.data))
        if req.code == m.AUTH_SASL:
            pw = self._need_password("SCRAM-SHA-256")
            if SCRAM_SHA_256 not in req.mechanisms:
                raise AuthFailed(f"server offers no supported SASL mechanism: {req.mechanisms}")
            if is_md5_secret(pw):
                raise AuthFailed("wrong password type: server wants SCRAM-SHA-256; an md5 "
                                 "hash cannot answer it")
            if parse_scram_secret(pw) is not None and self.client_key is None:
                raise AuthFailed(
                    "wrong password type: server wants SCRAM-SHA-256 and auth_file holds "
                    "only a SCRAM secret for "
                    f'"{self.user}": a client must first log in as that user with SCRAM '
                    "(so its key can be passed through), or configure the plain password")
            if self._scram_stage:
                raise ProtocolError("SASL authentication requested twice")
            self._client_nonce = _b64(secrets.token_bytes(_SCRAM_NONCE_BYTES))
            # PostgreSQL ignores the user name in SCRAM; it is sent (escaped) all the same.
            name = self.user.replace("=", "=3D").replace(",", "=2C")
            self._client_first_bare = f"n={name},r={self._client_nonce}"
            self._scram_stage = 1
            return m.sasl_initial_response(SCRAM_SHA_256,
                                           ("n,," + self._client_first_bare).encode())
        if req.code == m.AUTH_SASL_CONTINUE:
            if self._scram_stage != 1:
                raise ProtocolError("unexpected SASLContinue")
            self._scram_stage = 2
            return m.sasl_response(self._client_final(self._need_password("SCRAM-SHA-256"),
                                                      req.data))
        if req.code == m.AUTH_SASL_FINAL:
            if self._scram_stage != 2:
                raise ProtocolError("unexpected SASLFinal")
            self._check_server_final(req.data)
            self._scram_stage = 3
            return None
        raise AuthFailed(f"unsupported authentication method {req.code} requested by server")

    def _client_final(self, password: str, data: bytes) -> bytes:
        """client-final-message for the server-first-message ``data``."""
        try:
            server_first = data.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("malformed SCRAM server-first-message: invalid UTF-8") from exc
        attrs = server_first.split(",")
        if (len(attrs) < 3 or not attrs[0].startswith("r=") or not attrs[1].startswith("s=")
                or not attrs[2].startswith("i=")):
            raise ProtocolError("malformed SCRAM server-first-message")
        nonce, salt_b64, iter_text = attrs[0][2:], attrs[1][2:], attrs[2][2:]
        if (not nonce.startswith(self._client_nonce) or len(nonce) <= len(self._client_nonce)
                or not _scram_printable(nonce)):
            raise ProtocolError("SCRAM server nonce does not extend the client's nonce")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except binascii.Error as exc:
            raise ProtocolError("malformed SCRAM server-first-message: salt") from exc
        if not (iter_text.isascii() and iter_text.isdigit()) or not (
                1 <= int(iter_text) <= SCRAM_MAX_ITERATIONS):
            raise ProtocolError(f"SCRAM iteration count {iter_text[:20]!r} is not acceptable")
        secret = parse_scram_secret(password)
        if secret is not None and self.client_key is not None:
            if (salt, int(iter_text)) != (secret.salt, secret.iterations):
                raise AuthFailed(f'the SCRAM secret in auth_file for "{self.user}" is not the '
                                 "server's (its salt or iteration count differs)")
            client_key, stored_key, server_key = (self.client_key, secret.stored_key,
                                                  secret.server_key)
        else:
            client_key, stored_key, server_key = _scram_keys(password, salt, int(iter_text))
        without_proof = f"c=biws,r={nonce}"
        auth_message = ",".join(
            (self._client_first_bare, server_first, without_proof)).encode()
        signature = _hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = _hmac(server_key, auth_message)
        return f"{without_proof},p={_b64(proof)}".encode()

    def _check_server_final(self, data: bytes) -> None:
        if data.startswith(b"e="):
            reason = data[2:].decode("ascii", "replace")
            raise AuthFailed(f"server refused SCRAM authentication: {reason}")
        try:
            given = base64.b64decode(data.split(b",")[0].removeprefix(b"v="), validate=True)
        except binascii.Error:
            given = b""
        if not data.startswith(b"v=") or not hmac.compare_digest(given,
                                                                  self._server_signature):
            raise AuthFailed("server's SCRAM signature is wrong")
