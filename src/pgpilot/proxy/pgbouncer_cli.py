"""``pgpilot-pgbouncer``: PgBouncer's command line in front of ``pgpilot proxy``.

Systemd units, init scripts and tools written for PgBouncer call
``pgbouncer [-d] [-R] [-q] [-v] [-u user] [-V] [-h] config.ini``; this entry point takes
exactly that command line, so they run pgpilot unchanged (point ``ExecStart`` at it, or link
it as ``pgbouncer``)::

    -d, --daemon    run in the background (needs pidfile and logfile, as PgBouncer)
    -R, --reboot    online restart: take the listening sockets over from the running
                    pooler of this config (over its unix socket), which then finishes with
                    its clients as on SIGTERM (takeover.py)
    -q, --quiet     no log lines on stderr (the logfile still gets them)
    -v, --verbose   more log lines (repeatable)
    -u, --user U    switch to OS user U after start (only as root, or already U)
    -V, --version   print the version line and exit
    -h, --help      this help

The exit status and signals are those of ``pgpilot proxy``: SIGINT/SIGTERM stop, SIGHUP
reloads.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pgpilot import VERSION_LINE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgpilot-pgbouncer", add_help=False,
        description="pgpilot's pooler with PgBouncer's command line.")
    parser.add_argument("-d", "--daemon", action="store_true",
                        help="run in the background (needs pidfile and logfile)")
    parser.add_argument("-R", "--reboot", action="store_true",
                        help="online restart: take the running pooler's listening sockets "
                             "over")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no log lines on stderr")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log lines (repeatable)")
    parser.add_argument("-u", "--user", metavar="USER",
                        help="switch to this OS user after start (as root)")
    parser.add_argument("-V", "--version", action="version", version=VERSION_LINE,
                        help="print the version and exit")
    parser.add_argument("-h", "--help", action="help", help="show this help and exit")
    parser.add_argument("config", nargs="?", help="the pgbouncer.ini file")
    return parser


def switch_user(name: str) -> str | None:
    """Become OS user ``name`` (PgBouncer's -u); an error text, or None when done."""
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return f"could not find user '{name}'"
    if os.geteuid() == entry.pw_uid:
        return None
    if os.geteuid() != 0:
        return f"-u {name}: only root can switch to another user"
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    return None


def daemonize() -> None:
    """Detach as PgBouncer's -d does: fork, new session, fork again, stdio to /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.config:
        print("pgpilot-pgbouncer: need a config file (pgpilot-pgbouncer [options] "
              "config.ini)", file=sys.stderr)
        return 1
    from pgpilot.proxy import command
    from pgpilot.proxy.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.user:
        problem = switch_user(args.user)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    if args.daemon:
        if not config.pidfile:
            print("error: daemon needs pidfile configured", file=sys.stderr)
            return 1
        if not config.logfile:
            print("error: daemon needs logging configured (logfile)", file=sys.stderr)
            return 1
        daemonize()
    proxy_args = argparse.Namespace(
        config=args.config, check=False, strict=False, listen=None, port=None, data_dir=None,
        pool_mode=None, verbose=args.verbose, quiet=False,
        stderr=not (args.quiet or args.daemon), takeover=args.reboot)
    return command.run(proxy_args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
