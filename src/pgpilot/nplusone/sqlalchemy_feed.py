"""SQLAlchemy feed: every statement of every engine, sync and async, while a scope is open.

Listeners on the dialect execution events (``do_execute``, ``do_executemany``,
``do_execute_no_params``), registered through the ``Engine`` class, see all engines, including
the sync engine inside each ``AsyncEngine``, without being handed any of them. Dialect events
rather than the connection's ``before_cursor_execute``: a connection-level listener switches
every engine onto SQLAlchemy's event path (``before_execute``, ``after_execute``, ... on each
statement), which measured at ~5% of an ORM workload by itself; the dialect hooks cost one call.
They return None, so SQLAlchemy then runs the statement itself as usual.

For ORM statements the listener also reads what the ORM already knows:

* a relationship lazy load carries the state it loads for (``_lazy_loaded_from``) and that
  state's ``load_path``, the chain of relationships it was reached through; the loader option
  that would have avoided it is spelled from that chain: ``selectinload`` for collections,
  ``joinedload`` for many-to-one, chained for nested loops.
* a top-level ORM select carries its loader options; each eager one is noted, and the
  relationship attribute it loads starts counting reads, so an eager load nothing reads is
  reported (``unused_eager_load``).

These are SQLAlchemy 2.x internals read defensively (``getattr`` with defaults): if a future
version moves them, the feed degrades to plain SQL detection instead of failing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from functools import lru_cache
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import RelationshipProperty
from sqlalchemy.orm.attributes import InstrumentedAttribute

from pgpilot.nplusone.callsite import find_callsite
from pgpilot.nplusone.core import (
    _current_scope,
    note_eager_load,
    note_relationship_read,
    record_query,
)

__all__ = ["install", "loader_option_for_path", "uninstall"]

# SQLAlchemy's strategy names -> the loader option function that requests them.
_LOADER_FUNCTIONS = {
    "selectin": "selectinload",
    "joined": "joinedload",
    "subquery": "subqueryload",
    "immediate": "immediateload",
    "select": "lazyload",
    "raise": "raiseload",
    "raise_on_sql": "raiseload",
    "noload": "noload",
}
_EAGER = frozenset({"selectinload", "joinedload", "subqueryload", "immediateload"})


_EVENTS = ("do_execute", "do_executemany", "do_execute_no_params")


def install() -> None:
    for name, listener in zip(_EVENTS, _LISTENERS, strict=True):
        if not event.contains(Engine, name, listener):
            event.listen(Engine, name, listener)


def uninstall() -> None:
    """Remove the listeners and give tracked relationship attributes their class back."""
    for name, listener in zip(_EVENTS, _LISTENERS, strict=True):
        if event.contains(Engine, name, listener):
            event.remove(Engine, name, listener)
    for prop in list(_tracked):
        for mapper in prop.parent.self_and_descendants:
            attribute = mapper.class_manager.get(prop.key)
            if type(attribute) is _ReadTrackingAttribute:
                attribute.__class__ = InstrumentedAttribute  # type: ignore[assignment]
    _tracked.clear()


def _on_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
    if _current_scope.get() is not None:
        _record(statement, parameters, context, False)


def _on_executemany(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
    if _current_scope.get() is not None:
        _record(statement, parameters, context, True)


def _on_execute_no_params(cursor: Any, statement: str, context: Any) -> None:
    if _current_scope.get() is not None:
        _record(statement, None, context, False)


_LISTENERS: tuple[Callable[..., None], ...] = (
    _on_execute,
    _on_executemany,
    _on_execute_no_params,
)


def _record(statement: str, parameters: Any, context: Any, executemany: bool) -> None:
    relationship = loader_option = None
    eager_options: tuple[Any, ...] = ()
    invoked = getattr(context, "invoked_statement", None)
    if invoked is not None:
        current_path = getattr(getattr(invoked, "_compile_options", None), "_current_path", None)
        if current_path:
            # A relationship load. Lazy loads name the state they load for; the second query
            # of a selectinload does not, and is not the application's doing.
            load_options = context.execution_options.get("_sa_orm_load_options")
            lazy_state = getattr(load_options, "_lazy_loaded_from", None)
            loaded = current_path.path[-1]
            if lazy_state is not None and isinstance(loaded, RelationshipProperty):
                # The state's load_path is how the parent object itself was reached, so a
                # loop inside a loop gets the whole chain of loader options.
                path = (*getattr(lazy_state.load_path, "path", ()), loaded)
                relationship, loader_option = loader_option_for_path(path)
        else:
            eager_options = getattr(invoked, "_with_options", ())
    callsite = record_query(
        statement,
        parameters,
        executemany=executemany,
        relationship=relationship,
        loader_option=loader_option,
    )
    if eager_options and callsite is not None:
        if not callsite:  # past the sampled executions, but an unused load needs its line
            callsite = find_callsite()
        for key, name, option, step in _eager_loads(eager_options):
            _track_reads(key)
            note_eager_load(key, name, option, step, statement, callsite)


def _relationships(path: tuple[Any, ...]) -> list[tuple[Any, RelationshipProperty[Any]]]:
    """``(entity, relationship)`` pairs along an ORM path (entities, properties, alternating)."""
    pairs: list[tuple[Any, RelationshipProperty[Any]]] = []
    entity: Any = None
    for element in path:
        if isinstance(element, RelationshipProperty):
            pairs.append((entity if entity is not None else element.parent, element))
            entity = None
        else:
            entity = element
    return pairs


def _attribute_name(entity: Any, prop: RelationshipProperty[Any]) -> str:
    class_ = getattr(entity, "class_", None) or prop.parent.class_
    return f"{class_.__name__}.{prop.key}"


@lru_cache(maxsize=1024)
def loader_option_for_path(path: tuple[Any, ...]) -> tuple[str | None, str | None]:
    """``(relationship, option)`` for a lazy load reached along ``path``.

    ``(Customer, Customer.orders, Order, Order.items)`` gives ``("Order.items",
    "selectinload(Customer.orders).selectinload(Order.items)")``.
    """
    pairs = _relationships(path)
    if not pairs:
        return None, None
    steps = [
        f"{'selectinload' if prop.uselist else 'joinedload'}({_attribute_name(entity, prop)})"
        for entity, prop in pairs
    ]
    return _attribute_name(*pairs[-1]), ".".join(steps)


def _eager_loads(options: tuple[Any, ...]) -> Iterator[tuple[Hashable, str, str, str]]:
    """``(key, relationship, whole option, its step)`` for each eager load in ``options``."""
    for option in options:
        elements = getattr(option, "context", None)
        if not elements:
            continue
        functions: dict[tuple[Any, ...], str] = {}
        chains: list[tuple[tuple[Any, ...], str]] = []
        for element in elements:
            path = tuple(getattr(getattr(element, "path", None), "path", ()))
            pairs = tuple(_relationships(path))
            if not pairs:
                continue
            function = _loader_function(getattr(element, "strategy", None))
            functions[pairs] = function
            chains.append((pairs, function))
        for pairs, function in chains:
            if function not in _EAGER:
                continue
            steps = [
                f"{functions.get(pairs[: i + 1], 'defaultload')}({_attribute_name(*pair)})"
                for i, pair in enumerate(pairs)
            ]
            entity, prop = pairs[-1]
            yield prop, _attribute_name(entity, prop), ".".join(steps), steps[-1]


def _loader_function(strategy: Any) -> str:
    # strategy looks like (("lazy", "selectin"),); None for a defaultload step
    if not strategy:
        return "defaultload"
    for name, value in strategy:
        if name == "lazy":
            return _LOADER_FUNCTIONS.get(str(value), "defaultload")
    return "defaultload"


class _ReadTrackingAttribute(InstrumentedAttribute[Any]):
    """A relationship attribute that tells the open scope when the application reads it.

    Only relationships some query loaded eagerly are switched to this class, so other
    attribute reads pay nothing.
    """

    __slots__ = ()
    inherit_cache = True

    def __get__(self, instance: object | None, owner: Any) -> Any:  # type: ignore[override]
        if instance is not None and _current_scope.get() is not None:
            note_relationship_read(self.property)
        return InstrumentedAttribute.__get__(self, instance, owner)


_tracked: set[RelationshipProperty[Any]] = set()


def _track_reads(prop: Hashable) -> None:
    if prop in _tracked or not isinstance(prop, RelationshipProperty):
        return
    _tracked.add(prop)
    for mapper in prop.parent.self_and_descendants:
        attribute = mapper.class_manager.get(prop.key)
        # Same object, same slots: switching its class changes only what reading it does.
        if type(attribute) is InstrumentedAttribute:
            attribute.__class__ = _ReadTrackingAttribute
