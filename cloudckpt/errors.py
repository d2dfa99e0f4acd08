"""Errors cloudckpt raises beyond the builtins it uses directly."""

from __future__ import annotations


class CorruptCheckpointError(ValueError):
    """Stored data failed its checksum or could not be decoded.

    The message names the object; restoring from another step, or re-saving,
    is the remedy.
    """
