"""N+1 detection on real SQLAlchemy ORM loops against real PostgreSQL."""

from __future__ import annotations

import sys
import warnings

import pytest
from nplusone_models import CUSTOMERS, ORDERS_PER_CUSTOMER, Customer, Database, Item, Order
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session, joinedload, selectinload

from pgpilot.nplusone import (
    DEFAULT_THRESHOLD,
    NPlusOneError,
    NPlusOneWarning,
    detect,
)

THIS_FILE = "test_nplusone_sqlalchemy.py"


def next_line() -> int:
    """The line after the caller's: where the statement under test is."""
    return sys._getframe(1).f_lineno + 1


def test_default_threshold_is_three() -> None:
    assert DEFAULT_THRESHOLD == 3


def test_lazy_collection_in_a_loop_is_an_n_plus_one(session: Session) -> None:
    with detect() as report:
        customers = session.scalars(select(Customer).order_by(Customer.id)).all()
        for customer in customers:
            line = next_line()
            assert len(customer.orders) == ORDERS_PER_CUSTOMER

    [finding] = report.findings
    assert finding.kind == "n_plus_one"
    assert finding.count == CUSTOMERS
    assert finding.distinct_params == CUSTOMERS
    assert finding.suggestion == "selectinload(Customer.orders)"
    assert finding.relationship == "Customer.orders"
    assert finding.callsite.endswith(f"{THIS_FILE}:{line}")
    assert "orders" in finding.sql
    assert len(finding.fingerprint) == 16
    assert report.queries == CUSTOMERS + 1


def test_lazy_many_to_one_in_a_loop_suggests_joinedload(session: Session) -> None:
    with detect() as report:
        # one order per customer, so every order.customer is a different row to fetch
        orders = session.scalars(select(Order).where(Order.id % 100 == 0).order_by(Order.id)).all()
        names = [order.customer.name for order in orders]

    assert len(names) == CUSTOMERS
    [finding] = report.findings
    assert finding.kind == "n_plus_one"
    assert finding.suggestion == "joinedload(Order.customer)"
    assert finding.count == CUSTOMERS


def test_nested_loops_get_a_chained_suggestion(session: Session) -> None:
    with detect() as report:
        for customer in session.scalars(select(Customer)):
            for order in customer.orders:
                line = next_line()
                assert len(order.items) == 2

    by_relationship = {finding.relationship: finding for finding in report.findings}
    assert set(by_relationship) == {"Customer.orders", "Order.items"}
    items = by_relationship["Order.items"]
    assert items.suggestion == "selectinload(Customer.orders).selectinload(Order.items)"
    assert items.count == CUSTOMERS * ORDERS_PER_CUSTOMER
    assert items.callsite.endswith(f"{THIS_FILE}:{line}")
    assert by_relationship["Customer.orders"].suggestion == "selectinload(Customer.orders)"


def test_nested_loop_through_many_to_one_chains_joinedload(session: Session) -> None:
    with detect() as report:
        for item in session.scalars(select(Item).where(Item.id % 10 == 0).order_by(Item.id)):
            assert item.order.customer.name

    suggestions = {finding.relationship: finding.suggestion for finding in report.findings}
    assert suggestions["Item.order"] == "joinedload(Item.order)"
    assert suggestions["Order.customer"] == "joinedload(Item.order).joinedload(Order.customer)"


def test_applying_the_suggestion_removes_the_finding(session: Session) -> None:
    with detect() as before:
        for customer in session.scalars(select(Customer)):
            for order in customer.orders:
                assert order.items
    nested = next(f for f in before.findings if f.relationship == "Order.items")
    assert nested.suggestion == "selectinload(Customer.orders).selectinload(Order.items)"
    session.expunge_all()

    with detect() as after:
        query = select(Customer).options(selectinload(Customer.orders).selectinload(Order.items))
        for customer in session.scalars(query):
            for order in customer.orders:
                assert order.items
    assert after.findings == []
    assert after.queries == 3  # customers, then one query per relationship level


def test_applying_joinedload_removes_the_many_to_one_finding(session: Session) -> None:
    with detect() as report:
        query = select(Order).options(joinedload(Order.customer))
        names = {order.customer.name for order in session.scalars(query)}
    assert len(names) == CUSTOMERS
    assert report.findings == []
    assert report.queries == 1


def test_a_loop_of_different_statements_is_not_an_n_plus_one(session: Session) -> None:
    with detect() as report:
        session.scalars(select(Customer).where(Customer.id == 1)).all()
        session.scalars(select(Order).where(Order.total > 5)).all()
        session.scalars(select(Item).where(Item.sku.like("sku-1%"))).all()
        session.execute(text(f"SELECT count(*) FROM {Order.__table__.schema}.orders")).all()
    assert report.queries == 4
    assert report.findings == []


def test_below_the_threshold_is_not_reported(session: Session) -> None:
    with detect() as report:
        for customer_id in (1, 2):
            session.scalars(select(Order).where(Order.customer_id == customer_id)).all()
    assert report.findings == []
    with detect(threshold=2) as lowered:
        for customer_id in (1, 2):
            session.scalars(select(Order).where(Order.customer_id == customer_id)).all()
    assert [finding.kind for finding in lowered.findings] == ["n_plus_one"]


def test_duplicates_are_told_apart_from_n_plus_one(session: Session, database: Database) -> None:
    same = text(f"SELECT name FROM {database.schema}.customers WHERE id = :id")
    with detect() as report:
        for _ in range(4):
            line = next_line()
            session.execute(same, {"id": 1}).scalar_one()
    [finding] = report.findings
    assert finding.kind == "duplicate"
    assert finding.count == 4
    assert finding.distinct_params == 1
    assert finding.callsite.endswith(f"{THIS_FILE}:{line}")
    assert "reuse the first result" in finding.suggestion

    with detect() as loop:
        for customer_id in range(1, 5):
            session.execute(same, {"id": customer_id}).scalar_one()
    assert [finding.kind for finding in loop.findings] == ["n_plus_one"]


def test_a_write_between_two_reads_makes_them_no_duplicate(
    session: Session, database: Database
) -> None:
    count = text(f"SELECT count(*) FROM {database.schema}.items WHERE order_id = :o")
    with detect() as report:
        before = session.execute(count, {"o": 100}).scalar_one()
        session.execute(
            text(
                f"INSERT INTO {database.schema}.items (id, order_id, sku) VALUES (99999, 100, 'x')"
            )
        )
        after = session.execute(count, {"o": 100}).scalar_one()
    session.rollback()
    assert after == before + 1
    assert report.findings == []


def test_raw_text_loop_suggests_a_batch_query(session: Session, database: Database) -> None:
    with detect() as report:
        for customer_id in range(1, CUSTOMERS + 1):
            session.execute(
                text(f"SELECT id, total FROM {database.schema}.orders WHERE customer_id = :cid"),
                {"cid": customer_id},
            ).all()
    [finding] = report.findings
    assert finding.kind == "n_plus_one"
    assert finding.relationship is None
    assert "WHERE customer_id = ANY(:ids)" in finding.suggestion
    assert f"FROM {database.schema}.orders" in finding.suggestion
    assert "pgpilot.batch DataLoader" in finding.suggestion


def test_a_loop_of_single_row_inserts_suggests_executemany(
    session: Session, database: Database
) -> None:
    with detect() as report:
        for n in range(4):
            session.execute(
                text(f"INSERT INTO {database.schema}.customers (id, name) VALUES (:id, :name)"),
                {"id": 9000 + n, "name": f"new {n}"},
            )
    session.rollback()
    [finding] = report.findings
    assert finding.kind == "insert_loop"
    assert "executemany()" in finding.suggestion
    assert "session.execute(insert(Model), [dict, ...])" in finding.suggestion


def test_unused_eager_load_is_reported(session: Session) -> None:
    with detect() as report:
        line = next_line()
        customers = session.scalars(select(Customer).options(selectinload(Customer.orders))).all()
        names = [customer.name for customer in customers]
    assert len(names) == CUSTOMERS
    [finding] = report.findings
    assert finding.kind == "unused_eager_load"
    assert finding.relationship == "Customer.orders"
    assert "selectinload(Customer.orders)" in finding.suggestion
    assert finding.callsite.endswith(f"{THIS_FILE}:{line}")


def test_an_eager_load_that_is_read_is_not_reported(session: Session) -> None:
    with detect() as report:
        customers = session.scalars(select(Customer).options(selectinload(Customer.orders))).all()
        assert sum(len(customer.orders) for customer in customers) == 18
    assert report.findings == []


def test_unused_nested_eager_load_names_its_step(session: Session) -> None:
    with detect() as report:
        query = select(Customer).options(selectinload(Customer.orders).joinedload(Order.items))
        totals = [order.total for c in session.scalars(query).unique() for order in c.orders]
    assert len(totals) == CUSTOMERS * ORDERS_PER_CUSTOMER
    [finding] = report.findings
    assert finding.kind == "unused_eager_load"
    assert finding.relationship == "Order.items"
    assert finding.suggestion.startswith(
        "drop joinedload(Order.items) from selectinload(Customer.orders).joinedload(Order.items)"
    )


def lazy_loop(session: Session) -> None:
    for customer in session.scalars(select(Customer)):
        assert customer.orders


def test_allowlist_by_callsite_glob(session: Session) -> None:
    with detect(allow_callsites=[f"*{THIS_FILE}:*"]) as report:
        lazy_loop(session)
    assert report.findings == []
    with detect(allow_callsites=["*/some_other_file.py:*"]) as report:
        session.expunge_all()
        lazy_loop(session)
    assert len(report.findings) == 1


def test_allowlist_by_relationship(session: Session) -> None:
    with detect(allow_relationships=["Customer.orders"]) as report:
        lazy_loop(session)
    assert report.findings == []
    session.expunge_all()
    with detect(allow_relationships=["Order.*"]) as report:
        lazy_loop(session)
    assert [finding.relationship for finding in report.findings] == ["Customer.orders"]


def test_allowlist_by_fingerprint(session: Session) -> None:
    with detect() as first:
        lazy_loop(session)
    fingerprint = first.findings[0].fingerprint
    session.expunge_all()
    with detect(allow_fingerprints=[fingerprint]) as second:
        lazy_loop(session)
    assert second.findings == []


def test_raise_mode_raises_at_scope_exit_listing_the_findings(session: Session) -> None:
    ran_to_the_end = False
    with pytest.raises(NPlusOneError) as raised, detect(mode="raise"):
        lazy_loop(session)
        ran_to_the_end = True
    assert ran_to_the_end
    assert [finding.kind for finding in raised.value.findings] == ["n_plus_one"]
    assert "selectinload(Customer.orders)" in str(raised.value)


def test_raise_mode_does_not_hide_the_exception_in_flight(session: Session) -> None:
    with pytest.raises(KeyError), detect(mode="raise"):
        lazy_loop(session)
        raise KeyError("the application's own error")


def test_warn_mode_warns_once_per_finding_at_its_call_site(session: Session) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with detect(mode="warn"):
            for customer in session.scalars(select(Customer)):
                line = next_line()
                assert customer.orders
    ours = [w for w in caught if issubclass(w.category, NPlusOneWarning)]
    assert len(ours) == 1
    assert ours[0].filename.endswith(THIS_FILE)
    assert ours[0].lineno == line
    assert "selectinload(Customer.orders)" in str(ours[0].message)


def test_queries_outside_a_scope_are_not_counted(session: Session) -> None:
    lazy_loop(session)
    session.expunge_all()
    with detect() as report:
        pass
    assert report.queries == 0
    assert report.findings == []


def test_any_engine_is_seen_without_being_passed(database: Database) -> None:
    fresh: Engine = create_engine(database.sqlalchemy_url)
    try:
        with detect() as report, Session(fresh) as session:
            lazy_loop(session)
        assert [finding.kind for finding in report.findings] == ["n_plus_one"]
    finally:
        fresh.dispose()


def test_nested_scopes_both_see_the_inner_queries(session: Session) -> None:
    with detect() as outer:
        with detect() as inner:
            lazy_loop(session)
        assert len(inner.findings) == 1
    assert len(outer.findings) == 1
    assert outer.queries == inner.queries == CUSTOMERS + 1


def test_bad_arguments_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="mode"):
        detect(mode="loud")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        detect(threshold=1)


def test_the_report_is_live_inside_the_scope(session: Session) -> None:
    with detect() as report:
        lazy_loop(session)
        inside = [finding.kind for finding in report.findings]
        assert report.queries == CUSTOMERS + 1
    assert inside == ["n_plus_one"]
    assert "N+1: 6 executions" in report.summary()


def test_detach_removes_the_listener_and_detect_puts_it_back(session: Session) -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from pgpilot.nplusone import detach
    from pgpilot.nplusone.sqlalchemy_feed import _on_execute

    detach()
    assert not event.contains(Engine, "do_execute", _on_execute)
    with detect() as report:
        assert event.contains(Engine, "do_execute", _on_execute)
        lazy_loop(session)
    assert [finding.kind for finding in report.findings] == ["n_plus_one"]


def test_detach_gives_sqlalchemy_back_its_run_ids_and_load_events(session: Session) -> None:
    from sqlalchemy import event
    from sqlalchemy.orm import loading

    from pgpilot.nplusone import detach
    from pgpilot.nplusone.sqlalchemy_feed import _next_runid, _on_joined_load

    detach()
    original = loading._new_runid
    with detect() as report:
        assert loading._new_runid is _next_runid  # one call per ORM result, not per row
        orders = session.scalars(select(Order).options(joinedload(Order.customer))).all()
        # joinedload targets only
        assert event.contains(Customer.__mapper__, "load", _on_joined_load)
        assert not event.contains(Order.__mapper__, "load", _on_joined_load)
    assert orders
    assert [finding.kind for finding in report.findings] == ["unused_eager_load"]
    detach()
    assert loading._new_runid is original
    assert not event.contains(Customer.__mapper__, "load", _on_joined_load)



def test_detect_after_detach_and_disposed_mappers_still_starts(
    session: Session, engine: Engine, database: Database
) -> None:
    # A suite that maps classes of its own and disposes of them when done (registry
    # .dispose(), clear_mappers()) after a detach(): what was tracked before the detach is
    # tracked again at the next install, but not mappers that no longer map their class
    # (event.listen on one raises): detect() must still start, then and ever after.
    from sqlalchemy import ForeignKey, Integer, event
    from sqlalchemy.orm import DeclarativeBase, mapped_column, relationship

    from pgpilot.nplusone import detach
    from pgpilot.nplusone.sqlalchemy_feed import _on_joined_load

    class Own(DeclarativeBase):
        pass

    class Shelf(Own):
        __tablename__ = "rev25_shelves"
        __table_args__ = ({"schema": database.schema},)
        id = mapped_column(Integer, primary_key=True)
        books = relationship("Book")

    class Book(Own):
        __tablename__ = "rev25_books"
        __table_args__ = ({"schema": database.schema},)
        id = mapped_column(Integer, primary_key=True)
        shelf_id = mapped_column(ForeignKey(f"{database.schema}.rev25_shelves.id"))

    Own.metadata.create_all(engine)
    try:
        with Session(engine) as own:
            own.add(Shelf(id=1, books=[Book(id=1), Book(id=2)]))
            own.flush()
            own.expunge_all()
            with detect():
                shelves = own.scalars(select(Shelf).options(joinedload(Shelf.books))).unique()
                assert [len(shelf.books) for shelf in shelves] == [2]
            own.rollback()
        assert event.contains(Book.__mapper__, "load", _on_joined_load)
        detach()
        Own.registry.dispose()
        with detect() as report:
            lazy_loop(session)
        with detect() as again:
            lazy_loop(session)
    finally:
        Own.metadata.drop_all(engine)
    assert [finding.kind for finding in report.findings] == ["n_plus_one"]
    assert [finding.kind for finding in again.findings] == ["n_plus_one"]
