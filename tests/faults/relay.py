"""A fault-injecting TCP relay for tests: pooler <-> relay <-> PostgreSQL, on 127.0.0.1.

Every connection the relay accepts is relayed to ``target`` by two threads. The server's side
(target -> client) is read as PostgreSQL protocol messages (type, length, body), so that a
test can rewrite one whole message (``rewrite_server``), whatever the TCP chunking. Faults,
switched on and off while traffic runs:

- ``delay``: seconds slept before each chunk is passed on (a slow network);
- ``stall()`` / ``resume()``: nothing passes either way (a stalled network), connections stay;
- ``reset_all()``: every relayed connection is reset (RST, as a dropped NAT entry or a
  crashed host answers);
- ``refuse``: new connections are accepted and reset at once;
- ``unlisten()`` / ``listen()``: the port refuses connections (nothing listens, as when
  PostgreSQL is down), then listens again, on the same port;
- ``end_after_rewrite``: set by ``rewrite_server``, the connection it rewrites ends (the pooler
  reads what was passed on, then the close) and PostgreSQL's next answers never come, as when
  a server process exits between two messages.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN. shutdown(SHUT_RD) first wakes the relay thread blocked
    in recv() on it: until that call returns, close() would not release the socket (no RST,
    the connection stays up and swallows what comes: a black hole, not a reset)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


class FaultRelay:
    """A relay listening on ``self.port`` (127.0.0.1) that forwards to ``target``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, int(target_port))
        self.delay = 0.0
        self.refuse = False
        # Called with each whole server message (type byte, length, body); returns the bytes
        # to pass on instead. None: pass everything unchanged.
        self.rewrite_server: Callable[[bytes], bytes] | None = None
        self.end_after_rewrite = False
        self.accepted = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    # -- faults ------------------------------------------------------------------------
    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def reset_all(self) -> int:
        """Reset every relayed connection; returns how many pairs were open."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            _reset(a)
            _reset(b)
        return len(pairs)

    def unlisten(self) -> None:
        # shutdown() first: close() alone does not wake a thread blocked in accept().
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(5)

    def listen(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def open_pairs(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._closed = True
        self.unlisten()
        self.resume()
        self.reset_all()

    # -- relaying ----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.refuse:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        pending = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                if self.delay:
                    time.sleep(self.delay)
                if from_server and self.rewrite_server is not None:
                    pending += data
                    data, pending = self._rewrite(pending)
                elif pending:
                    data, pending = pending + data, b""
                if data:
                    dst.sendall(data)
                if from_server and self.end_after_rewrite:
                    self.end_after_rewrite = False
                    break  # (finally: the pooler reads the close after what was passed on)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                self._pairs = [p for p in self._pairs if src not in p]

    def _rewrite(self, buf: bytes) -> tuple[bytes, bytes]:
        """Whole messages of ``buf`` rewritten, and the incomplete rest."""
        out = bytearray()
        pos = 0
        rewrite = self.rewrite_server
        while len(buf) - pos >= 5:
            length = int.from_bytes(buf[pos + 1:pos + 5], "big")
            if len(buf) - pos < 1 + length:
                break
            msg = buf[pos:pos + 1 + length]
            out += rewrite(msg) if rewrite is not None else msg
            pos += 1 + length
        return bytes(out), buf[pos:]
