"""pytest plugin loaded by bench/doctor_realworld.py into a real project's test suite.

It records, per test, every ``NPlusOneWarning`` pgpilot's plugin emitted (``--nplusone=warn``)
and every test outcome, with whether a failure was pgpilot's ``NPlusOneError``
(``--nplusone=raise``), and writes them as JSON to ``$PGPILOT_COLLECT_OUT`` when the session
ends. It reads warnings rather than pgpilot's objects so that it works the same with any
version of pgpilot (the one before a change and the one after).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

_warnings: list[dict[str, Any]] = []
_outcomes: dict[str, dict[str, Any]] = {}


def pytest_warning_recorded(warning_message: Any, when: str, nodeid: str, location: Any) -> None:
    category = getattr(warning_message, "category", None)
    if category is None or category.__name__ != "NPlusOneWarning":
        return
    _warnings.append(
        {
            "nodeid": nodeid,
            "when": when,
            "message": str(warning_message.message),
            "filename": str(warning_message.filename),
            "lineno": int(warning_message.lineno or 0),
        }
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _outcomes.setdefault(report.nodeid, {"outcome": "passed", "nplusone_error": False})
    if report.when == "call" or report.failed or report.skipped:
        if report.failed:
            entry["outcome"] = "failed" if report.when == "call" else "error"
            text = str(report.longrepr) if report.longrepr is not None else ""
            if "NPlusOneError" in text:
                entry["nplusone_error"] = True
                entry["error_text"] = text[-4000:]
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get("PGPILOT_COLLECT_OUT")
    if not out:
        return
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"warnings": _warnings, "outcomes": _outcomes}, handle, indent=1)
