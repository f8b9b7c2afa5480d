"""The pytest plugin reports every finding kind: an inner suite with one test per kind, whose
application code lives in a module of its own (as an application's does), run against real
PostgreSQL in warn mode (every kind listed, no test failed) and in raise mode (exactly the
tests of the kinds that fail by default fail; the advisory kinds are listed and pass)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nplusone_models import Database
from test_nplusone_pytest_plugin import INNER_OPTIONS

from pgpilot.insight.detector import ADVISORY_KINDS, FINDING_KINDS

pytest_plugins = ["pytester"]

APP_CODE = """
import os

from nplusone_models import SCHEMA, Account, Customer, Item, Order
from sqlalchemy import create_engine, delete, insert, select, text, update
from sqlalchemy.orm import Session, selectinload

engine = create_engine(os.environ["PGPILOT_NPLUSONE_URL"])
NEW_ITEMS = list(range(900_001, 900_006))
ORDER_IDS = [100, 101, 102, 200, 201]  # customer c has orders c * 100 + 0..2


def n_plus_one():
    with Session(engine) as s:
        return [len(c.orders) for c in s.scalars(select(Customer))]


def duplicate():
    with Session(engine) as s:
        query = select(Order).where(Order.total >= 0)
        return len(s.scalars(query).all()) + len(s.scalars(query).all())


def duplicate_get():
    with Session(engine) as s:
        return s.get(Customer, 999_999) is None and s.get(Customer, 999_999) is None


def unused_eager_load():
    with Session(engine) as s:
        query = select(Customer).options(selectinload(Customer.orders))
        return [c.name for c in s.scalars(query)]


def insert_loop():
    with Session(engine) as s:
        for item_id in NEW_ITEMS:
            s.add(Item(id=item_id, order_id=100, sku="new"))
            s.commit()
        s.execute(delete(Item).where(Item.id.in_(NEW_ITEMS)))
        s.commit()


def update_loop():
    with Session(engine) as s:
        for order_id in ORDER_IDS:
            s.execute(update(Order).where(Order.id == order_id).values(total=Order.total))
        s.commit()


def delete_loop():
    with Session(engine) as s:
        s.execute(insert(Item), [{"id": i, "order_id": 100, "sku": "new"} for i in NEW_ITEMS])
        for item_id in NEW_ITEMS:
            s.execute(delete(Item).where(Item.id == item_id))
        s.commit()


def missing_contains_eager():
    with Session(engine) as s:
        query = select(Order).join(Order.customer).where(Customer.name != "")
        return [o.customer.name for o in s.scalars(query)]


def large_result():
    with Session(engine) as s:
        return len(s.execute(text("SELECT g FROM generate_series(1, 20000) g")).all())


def deep_offset():
    with Session(engine) as s:
        return s.scalars(select(Order.id).order_by(Order.id).offset(1_000).limit(10)).all()


def wrong_type_comparison():
    with Session(engine) as s:
        sql = f"SELECT count(*) FROM {SCHEMA}.orders WHERE customer_id = '1'"
        return s.execute(text(sql)).scalar()


def correlated_subquery():
    with Session(engine) as s:
        sql = (
            f"SELECT c.id, (SELECT count(*) FROM {SCHEMA}.orders o WHERE o.customer_id = c.id) "
            f"FROM {SCHEMA}.customers c"
        )
        return s.execute(text(sql)).all()


def overfetch():
    with Session(engine) as s:
        return [a.email for a in s.scalars(select(Account))]


def existence_load():
    with Session(engine) as s:
        return s.query(Customer).filter(Customer.id == 1).first() is not None


def unlocked_read_modify_write():
    with Session(engine) as s:
        order = s.get(Order, 100)
        order.total = order.total + 1
        s.commit()
        s.execute(update(Order).where(Order.id == 100).values(total=Order.total - 1))
        s.commit()
"""

INNER_TESTS = "import app_code\n" + "".join(
    f"\n\ndef test_{kind}():\n    app_code.{kind}()\n" for kind in FINDING_KINDS
)


@pytest.fixture
def kinds_suite(
    pytester: pytest.Pytester, database: Database, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    monkeypatch.setenv("PGPILOT_NPLUSONE_URL", database.sqlalchemy_url)
    pytester.makepyfile(app_code=APP_CODE, test_kinds=INNER_TESTS)
    pytester.syspathinsert()
    return pytester


def kinds_by_test(report: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for group in json.loads(report.read_text())["groups"]:
        for test in group["tests"]:
            found.setdefault(test.rpartition("::test_")[2], set()).add(group["kind"])
    return found


def test_warn_mode_reports_every_kind(kinds_suite: pytest.Pytester) -> None:
    report = kinds_suite.path / "doctor.json"
    result = kinds_suite.runpytest(*INNER_OPTIONS, "--nplusone=warn", f"--nplusone-report={report}")
    result.assert_outcomes(passed=len(FINDING_KINDS))
    found = kinds_by_test(report)
    for kind in FINDING_KINDS:
        # each test's own kind is among what it was reported for
        assert kind in found.get(kind, set()), (kind, found.get(kind))
    result.stdout.fnmatch_lines(["*pgpilot query doctor*", "*problem(s) at*call site(s)*"])


def test_raise_mode_fails_the_default_kinds_and_lists_the_advisory_ones(
    kinds_suite: pytest.Pytester,
) -> None:
    report = kinds_suite.path / "doctor.json"
    result = kinds_suite.runpytest(
        *INNER_OPTIONS, "--nplusone=raise", f"--nplusone-report={report}"
    )
    failing = set(FINDING_KINDS) - ADVISORY_KINDS
    result.assert_outcomes(passed=len(ADVISORY_KINDS), failed=len(failing))
    failed_tests = {
        test.rpartition("::test_")[2] for test in json.loads(report.read_text())["failed_tests"]
    }
    assert failed_tests == failing
    found = kinds_by_test(report)
    for kind in ADVISORY_KINDS:
        assert kind in found.get(kind, set()), (kind, found.get(kind))
