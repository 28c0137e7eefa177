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
        self.message = message


class ImageNotCachedError(InvalidRequestError):
    """An image sent as its hash alone that this worker does not hold (gRPC FAILED_PRECONDITION:
    the request is fine, the worker's state is not what the caller thought; resend the pixels)."""


def task_mismatch(task: str) -> str:
    """Why a worker of `task` (--task) refuses a request of the other kind (FAILED_PRECONDITION)."""
    if task == "embed":
        return (
            "this worker runs --task embed and serves embeddings (Embed) only; text generation "
            "needs a worker started without --task embed"
        )
    return (
        "this worker runs --task generate and serves text generation only; embeddings need a "
        "worker started with --task embed (a decoder embedding model such as Qwen3-Embedding)"
    )
