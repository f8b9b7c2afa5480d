"""Peering (``peer_id``, ``[peers]``): a cancel request that reaches the wrong pooler is passed
on to the one that gave out the key, and to nobody else."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import RunningProxy
from tests.proxy.test_cancel import Running, connect, wait_active
from tests.proxy.test_enginelogin import connect as connect_carol
from tests.proxy.test_enginelogin import counts, make_proxy, psycopg_route

from pgpilot.proxy import fastpath
from pgpilot.proxy.config import ConfigError, parse_config
from pgpilot.proxy.peering import TTL_MASK, peer_of, pid_layout
from pgpilot.wire import messages as m


def test_pid_layout_carries_the_peer_id_where_pgbouncer_puts_it() -> None:
    for peer_id in (1, 2, 255, 256, 16383):
        fixed, random_bits = pid_layout(peer_id, None)
        assert fixed & random_bits == 0
        for noise in (0, random_bits):
            pid = fixed | noise
            assert 0 < pid < 2**31  # a positive int32
            assert peer_of(pid) == peer_id
            # PgBouncer reads the id from the key's 2nd and 3rd byte, low byte first.
            raw = pid.to_bytes(4, "big")
            assert raw[1] + (raw[2] << 8) == peer_id
    fixed, random_bits = pid_layout(7, worker_index=5)
    assert peer_of(fixed | random_bits) == 7 and (fixed >> 24) == 5


def test_peers_section_is_read_and_checked() -> None:
    cfg = parse_config("[pgbouncer]\nauth_type = any\npeer_id = 2\n[peers]\n"
                       "1 = host=10.0.0.1 port=6433 pool_size=3\n3 = host=/run/pgb\n")
    assert cfg.peer_id == 2
    assert cfg.peers[1].host == "10.0.0.1" and cfg.peers[1].port == 6433
    assert cfg.peers[1].pool_size == 3
    assert cfg.peers[3].host == "/run/pgb" and cfg.peers[3].port == 6432
    assert not any("peer" in w for w in cfg.warnings)
    with pytest.raises(ConfigError, match="peer_id, an integer from 1 to 16383"):
        parse_config("[peers]\nalpha = host=x\n")
    with pytest.raises(ConfigError, match="peer_id, an integer from 1 to 16383"):
        parse_config("[peers]\n16384 = host=x\n")
    for not_ascii_digits in ("\u00b2", "\u0661"):  # superscript two, Arabic-Indic one
        with pytest.raises(ConfigError, match="peer_id, an integer from 1 to 16383"):
            parse_config(f"[peers]\n{not_ascii_digits} = host=x\n")
    with pytest.raises(ConfigError, match="peer_id"):
        parse_config("[pgbouncer]\npeer_id = 20000\n")
    with pytest.raises(ConfigError, match="port"):
        parse_config("[peers]\n1 = host=x port=0\n")


def add_peers(proxy: RunningProxy, peers: dict[int, RunningProxy]) -> None:
    """Append a [peers] section naming ``peers`` (id -> pooler) and RELOAD."""
    with proxy.config_path.open("a") as ini:
        ini.write("[peers]\n")
        for peer_id, peer in peers.items():
            ini.write(f"{peer_id} = host=127.0.0.1 port={peer.port} pool_size=2\n")
    proxy.reload()


@pytest.fixture
def pair(proxy_factory: Callable[..., RunningProxy]) -> tuple[RunningProxy, RunningProxy]:
    """Two poolers, peer 1 and peer 2, each naming the other in [peers]."""
    one = proxy_factory(peer_id=1)
    two = proxy_factory(peer_id=2)
    add_peers(one, {2: two})
    add_peers(two, {1: one})
    return one, two


def send_cancel(port: int, pid: int, key: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(m.cancel_request(pid, key))
        sock.settimeout(15)
        assert sock.recv(100) == b""  # closed without a word once it was acted on


def client_key(proxy: RunningProxy, conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """The (pid, key) the pooler gave ``conn`` (psycopg shows the pid only)."""
    pid = conn.info.backend_pid
    keys = proxy.call(lambda: [k for k in proxy.pooler.cancel_keys if k[0] == pid])  # type: ignore[union-attr]
    assert len(keys) == 1
    return keys[0]


def test_cancel_sent_to_the_wrong_pooler_reaches_the_query(
        pair: tuple[RunningProxy, RunningProxy], pg_dsn: str) -> None:
    one, two = pair
    with connect(one) as conn:
        pid, key = client_key(one, conn)
        assert peer_of(pid) == 1 and key & TTL_MASK == TTL_MASK
        server_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        running = Running(conn, "select pg_sleep(30)")
        wait_active(pg_dsn, server_pid)
        send_cancel(two.port, pid, key)  # peer 2 passes it on to peer 1
        outcome = running.outcome(15)
        assert isinstance(outcome, psycopg.errors.QueryCanceled), outcome
        assert conn.execute("select 1").fetchone() == (1,)
        # And to the right pooler directly, as before.
        running = Running(conn, "select pg_sleep(30)")
        wait_active(pg_dsn, server_pid)
        send_cancel(one.port, pid, key)
        assert isinstance(running.outcome(15), psycopg.errors.QueryCanceled)
    # SHOW PEERS lists the [peers] entries; peer 2 passed one request on to peer 1.
    with psycopg.connect(two.dsn(dbname="pgbouncer"), autocommit=True) as admin:
        assert admin.execute("show peers").fetchall() == [(1, "127.0.0.1", one.port, 2)]
        assert admin.execute("show peer_pools").fetchall() == [("1", 0, 0, 0, 0)]


def test_a_request_with_no_time_to_live_left_or_no_known_peer_goes_nowhere(
        pair: tuple[RunningProxy, RunningProxy],
        proxy_factory: Callable[..., RunningProxy], pg_dsn: str) -> None:
    one, two = pair
    lone = proxy_factory(peer_id=3)  # names no peer
    with connect(one) as conn:
        pid, key = client_key(one, conn)
        server_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        # Long enough that the three requests below are surely acted on while it runs (with
        # 1.5 s, on a loaded machine, they could come after its end and prove nothing).
        running = Running(conn, "select pg_sleep(4)")
        wait_active(pg_dsn, server_pid)
        send_cancel(two.port, pid, key & ~TTL_MASK)  # passed on too often already
        send_cancel(lone.port, pid, key)  # peer 1 is not in its [peers]
        send_cancel(two.port, pid, key ^ 0x100)  # a wrong key, passed on and not found
        assert running.outcome(15) == [("",)]  # pg_sleep ran to its end


def test_peers_naming_each_other_wrongly_stop_after_three_hops(
        proxy_factory: Callable[..., RunningProxy], caplog: pytest.LogCaptureFixture) -> None:
    """Peer 1 and peer 2 both say peer 9 is the other one: the request goes round until its
    time to live is spent, then is dropped, and the sender's connection is closed."""
    one = proxy_factory(peer_id=1)
    two = proxy_factory(peer_id=2)
    add_peers(one, {9: two})
    add_peers(two, {9: one})
    fixed, _ = pid_layout(9, None)
    send_cancel(one.port, fixed | 5, 1234 | TTL_MASK)
    assert caplog.text.count("TTL was exhausted") == 1
    assert caplog.text.count("could not forward") == 0  # nothing timed out on the way
    forwarded = [proxy.call(lambda p=proxy: p.pooler.peer_cancels.counts[9].active)
                 for proxy in (one, two)]
    assert forwarded == [0, 0]


@pytest.mark.skipif(not fastpath.available(), reason="fast path not built")
def test_keys_the_engine_makes_carry_the_peer_id(
        proxy_factory: Callable[..., RunningProxy], pg_params: dict[str, str],
        pg_dsn: str) -> None:
    """A client the engine logs in alone (fastpath.py, engine logins) gets a key laid out
    the same way, and a cancel for it through the other peer reaches its query."""
    one = make_proxy(proxy_factory, pg_params, peer_id=5)
    two = make_proxy(proxy_factory, pg_params, peer_id=6)
    add_peers(one, {6: two})
    add_peers(two, {5: one})
    psycopg_route(one)
    with connect_carol(one) as conn:
        assert counts(one)[0] == 1  # a phantom: the engine made its key
        pid, key = client_key(one, conn)
        assert peer_of(pid) == 5 and key & TTL_MASK == TTL_MASK
        server_pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        running = Running(conn, "select pg_sleep(30)")
        wait_active(pg_dsn, server_pid)
        send_cancel(two.port, pid, key)
        assert isinstance(running.outcome(15), psycopg.errors.QueryCanceled)


def test_peer_id_is_kept_until_a_restart(proxy_factory: Callable[..., RunningProxy],
                                         caplog: pytest.LogCaptureFixture) -> None:
    proxy = proxy_factory(peer_id=4)
    text = proxy.config_path.read_text().replace("peer_id = 4", "peer_id = 8")
    proxy.config_path.write_text(text)
    proxy.reload()
    assert "peer_id changes need a restart" in caplog.text
    with connect(proxy) as conn:
        assert peer_of(client_key(proxy, conn)[0]) == 4
    with (psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as admin,
          pytest.raises(psycopg.errors.CantChangeRuntimeParam)):
        admin.execute("set peer_id = 9")


def test_session_clients_get_a_key_carrying_the_peer_id(
        proxy_factory: Callable[..., RunningProxy]) -> None:
    """Without peering a session client's pid is its server's; with it, the pooler's own,
    so that a cancel sent to another peer can find its way back."""
    proxy = proxy_factory(peer_id=12, pool_mode="session")
    with connect(proxy) as conn:
        server_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        pid, key = client_key(proxy, conn)
        assert pid != server_pid and peer_of(pid) == 12 and key & TTL_MASK == TTL_MASK


def test_requests_for_a_silent_peer_hold_at_most_max_client_conn_connections(
        proxy_factory: Callable[..., RunningProxy]) -> None:
    """Anyone may send a CancelRequest naming a peer, and each one passed on holds its
    sender's connection until the peer answers or cancel_wait_timeout passes. A peer that
    accepts and never answers must not let them pile up past max_client_conn (each holds a
    file descriptor): the requests beyond are dropped at once."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    proxy = proxy_factory(peer_id=1, max_client_conn=3, cancel_wait_timeout=60)
    with proxy.config_path.open("a") as ini:
        ini.write(f"[peers]\n2 = host=127.0.0.1 port={silent.getsockname()[1]} pool_size=1\n")
    proxy.reload()
    fixed, _ = pid_layout(2, None)
    senders = []
    try:
        for i in range(6):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=15)
            sock.sendall(m.cancel_request(fixed | i, 1000 | TTL_MASK))
            senders.append(sock)
        # The first three are held (one sent, two waiting for the peer's one slot); the
        # others are closed without waiting.
        for sock in senders[3:]:
            sock.settimeout(15)
            assert sock.recv(100) == b""
        held = proxy.call(lambda: proxy.pooler.peer_cancels.counts[2])  # type: ignore[union-attr]
        assert held.waiting + held.connecting + held.active == 3
    finally:
        for sock in senders:
            sock.close()
        silent.close()
