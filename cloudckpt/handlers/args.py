"""The base of all checkpoint args, and Composite."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


class MissingItemError(KeyError, AttributeError):
    """An item a Composite does not have: a ``KeyError`` naming the items it has.

    Also an ``AttributeError``, so that ``hasattr``, ``getattr(c, name, default)``
    and libraries probing for attributes (``jax.block_until_ready``) see a
    missing attribute rather than an error.
    """


class CheckpointArgs:
    """Base class of everything passed as ``args=`` to save or restore.

    Subclasses are small (usually frozen dataclass) records, bound to a handler
    class with :func:`cloudckpt.register_with_handler`.
    """


class Composite(CheckpointArgs, Mapping[str, Any]):
    """An immutable mapping of item name to per-item args (or restored values).

    Items are reachable as keys and as attributes: ``c["state"] is c.state``.
    Restores return the same type, holding the restored values.
    """

    __slots__ = ("_items",)

    def __init__(self, **items: Any) -> None:
        object.__setattr__(self, "_items", dict(items))

    def __getitem__(self, key: str) -> Any:
        try:
            return self._items[key]
        except KeyError:
            raise KeyError(
                f"{key!r} is not in this Composite; available: {sorted(self._items)}"
            ) from None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._items[name]
        except KeyError:
            raise MissingItemError(
                f"{name!r} is not in this Composite; available: {sorted(self._items)}"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Composite is immutable; build a new one instead of setting {name!r}")

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError(f"Composite is immutable; build a new one instead of setting {key!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Composite is immutable; cannot delete {name!r}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._items.items())
        return f"Composite({inner})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Composite):
            return self._items == other._items
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]
