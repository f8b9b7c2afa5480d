"""ASGI and WSGI middleware: one detection scope per request, findings logged.

Each request runs in its own ``detect()`` scope (per task for ASGI, per thread for WSGI, so
concurrent requests never mix). The scope is isolated: inside a scope around it (a test
that sends several requests) its queries count in the request alone, and its findings are
added to the outer report when the request ends. At the end of the request every finding
is logged at WARNING on the ``pgpilot.nplusone`` logger with the method and path, and
handed to ``on_findings`` when given (to collect them, count them in metrics, or fail a
development server).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any, Generic, TypeVar

from pgpilot.insight.detector import DEFAULT_DUPLICATE_THRESHOLD, Finding
from pgpilot.nplusone.core import Detection, Report, detect

__all__ = ["ASGIMiddleware", "WSGIMiddleware"]

logger = logging.getLogger("pgpilot.nplusone")

OnFindings = Callable[[str, list[Finding]], None]
"""Called with ``"METHOD /path"`` and the request's findings, when there are any."""

ASGIScope = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[MutableMapping[str, Any]]]
ASGISend = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[ASGIScope, ASGIReceive, ASGISend], Awaitable[None]]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _Options:
    def __init__(
        self,
        threshold: int | None,
        duplicate_threshold: int,
        allow_callsites: Iterable[str],
        allow_fingerprints: Iterable[str],
        allow_relationships: Iterable[str],
        on_findings: OnFindings | None,
        log_level: int,
    ) -> None:
        self.threshold = threshold
        self.duplicate_threshold = duplicate_threshold
        self.allow_callsites = tuple(allow_callsites)
        self.allow_fingerprints = tuple(allow_fingerprints)
        self.allow_relationships = tuple(allow_relationships)
        self.on_findings = on_findings
        self.log_level = log_level

    def detection(self) -> Detection:
        return detect(
            self.threshold,
            "collect",
            duplicate_threshold=self.duplicate_threshold,
            allow_callsites=self.allow_callsites,
            allow_fingerprints=self.allow_fingerprints,
            allow_relationships=self.allow_relationships,
            isolate=True,
        )

    def finish(self, request: str, report: Report) -> None:
        findings = report.findings
        if not findings:
            return
        for finding in findings:
            logger.log(self.log_level, "%s: %s", request, finding.describe())
        if self.on_findings is not None:
            self.on_findings(request, findings)


AppT = TypeVar("AppT")


class _Middleware(Generic[AppT]):
    """What both middlewares take: the application and the detection settings."""

    def __init__(
        self,
        app: AppT,
        *,
        threshold: int | None = None,
        duplicate_threshold: int = DEFAULT_DUPLICATE_THRESHOLD,
        allow_callsites: Iterable[str] = (),
        allow_fingerprints: Iterable[str] = (),
        allow_relationships: Iterable[str] = (),
        on_findings: OnFindings | None = None,
        log_level: int = logging.WARNING,
    ) -> None:
        self.app = app
        self.options = _Options(
            threshold,
            duplicate_threshold,
            allow_callsites,
            allow_fingerprints,
            allow_relationships,
            on_findings,
            log_level,
        )


class ASGIMiddleware(_Middleware[ASGIApp]):
    """Wrap an ASGI application: ``app = ASGIMiddleware(app)``."""

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan: not a request
            return
        request = f"{scope.get('method', 'WS')} {scope.get('path', '')}"
        detection = self.options.detection()
        try:
            with detection:
                await self.app(scope, receive, send)
        finally:
            # Log what the request did even when it failed: the failure may be the N+1's.
            if detection.report is not None:
                self.options.finish(request, detection.report)


class WSGIMiddleware(_Middleware[WSGIApp]):
    """Wrap a WSGI application: ``app.wsgi_app = WSGIMiddleware(app.wsgi_app)``.

    A WSGI response body may be produced lazily, while the server iterates it; the scope is
    re-entered around each chunk and closed when the server closes the response.
    """

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request = f"{environ.get('REQUEST_METHOD', '')} {environ.get('PATH_INFO', '')}"
        detection = self.options.detection()
        report = detection.start()
        try:
            with detection.activated():
                body = self.app(environ, start_response)
        except BaseException as exc:
            detection.finish(type(exc))
            self.options.finish(request, report)
            raise
        return _ScopedBody(body, detection, lambda: self.options.finish(request, report))


class _ScopedBody:
    """The application's response body, iterated inside the request's scope."""

    def __init__(
        self, body: Iterable[bytes], detection: Detection, finish: Callable[[], None]
    ) -> None:
        self._body = body
        self._detection = detection
        self._finish = finish
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        iterator = iter(self._body)
        while True:
            with self._detection.activated():
                chunk = next(iterator, None)
            if chunk is None:
                return
            yield chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                with self._detection.activated():
                    close()
        finally:
            self._detection.finish()
            self._finish()
