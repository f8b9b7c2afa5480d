"""One detection scope per request sent through a test client.

A test that sends several requests (log in, create, list) is not a loop over them: a query each
request repeats would otherwise read as an N+1 of the test. While a ``detect()`` scope is open,
each request sent through a patched test client runs in an *isolated* child scope (its queries
count in it alone; its findings go to the test's report when it ends):

* Werkzeug's ``Client.open`` (Flask's ``app.test_client()``);
* httpx's ``ASGITransport`` (``httpx.AsyncClient(transport=ASGITransport(app))``);
* Starlette's ``TestClient`` (its transport runs the application in another thread, so the
  scope is entered around the application itself).

Only clients of modules already imported are patched, once; :func:`install` is cheap to call
again (the pytest plugin calls it before each test). Outside a scope the patched methods do
exactly what they did.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from pgpilot.nplusone.core import _current_scope, child_detection

__all__ = ["install", "uninstall"]

# (module, class attribute path, method) -> the original method
_patched: dict[tuple[str, str, str], Any] = {}


def _target(module_name: str, class_name: str) -> Any:
    module = sys.modules.get(module_name)
    return None if module is None else getattr(module, class_name, None)


def _patch(module_name: str, class_name: str, method: str, make: Callable[[Any], Any]) -> None:
    key = (module_name, class_name, method)
    if key in _patched:
        return
    cls = _target(module_name, class_name)
    original = getattr(cls, method, None) if cls is not None else None
    if original is None:
        return
    _patched[key] = original
    setattr(cls, method, functools.wraps(original)(make(original)))


def _wrap_sync(original: Any) -> Any:
    def scoped(self: Any, *args: Any, **kwargs: Any) -> Any:
        scope = _current_scope.get()
        if scope is None:
            return original(self, *args, **kwargs)
        with child_detection(scope):
            return original(self, *args, **kwargs)

    return scoped


def _wrap_async(original: Any) -> Any:
    async def scoped(self: Any, *args: Any, **kwargs: Any) -> Any:
        scope = _current_scope.get()
        if scope is None:
            return await original(self, *args, **kwargs)
        with child_detection(scope):
            return await original(self, *args, **kwargs)

    return scoped


def _wrap_starlette(original: Any) -> Any:
    def scoped(self: Any, request: Any) -> Any:
        scope = _current_scope.get()
        if scope is None:
            return original(self, request)
        detection = child_detection(scope)
        detection.start()
        app = self.app

        async def scoped_app(asgi_scope: Any, receive: Any, send: Any) -> None:
            with detection.activated():
                await app(asgi_scope, receive, send)

        self.app = scoped_app
        try:
            return original(self, request)
        finally:
            self.app = app
            detection.finish()

    return scoped


def install() -> None:
    """Patch the test clients of the modules imported so far (idempotent)."""
    _patch("werkzeug.test", "Client", "open", _wrap_sync)
    _patch("httpx", "ASGITransport", "handle_async_request", _wrap_async)
    _patch("starlette.testclient", "_TestClientTransport", "handle_request", _wrap_starlette)


def uninstall() -> None:
    """Give every patched client its method back."""
    for (module_name, class_name, method), original in list(_patched.items()):
        cls = _target(module_name, class_name)
        if cls is not None:
            setattr(cls, method, original)
        del _patched[(module_name, class_name, method)]
