"""The replication test bed (pgpilot.testbed): real streaming replicas, lag injection per
replica, stop/start, promotion. Facts are read from PostgreSQL itself, never from timing."""

from __future__ import annotations

from pgpilot.testbed import ReplicationCluster


def test_replicas_stream_from_the_primary(replication_cluster: ReplicationCluster) -> None:
    c = replication_cluster
    assert c.query(c.primary_name, "SELECT pg_is_in_recovery()") is False
    names = c.replica_names
    assert len(names) == 2
    for name in names:
        assert c.query(name, "SELECT pg_is_in_recovery()") is True
    streaming = c.query(c.primary_name, "SELECT array_agg(application_name ORDER BY 1) "
                        "FROM pg_stat_replication WHERE state = 'streaming'")
    assert streaming == names
    c.execute(c.primary_name, "DROP TABLE IF EXISTS tb_probe")
    c.execute(c.primary_name, "CREATE TABLE tb_probe (x int)")
    c.execute(c.primary_name, "INSERT INTO tb_probe VALUES (7)")
    c.wait_caught_up()
    for name in names:
        assert c.query(name, "SELECT sum(x) FROM tb_probe") == 7


def test_paused_replica_lags_the_other_does_not(replication_cluster: ReplicationCluster) -> None:
    c = replication_cluster
    first, second = c.replica_names
    c.execute(c.primary_name, "DROP TABLE IF EXISTS tb_probe")
    c.execute(c.primary_name, "CREATE TABLE tb_probe (x int)")
    c.wait_caught_up()
    c.pause_replay(first)
    c.execute(c.primary_name, "INSERT INTO tb_probe VALUES (1)")
    target = c.primary_lsn()
    # the second replica reaches the write; the paused one stays behind it
    c.wait_replayed(second, target)
    assert c.query(second, "SELECT count(*) FROM tb_probe") == 1
    assert c.query(first, "SELECT pg_is_wal_replay_paused()") is True
    assert c.query(first, "SELECT count(*) FROM tb_probe") == 0
    c.reset()
    assert c.query(first, "SELECT count(*) FROM tb_probe") == 1


def test_apply_delay_is_per_replica(replication_cluster: ReplicationCluster) -> None:
    c = replication_cluster
    first, second = c.replica_names
    c.set_apply_delay(first, 60_000)
    assert c.query(first, "SHOW recovery_min_apply_delay") == "1min"
    assert c.query(second, "SHOW recovery_min_apply_delay") == "0"
    c.execute(c.primary_name, "CREATE TABLE tb_delayed (x int)")
    target = c.primary_lsn()
    c.wait_replayed(second, target)
    assert c.query(second, "SELECT to_regclass('tb_delayed') IS NOT NULL") is True
    # the delayed replica received the commit but has not applied it
    assert c.query(first, "SELECT to_regclass('tb_delayed') IS NULL") is True
    c.reset()
    assert c.query(first, "SELECT to_regclass('tb_delayed') IS NOT NULL") is True
    c.execute(c.primary_name, "DROP TABLE tb_delayed")


def test_stop_start_and_promote(replication_cluster: ReplicationCluster) -> None:
    c = replication_cluster
    first, second = c.replica_names
    c.stop_node(second)
    assert not c.nodes[second].running()
    c.start_node(second)
    assert c.query(second, "SELECT pg_is_in_recovery()") is True
    c.stop_node("primary")
    c.promote(first)
    assert c.primary_name == first
    assert c.query(first, "SELECT pg_is_in_recovery()") is False
    c.execute(first, "CREATE TABLE IF NOT EXISTS tb_after_promotion (x int)")
    assert c.replica_names == ["primary", second]
