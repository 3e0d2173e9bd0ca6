"""Errors the user can fix; the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class RungwiseError(ValueError):
    """A one-line, user-facing error from the tuning layer."""


class TrackingError(RungwiseError):
    """MLflow cannot be reached or refused a request."""
