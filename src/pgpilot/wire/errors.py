"""The one exception of the protocol layer: the peer broke the protocol."""

from __future__ import annotations


class ProtocolError(Exception):
    """Bytes that are not valid protocol v3; the connection cannot go on.

    ``sqlstate`` is what a client is told (08P01, protocol_violation).
    """

    sqlstate = "08P01"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
