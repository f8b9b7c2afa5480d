"""What one new connection costs the pooler: SCRAM logins, pgpilot against PgBouncer.

``pgbench -C`` (the churn case of ``bench/pooler.py``) mostly measures libpq's own SCRAM:
4,096 PBKDF2 rounds per connection on the client dwarf the pooler's part. This client does
the exchange with the salted password computed once, so the pooler is most of the work:
per login it connects, sends SSLRequest (answered N) and the StartupMessage, runs SCRAM-SHA-256,
waits for ReadyForQuery, runs ``SELECT 1`` and sends Terminate, one login after another.

For each pooler, in alternating rounds, it reports logins per second and the pooler's user and
system CPU per login (from /proc). Same PostgreSQL and pooler settings as bench/pooler.py:

    python bench/login_cpu.py                  # embedded PostgreSQL
    python bench/login_cpu.py --dsn postgresql://postgres@127.0.0.1:5432/postgres
    python bench/login_cpu.py --logging        # a log line per login and per leaving

``--baseline-src DIR`` measures pgpilot against another build of itself instead of PgBouncer
(DIR is a copy of ``src/`` with its compiled extension, e.g. from an older commit), paired in
the same alternating rounds, with the after/before ratio of each round:

    python bench/login_cpu.py --baseline-src /tmp/before/src
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pooler as bench


class RawScramClient:
    """Just enough of the protocol for a SCRAM login and one query."""

    def __init__(self, port: int, user: str, password: str, database: str) -> None:
        self.port, self.user, self.password, self.database = port, user, password, database
        self._salted: dict[tuple[bytes, int], bytes] = {}

    def _read(self, sock: socket.socket, buf: bytearray) -> tuple[bytes, bytes]:
        while True:
            if len(buf) >= 5:
                length = struct.unpack_from("!I", buf, 1)[0]
                if len(buf) >= 1 + length:
                    kind, body = bytes(buf[:1]), bytes(buf[5:1 + length])
                    del buf[:1 + length]
                    return kind, body
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("pooler closed the connection")
            buf += chunk

    def _until_ready(self, sock: socket.socket, buf: bytearray) -> None:
        while True:
            kind, body = self._read(sock, buf)
            if kind == b"E":
                raise RuntimeError(body.decode(errors="replace"))
            if kind == b"Z":
                return

    def login(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(struct.pack("!II", 8, 80877103))  # SSLRequest, as libpq sends
            if sock.recv(1) != b"N":
                raise RuntimeError("expected N to SSLRequest")
            body = (struct.pack("!I", 196608) + b"user\0" + self.user.encode() + b"\0database\0"
                    + self.database.encode() + b"\0\0")
            sock.sendall(struct.pack("!I", len(body) + 4) + body)
            buf = bytearray()
            kind, body = self._read(sock, buf)
            if kind != b"R" or struct.unpack_from("!I", body)[0] != 10:
                raise RuntimeError(f"expected AuthenticationSASL, got {kind!r}")
            first_bare = "n=,r=" + base64.b64encode(os.urandom(18)).decode()
            first = ("n,," + first_bare).encode()
            msg = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first
            sock.sendall(b"p" + struct.pack("!I", len(msg) + 4) + msg)
            kind, body = self._read(sock, buf)
            server_first = body[4:].decode()
            attrs = dict(a.split("=", 1) for a in server_first.split(","))
            salt, iterations = base64.b64decode(attrs["s"]), int(attrs["i"])
            salted = self._salted.get((salt, iterations))
            if salted is None:  # once per pooler: the point is the pooler's cost
                salted = self._salted[(salt, iterations)] = hashlib.pbkdf2_hmac(
                    "sha256", self.password.encode(), salt, iterations)
            client_key = hmac.digest(salted, b"Client Key", "sha256")
            without_proof = f"c=biws,r={attrs['r']}"
            auth_message = f"{first_bare},{server_first},{without_proof}".encode()
            signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
            proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
            final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
            sock.sendall(b"p" + struct.pack("!I", len(final) + 4) + final)
            self._until_ready(sock, buf)
            sock.sendall(b"Q" + struct.pack("!I", 13) + b"SELECT 1\0")
            self._until_ready(sock, buf)
            sock.sendall(b"X\0\0\0\4")


def user_sys_seconds(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def measure(kind: str, up: bench.Upstream, secret: str, logins: int,
            base: Path, logging: bool, baseline_src: str | None = None) -> dict[str, float]:
    case = bench.Case("login-cpu", "SCRAM logins", auth="scram-sha-256", logging=logging)
    if kind == "baseline":
        # The pooler process imports pgpilot from the baseline's source tree.
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(baseline_src)
        try:
            pooler = bench.start_pooler("pgpilot", case, up, secret, base)
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
    else:
        pooler = bench.start_pooler(kind, case, up, secret, base)
    try:
        client = RawScramClient(pooler.port, bench.BENCH_USER, bench.BENCH_PASSWORD,
                                bench.BENCH_DB)
        for _ in range(100):  # warm-up: server connections open, caches filled
            client.login()
        user0, sys0 = user_sys_seconds(pooler.pid)
        start = time.perf_counter()
        for _ in range(logins):
            client.login()
        elapsed = time.perf_counter() - start
        user1, sys1 = user_sys_seconds(pooler.pid)
    finally:
        pooler.stop()
    return {"logins_per_s": logins / elapsed, "user_us": (user1 - user0) / logins * 1e6,
            "sys_us": (sys1 - sys0) / logins * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL on 127.0.0.1 (superuser); default: embedded")
    parser.add_argument("--data-dir", help="embedded PostgreSQL data folder (kept, reused)")
    parser.add_argument("--logins", type=int, default=3000, help="measured logins per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--logging", action="store_true",
                        help="log_connections and log_disconnections on (both poolers' default)")
    parser.add_argument("--baseline-src",
                        help="compare with pgpilot imported from this src/ folder, not PgBouncer")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pgpilot-login-bench-"))
    tmp.chmod(0o755)
    up = bench.start_upstream(argparse.Namespace(dsn=args.dsn, data_dir=args.data_dir), tmp)
    try:
        secret = bench.prepare_data(up, 1, reuse=bool(args.dsn or args.data_dir))
        anchor = "baseline" if args.baseline_src else "pgbouncer"
        results: dict[str, list[dict[str, float]]] = {anchor: [], "pgpilot": []}
        for rnd in range(1, args.rounds + 1):
            for kind in results:
                got = measure(kind, up, secret, args.logins, tmp, args.logging,
                              args.baseline_src)
                results[kind].append(got)
                bench.log(f"{kind:9} r{rnd}: {got['logins_per_s']:7.0f} logins/s, "
                          f"user {got['user_us']:5.0f} us, sys {got['sys_us']:5.0f} us "
                          "per login")
        print(f"\n{'pooler':10} {'logins/s':>9} {'user us':>8} {'sys us':>7}  (medians)")
        med = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]}
               for k, rs in results.items()}
        for kind, m in med.items():
            print(f"{kind:10} {m['logins_per_s']:9.0f} {m['user_us']:8.0f} {m['sys_us']:7.0f}")
        b, p = med[anchor], med["pgpilot"]
        print(f"{'ratio P/B':10} {p['logins_per_s'] / b['logins_per_s']:8.2f}x "
              f"{p['user_us'] / b['user_us']:7.2f}x {p['sys_us'] / b['sys_us']:6.2f}x")
        # Paired: each round's pgpilot against the anchor measured right before it.
        cpu = [(q["user_us"] + q["sys_us"]) / (a["user_us"] + a["sys_us"])
               for a, q in zip(results[anchor], results["pgpilot"], strict=True)]
        print(f"paired CPU per login, pgpilot / {anchor}: median {statistics.median(cpu):.3f}, "
              f"rounds {' '.join(f'{r:.3f}' for r in cpu)}")
    finally:
        if up.embedded is not None:
            up.embedded.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
