"""The detector over event streams: one scope (in-app) and many interleaved scopes (pooler)."""

from __future__ import annotations

import pytest

from pgpilot.insight import (
    Allowlist,
    Detector,
    FindingKind,
    QueryEvent,
    ScopeDetector,
    fingerprint,
    suggest_fix,
)

BY_CUSTOMER = "SELECT id FROM orders WHERE customer_id = $1"
BY_ID = "SELECT name FROM customers WHERE id = $1"
INSERT = "INSERT INTO orders (customer_id) VALUES ($1)"


def event(
    sql: str,
    value: object,
    *,
    scope: object = "s",
    command: str = "read",
    callsite: str = "app/views.py:10",
    at: float = 0.0,
) -> QueryEvent:
    return QueryEvent(
        fingerprint=fingerprint(sql),
        sql=sql,
        params_key=(sql, value),
        scope_id=scope,
        callsite=callsite,
        timestamp=at,
        command=command,
    )


def test_distinct_parameters_at_the_threshold_make_an_n_plus_one() -> None:
    detector = ScopeDetector(threshold=3)
    assert detector.add(event(BY_CUSTOMER, 1)) is False
    assert detector.add(event(BY_CUSTOMER, 2)) is False
    assert detector.findings() == []
    assert detector.add(event(BY_CUSTOMER, 3)) is True  # the threshold is met here
    assert detector.add(event(BY_CUSTOMER, 4)) is False  # and only once
    [finding] = detector.findings()
    assert (finding.kind, finding.count, finding.distinct_params) == ("n_plus_one", 4, 4)
    assert finding.callsite == "app/views.py:10"


def test_same_parameters_repeated_make_a_duplicate_not_an_n_plus_one() -> None:
    detector = ScopeDetector()
    for _ in range(5):
        detector.add(event(BY_ID, 7))
    [finding] = detector.findings()
    assert (finding.kind, finding.count, finding.distinct_params) == ("duplicate", 5, 1)


def test_an_n_plus_one_with_repeats_is_reported_once_as_n_plus_one() -> None:
    detector = ScopeDetector()
    for value in (1, 2, 3, 1, 2, 3):
        detector.add(event(BY_CUSTOMER, value))
    [finding] = detector.findings()
    assert finding.kind == "n_plus_one"
    assert finding.count == 6


def test_a_write_in_between_resets_duplicate_counting() -> None:
    detector = ScopeDetector()
    detector.add(event(BY_ID, 7))
    detector.add(event(INSERT, 1, command="write"))
    detector.add(event(BY_ID, 7))
    assert detector.findings() == []
    detector.add(event(BY_ID, 7))
    assert [finding.kind for finding in detector.findings()] == ["duplicate"]


def test_writes_in_a_loop_are_a_write_loop_but_never_duplicates() -> None:
    detector = ScopeDetector()
    for _ in range(3):
        detector.add(event(INSERT, 1, command="write"))
    assert detector.findings() == []
    for value in (2, 3):
        detector.add(event(INSERT, value, command="write"))
    [finding] = detector.findings()
    assert finding.kind == "insert_loop"


def test_other_statements_are_counted_but_never_findings() -> None:
    detector = ScopeDetector()
    for value in range(10):
        detector.add(event("SELECT nextval('s')", value, command="other"))
    assert detector.queries == 10
    assert detector.findings() == []


def test_findings_are_sorted_by_count_and_carry_callsites() -> None:
    detector = ScopeDetector()
    for value in range(3):
        detector.add(event(BY_ID, value, callsite="a.py:1"))
    for value in range(5):
        detector.add(event(BY_CUSTOMER, value, callsite=f"b.py:{value % 2}"))
    counts = [finding.count for finding in detector.findings()]
    assert counts == [5, 3]
    assert detector.findings()[0].callsites == ("b.py:0", "b.py:1")


def test_allowlist_filters_by_fingerprint_callsite_and_relationship() -> None:
    allow = Allowlist(
        callsites=("legacy/*.py:*",),
        fingerprints=frozenset({fingerprint(BY_ID)}),
        relationships=("Customer.*",),
    )
    detector = ScopeDetector(allowlist=allow)
    for value in range(3):
        detector.add(event(BY_ID, value))  # allowlisted fingerprint
        detector.add(event(BY_CUSTOMER, value, callsite="legacy/report.py:9"))
        detector.add(
            QueryEvent(
                fingerprint=fingerprint("SELECT * FROM orders WHERE id = $1"),
                sql="SELECT * FROM orders WHERE id = $1",
                params_key=value,
                relationship="Customer.orders",
            )
        )
        detector.add(event("SELECT * FROM items WHERE order_id = $1", value))
    assert [finding.sql for finding in detector.findings()] == [
        "SELECT * FROM items WHERE order_id = $1"
    ]


def test_suggest_callback_fills_the_suggestion() -> None:
    seen: list[FindingKind] = []

    def suggest(kind: FindingKind, example: QueryEvent) -> str:
        seen.append(kind)
        return f"fix {example.sql}"

    detector = ScopeDetector(suggest=suggest)
    for value in range(3):
        detector.add(event(BY_CUSTOMER, value))
    [finding] = detector.findings()
    assert finding.suggestion == f"fix {BY_CUSTOMER}"
    assert seen == ["n_plus_one"]


def test_suggest_fix_prefers_the_loader_option_then_reads_the_sql() -> None:
    lazy = QueryEvent(
        fingerprint="x", sql=BY_CUSTOMER, params_key=1, loader_option="selectinload(A.b)"
    )
    assert suggest_fix("n_plus_one", lazy) == "selectinload(A.b)"
    raw = suggest_fix("n_plus_one", event(BY_CUSTOMER, 1))
    assert "SELECT id FROM orders WHERE customer_id = ANY(:ids)" in raw
    assert "executemany()" in suggest_fix("n_plus_one", event(INSERT, 1, command="write"))
    assert "reuse the first result" in suggest_fix("duplicate", event(BY_ID, 1))
    assert "pgpilot.cache" in suggest_fix("duplicate", event(BY_ID, 1))


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="threshold"):
        ScopeDetector(threshold=1)
    with pytest.raises(ValueError, match="duplicate_threshold"):
        Detector(duplicate_threshold=0)


def test_interleaved_scopes_are_kept_apart_and_reported_as_they_cross() -> None:
    detector = Detector(threshold=3, suggest=suggest_fix)
    crossed = []
    for value in range(4):
        for client in ("alice", "bob"):
            # bob repeats the same value: a duplicate, never an N+1
            found = detector.feed(
                event(BY_CUSTOMER, value if client == "alice" else 0, scope=client)
            )
            if found is not None:
                crossed.append((client, value, found.kind))
    assert crossed == [("alice", 2, "n_plus_one")]
    assert set(detector.open_scopes()) == {"alice", "bob"}
    assert [f.kind for f in detector.findings("bob")] == ["duplicate"]
    alice = detector.close("alice")
    assert [(f.kind, f.count) for f in alice] == [("n_plus_one", 4)]
    assert "ANY(:ids)" in alice[0].suggestion
    assert detector.close("alice") == []
    assert set(detector.open_scopes()) == {"bob"}


def test_quiet_scopes_expire() -> None:
    detector = Detector()
    for value in range(3):
        detector.feed(event(BY_CUSTOMER, value, scope="old", at=1.0))
    detector.feed(event(BY_CUSTOMER, 1, scope="new", at=50.0))
    expired = detector.expire(older_than=10.0)
    assert list(expired) == ["old"]
    assert [f.kind for f in expired["old"]] == ["n_plus_one"]
    assert list(detector.open_scopes()) == ["new"]


def test_allowlisted_crossings_are_not_reported_online() -> None:
    detector = Detector(allowlist=Allowlist(fingerprints=frozenset({fingerprint(BY_ID)})))
    results = [detector.feed(event(BY_ID, value)) for value in range(5)]
    assert results == [None] * 5


def test_unhashable_parameters_are_compared_by_value() -> None:
    detector = ScopeDetector()
    for _ in range(2):
        detector.add(event(BY_CUSTOMER, [1, 2]))  # an array parameter, as a list
    detector.add(event(BY_CUSTOMER, {"doc": [3]}))
    [finding] = detector.findings()
    assert (finding.kind, finding.count, finding.distinct_params) == ("duplicate", 2, 2)


def test_plain_tuples_of_the_event_fields_are_accepted() -> None:
    detector = ScopeDetector()
    fp = fingerprint(BY_CUSTOMER)
    for value in range(3):
        detector.add((fp, BY_CUSTOMER, value, "s", "a.py:3", 0.0, "read", None, None))
    [finding] = detector.findings()
    assert (finding.kind, finding.callsite, finding.sql) == ("n_plus_one", "a.py:3", BY_CUSTOMER)
