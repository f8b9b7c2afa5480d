"""The query doctor's kinds that look at what the application does with the rows the ORM loaded
(``existence_load``, ``overfetch``, ``unlocked_read_modify_write``) and the raise-mode rule for
repeated ``Session.get()`` lookups (``duplicate_get``), on real SQLAlchemy code against real
PostgreSQL: for each, a true case, a near miss that stays silent, and the fix."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from nplusone_models import ACCOUNTS, Account, Customer, Database
from sqlalchemy import Engine, exists, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, load_only

from pgpilot.insight.detector import ADVISORY_KINDS, FINDING_KINDS
from pgpilot.nplusone import detect

pytest_plugins = ["pytester"]

THIS_FILE = "test_nplusone_doctor_loads.py"


def kinds(report: object) -> list[str]:
    return sorted(finding.kind for finding in report.findings)  # type: ignore[attr-defined]


def test_the_new_kinds_are_finding_kinds_and_advisory() -> None:
    for kind in ("overfetch", "existence_load", "unlocked_read_modify_write", "duplicate_get"):
        assert kind in FINDING_KINDS
        assert kind in ADVISORY_KINDS
    assert "duplicate" not in ADVISORY_KINDS


# --- duplicate_get: a repeated Session.get() is a key that was not there ----------------------


def test_a_repeated_get_of_a_missing_key_is_a_duplicate_get(session: Session) -> None:
    with detect() as report:
        assert session.get(Customer, 99_999) is None
        assert session.get(Customer, 99_999) is None
    [finding] = report.findings
    assert finding.kind == "duplicate_get"
    assert finding.count == 2
    assert "identity map" in finding.suggestion


def test_a_repeated_get_of_a_found_row_runs_once_and_is_silent(session: Session) -> None:
    with detect() as report:
        first = session.get(Customer, 1)
        assert first is not None and first.name
        assert session.get(Customer, 1) is first  # the identity map answers
    assert report.queries == 1
    assert report.findings == []


def test_the_same_query_twice_outside_get_stays_a_duplicate(session: Session) -> None:
    with detect() as report:
        for _ in range(2):
            assert session.scalars(select(Customer).where(Customer.id == 1)).one().name
    assert kinds(report) == ["duplicate"]


@pytest.fixture
def flask_app(engine: Engine) -> Iterator[Flask]:
    app = Flask(__name__)

    @app.post("/accounts/<int:account_id>/owner")
    def rename(account_id: int) -> str:
        with Session(engine) as session:
            session.execute(
                update(Account).where(Account.id == account_id).values(owner="renamed")
            )
            session.rollback()  # the write ran; the data stays as the other tests expect
        return "ok"

    @app.get("/accounts/<int:account_id>")
    def show(account_id: int) -> str:
        with Session(engine) as session:
            return str(session.scalar(select(Account.owner).where(Account.id == account_id)))

    yield app


def owner_of(engine: Engine, account_id: int) -> str | None:
    with Session(engine) as session:
        return session.scalar(select(Account.owner).where(Account.id == account_id))


def test_a_test_reading_again_after_a_request_that_wrote_is_no_duplicate(
    flask_app: Flask, engine: Engine
) -> None:
    from pgpilot.nplusone import testclients

    testclients.install()
    client = flask_app.test_client()
    with detect() as report:
        assert owner_of(engine, 4) == "owner 4"
        assert client.post("/accounts/4/owner").text == "ok"  # writes in its own scope
        assert owner_of(engine, 4) == "owner 4"
    assert report.findings == []

    with detect() as read_only:
        assert owner_of(engine, 4) == "owner 4"
        assert client.get("/accounts/4").text == "owner 4"  # reads only
        assert owner_of(engine, 4) == "owner 4"
    assert kinds(read_only) == ["duplicate"]


RAISE_OPTIONS = (
    "-p",
    "no:cacheprovider",
    "-o",
    "asyncio_default_fixture_loop_scope=function",
    "--nplusone=raise",
)

INNER_SUITE = """
import os

from nplusone_models import Customer
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

engine = create_engine(os.environ["PGPILOT_NPLUSONE_URL"])


def test_validator_asks_twice():
    with Session(engine) as session:
        assert session.get(Customer, 99_999) is None
        assert session.get(Customer, 99_999) is None


def test_reads_what_it_asserts_twice():
    with Session(engine) as session:
        assert session.scalars(select(Customer).where(Customer.id == 1)).one().name
    with Session(engine) as session:
        assert session.scalars(select(Customer).where(Customer.id == 1)).one().name
"""


def test_raise_mode_lists_a_duplicate_get_and_a_test_reading_twice_without_failing(
    pytester: pytest.Pytester, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPILOT_NPLUSONE_URL", database.sqlalchemy_url)
    pytester.makepyfile(test_inner=INNER_SUITE)
    options = RAISE_OPTIONS
    result = pytester.runpytest(*options)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*[[]info[]] 1 test(s): duplicate get(): 2 lookups*"])
    result.stdout.fnmatch_lines(["*[[]warn[]] 1 test(s): duplicate: 2 executions*"])
    asked = pytester.runpytest(*options, "--nplusone-kinds=duplicate,duplicate_get")
    asked.assert_outcomes(failed=2)


# The application is a module of its own, called from the test body: Flask-Admin's tests call
# view.get_list() from several lines of one test, and each call runs the same count query.
INNER_APP = """
import os

from nplusone_models import Customer
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

engine = create_engine(os.environ["PGPILOT_NPLUSONE_URL"])


def count_customers(session):
    return session.scalar(select(func.count()).select_from(Customer))


def page_header(session):
    return f"{count_customers(session)} customers"


def page(session):
    # the application asking twice in one call: a duplicate to fix
    return page_header(session), count_customers(session)
"""

INNER_CALLS = """
from inner_app import count_customers, engine, page
from sqlalchemy.orm import Session


def test_calls_the_application_from_two_lines():
    with Session(engine) as session:
        first = count_customers(session)
        assert count_customers(session) == first


def test_one_call_in_which_the_application_asks_twice():
    with Session(engine) as session:
        header, count = page(session)
        assert str(count) in header
"""


def test_raise_mode_fails_no_test_for_a_duplicate_the_test_body_starts_from_two_lines(
    pytester: pytest.Pytester, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPILOT_NPLUSONE_URL", database.sqlalchemy_url)
    pytester.makepyfile(inner_app=INNER_APP, test_inner_calls=INNER_CALLS)
    options = RAISE_OPTIONS
    result = pytester.runpytest(*options)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAILED*test_one_call_in_which_the_application_asks_twice*"])
    # listed all the same
    result.stdout.fnmatch_lines(["*2 test(s): duplicate: 2 executions*"])
    asked = pytester.runpytest(*options, "--nplusone-kinds=duplicate")
    asked.assert_outcomes(failed=2)


# --- existence_load: a row loaded only to test that it exists ---------------------------------


def test_a_first_only_tested_for_truth_is_an_existence_load(session: Session) -> None:
    with detect() as report:
        if session.query(Account).filter_by(owner="owner 1").first():
            found = True
        if session.get(Account, 2) is not None:
            found = found and True
    assert found
    assert kinds(report) == ["existence_load", "existence_load"]
    finding = report.findings[0]
    assert THIS_FILE in finding.callsite
    assert "select(exists().where(" in finding.suggestion
    assert "1 Account row(s) loaded" in finding.detail


def test_a_first_whose_row_is_read_or_deleted_is_not_an_existence_load(
    session: Session,
) -> None:
    with detect() as report:
        account = session.query(Account).filter_by(owner="owner 1").first()
        assert account is not None and account.email
        doomed = session.get(Account, 3)
        session.delete(doomed)
        session.flush()
        many = session.scalars(select(Account)).all()  # many rows, thrown away: not a test
    session.rollback()
    assert len(many) == ACCOUNTS - 1
    assert "existence_load" not in kinds(report)


def test_a_row_matching_an_object_already_in_the_session_is_not_an_existence_load(
    session: Session,
) -> None:
    # SQLAlchemy hands back the object the session already holds (here loaded before the
    # scope) without stamping it with the new load's run id: its reads must still count.
    # Flask-Admin's edit view does this: session.get(Model, "1"), the id as the URL gives it,
    # misses the identity map (keyed by 1) and selects the row the session already has.
    held = session.get(Account, 2)
    assert held is not None and held.owner
    with detect() as report:
        by_string_id = session.get(Account, "2")
        first = session.query(Account).filter_by(id=2).first()
        assert by_string_id is held and first is held
        assert held.email
    assert report.queries == 2
    assert "existence_load" not in kinds(report)


def test_an_unread_row_is_still_an_existence_load_beside_an_object_read_from_before(
    session: Session,
) -> None:
    held = session.get(Account, 2)
    assert held is not None
    with detect() as report:
        assert session.get(Account, 4) is not None  # a new object, never read: a truth test
        assert held.email  # an object the scope did not load: says nothing of the one above
    assert kinds(report) == ["existence_load"]


def test_an_object_held_from_before_read_before_the_lookup_that_returns_it_is_not_one(
    session: Session,
) -> None:
    # The same lookup as above, but the view reads the object before it looks it up again
    # (a template showing the current account, then the edit form's get("2")): the first
    # read comes while no load of the scope is followed yet, and must not keep the object
    # from being seen, at the later reads, as the row of the lookup.
    with detect():
        held = session.get(Account, 2)  # (in a scope: Account's column reads are tracked)
    assert held is not None
    with detect() as report:
        assert held.email
        by_string_id = session.get(Account, "2")
        assert by_string_id is held
        assert held.email and held.owner
    assert report.queries == 1
    assert "existence_load" not in kinds(report)
    # the same in a scope inside another (a request inside a test): each scope
    session.expire(held, ["email", "owner"])
    assert held.email and held.owner
    with detect() as test, detect() as request:
        assert held.email
        assert session.get(Account, "2") is held
        assert held.owner
    assert "existence_load" not in kinds(request) + kinds(test)
    # and a lookup whose row nothing reads stays one beside it
    with detect() as report:
        assert held.email
        assert session.get(Account, 5) is not None
        assert held.owner
    assert kinds(report) == ["existence_load"]


def _customers_from(session: Session, first_id: int, count: int) -> list[Customer]:
    # one call site, one statement: LIMIT is a parameter (1 for one call, 3 for the other)
    query = select(Customer).where(Customer.id >= first_id).order_by(Customer.id).limit(count)
    return list(session.scalars(query))


def test_a_query_whose_rows_are_read_in_another_run_is_not_an_existence_load(
    session: Session,
) -> None:
    # one query (call site and statement) is one finding however many times it ran: a run of
    # it with LIMIT 1 only tested for truth is no existence_load when its other runs' rows
    # are read, however wide the entity (the narrow Customer here, the wide Account below)
    with detect() as report:
        assert _customers_from(session, 5, 1)
        names = [customer.name for customer in _customers_from(session, 1, 3)]
    assert len(names) == 3
    assert "existence_load" not in kinds(report)
    session.expunge_all()
    with detect() as report:
        query = select(Account).where(Account.id >= 1).order_by(Account.id)
        for first_id, count in ((5, 1), (1, 3)):
            accounts = list(session.scalars(query.where(Account.id >= first_id).limit(count)))
            if count > 1:
                assert all(account.email and account.owner for account in accounts)
    assert "existence_load" not in kinds(report)


def test_exists_is_the_fix_for_an_existence_load(session: Session) -> None:
    with detect() as report:
        assert session.scalar(select(exists().where(Account.owner == "owner 1")))
    assert report.findings == []


# --- overfetch: wide rows of which the code reads one column -----------------------------------


def test_reading_one_column_of_wide_rows_is_an_overfetch(session: Session) -> None:
    with detect() as report:
        emails = [account.email for account in session.scalars(select(Account))]
    assert len(emails) == ACCOUNTS
    [finding] = report.findings
    assert finding.kind == "overfetch"
    assert finding.count == ACCOUNTS
    assert finding.suggestion.startswith(".options(load_only(Account.customer_id, Account.email))")
    assert "defer(Account.notes)" in finding.suggestion  # the text column nobody read
    assert "1 of 8 Account columns read" in finding.detail


def test_an_overfetch_keeps_the_foreign_key_of_a_relationship_the_code_reads(
    session: Session,
) -> None:
    # ihatemoney's balance reads bill.payer per bill: load_only() without Bill.payer_id would
    # defer the key the lazy load needs, one more SELECT per row to fetch it (and when the
    # identity map answers the many-to-one, no SQL tells the detector it was read: the key
    # is kept whenever the entity has the relationship)
    with detect() as report:
        owners = [(a.email, a.customer.name) for a in session.scalars(select(Account))]
    assert len(owners) == ACCOUNTS
    [finding] = [f for f in report.findings if f.kind == "overfetch"]
    assert finding.suggestion.startswith(".options(load_only(Account.customer_id, Account.email))")
    assert "Account.customer_id, which its relationships join on" in finding.suggestion
    assert "1 of 8 Account columns read" in finding.detail
    # rows of which only a relationship is read: no column to name, no overfetch
    with detect() as only_related:
        names = [account.customer.name for account in session.scalars(select(Account))]
    assert len(names) == ACCOUNTS
    assert "overfetch" not in kinds(only_related)


def test_reading_most_columns_or_narrow_rows_is_not_an_overfetch(session: Session) -> None:
    with detect() as report:
        for account in session.scalars(select(Account)):
            assert all((account.owner, account.email, account.balance, account.currency))
        names = [customer.name for customer in session.scalars(select(Customer))]
    assert names
    assert report.findings == []


def test_an_overfetch_counts_the_rows_whose_columns_are_read(session: Session) -> None:
    # OVERFETCH_MIN_ROWS rows with a column read make a loop; rows of which only a
    # relationship is read do not count (their use is not followed on many-row loads)
    with detect() as report:
        accounts = session.scalars(select(Account).order_by(Account.id)).all()
        assert [account.email for account in accounts[:2]]
        assert [account.customer for account in accounts[2:]]
    assert "overfetch" not in kinds(report)
    session.expunge_all()  # loaded afresh: objects the session holds are not a load's rows
    with detect() as report:
        accounts = session.scalars(select(Account).order_by(Account.id)).all()
        assert [account.email for account in accounts[:3]]
    assert kinds(report) == ["overfetch"]


def test_load_only_is_the_fix_for_an_overfetch(session: Session) -> None:
    with detect() as report:
        query = select(Account).options(load_only(Account.email))
        emails = [account.email for account in session.scalars(query)]
    assert len(emails) == ACCOUNTS
    assert report.findings == []


async def test_overfetch_on_an_async_session(async_engine: AsyncEngine) -> None:
    async with AsyncSession(async_engine) as session:
        await session.connection()
        with detect() as report:
            accounts = (await session.scalars(select(Account))).all()
            emails = [account.email for account in accounts]
    assert len(emails) == ACCOUNTS
    assert kinds(report) == ["overfetch"]


# --- unlocked_read_modify_write: read, change, write back without a lock ------------------------


def test_read_modify_write_without_a_lock_is_reported(session: Session) -> None:
    with detect() as report:
        account = session.get(Account, 1)
        assert account is not None
        account.balance = account.balance - 10
        session.flush()
    session.rollback()
    [finding] = report.of_kind("unlocked_read_modify_write")
    assert THIS_FILE in finding.callsite  # where the row was read
    assert "Account.balance read, changed and written back" in finding.detail
    assert ".with_for_update()" in finding.suggestion
    assert "update(Account)" in finding.suggestion


def test_read_modify_write_on_narrow_rows_loaded_many_at_a_time_is_reported(
    session: Session,
) -> None:
    # Customer has two columns and the SELECT returns many rows: neither an overfetch nor an
    # existence_load can come of its objects, so their use (a relationship read) is not
    # followed; the column reads before a change still are.
    with detect() as report:
        customers = session.scalars(select(Customer).order_by(Customer.id)).all()
        for customer in customers:
            assert customer.orders  # a use (lazy loads), not a column read
        customers[0].name = customers[0].name + " (renamed)"
        session.flush()
    session.rollback()
    [finding] = report.of_kind("unlocked_read_modify_write")
    assert "Customer.name read, changed and written back" in finding.detail
    assert report.of_kind("existence_load") == []


def test_a_one_row_lookup_after_narrow_loads_is_still_an_existence_load(
    session: Session,
) -> None:
    # the narrow many-row load before it follows nothing; the lookup after it is followed
    with detect() as report:
        customers = session.scalars(select(Customer).order_by(Customer.id)).all()
        assert [customer.orders for customer in customers]
        found = session.query(Account).filter_by(owner="owner 1").first() is not None
    assert found  # the row only tested for truth
    assert "existence_load" in kinds(report)


def test_a_blind_write_is_not_a_read_modify_write(session: Session) -> None:
    with detect() as report:
        account = session.get(Account, 1)
        assert account is not None
        account.currency = "USD"  # not computed from what was read
        session.flush()
    session.rollback()
    assert report.of_kind("unlocked_read_modify_write") == []


def test_serializable_isolation_is_not_a_read_modify_write(engine: Engine) -> None:
    strict = engine.execution_options(isolation_level="SERIALIZABLE")
    with Session(strict) as session, detect() as report:
        account = session.get(Account, 1)
        assert account is not None
        account.balance = account.balance - 10
        session.flush()
        session.rollback()
    assert report.of_kind("unlocked_read_modify_write") == []


def test_for_update_or_a_database_side_update_is_the_fix(session: Session) -> None:
    with detect() as report:
        account = session.get(Account, 1, with_for_update=True)
        assert account is not None
        account.balance = account.balance - 10
        session.flush()
        session.execute(update(Account).where(Account.id == 2).values(balance=Account.balance - 1))
    session.rollback()
    assert report.of_kind("unlocked_read_modify_write") == []


async def test_read_modify_write_on_an_async_session(async_engine: AsyncEngine) -> None:
    async with AsyncSession(async_engine) as session:
        await session.connection()
        with detect() as report:
            account = await session.get(Account, 1)
            assert account is not None
            account.balance = account.balance + 5
            await session.flush()
        await session.rollback()
    assert kinds(report) == ["unlocked_read_modify_write"]


# Flask-Admin's test_export_csv fills its tables with a helper of its own file, one commit per
# call: the test's set-up, not a loop of the application.
INNER_WRITER = """
from nplusone_models import Account
from sqlalchemy import update


def touch_each(session, account_ids):
    for account_id in account_ids:
        touch(session, account_id)
        session.commit()


def touch(session, account_id):
    session.execute(
        update(Account).where(Account.id == account_id).values(balance=Account.balance)
    )
"""

INNER_WRITES = """
import os

from inner_writer import touch_each
from nplusone_models import Account
from sqlalchemy import create_engine, update
from sqlalchemy.orm import Session

engine = create_engine(os.environ["PGPILOT_NPLUSONE_URL"])


def set_up(session, account_id):
    session.execute(
        update(Account).where(Account.id == account_id).values(balance=Account.balance)
    )
    session.commit()


def test_sets_up_its_rows_one_by_one():
    with Session(engine) as session:
        for account_id in (1, 2, 3):
            set_up(session, account_id)


def test_the_application_writes_one_by_one():
    with Session(engine) as session:
        touch_each(session, (1, 2, 3))
"""


def test_raise_mode_fails_no_test_for_a_write_loop_at_the_tests_own_lines(
    pytester: pytest.Pytester, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPILOT_NPLUSONE_URL", database.sqlalchemy_url)
    pytester.makepyfile(inner_writer=INNER_WRITER, test_inner_writes=INNER_WRITES)
    result = pytester.runpytest(*RAISE_OPTIONS)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAILED*test_the_application_writes_one_by_one*"])
    result.stdout.fnmatch_lines(["*1 test(s): update loop: 3 executions*test_inner_writes.py*"])
    asked = pytester.runpytest(*RAISE_OPTIONS, "--nplusone-kinds=update_loop")
    asked.assert_outcomes(failed=2)
