"""The ``options`` startup parameter, read as PgBouncer 1.23 reads it.

libpq sends ``options`` (``PGOPTIONS``, ``options=`` in a DSN) as one string of command-line
switches for the backend. A pooler cannot hand it to a server as it is (the server is shared),
so, as PgBouncer, pgpilot accepts only settings, ``-c name=value`` or ``--name=value``, with a
backslash escaping the next character (``-c datestyle=German,\\ YMD``), and treats each setting
as if it had come as a startup parameter of its own: a tracked one (DateStyle, TimeZone ...)
follows the client, one in ``ignore_startup_parameters`` is dropped, any other refuses the
login, unless ``options`` itself is in ``ignore_startup_parameters``.
"""

from __future__ import annotations

ONLY_SETTINGS = ("unsupported options startup parameter: only '-c config=val' and "
                 "'--config=val' are allowed")


class OptionsError(ValueError):
    """``options`` holds something other than settings; the text is what the client is told."""


def _token(text: str, pos: int) -> tuple[str, int]:
    """The token at ``pos``: up to the next unescaped whitespace, backslashes removed."""
    out: list[str] = []
    n = len(text)
    while pos < n and not text[pos].isspace():
        char = text[pos]
        if char == "\\" and pos + 1 < n:
            pos += 1
            char = text[pos]
        out.append(char)
        pos += 1
    return "".join(out), pos


def parse_options(text: str) -> list[tuple[str, str]]:
    """The (name, value) settings in an ``options`` startup parameter, in order.

    >>> parse_options(r"-c timezone=Portugal  --datestyle=German,\\ YMD")
    [('timezone', 'Portugal'), ('datestyle', 'German, YMD')]
    """
    settings: list[tuple[str, str]] = []
    pos, n = 0, len(text)
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            return settings
        if text.startswith("-c", pos):
            pos += 2
            while pos < n and text[pos].isspace():
                pos += 1
        elif text.startswith("--", pos):
            pos += 2
        else:
            raise OptionsError(ONLY_SETTINGS)
        token, pos = _token(text, pos)
        name, equals, value = token.partition("=")
        if not equals or not name:
            raise OptionsError(ONLY_SETTINGS)
        settings.append((name, value))
