"""The pooler's log lines: log_lines writes the lines logger.info would, a batch at a time."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgpilot.proxy.logs import LOG_FORMAT, LogFormatter, direct_target, log_lines

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


@pytest.fixture()
def logger() -> Iterator[logging.Logger]:
    """A logger under a parent with the CLI's handler, cut off from the root (where pytest
    keeps its own handlers). The parent propagates, to a top logger that is not registered
    with logging's manager: pytest 9.2 adds its capture handler to every registered logger
    that does not propagate, which would be one more handler on the way."""
    parent = logging.getLogger("pgpilot.test_logs")
    parent.setLevel(logging.INFO)
    above = parent.parent
    parent.parent = logging.Logger("pgpilot-test-logs-top")
    child = logging.getLogger("pgpilot.test_logs.fastpath")
    yield child
    for each in (parent, child):
        for handler in list(each.handlers):
            each.removeHandler(handler)
        for filt in list(each.filters):
            each.removeFilter(filt)
    parent.parent = above


def cli_handler(level: int = logging.NOTSET) -> tuple[logging.StreamHandler[io.StringIO],
                                                      io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogFormatter())
    handler.setLevel(level)
    return handler, stream


MESSAGES = ["C-1(app/alice@127.0.0.1:5000) login ok", "C-2(app/bob@::1:5001) login ok",
            "C-1(app/alice@127.0.0.1:5000) closing: client closed the connection",
            "odd % text %s %(name)s"]


def without_stamps(text: str) -> list[str]:
    lines = text.splitlines()
    assert all(re.match(STAMP + " ", line) for line in lines), lines
    return [line[24:] for line in lines]


def test_batch_lines_are_the_records_lines(logger: logging.Logger) -> None:
    """Same text as one logger.info per message (bar the clock), in one write."""
    handler, batched = cli_handler()
    logger.parent.addHandler(handler)  # type: ignore[union-attr]
    writes = []
    original = batched.write
    batched.write = lambda text: writes.append(text) or original(text)  # type: ignore
    log_lines(logger, logging.INFO, MESSAGES)
    assert len(writes) == 1  # the batch went out at once, not record by record
    single_handler, single = cli_handler()
    logger.parent.removeHandler(handler)  # type: ignore[union-attr]
    logger.parent.addHandler(single_handler)  # type: ignore[union-attr]
    for message in MESSAGES:
        logger.info("%s", message)
    assert without_stamps(batched.getvalue()) == without_stamps(single.getvalue())
    assert without_stamps(batched.getvalue())[0] == f"{os.getpid()} INFO {MESSAGES[0]}"
    assert len(batched.getvalue().splitlines()) == len(MESSAGES)


def test_the_time_text_is_the_standard_formatters() -> None:
    ours, standard = LogFormatter(), logging.Formatter(LOG_FORMAT)
    for created in (1733300000.001, 1733300000.999, 1733300001.0, 1751234567.75):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
        assert ours.time_text(created) == standard.formatTime(record)


def test_a_filter_or_another_handler_gets_each_record(logger: logging.Logger) -> None:
    """Whatever looks at records one by one still does: a filter drops what it drops, a
    handler of another kind gets one record per message."""
    handler, stream = cli_handler()
    logger.parent.addHandler(handler)  # type: ignore[union-attr]
    logger.addFilter(lambda record: "bob" not in record.getMessage())
    log_lines(logger, logging.INFO, MESSAGES)
    assert "bob" not in stream.getvalue()
    assert len(stream.getvalue().splitlines()) == len(MESSAGES) - 1

    logger.filters.clear()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger.addHandler(Keep())
    log_lines(logger, logging.INFO, MESSAGES)
    assert [r.getMessage() for r in records] == MESSAGES
    assert len(stream.getvalue().splitlines()) == 2 * len(MESSAGES) - 1


def test_levels_hold(logger: logging.Logger) -> None:
    """A handler above the level writes nothing; a logger above it drops the batch."""
    quiet, quiet_stream = cli_handler(logging.WARNING)
    loud, loud_stream = cli_handler()
    logger.parent.addHandler(quiet)  # type: ignore[union-attr]
    logger.parent.addHandler(loud)  # type: ignore[union-attr]
    log_lines(logger, logging.INFO, MESSAGES)
    assert quiet_stream.getvalue() == "" and len(loud_stream.getvalue().splitlines()) == 4
    logger.setLevel(logging.WARNING)
    log_lines(logger, logging.INFO, MESSAGES)
    assert len(loud_stream.getvalue().splitlines()) == 4
    logger.setLevel(logging.NOTSET)


def test_a_failing_stream_is_reported_not_raised(logger: logging.Logger,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    handler, stream = cli_handler()
    stream.close()  # writes raise ValueError
    logger.parent.addHandler(handler)  # type: ignore[union-attr]
    log_lines(logger, logging.INFO, MESSAGES)  # no exception: logging's handleError reports
    assert "Logging error" in capsys.readouterr().err


def file_handler(path: Path, encoding: str | None = "utf-8") -> logging.FileHandler:
    handler = logging.FileHandler(path, encoding=encoding)
    handler.setFormatter(LogFormatter())
    return handler


def test_direct_target_is_a_copy_of_the_files_descriptor(logger: logging.Logger,
                                                         tmp_path: Path) -> None:
    """Plain CLI handlers on files: a copy of each file's descriptor, which appends after
    what Python wrote (flushed first), and the line's head with this process's pid."""
    handler = file_handler(tmp_path / "a.log")
    logger.parent.addHandler(handler)  # type: ignore[union-attr]
    handler.stream.write("from python\n")  # unflushed: must reach the file first
    target = direct_target(logger, logging.INFO)
    assert target is not None
    fds, head = target
    assert len(fds) == 1 and head == f" {os.getpid()} INFO ".encode()
    try:
        assert fds[0] != handler.stream.fileno()  # a copy: closing it leaves Python's open
        os.write(fds[0], b"from the copy\n")
    finally:
        os.close(fds[0])
    handler.close()
    assert (tmp_path / "a.log").read_text() == "from python\nfrom the copy\n"


@pytest.mark.parametrize("what", ["StringIO", "latin-1", "filter", "terminator", "level"])
def test_no_direct_target_where_python_must_write(logger: logging.Logger, tmp_path: Path,
                                                  what: str) -> None:
    """No descriptor (a StringIO), a file in another encoding, a filter, another line end, or
    a level the logger drops: None, and Python logs the lines itself."""
    handler: logging.Handler
    if what == "StringIO":
        handler = cli_handler()[0]
    else:
        handler = file_handler(tmp_path / "b.log", "latin-1" if what == "latin-1" else "utf-8")
    if what == "filter":
        handler.addFilter(lambda record: True)
    if what == "terminator":
        handler.terminator = "\r\n"  # type: ignore[attr-defined]
    if what == "level":
        logger.setLevel(logging.WARNING)
    logger.parent.addHandler(handler)  # type: ignore[union-attr]
    try:
        assert direct_target(logger, logging.INFO) is None
    finally:
        handler.close()
        logger.setLevel(logging.NOTSET)
