"""Every ``pgpilot.X`` a user is told about exists.

``help(pgpilot)``, every module's docstring and every fix the N+1 / duplicate detector suggests
may only name modules (or attributes) that import today: a newcomer who types what they read
must not meet a ModuleNotFoundError.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from types import ModuleType
from typing import get_args

import pgpilot
from pgpilot.insight import FindingKind, QueryEvent, suggest_fix

DOTTED = re.compile(r"\bpgpilot(?:\.[A-Za-z_]\w*)+")


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` is an importable module or an attribute reached from one."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def pgpilot_modules() -> list[ModuleType]:
    modules: list[ModuleType] = [pgpilot]
    for info in pkgutil.walk_packages(pgpilot.__path__, "pgpilot."):
        if info.name.endswith("__main__"):  # importing it runs the command line
            continue
        modules.append(importlib.import_module(info.name))
    return modules


def test_resolves_tells_a_missing_module_from_a_present_one() -> None:
    assert resolves("pgpilot.batch.sql.rows_by_key")
    assert resolves("pgpilot.cache.Cache")
    assert not resolves("pgpilot.no_such_module")
    assert not resolves("pgpilot.batch.no_such_name")


def test_help_pgpilot_names_the_toolkit_modules_that_exist() -> None:
    named = set(DOTTED.findall(pgpilot.__doc__ or ""))
    assert {"pgpilot.batch", "pgpilot.nplusone", "pgpilot.explain", "pgpilot.cache"} <= named
    assert [name for name in sorted(named) if not resolves(name)] == []


def test_every_module_docstring_names_only_what_exists() -> None:
    missing = [
        f"{module.__name__}: {name}"
        for module in pgpilot_modules()
        for name in sorted(set(DOTTED.findall(module.__doc__ or "")))
        if not resolves(name)
    ]
    assert missing == []


def test_every_suggested_fix_names_only_what_exists() -> None:
    events = [
        QueryEvent("f1", "SELECT * FROM orders WHERE customer_id = $1", 1),
        QueryEvent("f2", "SELECT * FROM orders WHERE customer_id = $1 OR total > $2", 1),
        QueryEvent("f3", "INSERT INTO orders (total) VALUES ($1)", 1, command="write"),
        QueryEvent("f4", "SELECT * FROM a", 1, loader_option="selectinload(A.b)"),
    ]
    texts = [suggest_fix(kind, event) for kind in get_args(FindingKind) for event in events]
    named = {name for text in texts for name in DOTTED.findall(text)}
    assert "pgpilot.batch" in named  # the texts do point somewhere
    assert [name for name in sorted(named) if not resolves(name)] == []
