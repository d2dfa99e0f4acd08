"""Checkpoint args: what to save or restore, item by item.

``cloudckpt.args.Composite(state=StandardSave(tree), meta=JsonSave({...}))``
"""

from __future__ import annotations

from cloudckpt.handlers.args import CheckpointArgs, Composite
from cloudckpt.handlers.json import JsonRestore, JsonSave
from cloudckpt.handlers.pytree import StandardRestore, StandardSave

__all__ = [
    "CheckpointArgs",
    "Composite",
    "JsonRestore",
    "JsonSave",
    "StandardRestore",
    "StandardSave",
]
