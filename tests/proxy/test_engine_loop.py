"""The pooler's event loop: asyncio on the engine's selector (fastpath.EngineSelector).

The whole proxy suite runs on this loop (conftest's RunningProxy makes it, as
``command.serve`` does). These tests check the selector as asyncio sees it: registration
semantics, readiness, timers, wake-ups from other threads and from signals while the engine
waits; and that the pooler still works on a loop it did not make (the engine's epoll fd is
then watched with ``add_reader``).
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import RunningProxy, forced_user_databases, write_config
from tests.proxy.test_fastpath import engine_xacts

from pgpilot.proxy import fastpath
from pgpilot.proxy.config import load_config
from pgpilot.proxy.pooler import Pooler

pytestmark = pytest.mark.skipif(not fastpath.available() and os.environ.get("CI") != "true",
                                reason="fast path not built (no C compiler at install)")


@pytest.fixture
def loop() -> Any:
    loop = fastpath.new_event_loop()
    assert isinstance(loop._selector, fastpath.EngineSelector)  # type: ignore[attr-defined]
    yield loop
    loop.close()


def test_registration_follows_the_selectors_contract() -> None:
    sel = fastpath.EngineSelector()
    a, b = socket.socketpair()
    try:
        key = sel.register(a, selectors.EVENT_READ, "data")
        assert key.fd == a.fileno() and key.data == "data"
        assert sel.get_key(a) is key and sel.get_key(a.fileno()) is key
        assert len(sel.get_map()) == 1 and list(sel.get_map()) == [a.fileno()]
        with pytest.raises(KeyError):
            sel.register(a, selectors.EVENT_READ)
        with pytest.raises(ValueError):
            sel.register(b, 0)
        with pytest.raises(ValueError):
            sel.register(-1, selectors.EVENT_READ)
        assert sel.select(0) == []  # nothing to read yet
        b.send(b"x")
        assert sel.select(1) == [(key, selectors.EVENT_READ)]
        # Writable as well as readable once asked for both; the data goes with the key.
        key = sel.modify(a, selectors.EVENT_READ | selectors.EVENT_WRITE, "both")
        assert sel.select(1) == [(key, selectors.EVENT_READ | selectors.EVENT_WRITE)]
        key = sel.modify(a, selectors.EVENT_WRITE, "write")
        assert sel.select(1) == [(key, selectors.EVENT_WRITE)]
        assert sel.unregister(a) is key
        with pytest.raises(KeyError):
            sel.unregister(a)
        with pytest.raises(KeyError):
            sel.get_key(a)
        assert sel.select(0) == []  # gone from the epoll set as well
        # Registered again after unregister: a fresh ADD, not a MOD.
        sel.register(a, selectors.EVENT_READ)
        assert [k.fd for k, _ in sel.select(1)] == [a.fileno()]
    finally:
        sel.close()
        a.close()
        b.close()
    assert len(sel.get_map()) == 0


def test_a_closed_descriptor_can_be_unregistered() -> None:
    # As selectors.EpollSelector: closing first and unregistering after is not an error.
    sel = fastpath.EngineSelector()
    a, b = socket.socketpair()
    sel.register(a, selectors.EVENT_READ)
    fd = a.fileno()
    a.close()
    b.close()
    assert sel.unregister(fd).fd == fd
    sel.close()


def test_timers_readers_and_writers_run(loop: asyncio.AbstractEventLoop) -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    seen: list[str] = []

    async def main() -> None:
        done = loop.create_future()
        loop.call_later(0.05, seen.append, "timer")
        loop.add_reader(a, lambda: (seen.append(a.recv(10).decode()), done.set_result(None)))
        loop.add_writer(b, lambda: (b.send(b"ping"), loop.remove_writer(b)))
        await asyncio.wait_for(done, 10)
        await asyncio.sleep(0.1)
        loop.remove_reader(a)

    loop.run_until_complete(main())
    a.close()
    b.close()
    assert sorted(seen) == ["ping", "timer"]


def test_a_timer_is_not_run_early(loop: asyncio.AbstractEventLoop) -> None:
    # The engine waits in milliseconds rounded up: a timer never fires before its time.
    async def main() -> float:
        start = loop.time()
        fired = loop.create_future()
        loop.call_later(0.0305, lambda: fired.set_result(loop.time()))
        return await fired - start

    assert loop.run_until_complete(main()) >= 0.0305


def test_another_thread_wakes_the_waiting_loop(loop: asyncio.AbstractEventLoop) -> None:
    # No timer and no descriptor ready: the engine waits with no timeout, and only the loop's
    # self-pipe (call_soon_threadsafe) can end it.
    woke = threading.Event()

    def wake_later() -> None:
        time.sleep(0.2)
        loop.call_soon_threadsafe(woke.set)
        loop.call_soon_threadsafe(loop.stop)

    threading.Thread(target=wake_later, daemon=True).start()
    loop.run_forever()
    assert woke.is_set()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers need the main thread")
def test_a_signal_wakes_the_waiting_loop(loop: asyncio.AbstractEventLoop) -> None:
    got: list[int] = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: (got.append(1), loop.stop()))
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    try:
        loop.run_forever()
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
    assert got == [1]


def _run_traffic(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        for i in range(50):
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE t (x int) ON COMMIT DROP")  # a hazard: Python
            conn.execute("INSERT INTO t VALUES (1)")
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)


def _uvloop() -> asyncio.AbstractEventLoop:
    uvloop = pytest.importorskip("uvloop")
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, _uvloop],
                         ids=["asyncio", "uvloop"])
def test_the_pooler_on_a_loop_it_did_not_make(
        proxy_factory: Callable[..., RunningProxy],
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    proxy = proxy_factory(loop_factory=loop_factory)
    assert not isinstance(getattr(proxy.loop, "_selector", None), fastpath.EngineSelector)
    _run_traffic(proxy)
    assert engine_xacts(proxy) >= 50  # the engine carried them, watched through add_reader


def test_the_pooler_on_its_own_loop(proxy: RunningProxy) -> None:
    assert isinstance(proxy.loop._selector, fastpath.EngineSelector)  # type: ignore[attr-defined]
    _run_traffic(proxy)
    assert engine_xacts(proxy) >= 50


def test_two_poolers_on_one_loop_keep_their_own_logins(tmp_path: Path,
                                                       pg_params: dict[str, str]) -> None:
    """The loop's engine serves one pooler; a second one on the same loop gets an engine of
    its own, so one pooler's login routes never log a client into the other."""
    from tests.proxy.test_fastlogin import scram_secret

    configs = []
    for name, password in (("one", "first-Secret1"), ("two", "second-Secret2")):
        folder = tmp_path / name
        folder.mkdir()
        configs.append(write_config(
            folder, pg_params,
            {"auth_type": "scram-sha-256", "log_connections": 0, "log_disconnections": 0},
            databases=forced_user_databases(pg_params),
            userlist={pg_params["user"]: "", "carol": scram_secret(password)}))
    loop = fastpath.new_event_loop()
    poolers = [Pooler(load_config(path)) for path, _port in configs]
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        for pooler in poolers:
            loop.run_until_complete(pooler.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        one, two = (port for _path, port in configs)
        dsn = "postgresql://carol:{}@127.0.0.1:{}/test"
        for port, password in ((one, "first-Secret1"), (two, "second-Secret2")):
            for _ in range(3):  # the first through Python, then along that pooler's route
                with psycopg.connect(dsn.format(password, port)) as conn:
                    assert conn.execute("SELECT 1").fetchone() == (1,)
        for port, password in ((one, "second-Secret2"), (two, "first-Secret1")):
            with pytest.raises(psycopg.OperationalError, match="authentication failed"):
                psycopg.connect(dsn.format(password, port))
        engines = [p.fast.engine for p in poolers if p.fast is not None]
        assert len(engines) == 2 and engines[0] is not engines[1]
    finally:
        for pooler in poolers:
            asyncio.run_coroutine_threadsafe(pooler.stop(timeout=2), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
