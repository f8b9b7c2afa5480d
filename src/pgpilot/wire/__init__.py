"""PostgreSQL frontend/backend protocol v3, sans-IO: bytes in, typed messages out, and back.

Nothing here touches a socket or an event loop; the proxy feeds bytes and sends what it is given.
``framing`` cuts streams into messages, ``messages`` builds and parses their contents, ``auth``
holds the password arithmetic (md5, SCRAM secrets) both sides of the pooler need.
"""

from pgpilot.wire.errors import ProtocolError
from pgpilot.wire.framing import (
    CancelRequest,
    GSSENCRequest,
    MessageReader,
    SSLRequest,
    StartupMessage,
    StartupReader,
)

__all__ = [
    "CancelRequest",
    "GSSENCRequest",
    "MessageReader",
    "ProtocolError",
    "SSLRequest",
    "StartupMessage",
    "StartupReader",
]
