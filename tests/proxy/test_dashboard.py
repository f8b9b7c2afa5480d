"""The dashboard on the metrics port (proxy/dashboard/): the page, its JSON, the token when the
port is exposed, and the page in headless Chromium (no console errors, the query a client ran
on screen, a screenshot), and with workers = 2 every worker's pools on any worker's page and
console."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import RunningProxy
from tests.proxy.test_workers import run_workers

from pgpilot.embedded import free_port
from pgpilot.proxy.dashboard import is_exposed

SCREENSHOTS = Path(os.environ.get("PGPILOT_SCREENSHOTS", "/tmp/pgpilot-screenshots"))


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_exposed_addresses() -> None:
    assert not is_exposed("127.0.0.1") and not is_exposed("::1")
    assert not is_exposed("localhost")
    assert is_exposed(None) and is_exposed("0.0.0.0") and is_exposed("10.1.2.3")


def run_queries(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True, application_name="dash-app") as conn:
        for i in range(3):
            conn.execute("select %s::int as dashboard_probe", [i])


def test_page_and_state_on_localhost(proxy_factory: Callable[..., RunningProxy]) -> None:
    port = free_port()
    proxy = proxy_factory(metrics_port=port)
    run_queries(proxy)
    status, kind, body = get(f"http://127.0.0.1:{port}/")
    assert status == 200 and kind.startswith("text/html") and b"dashboard.json" in body
    status, kind, body = get(f"http://127.0.0.1:{port}/dashboard.json")
    assert status == 200 and kind == "application/json"
    data: dict[str, Any] = json.loads(body)
    assert {"pools", "queries", "nplusone", "slow", "hazards", "advice"} <= set(data)
    assert any(p["database"] == "test" for p in data["pools"])
    probe = [q for q in data["queries"] if "dashboard_probe" in q["query"]]
    assert probe and probe[0]["calls"] == 3
    assert b"select $1::int as dashboard_probe" in body and b"'0'" not in body


def test_exposed_port_needs_the_token(proxy_factory: Callable[..., RunningProxy]) -> None:
    port = free_port()
    proxy_factory(listen_addr="0.0.0.0", metrics_port=port)
    for path in ("/", "/dashboard.json", "/queries", "/slow"):
        status, _kind, body = get(f"http://127.0.0.1:{port}{path}")
        assert status == 403 and b"dashboard_token" in body, path
    assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200  # Prometheus as before
    port2 = free_port()
    guarded = proxy_factory(listen_addr="0.0.0.0", metrics_port=port2,
                            dashboard_token="s3cret-token")
    run_queries(guarded)
    assert get(f"http://127.0.0.1:{port2}/dashboard.json?token=wrong")[0] == 403
    assert get(f"http://127.0.0.1:{port2}/dashboard.json")[0] == 403
    ok, _kind, body = get(f"http://127.0.0.1:{port2}/dashboard.json?token=s3cret-token")
    assert ok == 200 and b"dashboard_probe" in body
    bearer = get(f"http://127.0.0.1:{port2}/queries",
                 {"Authorization": "Bearer s3cret-token"})
    assert bearer[0] == 200
    with psycopg.connect(guarded.dsn(dbname="pgbouncer"), autocommit=True) as console:
        shown = {row[0]: row[1] for row in console.execute("SHOW CONFIG").fetchall()}
    assert shown["dashboard_token"] != "s3cret-token"  # masked


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    return found


def test_page_in_headless_chromium(proxy_factory: Callable[..., RunningProxy],
                                   tmp_path: Path) -> None:
    browser = chromium()
    port = free_port()
    proxy = proxy_factory(metrics_port=port)
    run_queries(proxy)
    url = f"http://127.0.0.1:{port}/"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
              "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "select $1::int as dashboard_probe" in dom.stdout  # the query the test ran
    assert 'class="error"' not in dom.stdout  # the status line says it read the pooler
    assert "updated " in dom.stdout
    console_errors = [line for line in dom.stderr.splitlines()
                      if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    assert console_errors == []
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "dashboard.png"
    taken = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1400,900", url],
                           capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0 and shot.stat().st_size > 1000, taken.stderr[-2000:]


def free_port_pair() -> int:
    """A free port whose successor is free too."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two free ports in a row")


def test_workers_dashboard_and_console_show_every_workers_pools(
        tmp_path: Path, pg_params: dict[str, str], pg_dsn: str) -> None:
    port = free_port_pair()  # worker i serves its metrics port on metrics_port + i
    gen = run_workers(tmp_path, pg_params, pg_dsn,
                      settings=("auth_type = trust\nadmin_users = postgres\n"
                                f"metrics_port = {port}\n"))
    _proc, dsn, _tmp = next(gen)
    try:
        console_dsn = dsn.rsplit("/", 1)[0] + "/pgbouncer"
        database = dsn.rsplit("/", 1)[1]
        # Held open together, the clients are balanced over both workers (workers.Balance).
        conns = [psycopg.connect(dsn, autocommit=True) for _ in range(16)]
        holders = [psycopg.connect(dsn) for _ in range(2)]  # each in a transaction: a server
        try:
            with psycopg.connect(console_dsn, autocommit=True) as console:
                shares = [row[2] for row in console.execute("SHOW WORKERS").fetchall()]
            assert len(shares) == 2 and min(shares) >= 6, shares
            for conn in holders:
                conn.execute("select 1")

            def console_rows() -> list[tuple[Any, ...]]:
                with psycopg.connect(console_dsn, autocommit=True) as console:
                    cur = console.execute("SHOW WORKER_POOLS")
                    names = [d.name for d in cur.description or ()]
                    return [tuple(row) for row in cur.fetchall()
                            if row[names.index("database")] == database]

            def dashboard_pool(worker: int) -> dict[str, Any] | None:
                status, _kind, body = get(f"http://127.0.0.1:{port + worker}/dashboard.json")
                assert status == 200
                data = json.loads(body)
                assert data["workers"] == 2
                return next((p for p in data["pools"] if p["database"] == database), None)

            # Each worker publishes its pools about once a second; any worker's console and
            # dashboard add the other's share to its own.
            def whole() -> bool:
                rows = console_rows()
                pools = [dashboard_pool(0), dashboard_pool(1)]
                return ({row[0] for row in rows} == {0, 1}
                        and sum(row[5] for row in rows) == 18
                        and sum(row[7] for row in rows) == 2
                        and all(p is not None and p["cl_active"] == 18 and p["sv_active"] == 2
                                and p["workers"] == 2 and p["size"] == 4 for p in pools))

            deadline = time.monotonic() + 15
            while not whole():
                assert time.monotonic() < deadline, (console_rows(), dashboard_pool(0),
                                                     dashboard_pool(1))
                time.sleep(0.3)
        finally:
            for conn in conns + holders:
                conn.close()
    finally:
        for _ in gen:
            pass
