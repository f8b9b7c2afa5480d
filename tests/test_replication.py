"""pgpilot.replication and the pooler's byte-level routing helpers, on text and bytes alone
(sans-IO): what goes to the primary, what may go to a replica, and how a replica is chosen."""

from __future__ import annotations

import pytest

from pgpilot.proxy.routing import first_sql, own_command
from pgpilot.replication import (
    FunctionSafety,
    ReplicaSet,
    Route,
    classify,
    format_lsn,
    parse_lsn,
)
from pgpilot.wire import messages as m

SAFE = FunctionSafety()
SAFE.load(["lower", "count", "now"])


@pytest.mark.parametrize("sql", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
    "select lower(name), count(*) from t group by 1",
    "SHOW search_path",
    "EXPLAIN SELECT * FROM t",
    "SELECT random(), gen_random_uuid()",
    "WITH x AS (SELECT 1) SELECT * FROM x",
])
def test_reads_may_go_to_a_replica(sql: str) -> None:
    assert classify(sql).route(SAFE) is Route.REPLICA


@pytest.mark.parametrize("sql", [
    "INSERT INTO t VALUES (1)",
    "UPDATE t SET x = 1",
    "DELETE FROM t",
    "SELECT * FROM t FOR UPDATE",
    "SELECT * FROM t FOR SHARE",
    "SELECT * INTO t2 FROM t",
    "WITH w AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM w",
    "SELECT nextval('s')",
    "SELECT my_volatile_function(1)",
    "SELECT public.lower('x')",  # a schema-qualified user function: unknown
    "EXPLAIN ANALYZE DELETE FROM t",
    "/* pgpilot:primary */ SELECT 1",
    "SELECT 1; DELETE FROM t",
    "CREATE TABLE t (x int)",
    "this is not sql",
])
def test_writes_locks_and_unknowns_go_to_the_primary(sql: str) -> None:
    assert classify(sql).route(SAFE) is Route.PRIMARY


def test_transactions_and_settings() -> None:
    assert classify("BEGIN READ ONLY").begin_read_only
    assert classify("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY").begin_read_only
    begin = classify("BEGIN")
    assert begin.begin and not begin.begin_read_only
    assert classify("COMMIT").ends
    route = classify("SET pgpilot.route = primary")  # PostgreSQL itself would not parse it
    assert route.sets_route and route.hint is Route.PRIMARY


def test_lsn_text_round_trip() -> None:
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    with pytest.raises(ValueError):
        parse_lsn("nonsense")


def test_first_sql_reads_simple_and_extended_rounds() -> None:
    assert first_sql(m.query("SELECT 1")) == ["SELECT 1"]
    batch = (m.parse_message("", "SELECT $1") + m.bind_simple("", "", ["1"])
             + m.execute_message() + m.sync())
    assert first_sql(batch) == ["SELECT $1"]
    asyncpg_prepare = m.parse_message("s1", "SELECT 2") + m.describe_message("S", "s1") \
        + m.flush()
    assert first_sql(asyncpg_prepare) == ["SELECT 2"]
    later_bind = m.bind_simple("", "s1") + m.execute_message() + m.sync()
    assert first_sql(later_bind) is None  # its text is not in these bytes
    assert first_sql(later_bind, {b"s1": "SELECT 2"}) == ["SELECT 2"]
    assert first_sql(m.query("SELECT 1")[:-3]) is None  # incomplete


def test_own_commands_are_recognized_only_alone() -> None:
    found = own_command(m.query("SET pgpilot.route = 'primary'"))
    assert found is not None and found[0]["value"] == "primary" and found[1] == b"Q"
    assert own_command(m.query("SHOW pgpilot.min_lsn")) is not None
    assert own_command(m.query("SET search_path = x")) is None
    assert own_command(m.query("SET pgpilot.route = primary; SELECT 1")) is None


def test_choice_least_outstanding_lag_and_min_lsn() -> None:
    rs = ReplicaSet(["r1", "r2"], max_lag_bytes=100)
    assert rs.choose() is None  # never checked: not up
    rs.states["r1"].record((True, "0/1000", 0.0), primary_lsn=0x1000)
    rs.states["r2"].record((True, "0/1000", 0.0), primary_lsn=0x1000)
    first = rs.choose()
    second = rs.choose()
    assert {first, second} == {"r1", "r2"}  # the busier one is not chosen again
    assert first is not None
    rs.release(first)
    assert rs.choose() == first
    assert rs.choose(min_lsn=0x1001) is None  # neither has replayed that far
    rs.states["r2"].record((True, "0/1000", 0.0), primary_lsn=0x2000)  # 4 KiB behind
    assert not rs.eligible("r2")
    rs.states["r1"].record((False, "0/2000", 0.0), primary_lsn=0x2000)  # promoted
    assert not rs.eligible("r1")
    rs.states["r1"].record(None, None, error="down")
    assert not rs.states["r1"].up
