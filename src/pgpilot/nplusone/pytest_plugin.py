"""pytest plugin: the query doctor for a whole suite, a fixture, and a marker.

* ``pytest --nplusone=raise`` fails every test whose body runs an N+1, a write loop, a
  duplicate, a large result, a deep OFFSET, a wrong-type comparison or a missing
  ``contains_eager``; the advisory kinds (``insight.ADVISORY_KINDS``: unused eager loads,
  correlated subqueries) are listed in the summary instead,
  unless ``--nplusone-kinds`` names them. ``--nplusone=warn`` fails nothing.
* Both print one summary at the end of the session, grouped by call site and relationship (or
  statement), with the number of tests each group appeared in; ``--nplusone-report=FILE``
  writes the same as JSON.
* Each request a test sends through Flask's / Werkzeug's test client, httpx's ASGI transport
  or Starlette's ``TestClient`` is a scope of its own (``nplusone.testclients``).
* ``nplusone`` fixture: a :class:`~pgpilot.nplusone.Report` collecting over the test, to
  assert on (``assert not nplusone.findings``).
* ``@pytest.mark.allow_nplusone``: a test that means it is left alone by ``--nplusone``.

Fixtures' set-up and tear-down are not watched: only what the test itself runs.

Registered through the ``pytest11`` entry point, so every suite in an environment with pgpilot
loads it: without ``--nplusone`` it only adds the options, the fixture and the marker, and
imports nothing but the detector's small core.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pgpilot.insight.detector import ADVISORY_KINDS, FINDING_KINDS, Finding
from pgpilot.nplusone.core import NPlusOneError, Report, detect

__all__ = ["nplusone"]

SUMMARY_LINES = 40


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nplusone", "pgpilot query doctor")
    group.addoption(
        "--nplusone",
        choices=("raise", "warn"),
        default=None,
        help="watch every test's queries: fail the test (raise) or only report (warn) "
        "N+1s, write loops, duplicates and the doctor's other findings",
    )
    group.addoption(
        "--nplusone-threshold",
        type=int,
        default=None,
        help="distinct parameter sets of one statement, from one loop, that make an N+1 "
        "(default 3)",
    )
    group.addoption(
        "--nplusone-kinds",
        default=None,
        help="comma-separated finding kinds that fail a test in raise mode, or 'all' "
        "(default: all but " + ", ".join(sorted(ADVISORY_KINDS)) + ")",
    )
    group.addoption(
        "--nplusone-report",
        default=None,
        metavar="FILE",
        help="write every finding, grouped, with the tests it appeared in, as JSON",
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


@dataclass
class _Group:
    """One finding as it recurs across tests: same kind, call site and relationship/statement."""

    kind: str
    callsite: str
    subject: str
    example: Finding
    tests: list[str] = field(default_factory=list)
    executions: int = 0
    failed: bool = False


class _Session:
    """What the plugin gathered over the session."""

    def __init__(self, config: pytest.Config) -> None:
        self.mode: str = config.getoption("nplusone")
        self.raise_kinds = _raise_kinds(config.getoption("nplusone_kinds", None))
        self.groups: dict[tuple[str, str, str], _Group] = {}
        self.tests_with_findings: set[str] = set()
        self.failed_tests: set[str] = set()

    def add(self, nodeid: str, findings: list[Finding], failing: list[Finding]) -> None:
        failing_ids = {id(finding) for finding in failing}
        for finding in findings:
            subject = finding.relationship or " ".join(finding.sql.split())[:120]
            key = (finding.kind, finding.callsite, subject)
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = _Group(finding.kind, finding.callsite, subject, finding)
            if nodeid not in group.tests:
                group.tests.append(nodeid)
            group.executions += finding.count
            group.failed = group.failed or id(finding) in failing_ids
            self.tests_with_findings.add(nodeid)
        if failing:
            self.failed_tests.add(nodeid)

    def ordered(self) -> list[_Group]:
        return sorted(self.groups.values(), key=lambda group: (-len(group.tests), group.kind))


def _raise_kinds(option: str | None) -> frozenset[str]:
    if option is None:
        return frozenset(FINDING_KINDS) - ADVISORY_KINDS
    if option.strip() == "all":
        return frozenset(FINDING_KINDS)
    kinds = frozenset(part.strip() for part in option.split(",") if part.strip())
    unknown = sorted(kinds - set(FINDING_KINDS))
    if unknown:
        raise pytest.UsageError(
            f"--nplusone-kinds: unknown kind(s) {', '.join(unknown)}; "
            f"known: {', '.join(FINDING_KINDS)}"
        )
    return kinds


_SESSION_KEY = pytest.StashKey[_Session]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_nplusone: this test runs N+1 queries on purpose; --nplusone leaves it alone",
    )
    if config.getoption("nplusone", None) is not None:
        config.stash[_SESSION_KEY] = _Session(config)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    session = item.config.stash.get(_SESSION_KEY, None)
    if session is None or item.get_closest_marker("allow_nplusone") is not None:
        return (yield)
    from pgpilot.nplusone import testclients

    testclients.install()
    detection = detect(
        item.config.getoption("nplusone_threshold", None),
        "collect",
        allow_callsites=item.config.getini("nplusone_allow_callsites"),
        allow_relationships=item.config.getini("nplusone_allow_relationships"),
    )
    with detection as report:
        result = yield
    findings = report.findings
    failing = (
        [f for f in findings if f.kind in session.raise_kinds and not _tests_own_doing(f, item)]
        if session.mode == "raise"
        else []
    )
    session.add(item.nodeid, findings, failing)
    if failing:
        raise NPlusOneError(failing)
    return result


_WRITE_LOOPS = frozenset({"insert_loop", "update_loop", "delete_loop"})


def _tests_own_doing(finding: Finding, item: pytest.Item) -> bool:
    """A finding the test makes, not the application: listed, but it fails no test unless
    ``--nplusone-kinds`` names its kind explicitly.

    * a ``duplicate`` whose call site is the test's own file (the test reading the state it
      asserts on, before and after an action), or whose first execution and repeat were
      started from two lines of the test's file (the test calling the code twice: each
      call asks once);
    * a write loop whose call site is the test's own file: the test setting up its rows.
    """
    if finding.kind not in _WRITE_LOOPS and finding.kind != "duplicate":
        return False
    if not finding.callsite:
        return False
    named = item.config.getoption("nplusone_kinds", None) or ""
    if finding.kind in (part.strip() for part in named.split(",")):
        return False
    try:
        test_file = Path(str(item.path)).resolve()
        if _in_file(finding.callsite, test_file):
            return True
        if finding.kind != "duplicate":
            return False
        first = next((p for p in finding.first_stack if _in_file(p, test_file)), None)
        repeat = next((p for p in finding.callers if _in_file(p, test_file)), None)
    except (OSError, ValueError):
        return False
    return first is not None and repeat is not None and first != repeat


def _in_file(place: str, path: Path) -> bool:
    """Whether ``place`` (``"file.py:LINE"``) is a line of ``path``."""
    return Path(place.rpartition(":")[0]).resolve() == path


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = config.stash.get(_SESSION_KEY, None)
    if session is None:
        return
    groups = session.ordered()
    write = terminalreporter.write_line
    terminalreporter.section("pgpilot query doctor")
    if not groups:
        write("no query problems found")
    else:
        write(
            f"{len(groups)} problem(s) at {len({g.callsite for g in groups})} call site(s), "
            f"in {len(session.tests_with_findings)} test(s)"
            + (
                f"; {len(session.failed_tests)} test(s) failed on them"
                if session.mode == "raise"
                else ""
            )
        )
        for group in groups[:SUMMARY_LINES]:
            mark = "FAIL" if group.failed else ("info" if group.kind in ADVISORY_KINDS else "warn")
            write(f"  [{mark}] {len(group.tests)} test(s): {group.example.describe()}")
        if len(groups) > SUMMARY_LINES:
            write(f"  ... and {len(groups) - SUMMARY_LINES} more (--nplusone-report=FILE has all)")
    path = config.getoption("nplusone_report", None)
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(_report_json(session), handle, indent=1)
        write(f"query doctor report written to {path}")


def _report_json(session: _Session) -> dict[str, Any]:
    return {
        "mode": session.mode,
        "raise_kinds": sorted(session.raise_kinds),
        "tests_with_findings": len(session.tests_with_findings),
        "failed_tests": sorted(session.failed_tests),
        "groups": [
            {
                "kind": group.kind,
                "callsite": group.callsite,
                "callers": list(group.example.callers),
                "relationship": group.example.relationship,
                "sql": group.example.sql,
                "fingerprint": group.example.fingerprint,
                "suggestion": group.example.suggestion,
                "detail": group.example.detail,
                "message": group.example.describe(),
                "executions": group.executions,
                "failed": group.failed,
                "tests": group.tests,
            }
            for group in session.ordered()
        ],
    }


@pytest.fixture
def nplusone(request: pytest.FixtureRequest) -> Iterator[Report]:
    """A report of the queries this test runs (collect mode): assert on its findings."""
    from pgpilot.nplusone import testclients

    testclients.install()
    with detect(request.config.getoption("nplusone_threshold", None)) as report:
        yield report
