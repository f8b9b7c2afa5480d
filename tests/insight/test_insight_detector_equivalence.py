"""The scope detector against its reference (``old_scope_detector``: ``add`` and the group's
per-loop parameter sets as they were before those sets were made only when a second loop runs
a statement, and ``_findings_for`` before its fast path): for any stream of events (full
``QueryEvent``s, the short tuples the pooler passes, unhashable parameter keys, several loop
keys, writes, caps on distinct parameters lowered so that they are met), ``add`` returns the
same answer at every event, ``loop_distinct()`` stays the same, and the findings are equal."""

from __future__ import annotations

from typing import Any
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st
from old_scope_detector import OldScopeDetector

from pgpilot.insight import detector as detector_module
from pgpilot.insight.detector import Detector, QueryEvent, ScopeDetector
from pgpilot.insight.fingerprint import fingerprint

STATEMENTS = (
    "SELECT name FROM customers WHERE id = $1",
    "UPDATE accounts SET balance = $1 WHERE id = $2",
    "SELECT id FROM orders ORDER BY id LIMIT $1 OFFSET $2",
    "SELECT a FROM t WHERE id = '12'",  # a wrong-type comparison: found from the text alone
    "",  # what the pooler's events carry
)
FINGERPRINTS = tuple(fingerprint(sql) if sql else "7" for sql in STATEMENTS)

params_keys = st.one_of(
    st.integers(0, 4),
    st.integers(0, 4),
    st.tuples(st.sampled_from(STATEMENTS[:2]), st.integers(0, 4)),
    st.lists(st.integers(0, 2), max_size=2),  # unhashable: the repr fallback
    st.dictionaries(st.sampled_from("ab"), st.integers(0, 1), max_size=2),
    st.none(),
)


LOOP_KEYS = st.sampled_from([None, 1, 2, "outer"])
LENGTHS = st.sampled_from([7, 8, 9, 10, 11, 12, 13, 14, 15])


@st.composite
def events(draw: Any, loops: Any = None, lengths: Any = None) -> tuple[Any, ...]:
    which = draw(st.sampled_from([0, 0, 0, 0, 1, 2, 3, 4]))  # mostly one group
    full = QueryEvent(
        fingerprint=FINGERPRINTS[which],
        sql=STATEMENTS[which],
        params_key=draw(params_keys),
        scope_id=None,
        callsite=draw(st.sampled_from(["", *(f"app/v.py:{n}" for n in range(10))])),
        timestamp=0.0,
        command=draw(st.sampled_from(["read", "read", "read", "write", "other"])),
        relationship=draw(st.sampled_from([None, "Customer.orders"])),
        loader_option=None,
        loop_key=draw(loops if loops is not None else LOOP_KEYS),
        rows=draw(st.sampled_from([-1, 0, 3, 50])),
        tag=draw(st.sampled_from([None, None, "get", "flush", "contains_eager"])),
        offset=draw(st.sampled_from([None, None, None, 0, 10, 20, 70])),
        callers=(),
        limit=draw(st.sampled_from([None, None, 1, 5])),
    )
    # a plain tuple may stop after any field from the command on (the pooler's stops there)
    length = draw(lengths if lengths is not None else LENGTHS)
    if length == 15 and draw(st.booleans()):
        return full
    return tuple(full)[:length]


@st.composite
def operations(draw: Any) -> list[Any]:
    # each stream draws the loop keys and tuple lengths it uses: some run one loop only
    # (the sets not made at all), some several, some are all short tuples (no loop key)
    loops = st.sampled_from(
        draw(st.lists(st.sampled_from([None, 1, 2, "outer"]), min_size=1, max_size=3))
    )
    lengths = st.sampled_from(
        draw(st.lists(st.sampled_from([7, 9, 10, 11, 14, 15]), min_size=1, max_size=3))
    )
    # "write": note_write() (a write in an isolated scope inside this one)
    return draw(st.lists(st.one_of(events(loops, lengths), st.just("write")), max_size=50))


def _detectors(
    threshold: int, duplicates: int, large: int, deep: int
) -> tuple[ScopeDetector, ScopeDetector]:
    return (
        ScopeDetector(threshold, duplicates, large_result=large, deep_offset=deep),
        OldScopeDetector(threshold, duplicates, large_result=large, deep_offset=deep),
    )


@settings(max_examples=1500, deadline=None)
@given(
    operations(),
    st.integers(2, 4),
    st.integers(2, 3),
    st.sampled_from([2, 3, 5, 10_000]),
    st.sampled_from([10, 10_000]),
    st.sampled_from([1, 15, 1_000]),
)
def test_add_and_findings_match_the_reference(
    stream: list[Any], threshold: int, duplicates: int, cap: int, large: int, deep: int
) -> None:
    with mock.patch.object(detector_module, "MAX_DISTINCT_PARAMS", cap):
        new, old = _detectors(threshold, duplicates, large, deep)
        for step, operation in enumerate(stream):
            if operation == "write":
                new.note_write()
                old.note_write()
                continue
            assert new.add(operation) == old.add(operation), (step, operation)
            for key, group in new._groups.items():
                assert group.loop_distinct() == old._groups[key].loop_distinct(), step
                assert len(group.params) == len(old._groups[key].params), step
        assert new.queries == old.queries
        assert new.findings() == old.findings()
        for key in FINGERPRINTS:
            assert new.finding(key) == old.finding(key)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["c1", "c2"]), events()), max_size=60))
def test_the_poolers_detector_reports_the_same_loops(stream: list[Any]) -> None:
    # Detector (many scopes, what the pooler's Python path and tests use) makes one
    # ScopeDetector per scope: the same answers with the reference in its place
    def run() -> tuple[list[Any], dict[str, list[Any]]]:
        detector = Detector(threshold=3)
        reported = []
        for scope, fields in stream:
            event = QueryEvent(*fields)._replace(scope_id=scope)
            reported.append(detector.feed(event))
        return reported, {scope: detector.close(scope) for scope in ("c1", "c2")}

    current = run()
    with mock.patch.object(detector_module, "ScopeDetector", OldScopeDetector):
        reference = run()
    assert current == reference


def test_a_second_loop_after_the_first_met_the_cap_counts_from_its_own_start() -> None:
    # the case the lazily made sets are most likely to get wrong: the first loop's keys
    # copied from the parameters when a second loop appears, after the cap stopped both
    with mock.patch.object(detector_module, "MAX_DISTINCT_PARAMS", 3):
        new, old = _detectors(3, 2, 10_000, 1_000)
        sql = STATEMENTS[0]
        stream = [
            QueryEvent(FINGERPRINTS[0], sql, (sql, value), loop_key=loop)
            for loop, value in [(1, 1), (1, 2), (1, 3), (1, 4), (2, 4), (2, 5), (2, 1), (1, 5)]
        ]
        answers = [(new.add(event), old.add(event)) for event in stream]
    assert [a for a, _ in answers] == [b for _, b in answers]
    assert [a for a, _ in answers] == [False, False, True, False, False, False, True, False]
    assert new.findings() == old.findings()
