"""One error hierarchy for the whole project, at the bottom so every layer can use it.

``RungwiseError`` is an error the user can fix (a spec value, the data, a file, a device, the
cluster's size): the CLI prints its message as one line and exits 2. Everything else is a
defect or an outage: exit 1 with the ``--debug`` hint. Messages name the key path or the thing
that is wrong, what was received and what is allowed.
"""

from __future__ import annotations


class RungwiseError(ValueError):
    """A user-facing, one-line error (exit code 2)."""


class UserError(RungwiseError):
    """A command-line argument or a file the user named is not usable."""
