"""The query doctor's stack key: the compiled helper (``nplusone/_stackwalk.c``), its
pure-Python fallback, and the stack answers kept across scopes, on real ORM loops."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import FrameType

import pytest
from nplusone_models import CUSTOMERS, Customer
from sqlalchemy import select
from sqlalchemy.orm import Session

from pgpilot.nplusone import callsite, detect

THIS_FILE = "test_nplusone_stack_key.py"


def next_line() -> int:
    """The line after the caller's: where the statement under test is."""
    return sys._getframe(1).f_lineno + 1


def key_here(
    memo_key: object, anchor: FrameType, bottom: callsite._Bottom
) -> tuple[object, int, int] | None:
    return memo_key(0, "sql", bottom, anchor, callsite.MAX_LOOP_FRAMES)  # type: ignore[operator]


def bottom_of_key_here() -> callsite._Bottom:
    # no library frames below: the first frame "above them" is key_here's caller's callee
    return (0, key_here.__code__, key_here.__code__, (), False, False, False)


def keys_from_two_lines(memo_key: object) -> list[tuple[object, int, int] | None]:
    anchor = sys._getframe(0)
    bottom = bottom_of_key_here()
    keys = [key_here(memo_key, anchor, bottom) for _ in range(2)]  # one line, twice
    keys.append(key_here(memo_key, anchor, bottom))  # another line
    return keys


def unrelated_anchor() -> FrameType:
    return sys._getframe(0)  # a frame that has returned: on no later stack


@pytest.mark.parametrize("compiled", [True, False])
def test_the_key_tells_lines_apart_and_needs_the_anchor(compiled: bool) -> None:
    if compiled:
        stackwalk = pytest.importorskip("pgpilot.nplusone._stackwalk")
        memo_key = stackwalk.memo_key
    else:
        memo_key = callsite._py_memo_key
    first, again, other = keys_from_two_lines(memo_key)
    assert first is not None and first == again  # the same line in a loop: one key
    assert other is not None and other != first  # another line: another key
    assert first[:2] == ("sql", 0)
    # the anchor not on the stack: no key (the statement is walked instead)
    assert key_here(memo_key, unrelated_anchor(), bottom_of_key_here()) is None
    # the library frames are not those recorded: no key
    wrong: callsite._Bottom = (0, unrelated_anchor.__code__, key_here.__code__, (), False,
                               False, False)
    assert key_here(memo_key, sys._getframe(0), wrong) is None


def load_orders(session: Session) -> int:
    customers = session.scalars(select(Customer).order_by(Customer.id)).all()
    return sum(len(customer.orders) for customer in customers)  # the loop: lazy loads


def scope_calling_from_two_places(session: Session) -> list[tuple[str, tuple[str, ...], int]]:
    found = []
    with detect() as report:
        first_line = next_line()
        load_orders(session)
    [finding] = report.findings
    found.append((finding.callsite, finding.callers, first_line))
    session.expire_all()
    with detect() as report:
        second_line = next_line()
        load_orders(session)
    [finding] = report.findings
    found.append((finding.callsite, finding.callers, second_line))
    assert first_line != second_line
    return found


@pytest.fixture
def pure_python_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(callsite, "_memo_key", callsite._py_memo_key)
    monkeypatch.setattr(callsite, "_frame_codes", callsite._py_frame_codes)
    yield


@pytest.mark.parametrize("compiled", [True, False])
def test_a_stack_answered_across_scopes_keeps_each_scopes_callers(
    session: Session, compiled: bool, request: pytest.FixtureRequest
) -> None:
    if not compiled:
        request.getfixturevalue("pure_python_key")
    # twice: the second time every stack is answered from what the first time kept
    for _ in range(2):
        session.expire_all()
        (site_a, callers_a, line_a), (site_b, callers_b, line_b) = (
            scope_calling_from_two_places(session)
        )
        # the loop's line is in load_orders, the same for both scopes; who called it differs
        assert site_a == site_b and f"{THIS_FILE}:" in site_a
        assert callers_a[0].endswith(f"{THIS_FILE}:{line_a}")
        assert callers_b[0].endswith(f"{THIS_FILE}:{line_b}")


@pytest.mark.parametrize("compiled", [True, False])
def test_repeated_scopes_count_the_loop_alike(
    session: Session, compiled: bool, request: pytest.FixtureRequest
) -> None:
    if not compiled:
        request.getfixturevalue("pure_python_key")
    counts = []
    for _ in range(3):
        session.expire_all()
        with detect() as report:
            load_orders(session)
        [finding] = report.findings
        assert finding.kind == "n_plus_one"
        counts.append((finding.count, finding.distinct_params, report.queries))
    assert counts == [(CUSTOMERS, CUSTOMERS, CUSTOMERS + 1)] * 3
