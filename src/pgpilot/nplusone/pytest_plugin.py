"""pytest plugin: N+1 detection for a whole suite, a fixture, and a marker.

* ``pytest --nplusone=raise`` fails every test whose body runs an N+1, a duplicate or an unused
  eager load; ``--nplusone=warn`` reports them as warnings at their call sites. Fixtures'
  set-up and tear-down are not watched: only what the test itself runs.
* ``nplusone`` fixture: a :class:`~pgpilot.nplusone.Report` collecting over the test, to
  assert on (``assert not nplusone.findings``).
* ``@pytest.mark.allow_nplusone``: a test that means it is left alone by ``--nplusone``.

Registered through the ``pytest11`` entry point, so every suite in an environment with pgpilot
loads it: without ``--nplusone`` it only adds the option, the fixture and the marker, and
imports nothing but the detector's small core.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import pytest

from pgpilot.nplusone.core import NPlusOneError, Report, detect, emit_warning

__all__ = ["nplusone"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nplusone", "pgpilot N+1 detector")
    group.addoption(
        "--nplusone",
        choices=("raise", "warn"),
        default=None,
        help="watch every test's queries: fail the test (raise) or warn on N+1s, "
        "duplicates and unused eager loads",
    )
    group.addoption(
        "--nplusone-threshold",
        type=int,
        default=None,
        help="distinct parameter sets of one statement that make an N+1 (default 3)",
    )
    parser.addini(
        "nplusone_allow_callsites",
        type="linelist",
        default=[],
        help="call site globs ('path/file.py:*') --nplusone ignores",
    )
    parser.addini(
        "nplusone_allow_relationships",
        type="linelist",
        default=[],
        help="relationship globs ('Customer.orders') --nplusone ignores",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_nplusone: this test runs N+1 queries on purpose; --nplusone leaves it alone",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    mode = item.config.getoption("nplusone", None)
    if mode is None or item.get_closest_marker("allow_nplusone") is not None:
        return (yield)
    detection = detect(
        item.config.getoption("nplusone_threshold", None),
        "collect",
        allow_callsites=item.config.getini("nplusone_allow_callsites"),
        allow_relationships=item.config.getini("nplusone_allow_relationships"),
    )
    with detection as report:
        result = yield
    findings = report.findings
    if findings:
        if mode == "raise":
            raise NPlusOneError(findings)
        for finding in findings:
            emit_warning(finding)
    return result


@pytest.fixture
def nplusone(request: pytest.FixtureRequest) -> Iterator[Report]:
    """A report of the queries this test runs (collect mode): assert on its findings."""
    with detect(request.config.getoption("nplusone_threshold", None)) as report:
        yield report
