"""The scope detector's ``add`` and per-group state as they were before the per-loop parameter
sets were made lazily (pgpilot bc22a13), kept as the reference the equivalence test in
``test_insight_detector_equivalence.py`` compares the current detector with. Not a test module.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import replace
from itertools import pairwise
from typing import Any

from pgpilot.insight import detector as current
from pgpilot.insight.detector import (
    _CALLERS,
    _CALLSITE,
    _COMMAND,
    _FIELDS,
    _FINGERPRINT,
    _LIMIT,
    _LOOP_KEY,
    _LOOP_KINDS,
    _OFFSET,
    _PARAMS_KEY,
    _RELATIONSHIP,
    _ROWS,
    _SQL,
    _TAG,
    MAX_CALLSITES,
    OTHER,
    READ,
    WRITE,
    EventFields,
    Finding,
    ScopeDetector,
    _as_event,
    _field,
)
from pgpilot.insight.shape import shape


class OldGroup:
    """``_Group`` at bc22a13: a set of parameter keys per loop key, from the first execution."""

    def __init__(self, first: EventFields) -> None:
        self.first = first
        self.labelled: EventFields | None = None
        self.tagged: EventFields | None = None
        self.count = 0
        self.params: dict[Hashable, list[Any]] = {}
        self.loop_params: dict[Hashable, set[Hashable]] = {}
        self.callsites: dict[str, int] = {}
        self.repeats = 0
        self.repeat_event = first
        self.repeat_first = first
        self.biggest: EventFields | None = None
        self.offsets: dict[Hashable, list[int]] = {}
        self.pages = False

    def loop_distinct(self) -> int:
        return max((len(keys) for keys in self.loop_params.values()), default=0)


class OldScopeDetector(ScopeDetector):
    """``ScopeDetector`` with ``add`` and ``_findings_for`` as they were at bc22a13 (the cap
    on distinct parameters read from the current module, so a test can lower both at once)."""

    def add(self, event: EventFields) -> bool:
        max_distinct = current.MAX_DISTINCT_PARAMS
        fields: tuple[Any, ...] = event
        self.queries += 1
        command = fields[_COMMAND]
        if command == OTHER:
            return False
        if command == WRITE:
            self._write_epoch += 1
        fingerprint = fields[_FINGERPRINT]
        groups: dict[str, Any] = self._groups
        group = groups.get(fingerprint)
        if group is None:
            group = groups[fingerprint] = OldGroup(event)
        group.count += 1
        callsite = fields[_CALLSITE]
        if callsite:
            callsites = group.callsites
            if callsite in callsites:
                callsites[callsite] += 1
            elif len(callsites) < MAX_CALLSITES:
                callsites[callsite] = 1
        if len(fields) > _LOOP_KEY:
            if len(fields) < _FIELDS:
                fields = _as_event(fields)
            loop_key = fields[_LOOP_KEY]
            if group.labelled is None and fields[_RELATIONSHIP] is not None:
                group.labelled = event
            if group.tagged is None and fields[_TAG] is not None:
                group.tagged = event
            rows = fields[_ROWS]
            if rows > 0 and (group.biggest is None or rows > group.biggest[_ROWS]):
                group.biggest = event
            limit = fields[_LIMIT]
            if limit is not None and limit > 1:
                group.pages = True
            offset = fields[_OFFSET]
            if offset is not None:
                offsets = group.offsets.setdefault(loop_key, [])
                if len(offsets) < MAX_CALLSITES * 4:
                    offsets.append(offset)
        else:
            loop_key = None
        params = group.params
        key = fields[_PARAMS_KEY]
        try:
            entry = params.get(key)
        except TypeError:
            key = repr(key)
            entry = params.get(key)
        loop = group.loop_params.get(loop_key)
        if loop is None:
            loop = group.loop_params[loop_key] = set()
        new_in_loop = key not in loop and len(loop) < max_distinct
        if new_in_loop:
            loop.add(key)
        if entry is None:
            if len(params) < max_distinct:
                params[key] = [self._write_epoch, 1, event]
        elif command == READ:
            if entry[0] == self._write_epoch:
                entry[1] += 1
                if entry[1] > group.repeats:
                    group.repeats = entry[1]
                    group.repeat_event = event
                    group.repeat_first = entry[2]
            else:
                entry[0] = self._write_epoch
                entry[1] = 1
                entry[2] = event
        return bool(
            new_in_loop and len(loop) == self.threshold and group.loop_distinct() == len(loop)
        )

    def _findings_for(self, group: Any) -> list[Finding]:
        found: list[Finding] = []
        distinct = group.loop_distinct()
        first: tuple[Any, ...] = group.first
        example = group.labelled if group.labelled is not None else group.first
        statement = shape(first[_SQL])
        tagged: tuple[Any, ...] | None = group.tagged
        tag = tagged[_TAG] if tagged is not None else None
        growing = max(
            (
                len(values)
                for values in group.offsets.values()
                if len(values) >= self.threshold and all(a < b for a, b in pairwise(values))
            ),
            default=0,
        )
        if distinct >= self.threshold and not growing and not group.pages:
            kind = _LOOP_KINDS.get(statement.verb, "n_plus_one")
            if tag == "contains_eager" and kind == "n_plus_one":
                kind = "missing_contains_eager"
            if tag in ("contains_eager", "expired", "flush", "commit_loop"):
                example = tagged if tagged is not None else example
            found.append(self._make(kind, example, group.count, len(group.params), group))
        elif group.repeats >= self.duplicate_threshold and tag not in ("flush", "commit_loop"):
            repeated: tuple[Any, ...] = group.repeat_event
            kind = "duplicate_get" if _field(repeated, _TAG) == "get" else "duplicate"
            duplicate = self._make(kind, repeated, group.repeats, len(group.params), group)
            first_run: tuple[Any, ...] = group.repeat_first
            if first_run is not repeated and len(first_run) > _CALLERS:
                callers: tuple[str, ...] = first_run[_CALLERS] or ()
                duplicate = replace(duplicate, first_stack=(first_run[_CALLSITE], *callers))
            found.append(duplicate)
        if group.biggest is not None and group.biggest[_ROWS] >= self.large_result:
            rows = group.biggest[_ROWS]
            found.append(
                self._make(
                    "large_result", group.biggest, group.count, len(group.params), group,
                    detail=f"{rows:,} rows in one result",
                )
            )
        deepest = max((max(values) for values in group.offsets.values() if values), default=0)
        if deepest >= self.deep_offset or growing:
            detail = f"OFFSET up to {deepest:,}"
            if growing:
                detail += f", growing over {growing} pages of one loop"
            found.append(
                self._make("deep_offset", group.first, group.count, len(group.params), group,
                           detail=detail)
            )
        if statement.wrong_type is not None:
            column, literal = statement.wrong_type
            found.append(
                self._make("wrong_type_comparison", group.first, group.count,
                           len(group.params), group, detail=f"{column} = '{literal}'")
            )
        if statement.correlated_subquery is not None:
            found.append(
                self._make("correlated_subquery", group.first, group.count, len(group.params),
                           group, detail=f"a subquery per row of {statement.correlated_subquery}")
            )
        return found
