"""A downstream (styler / worker) gRPC failure as the client should see it, in OpenAI's envelope.

Its own module: the mapping needs both `errors` (APIError) and `deadline` (has the request's
deadline passed?), and `deadline` itself raises APIErrors.
"""

from __future__ import annotations

import grpc

from gateway.deadline import expired
from gateway.errors import APIError, one_line

# gRPC status -> (HTTP status, retry-after seconds or None)
_GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, int | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, None),
    grpc.StatusCode.OUT_OF_RANGE: (400, None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, None),
    grpc.StatusCode.NOT_FOUND: (404, None),
    grpc.StatusCode.ALREADY_EXISTS: (409, None),
    grpc.StatusCode.UNAUTHENTICATED: (401, None),
    grpc.StatusCode.PERMISSION_DENIED: (403, None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, 1),
    grpc.StatusCode.UNAVAILABLE: (503, 1),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, None),
    grpc.StatusCode.CANCELLED: (503, 1),
    grpc.StatusCode.ABORTED: (503, 1),
    grpc.StatusCode.UNIMPLEMENTED: (501, None),
}


def from_grpc(exc: grpc.aio.AioRpcError, service: str) -> APIError:
    """A downstream failure as the client should see it: client errors pass their message through.

    Any failure once the request's deadline has passed is the timeout: a stream write that races
    the deadline fails in grpcio with INTERNAL ("the styler failed") rather than DEADLINE_EXCEEDED.
    """
    status, retry_after = _GRPC_TO_HTTP.get(exc.code(), (502, None))
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (status >= 500 and expired()):
        return APIError(504, f"the request timed out waiting for the {service}", code="timeout")
    if status < 500:
        return APIError(status, one_line(exc.details() or "") or exc.code().name, retry_after_s=retry_after)
    return APIError(status, f"the {service} failed: {exc.code().name}", retry_after_s=retry_after)


# grpc core reports a connection torn down under an open rpc (a peer that stopped or restarted) as
# UNAVAILABLE, but in some races as UNKNOWN "Stream removed" (grpc/grpc#34076): the peer is gone
# either way, and the router must read it so (move the request) rather than as the request's 500.
STREAM_REMOVED = "Stream removed"


def stream_removed(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() == grpc.StatusCode.UNKNOWN and exc.details() == STREAM_REMOVED


def peer_gone(exc: grpc.aio.AioRpcError, what: str) -> grpc.aio.AioRpcError:
    """UNAVAILABLE for a failure that is the peer's (`what` says which), keeping `exc`'s status in
    the details."""
    details = f"{what} ({exc.code().name}: {exc.details()})"
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details
    )
