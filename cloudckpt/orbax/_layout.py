"""Recognising Orbax-written steps and their items from a listing.

Orbax (orbax-checkpoint 0.5 to 0.12) lays a step out as::

    <root>/<step>/                       ``<step_prefix>_<n>``, optionally zero-padded
      _CHECKPOINT_METADATA               plain JSON (no checksum envelope)
      commit_success.txt                 object stores (and POSIX since ~0.11): committed
      <item>/_METADATA                   pytree item (standard or PyTree handler)
      <item>/manifest.ocdbt, d/, ocdbt.process_<i>/   ... on OCDBT
      <item>/<param>/.zarray | zarr.json ...           ... without OCDBT
      <item>/metadata                    JSON item
    <root>/<step>.orbax-checkpoint-tmp-<ts>/           a save in flight or crashed

A directory written by ``orbax.checkpoint.Checkpointer`` is the item itself
(``_METADATA`` at its top). Committed-ness follows Orbax: on POSIX the final
name (no ``.orbax-checkpoint-tmp`` in it); on object stores
``commit_success.txt`` at the step's top as well. A child carrying
cloudckpt's own claim or marker is never taken for Orbax.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import atomicity
from atomicity import ObjectInfo
from cloudckpt.format.step import validate_item_name

#: Orbax's temporary-name infix (``<name>.orbax-checkpoint-tmp-<timestamp>``).
ORBAX_TMP_INFIX = ".orbax-checkpoint-tmp"
COMMIT_FILE = "commit_success.txt"
STEP_METADATA = "_CHECKPOINT_METADATA"
PYTREE_METADATA = "_METADATA"
JSON_ITEM_FILE = "metadata"
LEGACY_MSGPACK = "checkpoint"
_OURS = frozenset({atomicity.MARKER_NAME, atomicity.CLAIM_NAME})
_TOP_LEVEL_SIGNS = frozenset({STEP_METADATA, COMMIT_FILE, PYTREE_METADATA, "manifest.ocdbt"})


class UnsupportedOrbaxLayoutError(ValueError):
    """An Orbax checkpoint uses a feature cloudckpt does not read (named in the message)."""


@dataclass(frozen=True)
class OrbaxItem:
    """One item of an Orbax step.

    Attributes:
        name: The item's directory name; ``""`` when the step is the item
            (a directory written by an Orbax ``Checkpointer``).
        kind: ``pytree``, ``json`` or ``unsupported``.
        detail: For ``unsupported``: what was found.
    """

    name: str
    kind: str
    detail: str | None = None

    def prefix(self) -> str:
        return f"{self.name}/" if self.name else ""


@dataclass
class OrbaxStep:
    """A child of a root written by Orbax."""

    name: str
    path: str
    committed: bool
    items: list[OrbaxItem] = field(default_factory=list)
    n_objects: int = 0
    nbytes: int = 0
    mtime: float | None = None


def is_orbax_tmp_name(name: str) -> bool:
    return ORBAX_TMP_INFIX in name


def classify(
    name: str, path: str, rels: dict[str, ObjectInfo], *, atomic_rename: bool
) -> OrbaxStep | None:
    """The Orbax step made of ``rels`` (paths relative to the step), or None if not Orbax."""
    if not rels or _OURS & rels.keys() or atomicity.is_temporary_name(name):
        return None
    top = {rel for rel in rels if "/" not in rel}
    if not top & _TOP_LEVEL_SIGNS:
        return None
    committed = not is_orbax_tmp_name(name) and (atomic_rename or COMMIT_FILE in top)
    step = OrbaxStep(
        name=name,
        path=path,
        committed=committed,
        items=items_of(rels),
        n_objects=len(rels),
        nbytes=sum(i.size for i in rels.values()),
    )
    times = [i.mtime for i in rels.values() if i.mtime is not None]
    step.mtime = max(times) if times else None
    return step


def items_of(rels: Iterable[str]) -> list[OrbaxItem]:
    """The items of a step (or of a Checkpointer directory) from its relative paths."""
    rels = set(rels)
    if PYTREE_METADATA in rels:
        return [OrbaxItem("", "pytree")]
    if "manifest.ocdbt" in rels or LEGACY_MSGPACK in rels:
        return [_unsupported_pytree("")]
    names = sorted(
        {
            rel.split("/", 1)[0]
            for rel in rels
            if "/" in rel and not is_orbax_tmp_name(rel.split("/", 1)[0])
        }
    )
    out = []
    for name in names:
        try:  # the rule for cloudckpt's own items: a converted step must be readable
            validate_item_name(name)
        except ValueError as exc:
            out.append(OrbaxItem(name, "unsupported", str(exc)))
            continue
        if f"{name}/{PYTREE_METADATA}" in rels:
            out.append(OrbaxItem(name, "pytree"))
        elif f"{name}/{JSON_ITEM_FILE}" in rels:
            out.append(OrbaxItem(name, "json"))
        else:
            kids = {rel[len(name) + 1 :] for rel in rels if rel.startswith(name + "/")}
            out.append(_unsupported_pytree(name, kids))
    return out


def _unsupported_pytree(name: str, kids: set[str] | None = None) -> OrbaxItem:
    kids = kids or set()
    if LEGACY_MSGPACK in kids or not kids:
        detail = (
            "a msgpack aggregate file 'checkpoint' without _METADATA (Orbax before 0.5 / "
            "flax.training.checkpoints)"
        )
    else:
        detail = "no _METADATA and no JSON 'metadata' file: an item type cloudckpt does not know"
    return OrbaxItem(name, "unsupported", detail)


def steps_from_listing(
    root: str, infos: Iterable[ObjectInfo], *, atomic_rename: bool
) -> list[OrbaxStep]:
    """Orbax steps (committed or not) among the children of ``root``, from one listing."""
    root = root.rstrip("/")
    children: dict[str, dict[str, ObjectInfo]] = {}
    for info in infos:
        rel = info.path[len(root) + 1 :]
        if not info.path.startswith(root + "/") or "/" not in rel:
            continue
        name, rest = rel.split("/", 1)
        if name in ("", ".", ".."):  # names no child: it would address the root itself
            continue
        children.setdefault(name, {})[rest] = info
    out = []
    for name, rels in children.items():
        step = classify(name, f"{root}/{name}", rels, atomic_rename=atomic_rename)
        if step is not None:
            out.append(step)
    return sorted(out, key=lambda s: s.name)
