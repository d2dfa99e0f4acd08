"""cloudckpt and its peer, Orbax, behind one small interface, so scenarios time both alike.

Both save the tree as the item ``state`` of a composite checkpoint and restore
it into a target of ``jax.ShapeDtypeStruct`` leaves with the saved shardings.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

import jax
import numpy as np


class Saver(Protocol):
    name: str

    def save(self, url: str, tree: Any) -> None: ...
    def restore(self, url: str, target: Any) -> Any: ...
    def async_save(self, url: str, tree: Any) -> float:
        """Starts an async save; returns the seconds ``save`` blocked."""
        ...

    def wait(self) -> None: ...
    def close(self) -> None: ...


class _Library:
    """Blocking and async checkpointers of one library.

    cloudckpt is meant as a drop-in for Orbax, and the calls used here are the
    same in both (``Checkpointer``, ``AsyncCheckpointer``, ``args.Composite``,
    ``StandardSave``/``StandardRestore``), so one adapter serves both.
    """

    def __init__(self, name: str, module: Any) -> None:
        self.name = name
        self._lib = module
        self._sync = module.Checkpointer(module.CompositeCheckpointHandler())
        self._async: Any = None

    def _args(self, tree: Any) -> Any:
        return self._lib.args.Composite(state=self._lib.args.StandardSave(tree))

    def save(self, url: str, tree: Any) -> None:
        self._sync.save(url, args=self._args(tree))

    def restore(self, url: str, target: Any) -> Any:
        args = self._lib.args.Composite(state=self._lib.args.StandardRestore(target))
        return jax.block_until_ready(self._sync.restore(url, args=args)["state"])

    def async_save(self, url: str, tree: Any) -> float:
        if self._async is None:
            self._async = self._lib.AsyncCheckpointer(self._lib.CompositeCheckpointHandler())
        start = time.perf_counter()
        self._async.save(url, args=self._args(tree))
        return time.perf_counter() - start

    def wait(self) -> None:
        if self._async is not None:
            self._async.wait_until_finished()

    def close(self) -> None:
        self._sync.close()
        if self._async is not None:
            self._async.close()


def CloudCkpt() -> Saver:
    import cloudckpt

    return _Library("cloudckpt", cloudckpt)


def Orbax() -> Saver:
    import orbax.checkpoint

    return _Library("orbax", orbax.checkpoint)


def point_orbax_at_gcs(endpoint: str) -> None:
    """tensorstore settings Orbax needs for a GCS emulator (cloudckpt derives its own).

    Without them tensorstore talks to real GCS and hangs on authentication.
    """
    endpoint = endpoint.rstrip("/")
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = endpoint
    os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"


def same_values(a: Any, b: Any) -> bool:
    """Whether two trees hold equal leaves (compared on the host)."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    if len(la) != len(lb):
        return False
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))
