"""Matching a restore target to the saved leaves: what to read, what to leave, what is wrong.

Every mismatch is named (missing leaves, shapes, dtypes, kinds) before any
array data is read; ``strict=False`` casts dtypes and leaves missing leaves
as given, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloudckpt.format.pytree import Leaf
from cloudckpt.handlers.pytree import keys
from cloudckpt.storage.path import StoragePath


# ------------------------------------------------------------------------------ matching
@dataclass
class MatchPlan:
    reads: list[tuple[int, Any]]
    paths: list[tuple[str, Any]]
    untouched: dict[str, Any]


def match_targets(
    directory: StoragePath,
    targets: list[tuple[str, Any]],
    saved: Sequence[Leaf],
    by_path: dict[str, int],
    *,
    strict: bool,
) -> MatchPlan:
    missing, shapes, dtypes, kinds = [], [], [], []
    plan = MatchPlan([], [], {})
    for path, target in targets:
        i = by_path.get(path)
        if i is None:
            missing.append(path)
            plan.untouched[path] = target
            continue
        leaf = saved[i]
        if keys.is_key_leaf(leaf) or keys.is_key(target):
            problem = keys.mismatch(path, leaf, target)
            if problem is not None:
                (shapes if problem[0] == "shape" else kinds).append(problem[1])
                continue
        elif leaf.kind == "str" or isinstance(target, str):
            if not (leaf.kind == "str" and isinstance(target, str)):
                kinds.append(f"{path} (saved {leaf.kind}, target {type(target).__name__})")
                continue
        elif hasattr(target, "shape") and hasattr(target, "dtype"):
            if tuple(target.shape) != leaf.shape:
                shapes.append(f"{path}: target {tuple(target.shape)} vs saved {leaf.shape}")
                continue
            if np.dtype(target.dtype) != leaf.dtype:
                dtypes.append(
                    f"{path}: target {np.dtype(target.dtype).name} vs saved {leaf.dtype_name}"
                )
        plan.reads.append((i, target))
        plan.paths.append((path, target))
    problems = []
    if missing and strict:
        problems.append(_few(f"{len(missing)} leaves missing from the checkpoint", missing))
    if shapes:
        problems.append(_few(f"{len(shapes)} shape mismatches", shapes))
    if dtypes and strict:
        problems.append(_few(f"{len(dtypes)} dtype mismatches", dtypes))
    if kinds:
        problems.append(_few(f"{len(kinds)} kind mismatches", kinds))
    if problems:
        hint = "" if not strict else "; strict=False casts dtypes and skips missing leaves"
        raise ValueError(
            f"restore target does not match the checkpoint at {directory}: "
            + "; ".join(problems)
            + hint
        )
    if missing or dtypes:
        warnings.warn(
            f"partial restore from {directory}: "
            + "; ".join(
                p
                for p in (
                    _few(
                        f"{len(missing)} target leaves not in the checkpoint (left as given)",
                        missing,
                    )
                    if missing
                    else "",
                    _few(f"{len(dtypes)} leaves cast", dtypes) if dtypes else "",
                )
                if p
            ),
            stacklevel=4,
        )
    return plan


def _few(title: str, items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return f"{title}: {', '.join(items[:n])}{more}"
