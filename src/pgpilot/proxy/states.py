"""Every state of a client or server connection, and every legal move between them.

Rules of this file (as h11's ``_state.py``):

- A connection is in exactly one state; the state decides which per-pool list it sits in, and
  those lists are what ``SHOW CLIENTS`` / ``SHOW SERVERS`` print and what the metrics count.
- The tables below are the whole truth about transitions. Code changes a state only through
  ``Connection.set_state``, which looks the move up here; a move that is not in the table is a
  bug and raises :class:`IllegalTransition` naming both states.

Client states (PgBouncer's names in brackets):
  LOGIN    startup packet, TLS and authentication in progress               [cl_login]
  WAITING  logged in, wants a server, none free yet                          [cl_waiting]
  ACTIVE   logged in; linked to a server or idle between transactions        [cl_active]
  CLOSED   gone                                                               [justfree]

Server states:
  LOGIN    connecting and authenticating to PostgreSQL                        [sv_login]
  IDLE     logged in, clean, in the pool's idle list                          [sv_idle]
  ACTIVE   linked to a client                                                 [sv_active]
  USED     released by a client, waiting for its reset or check query         [sv_used]
  TESTED   running the reset / check / parameter query before reuse           [sv_tested]
  CLOSED   gone
"""

from __future__ import annotations

import enum


class ClientState(enum.Enum):
    # Members are singletons: identity hashing skips Enum's Python-level __hash__, which the
    # per-state sets would otherwise call on every transition.
    __hash__ = object.__hash__
    LOGIN = "login"
    WAITING = "waiting"
    ACTIVE = "active"
    CLOSED = "closed"


class ServerState(enum.Enum):
    __hash__ = object.__hash__
    LOGIN = "login"
    IDLE = "idle"
    ACTIVE = "active"
    USED = "used"
    TESTED = "tested"
    CLOSED = "closed"


class IllegalTransition(RuntimeError):
    """A connection was asked to move between two states the table does not connect."""


CLIENT_TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    ClientState.LOGIN: frozenset({ClientState.ACTIVE, ClientState.WAITING, ClientState.CLOSED}),
    ClientState.WAITING: frozenset({ClientState.ACTIVE, ClientState.CLOSED}),
    ClientState.ACTIVE: frozenset({ClientState.WAITING, ClientState.CLOSED}),
    ClientState.CLOSED: frozenset(),
}

SERVER_TRANSITIONS: dict[ServerState, frozenset[ServerState]] = {
    ServerState.LOGIN: frozenset({ServerState.IDLE, ServerState.ACTIVE, ServerState.TESTED,
                                  ServerState.CLOSED}),
    ServerState.IDLE: frozenset({ServerState.ACTIVE, ServerState.TESTED, ServerState.CLOSED}),
    ServerState.ACTIVE: frozenset({ServerState.IDLE, ServerState.USED, ServerState.TESTED,
                                   ServerState.CLOSED}),
    ServerState.USED: frozenset({ServerState.TESTED, ServerState.IDLE, ServerState.ACTIVE,
                                 ServerState.CLOSED}),
    ServerState.TESTED: frozenset({ServerState.IDLE, ServerState.ACTIVE, ServerState.CLOSED}),
    ServerState.CLOSED: frozenset(),
}


def check_client_move(old: ClientState, new: ClientState) -> None:
    if new is not old and new not in CLIENT_TRANSITIONS[old]:
        raise IllegalTransition(f"client cannot go from {old.name} to {new.name}")


def check_server_move(old: ServerState, new: ServerState) -> None:
    if new is not old and new not in SERVER_TRANSITIONS[old]:
        raise IllegalTransition(f"server cannot go from {old.name} to {new.name}")

# Why a client left when it closed the connection itself (Terminate, or the end of its stream):
# the log_disconnections reason, the same from the client and from the admin console.
CLIENT_CLOSED = "client closed the connection"
