"""What query traffic says, shared by the pooler and the in-app N+1 detector.

``fingerprint`` tells what a statement is regardless of its values (cached pglast parses);
``detector`` groups a stream of :class:`QueryEvent` per scope into N+1 and duplicate
:class:`Finding` objects; ``suggest`` says how to fix each one.
"""

from pgpilot.insight.detector import (
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_THRESHOLD,
    Allowlist,
    Detector,
    Finding,
    FindingKind,
    QueryEvent,
    ScopeDetector,
)
from pgpilot.insight.fingerprint import Statement, describe, fingerprint, normalize
from pgpilot.insight.suggest import suggest_fix

__all__ = [
    "DEFAULT_DUPLICATE_THRESHOLD",
    "DEFAULT_THRESHOLD",
    "Allowlist",
    "Detector",
    "Finding",
    "FindingKind",
    "QueryEvent",
    "ScopeDetector",
    "Statement",
    "describe",
    "fingerprint",
    "normalize",
    "suggest_fix",
]
