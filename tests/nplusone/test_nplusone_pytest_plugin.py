"""The pytest plugin, run on a small suite of its own (pytester) against real PostgreSQL."""

from __future__ import annotations

import asyncpg  # noqa: F401 - see below
import pytest
import sqlalchemy.dialects.postgresql.asyncpg
import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401
from nplusone_models import Database

pytest_plugins = ["pytester"]

# The inner suites run in this process; pytester drops the modules a run imported when it
# ends, and importing a C extension (asyncpg's protocol) a second time crashes the process.
# Imported here first, the drivers stay loaded across runs.

INNER_SUITE = """
import os

import pytest
from nplusone_models import Customer
from sqlalchemy import create_engine, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session, selectinload

engine = create_engine(os.environ["PGPILOT_NPLUSONE_URL"])


def lazy_loop():
    with Session(engine) as session:
        for customer in session.scalars(select(Customer)):
            assert customer.orders


def test_has_an_n_plus_one():
    lazy_loop()


@pytest.mark.allow_nplusone
def test_means_it():
    lazy_loop()


def test_fixed():
    with Session(engine) as session:
        query = select(Customer).options(selectinload(Customer.orders))
        for customer in session.scalars(query):
            assert customer.orders


@pytest.mark.allow_nplusone
def test_fixture_reports(nplusone):
    lazy_loop()
    [finding] = nplusone.findings
    assert finding.suggestion == "selectinload(Customer.orders)"


async def test_async_n_plus_one():
    async_engine = create_async_engine(os.environ["PGPILOT_NPLUSONE_ASYNC_URL"])
    try:
        async with AsyncSession(async_engine) as session:
            for customer in (await session.scalars(select(Customer))).all():
                assert await customer.awaitable_attrs.orders
    finally:
        await async_engine.dispose()
"""

INNER_OPTIONS = (
    "-p",
    "no:cacheprovider",
    "-o",
    "asyncio_mode=auto",
    "-o",
    "asyncio_default_fixture_loop_scope=function",
)


@pytest.fixture
def inner_suite(
    pytester: pytest.Pytester, database: Database, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    monkeypatch.setenv("PGPILOT_NPLUSONE_URL", database.sqlalchemy_url)
    monkeypatch.setenv("PGPILOT_NPLUSONE_ASYNC_URL", database.async_sqlalchemy_url)
    pytester.makepyfile(test_inner=INNER_SUITE)
    return pytester


def test_raise_fails_the_tests_that_run_an_n_plus_one(inner_suite: pytest.Pytester) -> None:
    result = inner_suite.runpytest(*INNER_OPTIONS, "--nplusone=raise", "-rf")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(
        [  # the summary line is cut to the terminal's width: match the start of the name
            "FAILED test_inner.py::test_has_an_n_plus_one - *NPlusOne*",
            "FAILED test_inner.py::test_async_n_plus_one - *NPlusOne*",
        ],
        consecutive=False,
    )
    result.stdout.fnmatch_lines(["*N+1: 6 executions*fix: selectinload(Customer.orders)*"])


def test_warn_reports_one_summary_without_failing(inner_suite: pytest.Pytester) -> None:
    result = inner_suite.runpytest(*INNER_OPTIONS, "--nplusone=warn")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(
        [
            "*pgpilot query doctor*",
            "2 problem(s) at 2 call site(s), in 2 test(s)",
            "*[[]warn[]] 1 test(s): N+1: 6 executions*at test_inner.py:15*"
            "fix: selectinload(Customer.orders)*",
        ]
    )
    assert "NPlusOneWarning" not in result.stdout.str()  # one summary, not a warning per test


def test_without_the_option_nothing_changes(inner_suite: pytest.Pytester) -> None:
    result = inner_suite.runpytest(*INNER_OPTIONS)
    result.assert_outcomes(passed=5)
    assert "NPlusOne" not in result.stdout.str()


def test_threshold_option(inner_suite: pytest.Pytester) -> None:
    result = inner_suite.runpytest(
        *INNER_OPTIONS, "--nplusone=raise", "--nplusone-threshold=50", "-k", "has_an"
    )
    result.assert_outcomes(passed=1)


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*INNER_OPTIONS, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.allow_nplusone*"])


def test_ini_allowlist_lets_a_known_relationship_pass(inner_suite: pytest.Pytester) -> None:
    inner_suite.makeini("[pytest]\nnplusone_allow_relationships =\n    Customer.orders\n")
    result = inner_suite.runpytest(*INNER_OPTIONS, "--nplusone=raise")
    result.assert_outcomes(passed=5)
