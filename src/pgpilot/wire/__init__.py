"""PostgreSQL frontend/backend protocol v3, sans-IO: bytes in, typed messages out, and back.

Nothing here touches a socket or an event loop; the proxy feeds bytes and sends what it is given.
"""
