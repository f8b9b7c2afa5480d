"""Precision of the query doctor on real projects' own test suites.

Each suite below is a real SQLAlchemy 2.x application or library published on PyPI whose sdist
ships its tests. For each one this script downloads the sdist (``pip download --no-binary``),
installs it with its test dependencies into a virtualenv of its own (``--system-site-packages``,
so pgpilot's own dependencies come from the running interpreter), and runs its suite three times
with the suite's own fixtures:

* ``baseline``: without ``--nplusone``: which tests fail anyway;
* ``warn``: ``--nplusone=warn``: every finding, as the warning pgpilot emits at its call site;
* ``raise``: ``--nplusone=raise``: how many tests would fail in CI because of pgpilot (failed
  with ``NPlusOneError`` and not failing at baseline).

The pgpilot that runs is the one under ``--pgpilot-src`` (default: this checkout's ``src``), put
first on ``PYTHONPATH``, so a copy of an older commit (``git archive <commit> src | tar -x -C
DIR``) measures "before". ``bench/realworld_collector.py`` records warnings and outcomes.

Findings are grouped by (kind, call site, relationship): a group is one thing a person would
fix once. ``--judgments FILE`` (JSON: ``{"suite": {"group key": "true" | "false"}}``) gives the
verdicts of a person who read the code behind a sample of groups (keys starting with "_" are
notes, ignored; ``"suite@OUT"`` overrides verdicts for the run written to ``--out OUT``, where
the pgpilot measured words a group's suggestion differently); the report then prints the
precision over the judged groups.

Usage::

    python bench/doctor_realworld.py --out bench/results/doctor-realworld-after \\
        [--suite ihatemoney] [--pgpilot-src DIR] [--judgments FILE] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class Suite:
    """One real project: where its sdist is, how to install it, how its tests run."""

    name: str
    requirement: str
    """What ``pip download`` fetches (pinned, so before and after run the same code)."""
    folder: str
    """The sdist's top folder."""
    install: tuple[str, ...]
    """``pip install`` arguments, run inside the unpacked sdist."""
    tests: tuple[str, ...]
    """pytest arguments selecting the tests."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment; ``{dsn}`` is replaced by a PostgreSQL URL."""
    database: str = "sqlite"
    what: str = ""


SUITES = {
    suite.name: suite
    for suite in (
        Suite(
            name="ihatemoney",
            requirement="ihatemoney==7.2.1",
            folder="ihatemoney-7.2.1",
            install=("-e", ".", "pytest-flask~=1.3.0", "pytest-timeout>=2,<3"),
            tests=("ihatemoney/tests",),
            what="a shared budget manager web application (Flask, Flask-SQLAlchemy, "
            "SQLAlchemy-Continuum); its tests drive the app through Flask's test client",
        ),
        Suite(
            name="flask-appbuilder",
            requirement="flask-appbuilder==5.3.0",
            folder="flask_appbuilder-5.3.0",
            install=(
                "-e",
                ".[jmespath,oauth]",
                "parameterized",
                "hiro",
                "freezegun",
                "psycopg2-binary",
                "pytest-timeout>=2,<3",
            ),
            tests=(
                "tests",
                "--ignore=tests/security/test_auth_ldap.py",
                "-k",
                "not mongo and not oauth",
            ),
            env={"SQLALCHEMY_DATABASE_URI": "{dsn}"},
            database="postgresql",
            what="an application framework (Flask, Flask-SQLAlchemy; security models with "
            "roles, permissions and views, CRUD views and a REST API); its tests drive a "
            "sample app through the test client",
        ),
        Suite(
            name="flask-admin",
            requirement="flask-admin==2.2.1",
            folder="flask_admin-2.2.1",
            install=(
                "-e",
                ".[sqlalchemy,sqlalchemy-lite,sqlalchemy-with-utils,translation,export]",
                # 2.2.1 predates WTForms 3.3, whose deprecation warnings its suite makes errors
                "wtforms>=3.1,<3.3",
                "flask[async]",
                "psycopg2-binary",
                "beautifulsoup4",
                "pytest-timeout>=2,<3",
            ),
            tests=("flask_admin/tests/sqla",),
            env={"SQLALCHEMY_DATABASE_URI": "{dsn}"},
            database="sqlite, postgresql",
            what="an admin interface framework (Flask, Flask-SQLAlchemy and "
            "Flask-SQLAlchemy-Lite; list, create, edit and inline-edit views over models with "
            "one-to-many, many-to-many and multi-column-key relationships, filters, search and "
            "export); its SQLAlchemy tests build models and views per test and drive them "
            "through the test client, on SQLite and (test_postgres.py) PostgreSQL",
        ),
    )
}


def run(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=cwd, env=env, check=True)


def prepare(suite: Suite, workdir: Path) -> tuple[Path, Path]:
    """The unpacked sdist and its virtualenv's python, made once and reused."""
    downloads = workdir / "dl"
    source = downloads / suite.folder
    python = workdir / f"venv-{suite.name}" / "bin" / "python"
    if not source.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "-d",
                str(downloads),
                suite.requirement,
            ]
        )
        name = suite.folder.rsplit("-", 1)[0].lower().replace("-", "_")
        archive = next(
            path
            for path in downloads.glob("*.tar.gz")
            if path.name.lower().replace("-", "_").startswith(name)
        )
        with tarfile.open(archive) as tar:
            tar.extractall(downloads, filter="data")
    if not python.exists():
        run([sys.executable, "-m", "venv", "--system-site-packages", str(python.parent.parent)])
        run([str(python), "-m", "pip", "install", "-q", *suite.install], cwd=source)
    return source, python


def run_variant(
    suite: Suite, source: Path, python: Path, variant: str, pgpilot_src: Path, dsn: str, out: Path
) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("CI", None)
    env["PYTHONPATH"] = os.pathsep.join([str(pgpilot_src), str(BENCH_DIR)])
    env["PGPILOT_COLLECT_OUT"] = str(out)
    for key, value in suite.env.items():
        env[key] = value.format(dsn=dsn)
    command = [
        str(python),
        "-m",
        "pytest",
        *suite.tests,
        "-p",
        "realworld_collector",
        "-p",
        "no:cacheprovider",
        "-q",
        "--timeout=300",
        "-W",
        "default::UserWarning",
    ]
    report = out.with_suffix(".report.json")
    report.unlink(missing_ok=True)
    if variant != "baseline":
        command.append(f"--nplusone={variant}")
        plugin = (pgpilot_src / "pgpilot" / "nplusone" / "pytest_plugin.py").read_text()
        if "--nplusone-report" in plugin:
            command.append(f"--nplusone-report={report}")
    print("+", " ".join(command), flush=True)
    with open(out.with_suffix(".log"), "w", encoding="utf-8") as log:
        subprocess.run(command, cwd=source, env=env, stdout=log, stderr=subprocess.STDOUT)
    return load_variant(out)


def load_variant(out: Path) -> dict[str, Any]:
    """A saved run: the collector's outcomes and warnings, and the plugin's report if any."""
    report = out.with_suffix(".report.json")
    collected = dict(json.loads(out.read_text(encoding="utf-8")))
    if report.exists():
        # A pgpilot with the session report: one entry per finding group and test, in the
        # shape the warnings of an older pgpilot are read in.
        for group in json.loads(report.read_text(encoding="utf-8"))["groups"]:
            path, _, line = group["callsite"].rpartition(":")
            for nodeid in group["tests"]:
                collected["warnings"].append(
                    {
                        "nodeid": nodeid,
                        "when": "runtest",
                        "message": group["message"],
                        "filename": path or group["callsite"],
                        "lineno": int(line) if line.isdigit() else 0,
                        "kind": group["kind"],
                        "relationship": group["relationship"],
                        "failed": group.get("failed", False),
                    }
                )
    return collected


_KIND = re.compile(r"^(?P<kind>N\+1|duplicate|unused eager load|[a-z_]+)(?::|\s)", re.IGNORECASE)


def group_key(warning: dict[str, Any]) -> tuple[str, str, str]:
    """(kind, call site, relationship-or-statement) of one warning: what a person fixes once."""
    message = warning["message"]
    kind = message.split(":", 1)[0].split(" of ", 1)[0].strip()
    if message.startswith("unused eager load"):
        kind = "unused eager load"
    kind = {"n_plus_one": "N+1", "unused_eager_load": "unused eager load"}.get(
        warning.get("kind", ""), warning.get("kind") or kind
    )
    relationship = warning.get("relationship") or ""
    match = re.search(r"(selectinload|joinedload|subqueryload)\((\w+\.\w+)\)(?!.*\()", message)
    if match and not relationship:
        relationship = match.group(2)
    match = re.search(r"unused eager load of (\S+)", message)
    if match:
        relationship = match.group(1)
    if not relationship:
        sql = message.split(": ", 2)[-1]
        relationship = re.sub(r"\s+", " ", sql)[:90]
    site = f"{Path(warning['filename']).name}:{warning['lineno']}"
    return kind, site, relationship


def summarize(suite: Suite, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    baseline = results["baseline"]["outcomes"]
    ran = [node for node, entry in baseline.items() if entry["outcome"] != "skipped"]
    # skipped and xfailed tests are not run, so they are not "failing anyway"
    failing_anyway = {node for node in ran if baseline[node]["outcome"] != "passed"}
    warn = results["warn"]
    by_group: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    kinds: Counter[str] = Counter()
    example: dict[tuple[str, str, str], str] = {}
    for warning in warn["warnings"]:
        key = group_key(warning)
        by_group[key].add(warning["nodeid"])
        kinds[key[0]] += 1
        example.setdefault(key, warning["message"])
    tests_with_findings = {w["nodeid"] for w in warn["warnings"]}
    failing_groups: dict[str, set[str]] = defaultdict(set)
    for warning in results["raise"]["warnings"]:
        if warning.get("failed"):
            failing_groups[" | ".join(group_key(warning))].add(warning["nodeid"])
    raised = results["raise"]["outcomes"]
    raise_failed = sorted(
        node
        for node, entry in raised.items()
        if entry.get("nplusone_error") and node not in failing_anyway
    )
    return {
        "suite": suite.name,
        "requirement": suite.requirement,
        "database": suite.database,
        "what": suite.what,
        "tests_run": len(ran),
        "tests_failing_at_baseline": len(failing_anyway),
        "warnings": len(warn["warnings"]),
        "warnings_by_kind": dict(kinds),
        "tests_with_findings": len(tests_with_findings),
        "groups": [
            {
                "key": " | ".join(key),
                "kind": key[0],
                "callsite": key[1],
                "what": key[2],
                "tests": len(nodes),
                "example": example[key][:600],
            }
            for key, nodes in sorted(by_group.items(), key=lambda item: -len(item[1]))
        ],
        "raise_fails": len(raise_failed),
        "raise_failed_tests": raise_failed,
        "raise_failing_groups": {key: sorted(nodes) for key, nodes in failing_groups.items()},
    }


def precision(summary: dict[str, Any], verdicts: dict[str, str]) -> dict[str, Any]:
    """Precision over the judged groups; over the groups that fail raise mode; and the tests
    raise mode fails on a true group (a failure a developer would want) or on false ones only.
    """
    judged = [group for group in summary["groups"] if group["key"] in verdicts]
    true = [group for group in judged if verdicts[group["key"]] == "true"]
    failing = summary.get("raise_failing_groups", {})
    failing_judged = [key for key in failing if key in verdicts]
    failing_true = [key for key in failing_judged if verdicts[key] == "true"]
    tests_true = {node for key in failing_true for node in failing[key]}
    tests_any = {node for nodes in failing.values() for node in nodes}
    return {
        "judged_groups": len(judged),
        "true_groups": len(true),
        "precision_groups": round(len(true) / len(judged), 3) if judged else None,
        "failing_groups": len(failing),
        "failing_groups_judged": len(failing_judged),
        "failing_groups_true": len(failing_true),
        "precision_failing_groups": (
            round(len(failing_true) / len(failing_judged), 3) if failing_judged else None
        ),
        "tests_failed_on_a_true_group": len(tests_true & set(summary["raise_failed_tests"])),
        "tests_failed_on_false_groups_only": len(
            (tests_any - tests_true) & set(summary["raise_failed_tests"])
        ),
    }


def render(summaries: list[dict[str, Any]], label: str) -> str:
    lines = [f"# Query doctor on real test suites: {label}", ""]
    lines += [
        "| suite | database | tests run | failing anyway | tests with findings "
        "| finding groups | `--nplusone=raise` fails | precision (judged groups) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for summary in summaries:
        judged = summary.get("precision") or {}
        shown = (
            f"{judged['true_groups']}/{judged['judged_groups']}"
            if judged.get("judged_groups")
            else "not judged"
        )
        lines.append(
            f"| {summary['suite']} ({summary['requirement']}) | {summary['database']} "
            f"| {summary['tests_run']} | {summary['tests_failing_at_baseline']} "
            f"| {summary['tests_with_findings']} | {len(summary['groups'])} "
            f"| {summary['raise_fails']} | {shown} |"
        )
    for summary in summaries:
        judged = summary.get("precision") or {}
        if judged.get("failing_groups_judged"):
            lines += [
                "",
                f"{summary['suite']}: of the {judged['failing_groups']} groups that fail "
                f"`--nplusone=raise`, {judged['failing_groups_true']} of "
                f"{judged['failing_groups_judged']} judged are true; raise fails "
                f"{judged['tests_failed_on_a_true_group']} test(s) on a true group and "
                f"{judged['tests_failed_on_false_groups_only']} on false ones only.",
            ]
    for summary in summaries:
        lines += ["", f"## {summary['suite']}", "", summary["what"], ""]
        lines.append(f"Warnings by kind: {summary['warnings_by_kind'] or 'none'}")
        lines += [
            "",
            "| kind | call site | relationship or statement | tests | judged |",
            "| --- | --- | --- | ---: | --- |",
        ]
        for group in summary["groups"][:40]:
            what = group["what"].replace("|", "\\|")
            verdict = (summary.get("verdicts") or {}).get(group["key"], "")
            lines.append(
                f"| {group['kind']} | {group['callsite']} | {what} | {group['tests']} "
                f"| {verdict} |"
            )
        if len(summary["groups"]) > 40:
            lines.append(f"| ... | {len(summary['groups']) - 40} more groups | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", choices=sorted(SUITES))
    parser.add_argument("--pgpilot-src", type=Path, default=ROOT / "src")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pgpilot-realworld"))
    parser.add_argument("--dsn", default=os.environ.get("PGPILOT_TEST_DSN") or DEFAULT_DSN)
    parser.add_argument("--judgments", type=Path)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--variants",
        default="baseline,warn,raise",
        help="comma-separated runs to redo; the others are read from the work folder "
        "('none': only summarize, judge and render saved runs)",
    )
    args = parser.parse_args()
    verdicts: dict[str, dict[str, str]] = (
        json.loads(args.judgments.read_text()) if args.judgments else {}
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for name in args.suite or sorted(SUITES):
        suite = SUITES[name]
        source, python = prepare(suite, args.workdir)
        results: dict[str, dict[str, Any]] = {}
        for variant in ("baseline", "warn", "raise"):
            out = args.workdir / f"{args.out.name}-{name}-{variant}.json"
            if variant in args.variants.split(",") or not out.exists():
                results[variant] = run_variant(
                    suite, source, python, variant, args.pgpilot_src.resolve(), args.dsn, out
                )
            else:
                results[variant] = load_variant(out)
        summary = summarize(suite, results)
        if name in verdicts:
            # "suite@out-name" holds the verdicts that differ for one run (a suggestion
            # worded differently by the pgpilot it measured)
            judged = {**verdicts[name], **verdicts.get(f"{name}@{args.out.name}", {})}
            summary["precision"] = precision(summary, judged)
            summary["verdicts"] = judged
        summaries.append(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summaries, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(summaries, args.label or args.out.name))
    print(render(summaries, args.label or args.out.name))


if __name__ == "__main__":
    main()
