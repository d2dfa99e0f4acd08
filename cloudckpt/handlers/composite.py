"""The composite handler: one sub-prefix per item, items saved concurrently."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

from cloudckpt.format.step import STEP_METADATA_NAME, read_step_metadata, validate_item_name
from cloudckpt.handlers.args import CheckpointArgs, Composite
from cloudckpt.handlers.base import AsyncCheckpointHandler, CheckpointHandler
from cloudckpt.handlers.registry import (
    HandlerRegistry,
    handler_class_by_typestr,
    handler_class_for,
    registered_args_for,
)
from cloudckpt.storage.path import StoragePath


class CompositeCheckpointHandler(AsyncCheckpointHandler):
    """Saves several named items, each under ``<step>/<item>/`` with its own handler.

    Handlers come from ``handler_registry`` when one is given; otherwise each
    item is bound, on first use, to the handler class its args type is
    registered with (``register_with_handler``). Restoring without args uses
    the bound handler or, in a fresh process, the handler type recorded in the
    step metadata.
    """

    # Its items' typestrs are what step metadata records (step_item_handlers),
    # never this one; it keeps the name the class had before the package layout.
    TYPESTR = "cloudckpt.composite.CompositeCheckpointHandler"

    def __init__(self, *, handler_registry: HandlerRegistry | None = None) -> None:
        self._registry = handler_registry
        self._process_group: tuple[int, tuple[int, ...]] = (0, ())
        self._bound: dict[str, CheckpointHandler] = {}
        self._pending: dict[str, CheckpointHandler] | None = None
        self._last_saved: dict[str, str] = {}

    # ----------------------------------------------------------------- resolution
    def _handler_for_args(self, item: str, args: CheckpointArgs) -> CheckpointHandler:
        if not isinstance(args, CheckpointArgs):
            raise TypeError(f"item {item!r}: expected CheckpointArgs, got {type(args).__name__}")
        args_name = type(args).__name__
        if self._registry is not None:
            if self._registry.has(item, args):
                return self._registry.get(item, args)
            raise ValueError(
                f"item {item!r}: the handler_registry has no handler for {args_name}; "
                f"args registered for this item: {self._registry.args_types_for_item(item) or 'none'}"
            )
        handler_cls = handler_class_for(type(args))
        if handler_cls is None:
            raise ValueError(
                f"item {item!r}: {args_name} is not registered with any handler; decorate it "
                "with cloudckpt.register_with_handler"
            )
        bound = self._bound.get(item)
        if bound is None:
            return self._new_handler(handler_cls)
        if type(bound) is not handler_cls:
            raise ValueError(
                f"item {item!r} is bound to {type(bound).__name__}, which takes "
                f"{registered_args_for(type(bound))}; it cannot be used with {args_name} "
                f"(a {handler_cls.__name__} args type). Use another item name."
            )
        return bound

    def _handler_for_saved_item(self, item: str, typestr: str) -> CheckpointHandler:
        if self._registry is not None:
            handlers = self._registry.handlers_for_item(item)
            # Item-independent entries may serve several handler types: take the one
            # that saved the item. An item's own entries are used even if the type differs.
            for handler in handlers:
                if type(handler).typestr() == typestr:
                    return handler
            if handlers and item in self._registry.items():
                return handlers[0]
        if item in self._bound:
            return self._bound[item]
        handler_cls = handler_class_by_typestr(typestr)
        if handler_cls is None:
            raise ValueError(
                f"item {item!r} could not be restored: it was saved by {typestr}, which is not "
                f"known in this process. Import the module that defines it, or pass "
                f"args=Composite({item}=<its restore args>)"
            )
        handler = self._bound[item] = self._new_handler(handler_cls)
        return handler

    def _new_handler(self, handler_cls: type[CheckpointHandler]) -> CheckpointHandler:
        handler = handler_cls()
        handler.bind_process_group(*self._process_group)
        return handler

    def bind_process_group(self, primary_host: int, members: Sequence[int]) -> None:
        self._process_group = (primary_host, tuple(members))
        handlers = list(self._bound.values())
        if self._registry is not None:
            handlers += self._registry.handlers()
        for handler in handlers:
            handler.bind_process_group(primary_host, members)

    @staticmethod
    def _default_args(item: str, handler: CheckpointHandler) -> CheckpointArgs:
        args_type = handler.default_restore_args
        if args_type is None:
            raise ValueError(
                f"item {item!r}: {type(handler).__name__} has no default restore args; pass "
                f"args=Composite({item}=<its restore args>)"
            )
        try:
            return args_type()
        except TypeError as exc:
            raise ValueError(
                f"item {item!r}: {args_type.__name__} cannot be built without arguments ({exc}); "
                f"pass args=Composite({item}={args_type.__name__}(...))"
            ) from None

    # ----------------------------------------------------------------------- save
    def async_save(self, directory: StoragePath, args: CheckpointArgs) -> Sequence[Awaitable[None]]:
        if not isinstance(args, Composite):
            raise TypeError(
                f"CompositeCheckpointHandler saves cloudckpt.args.Composite, got {type(args).__name__}"
            )
        if not args:
            raise ValueError("nothing to save: the Composite has no items")
        plan = {
            validate_item_name(item, saving=True): self._handler_for_args(item, a)
            for item, a in args.items()
        }
        # Everything validated: bind items, then copy (no I/O happens here).
        if self._registry is None:
            for item, handler in plan.items():
                self._bound.setdefault(item, handler)
        writes: list[Awaitable[None]] = []
        try:
            for item, handler in plan.items():
                if isinstance(handler, AsyncCheckpointHandler):
                    writes.extend(handler.async_save(directory / item, args[item]))
                else:
                    writes.append(handler.save(directory / item, args[item]))
        except BaseException:
            # A later item refused its args: the earlier items' writes never run.
            for write in writes:
                if asyncio.iscoroutine(write):
                    write.close()
            raise
        self._pending = plan
        self._last_saved = {item: type(h).typestr() for item, h in plan.items()}
        return writes

    def step_item_handlers(self) -> dict[str, str]:
        """``{item: typestr}`` of the save just prepared, recorded in step metadata."""
        return dict(self._last_saved)

    async def finalize(self, directory: StoragePath) -> None:
        if self._pending is None:
            raise ValueError("finalize called before any save (or twice for one save)")
        pending, self._pending = self._pending, None
        for item, handler in pending.items():
            await handler.finalize(directory / item)

    # -------------------------------------------------------------------- restore
    def restore_documents(
        self, directory: StoragePath, args: CheckpointArgs | None
    ) -> list[StoragePath]:
        """The step metadata, and the documents of the items ``args`` names."""
        found = [directory / STEP_METADATA_NAME]
        for item, item_args in args.items() if isinstance(args, Composite) else ():
            handler_cls = self._class_for_args(item, item_args)
            if handler_cls is not None:
                found += [directory / item / name for name in handler_cls.RESTORE_DOCUMENTS]
        return found

    def _class_for_args(self, item: str, args: CheckpointArgs) -> type[CheckpointHandler] | None:
        """The handler class that would restore ``item`` with ``args``; None if in doubt."""
        try:
            validate_item_name(item)
        except ValueError:
            return None  # the restore refuses it, before any I/O
        if self._registry is not None:
            has = self._registry.has(item, args)
            return type(self._registry.get(item, args)) if has else None
        bound = self._bound.get(item)
        return type(bound) if bound is not None else handler_class_for(type(args))

    async def _saved_items(self, directory: StoragePath) -> dict[str, str]:
        step = await read_step_metadata(directory)
        if not isinstance(step.item_handlers, dict):
            raise ValueError(
                f"{directory} was saved by a single {step.item_handlers} handler, not a "
                "CompositeCheckpointHandler; restore it with a Checkpointer of that handler"
            )
        return step.item_handlers

    async def restore(
        self, directory: StoragePath, args: CheckpointArgs | None = None
    ) -> Composite:
        saved = await self._saved_items(directory)
        if args is not None and not isinstance(args, Composite):
            raise TypeError(f"restore args must be a Composite, got {type(args).__name__}")
        plan: dict[str, tuple[CheckpointHandler, CheckpointArgs]] = {}
        if not args:
            for item, typestr in saved.items():
                handler = self._handler_for_saved_item(item, typestr)
                plan[item] = (handler, self._default_args(item, handler))
        else:
            for item, item_args in args.items():
                validate_item_name(item)
                if item not in saved:
                    raise KeyError(
                        f"item {item!r} is not in the checkpoint at {directory}; it has: {sorted(saved)}"
                    )
                plan[item] = (self._handler_for_args(item, item_args), item_args)
            if self._registry is None:
                # Handlers made for a restore are bound too, so close() reaches them.
                for item, (handler, _) in plan.items():
                    self._bound.setdefault(item, handler)
        results = await asyncio.gather(
            *(handler.restore(directory / item, a) for item, (handler, a) in plan.items())
        )
        return Composite(**dict(zip(plan, results, strict=True)))

    async def metadata(self, directory: StoragePath) -> dict[str, Any]:
        saved = await self._saved_items(directory)

        async def describe(item: str, typestr: str) -> Any:
            try:
                handler = self._handler_for_saved_item(item, typestr)
                return await handler.metadata(directory / item)
            except Exception:  # an item that cannot be described is None, never fatal
                return None

        values = await asyncio.gather(*(describe(i, t) for i, t in saved.items()))
        return dict(zip(saved, values, strict=True))

    def close(self) -> None:
        handlers: dict[int, CheckpointHandler] = {id(h): h for h in self._bound.values()}
        if self._registry is not None:
            handlers.update({id(h): h for h in self._registry.handlers()})
        for handler in handlers.values():
            handler.close()
        self._bound.clear()
