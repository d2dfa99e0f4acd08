"""Which handler serves what: handler identities, args bindings and HandlerRegistry.

Two process-wide tables live here, and only here. Both are filled as classes
are defined (at import), never by reading a checkpoint, and both refuse a
conflicting entry instead of silently replacing it, so every checkpointer in
the process sees the same answers:

* **handler identities** (``typestr`` -> handler class): step metadata
  records each item's handler typestr; restoring without args looks it up
  here. Only classes already imported are found: nothing in a checkpoint can
  make cloudckpt import code.
* **args bindings** (args class -> handler class, ``register_with_handler``):
  which handler a :class:`~cloudckpt.handlers.composite.CompositeCheckpointHandler`
  without a ``handler_registry`` makes for an item's args.

A :class:`HandlerRegistry` is the per-checkpointer alternative to the second:
handler instances chosen per item, passed to one composite handler.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from cloudckpt.handlers.args import CheckpointArgs

if TYPE_CHECKING:  # base.py imports this module to register handler classes
    from cloudckpt.handlers.base import CheckpointHandler

A = TypeVar("A", bound=type)

_lock = threading.Lock()  # makes register_handler_type's check-then-set one step
#: typestr -> the concrete handler class whose identity it is (see module docstring).
_HANDLER_TYPES: dict[str, type[CheckpointHandler]] = {}
#: args class -> the handler class ``register_with_handler`` bound it to.
_SAVE_ARGS: dict[type[CheckpointArgs], type[CheckpointHandler]] = {}
_RESTORE_ARGS: dict[type[CheckpointArgs], type[CheckpointHandler]] = {}


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_handler_type(handler_cls: type[CheckpointHandler]) -> None:
    """Records ``handler_cls`` as the class its ``typestr()`` names.

    Called for every concrete handler class when it is defined
    (``CheckpointHandler.__init_subclass__``); there is no need to call it
    directly. Defining a class again under the same module and qualified name
    (a module reloaded, a class made inside a function called twice) replaces
    the earlier one: it is the same handler.

    Raises:
        TypeError: another handler class already has this typestr; restoring
            a checkpoint that names it would be ambiguous.
    """
    typestr = handler_cls.typestr()
    with _lock:
        known = _HANDLER_TYPES.get(typestr)
        if known is not None and _qualified_name(known) != _qualified_name(handler_cls):
            raise TypeError(
                f"handler class {_qualified_name(handler_cls)} has typestr {typestr!r}, which is "
                f"already the identity of {_qualified_name(known)}; checkpoints record it to find "
                "their handler again, so each handler class needs its own. Declare another "
                "TYPESTR on the new class"
            )
        _HANDLER_TYPES[typestr] = handler_cls


def handler_class_by_typestr(typestr: str) -> type[CheckpointHandler] | None:
    """The handler class whose identity is ``typestr``, if it is defined in this process."""
    return _HANDLER_TYPES.get(typestr)


def _require_concrete_handler(handler_cls: object, where: str) -> None:
    """Raises a clear ``TypeError`` unless ``handler_cls`` is an instantiable handler class."""
    from cloudckpt.handlers.base import CheckpointHandler, abstract_methods  # import cycle

    if not (isinstance(handler_cls, type) and issubclass(handler_cls, CheckpointHandler)):
        raise TypeError(f"{where} needs a CheckpointHandler subclass, got {handler_cls!r}")
    missing = abstract_methods(handler_cls)
    if missing:
        raise TypeError(
            f"{where}: {handler_cls.__name__} is abstract; it does not implement "
            f"{', '.join(sorted(missing))}. Implement them (see cloudckpt.CheckpointHandler)"
        )


def register_with_handler(
    handler_cls: type[CheckpointHandler], *, for_save: bool = False, for_restore: bool = False
) -> Callable[[A], A]:
    """Class decorator binding an args class to the handler class that serves it.

    Raises:
        ValueError: neither ``for_save`` nor ``for_restore`` is set.
        TypeError: ``handler_cls`` is not a concrete handler class (an abstract
            method is missing), or the decorated class is not a
            :class:`CheckpointArgs` subclass.
    """
    _require_concrete_handler(handler_cls, f"register_with_handler({handler_cls!r})")
    if not (for_save or for_restore):
        raise ValueError(
            f"register_with_handler({handler_cls.__name__}) needs for_save=True and/or "
            "for_restore=True"
        )

    def decorate(args_cls: A) -> A:
        if not (isinstance(args_cls, type) and issubclass(args_cls, CheckpointArgs)):
            raise TypeError(
                f"register_with_handler can only decorate CheckpointArgs subclasses, got {args_cls!r}"
            )
        if for_save:
            _SAVE_ARGS[args_cls] = handler_cls
        if for_restore:
            _RESTORE_ARGS[args_cls] = handler_cls
        return args_cls

    return decorate


def handler_class_for(args_type: type[CheckpointArgs]) -> type[CheckpointHandler] | None:
    """The handler class registered for an args type (save or restore), if any."""
    return _SAVE_ARGS.get(args_type) or _RESTORE_ARGS.get(args_type)


def registered_args_for(handler_cls: type[CheckpointHandler]) -> list[str]:
    """Names of the args classes bound to ``handler_cls``, sorted."""
    bound = [*_SAVE_ARGS.items(), *_RESTORE_ARGS.items()]
    return sorted({a.__name__ for a, h in bound if h is handler_cls})


def _args_type(args_or_type: CheckpointArgs | type[CheckpointArgs]) -> type[CheckpointArgs]:
    return args_or_type if isinstance(args_or_type, type) else type(args_or_type)


class HandlerRegistry:
    """Maps (item name or None, args type) to a handler instance.

    ``get`` looks up the item's own entry first, then the item-independent
    (None) one. Looking up by args class or by args instance is the same.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str | None, type[CheckpointArgs]], CheckpointHandler] = {}

    def add(
        self,
        item: str | None,
        args_type: type[CheckpointArgs],
        handler: CheckpointHandler | type[CheckpointHandler],
    ) -> None:
        """Adds an entry; a handler class is instantiated once, here.

        Raises:
            ValueError: the (item, args type) pair already has an entry.
            TypeError: ``args_type`` is not a :class:`CheckpointArgs` subclass,
                or ``handler`` is an abstract handler class.
        """
        if not (isinstance(args_type, type) and issubclass(args_type, CheckpointArgs)):
            raise TypeError(f"args_type must be a CheckpointArgs subclass, got {args_type!r}")
        if isinstance(handler, type):
            _require_concrete_handler(
                handler, f"HandlerRegistry.add({item!r}, {args_type.__name__})"
            )
        key = (item, args_type)
        if key in self._entries:
            raise ValueError(
                f"an entry for item {item!r} with {args_type.__name__} already exists in this "
                "HandlerRegistry"
            )
        self._entries[key] = handler() if isinstance(handler, type) else handler

    def get(
        self, item: str | None, args_or_type: CheckpointArgs | type[CheckpointArgs]
    ) -> CheckpointHandler:
        """The handler for (item, args type); ``KeyError`` when there is no entry."""
        args_type = _args_type(args_or_type)
        for key in ((item, args_type), (None, args_type)):
            if key in self._entries:
                return self._entries[key]
        raise KeyError(
            f"no entry for item {item!r} with {args_type.__name__} in this HandlerRegistry; "
            f"entries: {self.describe()}"
        )

    def has(self, item: str | None, args_or_type: CheckpointArgs | type[CheckpointArgs]) -> bool:
        args_type = _args_type(args_or_type)
        return (item, args_type) in self._entries or (None, args_type) in self._entries

    def handlers_for_item(self, item: str) -> list[CheckpointHandler]:
        """Handlers with an entry naming ``item`` (then item-independent ones)."""
        own = [h for (i, _), h in self._entries.items() if i == item]
        return own or [h for (i, _), h in self._entries.items() if i is None]

    def args_types_for_item(self, item: str) -> list[str]:
        return sorted(a.__name__ for (i, a) in self._entries if i in (item, None))

    def items(self) -> list[str]:
        return sorted({i for (i, _) in self._entries if i is not None})

    def handlers(self) -> list[CheckpointHandler]:
        unique: dict[int, CheckpointHandler] = {}
        for handler in self._entries.values():
            unique.setdefault(id(handler), handler)
        return list(unique.values())

    def describe(self) -> str:
        return ", ".join(f"({i!r}, {a.__name__})" for (i, a) in self._entries) or "none"
