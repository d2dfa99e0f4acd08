"""Errors raised by the atomicity strategies; all subclass builtins."""

from __future__ import annotations


class ValidationError(ValueError):
    """A path is not what it was expected to be (temporary, or committed)."""


class ClaimLostError(RuntimeError):
    """A save's claim vanished or expired before commit; it must not be committed."""


class OutcomeUnknownError(ConnectionError):
    """A save's commit request may or may not have taken effect and could not be read back.

    The step is committed only if ``_COMMITTED`` (or, on object stores, its
    claim in state ``committed``) is there; ``cloudckpt ls`` tells.
    """
