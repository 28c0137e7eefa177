"""The encode role's gRPC service (`tandem worker --role encode`): Encode and Info of
tandem.v1.Worker; the other rpcs answer UNIMPLEMENTED (the generated base class's answer).

Encoding runs on one thread off the event loop (the encoder and its cache are single-threaded),
so calls queue there in arrival order; Info and health stay responsive meanwhile.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc

import tandem
from services.worker.encoder import VisionEncoder
from services.worker.errors import InvalidRequestError
from services.worker.mm_inputs import image_to_pb, images_from_pb
from tandem.v1 import worker_pb2, worker_pb2_grpc

SERVICE_NAME = "tandem.v1.Worker"


class EncodeServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, encoder: VisionEncoder, served_model_name: str) -> None:
        self.encoder = encoder
        self.served_model_name = served_model_name
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="encode")

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def Encode(
        self, request: worker_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.EncodeResponse:
        try:
            images = images_from_pb(request.images)
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(self._thread, self.encoder.encode, images)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises
        return worker_pb2.EncodeResponse(images=[image_to_pb(image) for image in encoded])

    async def Info(
        self, request: worker_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        e = self.encoder
        return worker_pb2.WorkerInfo(
            model_name=self.served_model_name,
            architecture=e.model_config.architecture,
            dtype=str(e.dtype).removeprefix("torch."),
            role=worker_pb2.WORKER_ROLE_ENCODE,
            vocab_size=e.model_config.vocab_size,
            hidden_size=e.model_config.hidden_size,
            device=str(e.device),
            version=tandem.__version__,
            num_images_encoded=e.cache.misses,
            num_encoder_cache_hits=e.cache.hits,
        )


def add_to_server(server: grpc.aio.Server, encoder: VisionEncoder, served_model_name: str) -> EncodeServicer:
    servicer = EncodeServicer(encoder, served_model_name)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    return servicer
