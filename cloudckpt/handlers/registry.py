"""Binding args types to handlers: the global registration and HandlerRegistry."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from cloudckpt.handlers.args import CheckpointArgs
from cloudckpt.handlers.base import CheckpointHandler

A = TypeVar("A", bound=type)

_SAVE_ARGS: dict[type[CheckpointArgs], type[CheckpointHandler]] = {}
_RESTORE_ARGS: dict[type[CheckpointArgs], type[CheckpointHandler]] = {}


def register_with_handler(
    handler_cls: type[CheckpointHandler], *, for_save: bool = False, for_restore: bool = False
) -> Callable[[A], A]:
    """Class decorator binding an args class to the handler class that serves it.

    Raises:
        ValueError: neither ``for_save`` nor ``for_restore`` is set.
        TypeError: the decorated class is not a :class:`CheckpointArgs` subclass.
    """
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
    names = {
        a.__name__ for a, h in (*_SAVE_ARGS.items(), *_RESTORE_ARGS.items()) if h is handler_cls
    }
    return sorted(names)


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
        """Adds an entry; a duplicate (item, args type) pair raises ``ValueError``."""
        if not (isinstance(args_type, type) and issubclass(args_type, CheckpointArgs)):
            raise TypeError(f"args_type must be a CheckpointArgs subclass, got {args_type!r}")
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
