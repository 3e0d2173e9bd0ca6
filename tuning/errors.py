"""Errors the user can fix; the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

from trainer.errors import RungwiseError

__all__ = ["RungwiseError", "TrackingError"]


class TrackingError(RungwiseError):
    """MLflow cannot be reached or refused a request."""
