"""Pytree structure: flattening with path names, and a JSON skeleton to rebuild it.

Leaves are identified by their jax key-path string (``['params']['w']``,
``[0]``, ``.field``), the same on save and restore, so a restore target
matches saved leaves by name, not by position.

The skeleton records dicts, lists, tuples and None exactly. Other pytree
nodes (named tuples, dataclasses, flax structs) are recorded with their
children's key names and come back as dicts when restoring without a target:
nothing in a checkpoint can make cloudckpt import or construct user classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey, keystr

_LEAF_TYPES = (jax.Array, np.ndarray, np.generic, bool, int, float, complex, str)


def _is_known_leaf(obj: Any) -> bool:
    return isinstance(obj, (*_LEAF_TYPES, jax.ShapeDtypeStruct))


def _key_json(key: Any) -> Any:
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return key
    raise ValueError(
        f"dict key {key!r} of type {type(key).__name__} cannot be stored; use str or int keys"
    )


def _children(obj: Any) -> list[tuple[Any, Any]] | None:
    """(jax key, child) pairs of a pytree node, or None for a leaf."""
    if isinstance(obj, dict):
        return [(DictKey(k), obj[k]) for k in obj]
    if type(obj) in (list, tuple):
        return [(SequenceKey(i), v) for i, v in enumerate(obj)]
    if obj is None or _is_known_leaf(obj):
        return None
    pairs, treedef = jax.tree_util.tree_flatten_with_path(obj, is_leaf=lambda x: x is not obj)
    if treedef.node_data() is None:
        return None  # an unregistered object: a leaf of unknown type
    return [(path[0], child) for path, child in pairs]


def flatten(
    tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """Returns ``[(path, leaf), ...]`` and the JSON skeleton of ``tree``."""
    leaves: list[tuple[str, Any]] = []

    def walk(obj: Any, path: tuple[Any, ...]) -> dict[str, Any]:
        if obj is None:
            return {"none": True}
        kids = None if (is_leaf is not None and is_leaf(obj)) else _children(obj)
        if kids is None:
            leaves.append((keystr(path), obj))
            return {"leaf": len(leaves) - 1}
        if isinstance(obj, dict):
            return {"dict": [[_key_json(k.key), walk(v, (*path, k))] for k, v in kids]}
        if type(obj) is list:
            return {"list": [walk(v, (*path, k)) for k, v in kids]}
        if type(obj) is tuple:
            return {"tuple": [walk(v, (*path, k)) for k, v in kids]}
        return {
            "node": type(obj).__qualname__,
            "children": [[_key_name(k), walk(v, (*path, k))] for k, v in kids],
        }

    skeleton = walk(tree, ())
    return leaves, skeleton


def _key_name(key: Any) -> Any:
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, FlattenedIndexKey):
        return key.key
    if isinstance(key, DictKey):
        return _key_json(key.key)
    if isinstance(key, SequenceKey):
        return key.idx
    return str(key)


def rebuild(skeleton: dict[str, Any], leaves: list[Any]) -> Any:
    """Rebuilds a tree from its skeleton; custom nodes come back as dicts."""
    if "leaf" in skeleton:
        return leaves[skeleton["leaf"]]
    if "none" in skeleton:
        return None
    if "dict" in skeleton:
        return {k: rebuild(v, leaves) for k, v in skeleton["dict"]}
    if "list" in skeleton:
        return [rebuild(v, leaves) for v in skeleton["list"]]
    if "tuple" in skeleton:
        return tuple(rebuild(v, leaves) for v in skeleton["tuple"])
    return {k: rebuild(v, leaves) for k, v in skeleton["children"]}


def unflatten_like(target: Any, values: dict[str, Any]) -> Any:
    """``target``'s structure with each leaf replaced by ``values[path]``."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(target)
    return jax.tree_util.tree_unflatten(treedef, [values[keystr(p)] for p, _ in pairs])
