"""The encode workers (--encode-worker, `tandem worker --role encode`): an image prompt's images
go to one of them before its Generate, and come back as embedding rows that the unified worker
takes instead of encoding the pixels itself (docs/multimodal.md).

The encode worker is chosen by the first image's content hash, so the same image (a later turn of
a conversation) goes to the same encode worker: its encoder cache has it, and the rows, hence the
unified worker's prefix-cache keys, are the same bytes as last time.

An encode worker that is gone (UNAVAILABLE) is skipped for the next one; a status that describes
the images (INVALID_ARGUMENT) fails the request alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc

from gateway.clients import WorkerClient
from gateway.errors import APIError
from gateway.grpc_errors import from_grpc

log = logging.getLogger(__name__)


class EncoderPool:
    def __init__(self, addresses: Sequence[str], credentials: grpc.ChannelCredentials | None = None) -> None:
        self.clients = [WorkerClient(a, credentials) for a in addresses]

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    async def encode(self, request_id: str, images: Sequence[Any]) -> tuple[Any, ...]:
        """The images (the styler's common_pb2.ImageInput) encoded by one encode worker (by the
        first image's hash, or the ones after it when it is gone); APIError when none can."""
        start = int(images[0].hash[:15] or "0", 16) if images else 0
        for k in range(len(self.clients)):
            client = self.clients[(start + k) % len(self.clients)]
            try:
                return await client.encode(request_id, images)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and k + 1 < len(self.clients):
                    log.warning("encode worker %s unavailable; trying the next one", client.address)
                    continue
                raise from_grpc(exc, "encode worker") from None
        raise APIError(503, "no encode worker is configured", retry_after_s=1)
