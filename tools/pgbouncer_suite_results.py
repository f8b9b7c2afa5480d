"""Summarize a run of PgBouncer's own test suite against pgpilot (JUnit XML from
``../shared/pgbouncer-tests/run.sh ... --junitxml=FILE``) into bench/results/pgbouncer-suite.json
and .md: per test file, passed / failed / skipped, every test that did not pass with the reason
(the skip's own reason, or pgpilot's note on why the failure is a deliberate difference or
not done yet; docs/pooler.md "Differences from PgBouncer" explains each).

    python tools/pgbouncer_suite_results.py out.xml --command "..." [--note "..."]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"

# Why a suite test fails against pgpilot (keyed by test name).
REASONS: dict[str, str] = {
    "test_auth_user": "deliberate: a user auth_query does not find gets the mock exchange "
                      "('password authentication failed'), not PgBouncer's 'no such user' "
                      "(no role enumeration)",
    "test_no_user_auth_user": "deliberate: as test_auth_user",
    "test_online_restart": "not done: no socket takeover (-R); docs/operations.md says how "
                           "to restart without dropping clients",
    "test_scram_takeover": "not done: as test_online_restart",
    "test_peering_with_own_index": "not done: no peering ([peers], peer_id); workers route "
                                   "cancels between pgpilot's own processes",
    "test_peering_without_own_index": "not done: as test_peering_with_own_index",
    "test_equivalent_startup_param": "deliberate: the client's startup parameters are SET on "
                                     "a server at login (the welcome reports the server's "
                                     "spelling), so PgBouncer's varcache_apply line comes at "
                                     "login, not at the first query",
    "test_deallocate_all": "deliberate: a statement used after DEALLOCATE ALL gets "
                           "PostgreSQL's 26000 error and the session goes on; PgBouncer "
                           "closes the connection",
    "test_discard_all": "deliberate: as test_deallocate_all, after DISCARD ALL",
    "test_describe_non_existent_prepared_statement": "deliberate: PostgreSQL's 26000 error, "
                                                     "the session goes on; PgBouncer closes "
                                                     "the connection",
    "test_prepared_disallow_name_reuse": "differs: a Parse of a name the client already "
                                         "prepared replaces it (the newest wins) instead of "
                                         "42P05 'already exists'",
    "test_evict_statement_cache": "differs: max_prepared_statements = 0 set while a client "
                                  "is connected does not stop renaming its statements "
                                  "(PgBouncer's test expects them to break)",
    "test_statement_name_longer_than_pkt_buf": "the test itself: psycopg 3.1.20's "
                                               "exec_prepared takes a list, the test passes a "
                                               "tuple (TypeError before any query)",
    "test_prepared_statement_pipeline_error_delayed_sync": "the test itself: fails the same "
                                                           "way directly against PostgreSQL "
                                                           "with psycopg 3.1.20 ('no result "
                                                           "available')",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", type=Path)
    parser.add_argument("--command", required=True, help="the exact command that ran it")
    parser.add_argument("--note", default="", help="conditions of the run")
    args = parser.parse_args()
    root = ET.parse(args.junit).getroot()
    files: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    others: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for case in root.iter("testcase"):
        module = (case.get("classname") or "").split(".")[-1] + ".py"
        name = case.get("name") or ""
        if (module, name) in seen:
            # A test that failed and then errored in its teardown is reported twice: once.
            continue
        seen.add((module, name))
        skipped = case.find("skipped")
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if skipped is not None:
            outcome = "skipped"
            reason = (skipped.get("message") or "").strip()
        elif failure is not None:
            outcome = "failed"
            reason = REASONS.get(name.split("[")[0], "not explained yet: " + (
                failure.get("message") or "").strip().splitlines()[0][:160] if (
                failure.get("message") or "").strip() else "not explained yet")
        else:
            files[module]["passed"] += 1
            continue
        files[module][outcome] += 1
        others.append({"file": module, "test": name, "outcome": outcome, "reason": reason})
    totals = collections.Counter[str]()
    for counts in files.values():
        totals.update(counts)
    run = totals["passed"] + totals["failed"]
    result = {
        "suite": "PgBouncer 1.23.1 test/ (../shared/pgbouncer-tests)",
        "command": args.command,
        "note": args.note,
        "totals": {"passed": totals["passed"], "failed": totals["failed"],
                   "skipped": totals["skipped"], "run": run,
                   "passed_share_of_run": round(totals["passed"] / run, 4) if run else 0.0},
        "files": {f: {k: files[f][k] for k in ("passed", "failed", "skipped")}
                  for f in sorted(files)},
        "not_passed": sorted(others, key=lambda o: (o["outcome"], o["file"], o["test"])),
    }
    (OUT / "pgbouncer-suite.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# PgBouncer 1.23.1's own test suite against pgpilot",
        "",
        f"Command: `{args.command}`",
        "",
    ]
    if args.note:
        lines += [args.note, ""]
    lines += [
        f"**{totals['passed']} of {run} run pass ({100 * totals['passed'] / max(run, 1):.1f} "
        f"%)**; {totals['failed']} fail, {totals['skipped']} skipped (IPv6, sudo, libpq "
        "version).",
        "",
        "| file | passed | failed | skipped |",
        "|---|---|---|---|",
    ]
    for f in sorted(files):
        c = files[f]
        lines.append(f"| {f} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    lines += ["", "| test | outcome | why |", "|---|---|---|"]
    for o in result["not_passed"]:  # type: ignore[union-attr]
        lines.append(f"| {o['file']}::{o['test']} | {o['outcome']} | "
                     f"{o['reason'].replace('|', '/')} |")
    (OUT / "pgbouncer-suite.md").write_text("\n".join(lines) + "\n")
    print(f"{totals['passed']}/{run} passed, {totals['skipped']} skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
