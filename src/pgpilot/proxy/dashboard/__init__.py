"""The dashboard: a web page the pooler serves on its metrics port (``GET /``), no build step.

``index.html`` is static; it reads ``GET /dashboard.json`` every two seconds: the pools and their
states, the top queries (stats.py), N+1 bursts (wire_nplusone.py), slow queries with their
findings (slow.py), transaction-pooling hazards and pins, and the pool sizing advice
(advisor.py). With ``workers = N`` all of it is every worker's: the pools are each worker's
share added up (admin.all_pools; the siblings' as of their last snapshot, about a second old).
No parameter value is in any of it.

Access: a metrics port bound to a loopback address serves it to anyone who can reach it (the
machine's own users). Bound to any other address ("exposed"), the page and every JSON endpoint
(``/dashboard.json``, ``/queries``, ``/slow``) answer only a request carrying
``dashboard_token`` (``?token=...`` or ``Authorization: Bearer ...``), and nothing at all while
no token is set. ``/metrics`` is unchanged (Prometheus scrapers).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import time
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from pgpilot.proxy.pooler import Pooler

PROTECTED = frozenset({b"/", b"/index.html", b"/dashboard.json", b"/queries", b"/slow"})


def page() -> bytes:
    return resources.files(__package__).joinpath("index.html").read_bytes()


def is_exposed(host: str | None) -> bool:
    """Whether a server bound to ``host`` (None: every address) is reachable from elsewhere."""
    if host is None or host in ("", "*"):
        return True
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: assume it is reachable


def authorized(head: bytes, pooler: Pooler, exposed: bool) -> tuple[bool, bytes]:
    """May this request (its head) read the dashboard's data? (answer, why not)."""
    if not exposed:
        return True, b""
    token = pooler.config.dashboard_token
    if not token:
        return False, b"the dashboard is off on an exposed metrics port: set dashboard_token\n"
    lines = head.split(b"\r\n")
    target = lines[0].split()[1].decode("latin-1") if len(lines[0].split()) == 3 else ""
    given = parse_qs(urlsplit(target).query).get("token", [""])[0]
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            scheme, _, credential = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                given = credential.strip().decode("latin-1")
    if given and hmac.compare_digest(given.encode(), token.encode()):
        return True, b""
    return False, b"a valid dashboard_token is needed (?token=... or Authorization: Bearer)\n"


def state(pooler: Pooler) -> dict[str, Any]:
    """Everything the page shows, as plain data."""
    import pgpilot
    from pgpilot.proxy.admin import all_pools
    from pgpilot.proxy.hazards import HINTS
    from pgpilot.proxy.stats import show_advice

    if pooler.fast is not None:
        pooler.fast.settle(claim=False)
    try:
        pools = all_pools(pooler)  # every worker's share, added up
    finally:
        if pooler.fast is not None:
            pooler.fast.refill()
    stats = pooler.query_stats
    queries = [e.to_json() for e in stats.merged()[:50]] if stats.enabled else []
    for q in queries:
        q.pop("histogram", None)
    slow = []
    for e in stats.merged_slow():
        findings = e.reports[-1]["findings"][:3] if e.reports else []
        slow.append({**e.to_json(reports=False),
                     "findings": "; ".join(f"{f['severity']} {f['rule']}: {f['message']}"
                                           for f in findings),
                     "fix": findings[0]["fix"] if findings else ""})
    hazards = [{"database": db, "user": user, "application_name": app, "hazard": kind,
                "count": entry.count, "last_seen": entry.last_seen, "hint": HINTS[kind]}
               for (db, user, app, kind), entry in sorted(pooler.hazards.counts.items())]
    hazards += [{"database": "", "user": "", "application_name": "", "hazard": f"pin: {reason}",
                 "count": count, "last_seen": None, "hint": "kept on its server"}
                for reason, count in sorted(pooler.pins_total.items())]
    columns, rows = show_advice(pooler)
    names = [name for name, _oid in columns]
    advice = [dict(zip(names, row, strict=True)) for row in rows]
    worker = pooler.worker
    return {"version": pgpilot.__version__, "generated_at": time.time(),
            "workers": worker.count if worker is not None else 1, "pools": pools,
            "queries": queries, "nplusone": [e.to_json() for e in stats.merged_nplusone()],
            "slow": slow, "hazards": hazards, "advice": advice}


def state_json(pooler: Pooler) -> bytes:
    return json.dumps(state(pooler), default=str).encode()


__all__ = ["PROTECTED", "authorized", "is_exposed", "page", "state", "state_json"]
