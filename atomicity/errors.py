"""Errors raised by the atomicity strategies; all subclass builtins."""

from __future__ import annotations


class ValidationError(ValueError):
    """A path is not what it was expected to be (temporary, or committed)."""


class ClaimLostError(RuntimeError):
    """A save's claim vanished or expired before commit; it must not be committed."""
