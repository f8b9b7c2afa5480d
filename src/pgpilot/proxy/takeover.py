"""Online restart (``pgpilot-pgbouncer -R``): a new process takes the listening sockets over.

PgBouncer's ``-R`` starts a new process that asks the running one, over the unix socket, for
every socket it has (listening, client and server) and carries on with them. pgpilot's takes
the listening sockets over, so a restart or an upgrade refuses no connection, and lets the old
process finish with the clients it has:

1. The running pooler listens, besides its clients' sockets, on a takeover socket beside its
   unix socket (``<unix_socket_dir>/.s.PGSQL.<port>.takeover``, mode 0600), and only talks
   there to a process of its own OS user (SO_PEERCRED).
2. The new process (``-R``) connects before it listens anywhere, sends ``TAKEOVER_HELLO``, and
   receives the listening sockets as SCM_RIGHTS descriptors with a JSON line describing them.
3. It serves them (both processes accept on them for a moment, which the kernel allows), then
   sends ``TAKEOVER_READY``. Only then does the old process stop accepting and shut down as
   SIGTERM makes it (PgBouncer's WAIT_FOR_CLIENTS): its clients go on until they disconnect,
   up to ``shutdown_timeout``. Should the new process fail before it is ready, the old one
   goes on as if nothing had happened.

The old process leaves the unix socket file and the pidfile to the new one. Clients and server
connections are not handed over (a client connected to the old process stays there until it
leaves; see docs/operations.md, "Online restart"), and TLS sessions could not be.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pgpilot.proxy.config import Config

if TYPE_CHECKING:
    from pgpilot.proxy.pooler import Pooler

log = logging.getLogger("pgpilot.proxy")

TAKEOVER_HELLO = b"pgpilot takeover 1\n"
TAKEOVER_READY = b"ready\n"
MAX_SOCKETS = 64  # listening sockets passed at most (one per address family and address)
CONNECT_TIMEOUT = 10.0


class TakeoverError(Exception):
    """The takeover could not be done; the message says why, for the person running -R."""


def takeover_socket_path(config: Config) -> str | None:
    """Where a running pooler with this configuration waits for a takeover (None: it has no
    unix socket, so no takeover, as PgBouncer's -R needs one)."""
    if not config.unix_socket_dir or config.unix_socket_dir.startswith("@"):
        return None
    return os.path.join(config.unix_socket_dir, f".s.PGSQL.{config.listen_port}.takeover")


# -- the running process ----------------------------------------------------------------------

async def serve_takeovers(pooler: Pooler,
                          handed_over: Callable[[int], None]) -> asyncio.AbstractServer | None:
    """Listen for a new process's takeover (None when there is no unix socket). Once one has
    its sockets and says it is ready, ``handed_over(its pid)`` is called."""
    path = takeover_socket_path(pooler.config)
    if path is None:
        return None

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _hand_over(pooler, reader, writer, handed_over)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.warning("takeover: gave up: %s; going on", exc)
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a file left by an earlier process (never one that is listening)
    server = await asyncio.start_unix_server(on_connection, path=path)
    os.chmod(path, 0o600)
    return server


async def _hand_over(pooler: Pooler, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, handed_over: Callable[[int], None]) -> None:
    sock = writer.get_extra_info("socket")
    uid, pid = _peer_uid_and_pid(sock)
    if uid != os.getuid():
        log.warning("takeover refused: process %d runs as uid %d, not as this pooler's", pid,
                    uid)
        return
    async with asyncio.timeout(CONNECT_TIMEOUT):
        hello = await reader.readline()
    if hello != TAKEOVER_HELLO:
        log.warning("takeover refused: process %d did not say hello", pid)
        return
    if pooler.stopping or pooler.shutdown_mode:
        writer.write(b'{"error": "the running pooler is shutting down"}\n')
        await writer.drain()
        return
    listening = pooler.listening_sockets()
    try:
        described = [{"family": int(s.family), "address": s.getsockname()} for s in listening]
        header = json.dumps({"pid": os.getpid(), "sockets": described}).encode() + b"\n"
        log.info("takeover: process %d asks for the listening sockets: sending %d", pid,
                 len(listening))
        # The descriptors ride with the header, in one sendmsg on the idle stream (nothing
        # else was written on it; a few hundred bytes fit in any socket buffer, so the
        # non-blocking send takes them whole).
        raw = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            sent = socket.send_fds(raw, [header], [s.fileno() for s in listening])
        finally:
            raw.close()
    finally:
        for each in listening:
            each.close()
    if sent != len(header):
        raise OSError(f"sent {sent} of {len(header)} bytes of the socket description")
    try:
        async with asyncio.timeout(pooler.config.server_connect_timeout + 60):
            answer = await reader.readline()
    except TimeoutError:
        answer = b""
    if answer != TAKEOVER_READY:
        log.warning("takeover: process %d did not get ready; going on as before", pid)
        return
    log.info("takeover: process %d serves the listening sockets now; finishing with the "
             "clients connected here", pid)
    handed_over(pid)


def _peer_uid_and_pid(sock: Any) -> tuple[int, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return uid, pid


# -- the new process --------------------------------------------------------------------------

class Takeover:
    """The new process's side: the sockets it took, and the connection it says ``ready`` on."""

    def __init__(self, conn: socket.socket, old_pid: int, sockets: list[socket.socket]) -> None:
        self.conn = conn
        self.old_pid = old_pid
        self.sockets = sockets

    def ready(self) -> None:
        """Serving the sockets now: the old process may stop accepting."""
        try:
            self.conn.sendall(TAKEOVER_READY)
        except OSError as exc:
            log.warning("takeover: could not tell process %d: %s", self.old_pid, exc)
        self.conn.close()

    def abandon(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.conn.close()


def take_over(config: Config) -> Takeover:
    """Ask the running pooler of ``config`` for its listening sockets (blocking; before the
    new process listens anywhere). Raises TakeoverError with the reason."""
    path = takeover_socket_path(config)
    if path is None:
        raise TakeoverError("online restart (-R) needs unix_socket_dir: the running pooler is "
                            "found through it")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(CONNECT_TIMEOUT)
    fds: list[int] = []
    try:
        conn.connect(path)
        # The socket directory may be shared (/tmp): a process of another user listening at
        # this path could hand over sockets it also accepts on, and see every client.
        uid, pid = _peer_uid_and_pid(conn)
        if uid != os.getuid():
            conn.close()
            raise TakeoverError(f"the process listening at {path} (pid {pid}) runs as uid "
                                f"{uid}, not as this user (uid {os.getuid()}): refused")
        conn.sendall(TAKEOVER_HELLO)
        # MSG_CMSG_CLOEXEC: descriptors arrive inheritable otherwise, and a child process
        # would keep the listening sockets open (and connections queued on them) after us.
        # (socket.recv_fds takes flags but does not pass them on: 3.11 to 3.13 at least.)
        received = array.array("i")
        message, ancillary, _flags, _addr = conn.recvmsg(
            65536, socket.CMSG_LEN(MAX_SOCKETS * received.itemsize), socket.MSG_CMSG_CLOEXEC)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received.frombytes(data[:len(data) - len(data) % received.itemsize])
        fds = list(received)
        while fds or message:
            if message.endswith(b"\n"):
                break
            more = conn.recv(65536)  # the rest of a long header (never a descriptor)
            if not more:
                break
            message += more
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        conn.close()
        raise TakeoverError(f"no running pooler answered at {path}: {exc}") from None
    sockets: list[socket.socket] = []
    refusal = None
    for fd in fds:
        if refusal is None:
            try:
                sockets.append(socket.socket(fileno=fd))
                continue
            except OSError as exc:
                refusal = f"it sent a descriptor that is no socket ({exc})"
        os.close(fd)
    try:
        header = json.loads(message)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        header = {"error": "the running pooler sent no description of its sockets"}
    if refusal is not None:
        header["error"] = refusal
    if "error" in header or not sockets:
        for sock in sockets:
            sock.close()
        conn.close()
        raise TakeoverError(f"the running pooler at {path} refused: "
                            f"{header.get('error', 'no listening sockets')}")
    for sock in sockets:
        sock.setblocking(False)
    conn.settimeout(None)
    return Takeover(conn, int(header.get("pid", 0)), sockets)
