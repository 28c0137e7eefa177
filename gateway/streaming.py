"""Server-sent events in OpenAI's format: `data: {chunk}\\n\\n` ... `data: [DONE]\\n\\n`.

The first chunk is produced before the response is started, so an error that happens before
any output (bad prompt, no worker) still gets its proper HTTP status; a later error is sent as
an `error` event followed by `[DONE]`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.errors import APIError
from services.common import telemetry

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def encode(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def encode_event(event: dict[str, Any]) -> bytes:
    """A typed SSE event (`event: <type>` then its data), as the Responses and Messages APIs send."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


async def sse(
    request: web.Request, batches: AsyncIterator[list[dict[str, Any]]], request_id: str = ""
) -> web.StreamResponse:
    """Stream `batches` of chunks: each batch (chunks that were ready at once) in one write, and
    `[DONE]` with the end of the body, so a token costs one transport write and the end no extra."""
    first = await anext(batches, None)
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if request_id:
        headers["X-Request-Id"] = request_id
    response = web.StreamResponse(status=200, headers=headers)
    await response.prepare(request)
    end = DONE
    try:
        if first is not None:
            await response.write(b"".join(map(encode, first)))
            telemetry.event("first_chunk_written")
        async for batch in batches:
            await response.write(b"".join(map(encode, batch)))
    except APIError as err:
        end = encode(err.body()) + DONE
    except (ConnectionResetError, ConnectionError):
        raise
    except Exception:
        log.exception("error while streaming")
        end = encode(APIError(500, "internal server error").body()) + DONE
    await response.write_eof(end)
    return response
