"""The query doctor's precision rules and its kinds beyond N+1, on real SQLAlchemy code against
real PostgreSQL: for each, a true case, a near miss that stays silent, and the fix making the
finding go away."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from flask import Flask
from nplusone_models import CUSTOMERS, ORDERS_PER_CUSTOMER, Customer, Database, Order
from sqlalchemy import Engine, delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, contains_eager, joinedload, selectinload

from pgpilot.nplusone import Report, detect

THIS_FILE = "test_nplusone_doctor.py"


def next_line() -> int:
    return sys._getframe(1).f_lineno + 1


def kinds(report: object) -> list[str]:
    return sorted(finding.kind for finding in report.findings)  # type: ignore[attr-defined]


def orders_of(session: Session, customer_id: int) -> list[Order]:
    return list(session.scalars(select(Order).where(Order.customer_id == customer_id)))


# --- one loop, not separate calls -------------------------------------------------------------


def test_separate_calls_repeating_a_query_are_not_a_loop(session: Session) -> None:
    with detect() as report:
        orders_of(session, 1)
        orders_of(session, 2)
        orders_of(session, 3)
    assert report.findings == []

    with detect() as looped:
        for customer_id in (1, 2, 3):
            line = next_line()
            orders_of(session, customer_id)
    [finding] = looped.findings
    assert finding.kind == "n_plus_one"
    # the query's line, and the loop's line as its caller
    assert "test_nplusone_doctor.py:" in finding.callsite
    assert any(caller.endswith(f"{THIS_FILE}:{line}") for caller in finding.callers)


def scoped_loop(session: Session) -> Report:
    with detect() as report:
        for customer_id in (1, 2, 3):
            orders_of(session, customer_id)
    return report


def test_callers_above_the_frame_that_opened_the_scope_are_named(session: Session) -> None:
    # the walk up the stack stops at the frame that runs the scope's block: what is above it
    # is read once per scope, and still named
    line = next_line()
    report = scoped_loop(session)
    [finding] = report.findings
    assert finding.kind == "n_plus_one"
    assert any(caller.endswith(f"{THIS_FILE}:{line}") for caller in finding.callers)
    again = next_line()
    [second] = scoped_loop(session).findings  # read again for each scope
    assert any(caller.endswith(f"{THIS_FILE}:{again}") for caller in second.callers)


def test_separate_calls_each_in_a_scope_of_their_own_are_not_a_loop_around(
    session: Session,
) -> None:
    def one_customer(customer_id: int) -> Report:
        with detect() as inner:
            orders_of(session, customer_id)
        return inner

    with detect() as report:
        one_customer(1)
        one_customer(2)
        one_customer(3)
    assert report.queries == 3
    assert report.findings == []

    with detect() as looped:
        for customer_id in (1, 2, 3):
            assert one_customer(customer_id).findings == []
    assert [finding.kind for finding in looped.findings] == ["n_plus_one"]


def test_frames_of_generated_code_are_skipped_for_the_call_site(session: Session) -> None:
    namespace: dict[str, object] = {}
    exec(  # a wrapper compiled from a string, as SQLAlchemy generates its own
        "def through_string(session, query):\n    return session.scalars(query).all()\n",
        namespace,
    )
    through_string = namespace["through_string"]
    with detect() as report:
        for customer_id in (1, 2, 3):
            line = next_line()
            through_string(session, select(Order).where(Order.customer_id == customer_id))  # type: ignore[operator]
    [finding] = report.findings
    assert finding.callsite.endswith(f"{THIS_FILE}:{line}")
    assert "<string>" not in finding.callsite


# --- requests through a test client are scopes of their own ------------------------------------


@pytest.fixture
def flask_app(engine: Engine) -> Iterator[Flask]:
    app = Flask(__name__)

    @app.get("/customers/<int:customer_id>")
    def one_customer(customer_id: int) -> str:
        with Session(engine) as session:
            return str(len(orders_of(session, customer_id)))

    @app.get("/orders")
    def all_orders() -> str:
        with Session(engine) as session:
            return ",".join(str(len(c.orders)) for c in session.scalars(select(Customer)))

    yield app


def test_each_test_client_request_is_its_own_scope(flask_app: Flask) -> None:
    from pgpilot.nplusone import testclients

    testclients.install()
    client = flask_app.test_client()
    with detect() as report:
        for customer_id in (1, 2, 3, 4):  # four requests: a loop in the test, not in the app
            assert client.get(f"/customers/{customer_id}").text == str(ORDERS_PER_CUSTOMER)
    assert report.findings == []

    with detect() as inside:
        assert client.get("/orders").status_code == 200
    [finding] = inside.findings  # the N+1 inside one request reaches the test's report
    assert finding.kind == "n_plus_one"
    assert finding.suggestion == "selectinload(Customer.orders)"


# --- unused eager loads -------------------------------------------------------------------------


def test_an_eager_load_with_nothing_under_it_is_not_unused(session: Session) -> None:
    with detect() as report:
        query = select(Customer).where(Customer.id < 0).options(selectinload(Customer.orders))
        assert session.scalars(query).all() == []
    assert report.findings == []  # advice to drop it would make an N+1 on real data


def test_joinedload_with_load_only_is_named_as_written(session: Session) -> None:
    with detect() as report:
        query = select(Order).options(joinedload(Order.customer).load_only(Customer.name))
        assert len(session.scalars(query).all()) == CUSTOMERS * ORDERS_PER_CUSTOMER
    [finding] = report.findings
    assert finding.kind == "unused_eager_load"
    assert finding.suggestion.startswith("drop joinedload(Order.customer) from")
    assert "defaultload" not in finding.suggestion


# --- lazy loads after expiry -------------------------------------------------------------------


def test_a_lazy_load_after_commit_says_it_was_expired(engine: Engine) -> None:
    with Session(engine) as session, detect() as report:
        customers = session.scalars(select(Customer).options(selectinload(Customer.orders))).all()
        commit_line = next_line()
        session.commit()
        assert sum(len(customer.orders) for customer in customers) == 18
    refresh, lazy = sorted(report.findings, key=lambda finding: finding.relationship or "")
    assert (refresh.kind, lazy.kind) == ("n_plus_one", "n_plus_one")
    assert lazy.relationship == "Customer.orders"
    for finding in (refresh, lazy):
        assert f"expired by commit() at tests/nplusone/{THIS_FILE}:{commit_line}" in (
            finding.suggestion
        )
        assert "expire_on_commit=False" in finding.suggestion
    assert refresh.suggestion.startswith("Customer objects expired by commit()")
    # the option it already had, named, instead of suggesting it again
    assert lazy.suggestion.startswith("Customer.orders was loaded by selectinload(Customer.orders)")

    with Session(engine, expire_on_commit=False) as session, detect() as fixed:
        customers = session.scalars(select(Customer).options(selectinload(Customer.orders))).all()
        session.commit()
        assert sum(len(customer.orders) for customer in customers) == 18
    assert fixed.findings == []


# --- ORM flushes and commits in loops ----------------------------------------------------------


@pytest.fixture
def scratch_ids(engine: Engine) -> Iterator[range]:
    ids = range(7000, 7005)
    yield ids
    with Session(engine) as session:
        session.execute(delete(Customer).where(Customer.id.in_(ids)))
        session.commit()


def test_one_flush_of_many_rows_is_not_an_insert_loop(engine: Engine, scratch_ids: range) -> None:
    with Session(engine) as session, detect() as report:
        session.add_all([Customer(id=i, name=f"new {i}") for i in scratch_ids])
        session.commit()
    assert report.findings == []


def test_a_commit_per_row_is_an_insert_loop(engine: Engine, scratch_ids: range) -> None:
    with Session(engine) as session, detect() as report:
        for i in scratch_ids:
            session.add(Customer(id=i, name=f"new {i}"))
            session.commit()
    [finding] = report.findings
    assert finding.kind == "insert_loop"
    assert finding.suggestion.startswith("commit once after the loop")
    assert finding.count == len(scratch_ids)


def test_raw_update_and_delete_loops(session: Session, database: Database) -> None:
    with detect() as report:
        for order_id in (100, 101, 102):
            session.execute(
                text(f"UPDATE {database.schema}.orders SET total = total WHERE id = :id"),
                {"id": order_id},
            )
        for item_id in (-1, -2, -3):
            session.execute(
                text(f"DELETE FROM {database.schema}.items WHERE id = :id"), {"id": item_id}
            )
    session.rollback()
    by_kind = {finding.kind: finding for finding in report.findings}
    assert set(by_kind) == {"update_loop", "delete_loop"}
    assert "update(Model)" in by_kind["update_loop"].suggestion
    assert "Model.id.in_(ids)" in by_kind["delete_loop"].suggestion

    with detect() as fixed:
        session.execute(
            update(Order).where(Order.id.in_([100, 101, 102])).values(total=Order.total)
        )
        session.execute(
            text(f"DELETE FROM {database.schema}.items WHERE id = ANY(:ids)"), {"ids": [-1, -2, -3]}
        )
    session.rollback()
    assert fixed.findings == []


# --- selectinload follow-ups, contains_eager ---------------------------------------------------


def test_selectinload_follow_ups_fold_into_their_query(session: Session) -> None:
    with detect() as report:
        for customer_id in (1, 2, 3):
            query = (
                select(Customer)
                .where(Customer.id == customer_id)
                .options(selectinload(Customer.orders))
            )
            assert len(session.scalars(query).one().orders) == ORDERS_PER_CUSTOMER
    [finding] = report.findings  # one group: the customer query, not also its follow-up
    assert finding.kind == "n_plus_one"
    assert "customers" in finding.sql


def test_a_join_then_lazy_loads_of_it_is_missing_contains_eager(session: Session) -> None:
    with detect() as report:
        query = select(Order).join(Order.customer).where(Customer.name.like("customer%"))
        names = {order.customer.name for order in session.scalars(query)}
    assert len(names) == CUSTOMERS
    [finding] = report.findings
    assert finding.kind == "missing_contains_eager"
    assert finding.suggestion.startswith(".options(contains_eager(Order.customer))")
    session.expunge_all()

    with detect() as near_miss:  # no join: a plain N+1, fixed by joinedload
        names = {order.customer.name for order in session.scalars(select(Order))}
    assert [f.kind for f in near_miss.findings] == ["n_plus_one"]
    session.expunge_all()

    with detect() as fixed:
        query = (
            select(Order)
            .join(Order.customer)
            .where(Customer.name.like("customer%"))
            .options(contains_eager(Order.customer))
        )
        names = {order.customer.name for order in session.scalars(query)}
    assert len(names) == CUSTOMERS
    assert fixed.findings == []


# --- large results, deep offsets ---------------------------------------------------------------


def test_a_large_result_held_in_memory(session: Session) -> None:
    with detect(large_result=10) as report:
        orders = session.scalars(select(Order)).all()
    assert len(orders) == CUSTOMERS * ORDERS_PER_CUSTOMER
    [finding] = report.findings
    assert finding.kind == "large_result"
    assert finding.detail == f"{len(orders)} rows in one result"
    assert "yield_per" in finding.suggestion

    with detect(large_result=10) as near_miss:
        assert len(session.scalars(select(Order).limit(5)).all()) == 5
    assert near_miss.findings == []

    with detect(large_result=10) as streamed:
        query = select(Order).execution_options(yield_per=5)
        assert sum(1 for _ in session.scalars(query)) == CUSTOMERS * ORDERS_PER_CUSTOMER
    assert streamed.findings == []


async def test_a_large_result_on_asyncpg(async_engine: AsyncEngine) -> None:
    async with AsyncSession(async_engine) as session:
        await session.connection()
        with detect(large_result=10) as report:
            orders = (await session.scalars(select(Order))).all()
    assert len(orders) == CUSTOMERS * ORDERS_PER_CUSTOMER
    assert kinds(report) == ["large_result"]


def test_deep_offset_and_an_offset_growing_in_a_loop(session: Session) -> None:
    with detect() as report:
        session.scalars(select(Order).order_by(Order.id).offset(1500).limit(10)).all()
    [finding] = report.findings
    assert finding.kind == "deep_offset"
    assert finding.detail == "OFFSET up to 1,500"
    assert "keyset" in finding.suggestion

    with detect() as near_miss:
        session.scalars(select(Order).order_by(Order.id).offset(10).limit(10)).all()
    assert near_miss.findings == []

    with detect() as paging:
        for page in range(4):
            session.scalars(select(Order).order_by(Order.id).offset(page * 4).limit(4)).all()
    [finding] = paging.findings  # the paging loop, told as what it is rather than an N+1
    assert finding.kind == "deep_offset"
    assert finding.detail == "OFFSET up to 12, growing over 4 pages of one loop"

    with detect() as keyset:
        last = 0
        for _ in range(4):
            page = session.scalars(
                select(Order).where(Order.id > last).order_by(Order.id).limit(4)
            ).all()
            last = page[-1].id
    assert keyset.findings == []


# --- read from the statement -------------------------------------------------------------------


def test_wrong_type_comparison_and_correlated_subquery(
    session: Session, database: Database
) -> None:
    schema = database.schema
    with detect() as report:
        session.execute(text(f"SELECT id FROM {schema}.orders WHERE customer_id = '1'")).all()
        session.execute(
            text(
                f"SELECT c.id, (SELECT count(*) FROM {schema}.orders o WHERE o.customer_id = c.id)"
                f" FROM {schema}.customers c"
            )
        ).all()
    assert kinds(report) == ["correlated_subquery", "wrong_type_comparison"]

    with detect() as fixed:
        session.execute(text(f"SELECT id FROM {schema}.orders WHERE customer_id = 1")).all()
        session.execute(
            text(
                f"SELECT c.id, count(o.id) FROM {schema}.customers c LEFT JOIN "
                f"{schema}.orders o ON o.customer_id = c.id GROUP BY c.id"
            )
        ).all()
    assert fixed.findings == []
