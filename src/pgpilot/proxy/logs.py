"""The pooler's log lines: the CLI's format, and a cheap way to write many lines at once.

With ``log_connections`` and ``log_disconnections`` on (PgBouncer's defaults, and ours) the
pooler writes two lines per connection. Through ``logging.Logger.info`` a line costs about
10 us here (a LogRecord, the handler chain, a formatter pass, a write and a flush each), which
under connection churn is a tenth of the pooler's CPU. ``log_lines`` writes a batch of lines
with one prefix, one write and one flush per handler, when the handlers are the ones the CLI
sets up (``setup_handlers``) and nothing that could see single records (a filter, another
handler, a formatter of another shape) is in the way; otherwise it logs line by line.
``direct_target`` lets the fast path's engine write its own clients' lines to those handlers'
files itself, the same text, with no Python in between.
"""

from __future__ import annotations

import codecs
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, TextIO

LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(message)s"


class LogFormatter(logging.Formatter):
    """logging.Formatter with the default time format, the date and time text made once a
    second: with log_connections on, the pooler writes two lines per connection."""

    def __init__(self, fmt: str = LOG_FORMAT) -> None:
        super().__init__(fmt)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.time_text(record.created, record.msecs)

    def time_text(self, created: float, msecs: float | None = None) -> str:
        """``created`` as %(asctime)s with no datefmt: local time to the millisecond."""
        second = int(created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        if msecs is None:  # as logging.LogRecord's msecs
            msecs = (created - second) * 1000
        return f"{self._text},{int(msecs):03d}"  # as default_msec_format


# The level the command line chose (setup_handlers): what verbose = 0 returns to at RELOAD.
started_level = logging.INFO


def verbose_changed(verbose: int) -> None:
    """``verbose`` changed at RELOAD or console SET: debug lines from now on, or the level
    the pooler started with again."""
    logging.getLogger().setLevel(logging.DEBUG if verbose else started_level)


def setup_handlers(level: int, logfile: str | None, stream: TextIO | None = None,
                   to_stream: bool = True) -> None:
    """The CLI's logging: lines in LOG_FORMAT to stderr (or ``stream``; not at all with
    ``to_stream`` False, PgBouncer's -q), and to ``logfile``."""
    handlers: list[logging.Handler] = [logging.StreamHandler(stream)] if to_stream else []
    if logfile:
        handlers.append(logging.FileHandler(logfile))
    global started_level
    started_level = level
    formatter = LogFormatter()
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=handlers, force=True)
    # What the format does not print is not gathered (the logging HOWTO's "Optimization").
    logging._srcfile = None  # type: ignore[attr-defined]  # caller's file and line
    logging.logThreads = False
    logging.logMultiprocessing = False


def _plain_handlers(logger: logging.Logger, level: int) -> list[logging.StreamHandler[Any]] | None:
    """The handlers a record of ``level`` from ``logger`` would reach, if each is a plain
    stream or file handler with a LogFormatter of LOG_FORMAT and no filter sees records on the
    way; None if anything else is there (the caller then logs record by record)."""
    found: list[logging.StreamHandler[Any]] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if type(handler) not in (logging.StreamHandler, logging.FileHandler) \
                    or handler.filters or type(handler.formatter) is not LogFormatter \
                    or handler.formatter._fmt != LOG_FORMAT:
                return None
            if level >= handler.level:
                assert isinstance(handler, logging.StreamHandler)
                if handler.stream is None:  # a FileHandler with delay=True, not yet opened
                    return None
                found.append(handler)
        if not current.propagate:
            break
        current = current.parent
    return found or None  # none: logging's lastResort decides, record by record


def log_lines(logger: logging.Logger, level: int, messages: Sequence[str]) -> None:
    """Log each of ``messages`` (finished text, no %-arguments) at ``level``: the same lines as
    ``logger.log(level, message)`` for each, at the same moment, in one write per handler."""
    if not messages or not logger.isEnabledFor(level):
        return
    handlers = _plain_handlers(logger, level)
    if handlers is None:
        for message in messages:
            logger.log(level, "%s", message)
        return
    created = time.time()
    head = f" {os.getpid()} {logging.getLevelName(level)} "
    for handler in handlers:
        formatter = handler.formatter
        assert isinstance(formatter, LogFormatter)
        prefix = formatter.time_text(created) + head
        end = handler.terminator
        text = "".join([f"{prefix}{message}{end}" for message in messages])
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.flush()
        except Exception:
            handler.handleError(logger.makeRecord(logger.name, level, "(log_lines)", 0,
                                                  "%d lines", (len(messages),), None))
        finally:
            handler.release()


def direct_target(logger: logging.Logger, level: int) -> tuple[list[int], bytes] | None:
    """Where code outside Python may write ``logger``'s lines of ``level`` itself, as
    ``log_lines`` would: copies of the handlers' file descriptors (the caller owns them) and
    the text between a line's time and its message (`` <pid> <LEVEL> ``). None when
    ``log_lines`` would not write them straight to files itself, or a handler's file is not
    UTF-8 or not a file descriptor, or ends lines otherwise than with a newline.

    The copies keep writing to the files the handlers have now: call again (and replace the
    copies) when the handlers change."""
    if not logger.isEnabledFor(level):
        return None
    handlers = _plain_handlers(logger, level)
    if handlers is None:
        return None
    streams = []
    for handler in handlers:
        stream = handler.stream
        try:
            encoding = codecs.lookup(getattr(stream, "encoding", None) or "").name
            fileno = stream.fileno()
        except (LookupError, AttributeError, OSError, ValueError):
            return None
        if encoding != "utf-8" or handler.terminator != "\n":
            return None
        streams.append((handler, fileno))
    fds: list[int] = []
    try:
        for handler, fileno in streams:
            handler.flush()  # what Python wrote is out before anything written to the copy
            fds.append(os.dup(fileno))
    except (OSError, ValueError):
        for fd in fds:
            os.close(fd)
        return None
    return fds, f" {os.getpid()} {logging.getLevelName(level)} ".encode()
