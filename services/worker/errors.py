"""The worker's request error: a parameter out of range (gRPC INVALID_ARGUMENT naming the field).

Its own module so that `request.py` and `guided.py` (which `request.py` refers to) both raise it
without importing each other.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request parameter is out of range; `field` names it (gRPC INVALID_ARGUMENT)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
