"""ASGI and WSGI middleware: one scope per request, findings logged with the request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from nplusone_models import CUSTOMERS, Customer, Order
from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, selectinload

from pgpilot.insight import Finding
from pgpilot.nplusone import ASGIMiddleware, WSGIMiddleware


def make_asgi_app(async_engine: AsyncEngine, both_started: asyncio.Barrier) -> Any:
    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        async with AsyncSession(async_engine) as session:
            await both_started.wait()  # both requests in flight at once
            if scope["path"] == "/loop":
                for customer in (await session.scalars(select(Customer))).all():
                    await customer.awaitable_attrs.orders
            else:
                query = select(Customer).options(selectinload(Customer.orders))
                for customer in (await session.scalars(query)).all():
                    assert customer.orders
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def test_asgi_requests_are_scoped_and_logged(
    async_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, list[Finding]]] = []
    app = ASGIMiddleware(
        make_asgi_app(async_engine, asyncio.Barrier(2)),
        on_findings=lambda request, findings: seen.append((request, findings)),
    )
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    def request(path: str) -> dict[str, Any]:
        return {"type": "http", "method": "GET", "path": path, "headers": []}

    with caplog.at_level(logging.WARNING, logger="pgpilot.nplusone"):
        await asyncio.gather(
            app(request("/loop"), receive, send), app(request("/fixed"), receive, send)
        )

    assert [message["status"] for message in sent if "status" in message] == [200, 200]
    assert [request for request, _ in seen] == ["GET /loop"]
    [(_, findings)] = seen
    assert [finding.suggestion for finding in findings] == ["selectinload(Customer.orders)"]
    assert findings[0].count == CUSTOMERS
    logged = [record.getMessage() for record in caplog.records if record.name == "pgpilot.nplusone"]
    assert len(logged) == 1
    assert logged[0].startswith("GET /loop: N+1")


async def test_asgi_lifespan_passes_through() -> None:
    calls: list[str] = []

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        calls.append(scope["type"])

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: MutableMapping[str, Any]) -> None:
        return None

    await ASGIMiddleware(app)({"type": "lifespan"}, receive, send)
    assert calls == ["lifespan"]


def make_wsgi_app(engine: Engine) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        session = Session(engine)

        def body() -> Iterator[bytes]:
            # Lazy body: the queries run while the server iterates the response.
            try:
                for order in session.scalars(select(Order).where(Order.id % 100 == 0)):
                    yield order.customer.name.encode()
            finally:
                session.close()

        if environ["PATH_INFO"] == "/lazy-body":
            return body()
        with session:
            names = [c.name for c in session.scalars(select(Customer))]
        return [", ".join(names).encode()]

    return app


def call_wsgi(app: Any, path: str) -> bytes:
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        statuses.append(status)

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    assert statuses == ["200 OK"]
    return body


def test_wsgi_scope_covers_a_lazily_iterated_body(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, list[Finding]]] = []
    app = WSGIMiddleware(
        make_wsgi_app(engine), on_findings=lambda request, found: seen.append((request, found))
    )
    with caplog.at_level(logging.WARNING, logger="pgpilot.nplusone"):
        assert call_wsgi(app, "/clean").count(b"customer") == CUSTOMERS
        assert call_wsgi(app, "/lazy-body").count(b"customer") == CUSTOMERS

    assert [request for request, _ in seen] == ["GET /lazy-body"]
    [(_, findings)] = seen
    assert [finding.suggestion for finding in findings] == ["joinedload(Order.customer)"]
    logged = [record.getMessage() for record in caplog.records if record.name == "pgpilot.nplusone"]
    assert len(logged) == 1
    assert "GET /lazy-body: N+1" in logged[0]


async def test_asgi_logs_the_findings_of_a_failing_request(
    async_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        async with AsyncSession(async_engine) as session:
            for customer in (await session.scalars(select(Customer))).all():
                await customer.awaitable_attrs.orders
        raise RuntimeError("the handler failed after its loop")

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        return None

    request = {"type": "http", "method": "POST", "path": "/orders", "headers": []}
    with (
        caplog.at_level(logging.WARNING, logger="pgpilot.nplusone"),
        pytest.raises(RuntimeError, match="after its loop"),
    ):
        await ASGIMiddleware(app)(request, receive, send)
    logged = [record.getMessage() for record in caplog.records if record.name == "pgpilot.nplusone"]
    assert len(logged) == 1
    assert logged[0].startswith("POST /orders: N+1")
