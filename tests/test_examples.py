"""Every script in examples/ runs as a user runs it (a subprocess, the DSN as its argument) and
shows what it claims: each assertion would fail if the feature it demonstrates were broken.

The scripts' prose may change; what is asserted are counts and names they print on lines of
their own (``key: value``), and their exit status.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(script: str, *args: str, timeout: float = 100) -> str:
    """Run ``examples/<script>`` with ``args``; its stdout, once it has exited 0."""
    path = EXAMPLES / script
    assert path.exists(), path
    done = subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"{script} exited {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )
    return done.stdout


def number(pattern: str, text: str) -> int:
    """The integer captured by ``pattern`` (which must match) in ``text``."""
    found = re.search(pattern, text, re.M)
    assert found, f"{pattern!r} not in:\n{text}"
    return int(found.group(1))


def test_every_example_has_a_docstring_a_main_and_a_test() -> None:
    tested = set(re.findall(r'run_example\(\s*"([^"]+\.py)"', Path(__file__).read_text()))
    scripts = sorted(path.name for path in EXAMPLES.glob("*.py"))
    assert scripts, EXAMPLES
    for name in scripts:
        tree = ast.parse((EXAMPLES / name).read_text())
        assert ast.get_docstring(tree), f"{name} has no module docstring"
        functions = {
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        assert "main" in functions, f"{name} has no main()"
    assert set(scripts) <= tested, f"examples without a test: {set(scripts) - tested}"


def test_pooler_many_clients_share_few_servers(pg_dsn: str) -> None:
    out = run_example("pooler.py", pg_dsn)
    pools = re.search(r"^SHOW POOLS \(.*\):(.*)$", out, re.M)
    assert pools, out
    row = dict(re.findall(r"(\w+)=(\S+)", pools.group(1)))
    assert row["pool_mode"] == "transaction", row
    clients = int(row["cl_active"])
    servers = int(row["sv_active"]) + int(row["sv_idle"]) + int(row["sv_used"])
    # 40 clients connected at once, through a pool of at most 5 server connections
    assert clients == 40, out
    assert 1 <= servers <= 5, out
    assert clients > servers
    # the clients really ran on those few backends, and every transaction was carried
    assert 1 <= number(r"^backends seen by the clients.*: (\d+)$", out) <= 5, out
    assert number(r"^rows written through the pooler: (\d+)$", out) == 400, out
    assert number(r"^pgpilot proxy stopped \(exit status (-?\d+)\)$", out) == 0, out


def test_batch_dataloader_loads_the_page_in_one_query_per_relation(pg_dsn: str) -> None:
    out = run_example("batch_dataloader.py", pg_dsn)
    # 100 customers and 500 order lines: 1 + 100 + 500 queries one by one
    assert number(r"^one by one:\s+(\d+) queries", out) == 601, out
    # with the loaders: one query for the orders of all customers, one for all products
    assert 1 <= number(r"^batch queries: (\d+)$", out) <= 2, out
    assert number(r"^\s*orders loader: 100 loads in (\d+) batch", out) == 1, out
    assert number(r"^\s*products loader: 500 loads in (\d+) batch", out) == 1, out
    assert re.search(r"^\s*orders batch:.*\"customer_id\" = ANY\(\$1\)", out, re.M), out


def test_nplusone_names_the_lazy_relationship_and_its_fix(pg_dsn: str) -> None:
    out = run_example("nplusone_sqlalchemy.py", pg_dsn)
    lazy, _, eager = out.partition("with selectinload(Author.posts):")
    assert eager, out
    assert number(r"^lazy loading: (\d+) queries", lazy) == 21, out
    assert number(r"(\d+) finding\(s\)", lazy) == 1, out
    assert re.search(
        r"^\s*n_plus_one: 20 executions .* at \S*nplusone_sqlalchemy\.py:\d+$", lazy, re.M
    ), out
    assert re.search(r"^\s*relationship:\s+Author\.posts$", lazy, re.M), out
    assert re.search(r"^\s*fix:.*selectinload\(Author\.posts\)", lazy, re.M), out
    # the fixed version: two queries, nothing reported
    assert number(r"^\s*(\d+) queries", eager) == 2, out
    assert number(r"(\d+) finding\(s\)", eager) == 0, out


def test_explain_finds_the_seq_scan_and_advise_the_index(pg_dsn: str) -> None:
    out = run_example("explain_advise.py", pg_dsn, timeout=110)
    explained, _, advised = out.partition("== pgpilot advise")
    assert advised, out
    found = re.search(r"^explain findings: (.*)$", explained, re.M)
    assert found and "seq_scan_filter" in found.group(1), out
    assert re.search(r"^\s*fix:.*orders \(customer_id", explained, re.M), out
    # the advisor proved an index led by the filtered column, on the example's table
    recommended = re.search(r"^recommended: (.*)$", advised, re.M)
    assert recommended, out
    assert re.search(r"CREATE INDEX .*\bON \S*\.orders \(customer_id\b", recommended.group(1)), out
    # with that index, pgpilot explain finds nothing (exit status 0: no finding)
    assert number(r"^after the index: pgpilot explain exit status (\d+)", out) == 0, out


def test_batch_redis_coalesces_a_thousand_commands(redis_url: str) -> None:
    out = run_example("batch_redis.py", redis_url)
    sent = re.search(r"^commands sent: (\[.*\])$", out, re.M)
    assert sent, out
    assert ast.literal_eval(sent.group(1)) == ["MSET x1000", "MGET x500", "MGET x500"], out


def test_cache_redis_is_never_stale_and_fills_a_hot_key_once(pg_dsn: str, redis_url: str) -> None:
    out = run_example("cache_redis.py", pg_dsn, redis_url)
    assert number(r"^orders before the write: (\d+)", out) == 2, out
    assert re.search(r"^orders before the write: 2 \(second read from the cache: True", out,
                     re.M), out
    # the writing request sees its own order, and so does everything after its commit
    assert number(r"^orders read in the writing transaction: (\d+)$", out) == 3, out
    assert number(r"^orders read after its commit: (\d+)$", out) == 3, out
    assert number(r"^orders read by the next request: (\d+)$", out) == 3, out
    assert number(r"^concurrent callers: (\d+)$", out) == 200, out
    assert number(r"^fills executed: (\d+)$", out) == 1, out
    assert number(r"hits=(\d+)", out) >= 1, out
    assert number(r"bypasses=(\d+)", out) == 1, out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
