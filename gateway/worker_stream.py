"""One prompt's token stream from the workers, across worker failures and disaggregation.

    unified    Generate(prompt) on the router's pick
    disagg     Prefill(prompt) on a compatible prefill worker  ── first token streamed at once
               Generate(prompt, [first], kv_source=handle) on the decode worker
    layer-wise PrefillStream(prompt): its first event, the handle, comes when the prompt is
               admitted; Generate(prompt, kv_source=handle) goes to the decode worker at once,
               which fetches each layer while the later ones are computed and streams the
               prefill's first token itself, on arrival (it is the only source of tokens, so the
               text is consistent whatever fails: a fetch that fails before that token makes it
               compute the prompt and sample the token itself, one that fails after it computes
               prompt + token and goes on from it); the PrefillStream stays open until its result
    failures   a prefill worker that fails: another one, else the decode worker computes the prompt
               (a handle that expires or whose worker died: the decode worker falls back itself);
               a decode / unified worker that fails mid-stream: the same choice is resumed on
               another worker with `generated_token_ids` = the tokens already streamed, so the
               client sees each token once. Seeded sampling is a function of (seed, choice index,
               output position), so the resumed tokens are the ones the first worker would have
               drawn. With n > 1 each unfinished choice resumes as its own request
               (first_choice_index keeps its index and seed stream). A request moves at most
               MAX_RESUMES times: one that kills its workers costs two, not the fleet.
    statuses   only a worker that is gone (UNAVAILABLE) leaves the rotation; a full worker
               (RESOURCE_EXHAUSTED) is skipped for this request (none left: 429); any other
               status describes this request and fails it alone (see WORKER_GONE below).
    images     each Generate leg sends an image the worker holds (sent_images.py) as its hash
               alone, the others whole: the styler's pixels, or with encode workers their rows
               (encoded once a request, only for the images sent whole). A worker that no
               longer holds one answers FAILED_PRECONDITION before doing anything: the leg is
               sent again to it once, every image whole (the client sees nothing of it).

The usage of the legs is folded into one final chunk: completion tokens over every leg, cached
prompt tokens from the leg that computed the prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from gateway.clients import hash_only_image
from gateway.context import GatewayContext
from gateway.downstream import GenerateChunk, Guided, KVSource, PrefillResult, Usage
from gateway.errors import APIError, invalid
from gateway.grpc_errors import from_grpc
from gateway.merge import merge_streams
from gateway.router import NoWorkerAvailable, NoWorkerForTask, WorkerState
from gateway.structured_output import worker_error
from services.common.image_hash import IMAGE_NOT_CACHED
from services.common.sampling import SamplingParams

log = logging.getLogger(__name__)

# The failure contract (docs/gateway.md, "Request failures vs worker failures"):
# - WORKER_GONE: a transport failure (grpc reports it as UNAVAILABLE) or the worker saying it is
#   unavailable. The worker leaves the rotation until its health check passes again, and the
#   request moves to another worker (resumed after the tokens already streamed).
# - WORKER_STOPPED: the worker cancelled or aborted the call (it is shutting down): the request
#   moves, the worker stays in rotation for the health check to judge.
# - BACK_PRESSURE: the worker is full (--max-pending-requests): another worker, else a 429.
# - anything else (INVALID_ARGUMENT, FAILED_PRECONDITION, INTERNAL, ...) describes this request:
#   it fails alone (4xx, or a 500 for INTERNAL / UNKNOWN) and the worker keeps serving.
WORKER_GONE = frozenset({grpc.StatusCode.UNAVAILABLE})
WORKER_STOPPED = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})
BACK_PRESSURE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})
# A request moves at most this many times after its worker failed under it: a request that
# kills the worker running it (a poison request) costs at most two workers, never the fleet.
MAX_RESUMES = 1
# A worker's own failure of one request: a 500 for that request alone (not a 502 "bad gateway").
_REQUEST_INTERNAL = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})

# A prefill worker without layer-wise push (a parallel group, or older than PrefillStream).
_NO_LAYERWISE = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED})

# ReleaseKV calls in flight (kept referenced until done).
_background: set[asyncio.Task[None]] = set()


@dataclass
class _Choice:
    index: int
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False


class PromptStream:
    """The worker chunks of one prompt (all its choices); see the module docstring."""

    def __init__(
        self,
        ctx: GatewayContext,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams[Guided],
        first_choice_index: int = 0,
        group_id: str = "",
        images: Sequence[Any] = (),
        lora_name: str = "",
    ) -> None:
        self.ctx = ctx
        self.lora_name = lora_name  # the LoRA adapter of every leg (prefill and decode alike)
        self.images = tuple(images)  # the styler's common_pb2.ImageInput (pixels), in prompt order
        self._rows: dict[int, Any] = {}  # an encode worker's rows of images[i] (sent whole once)
        self.request_id = request_id
        self.group_id = group_id  # the worker scheduler's fairness group (the gateway request)
        self.prompt_token_ids = tuple(prompt_token_ids)
        self.sampling = sampling
        self.choices = {i: _Choice(i) for i in range(first_choice_index, first_choice_index + sampling.n)}
        self.tried: list[WorkerState] = []  # workers that failed this request
        self.full: list[WorkerState] = []  # workers that refused it as full (RESOURCE_EXHAUSTED)
        self.cached_tokens: int | None = None
        self.prompt_logprobs_sent = False
        self.num_legs = 0
        self.num_resumed = 0
        self._leg: tuple[WorkerState, str] | None = None  # the Generate stream now open: worker, id

    async def chunks(self) -> AsyncIterator[GenerateChunk]:
        try:
            async for chunk in self._group(list(self.choices)):
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise _client_error(exc, self.sampling) from None
        completion = sum(len(c.token_ids) for c in self.choices.values())
        yield GenerateChunk(
            choices=(), usage=Usage(len(self.prompt_token_ids), completion, self.cached_tokens or 0)
        )

    # ---- groups of choices and their resumption ----------------------------------------------

    async def _group(self, indices: list[int]) -> AsyncIterator[GenerateChunk]:
        """Choices `indices` (n of them, or one resumed choice) until each has finished."""
        while True:
            try:
                async for chunk in self._attempt(indices):
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in BACK_PRESSURE:  # refused before it started: another worker
                    continue
                if not self._may_resume(exc):
                    raise
                pending = [i for i in indices if not self.choices[i].finished]
                if not pending:
                    return
                if not _refused_at_door(exc):
                    self.num_resumed += 1
                log.warning(
                    "request %s: worker failed (%s) after %s tokens; resuming elsewhere",
                    self.request_id,
                    exc.code().name,
                    [len(self.choices[i].token_ids) for i in pending],
                )
                if len(pending) > 1 and any(self.choices[i].token_ids for i in pending):
                    async for chunk in merge_streams([self._group([i]) for i in pending]):
                        yield chunk
                    return
                indices = pending

    async def _attempt(self, indices: list[int]) -> AsyncIterator[GenerateChunk]:
        first = indices[0]
        generated = tuple(self.choices[first].token_ids) if len(indices) == 1 else ()
        sampling = dataclasses.replace(
            self.sampling,
            n=len(indices),
            prompt_logprobs=None if self.prompt_logprobs_sent else self.sampling.prompt_logprobs,
        )
        disagg = self.ctx.disagg
        # (image prompts are not disaggregated: Prefill carries no images yet)
        fan_out = sampling.num_sequences > 1  # n > 1, best_of, beam search: one prefill for all
        if disagg is not None and not generated and not self.images:
            if not fan_out:
                async for chunk in self._disaggregated(first, sampling):
                    yield chunk
                return
            if sampling.prompt_logprobs is None:  # (prompt logprobs: the decode worker computes it)
                async for chunk in self._disaggregated_fan_out(first, sampling):
                    yield chunk
                return
        worker = self._pick_decode()
        async for chunk in self._generate(worker, first, sampling, generated, None):
            yield chunk

    def _leg_id(self) -> str:
        """A request id per leg: a failed worker may still hold the previous one for a moment."""
        self.num_legs += 1
        return self.request_id if self.num_legs == 1 else f"{self.request_id}.{self.num_legs}"

    def _may_resume(self, exc: grpc.aio.AioRpcError) -> bool:
        """Whether a request whose worker failed with `exc` moves to another worker."""
        if exc.code() not in WORKER_GONE | WORKER_STOPPED:
            return False
        if _refused_at_door(exc) or self.num_resumed < MAX_RESUMES:
            return True
        log.warning(
            "request %s: a second worker failed under it (%s); not sending it to a third",
            self.request_id,
            exc.code().name,
        )
        return False

    def _pick_decode(self) -> WorkerState:
        exclude = [*self.tried, *self.full]
        try:
            return self.ctx.router.pick(self.prompt_token_ids, exclude=exclude, lora_name=self.lora_name)
        except NoWorkerForTask as exc:  # e.g. a chat request to a gateway of embed workers
            raise invalid(str(exc), "model") from None
        except NoWorkerAvailable as exc:
            disagg = self.ctx.disagg
            if disagg is not None:  # a prefill worker can decode too: better than failing
                with contextlib.suppress(NoWorkerAvailable):
                    return disagg.prefill.pick(
                        self.prompt_token_ids, exclude=exclude, lora_name=self.lora_name
                    )
            if self.full:
                raise APIError(
                    429, "every worker is at capacity; retry shortly", code="overloaded", retry_after_s=1
                ) from None
            raise APIError(503, str(exc), retry_after_s=1) from None

    def _failed(self, worker: WorkerState, exc: grpc.aio.AioRpcError) -> None:
        """Note how `worker` failed this request; only a worker that is gone leaves the rotation."""
        code = exc.code()
        if code in BACK_PRESSURE:
            self.full.append(worker)
        elif code in WORKER_GONE | WORKER_STOPPED:
            if code in WORKER_GONE:
                self.ctx.router.mark_failed(worker)
            self.tried.append(worker)

    def _note(self, chunk: GenerateChunk) -> GenerateChunk | None:
        """Record what a chunk carries; strip the leg's usage (chunks() sends the total)."""
        for c in chunk.choices:
            choice = self.choices[c.index]
            choice.token_ids.extend(c.token_ids)
            choice.finished = choice.finished or c.finish_reason is not None
        if chunk.prompt_logprobs:
            self.prompt_logprobs_sent = True
        if chunk.usage is not None and self.cached_tokens is None:
            self.cached_tokens = chunk.usage.cached_prompt_tokens
        if not chunk.choices and not chunk.prompt_logprobs:
            return None
        return dataclasses.replace(chunk, usage=None) if chunk.usage is not None else chunk

    async def _generate(
        self,
        worker: WorkerState,
        first_choice_index: int,
        sampling: SamplingParams[Guided],
        generated: tuple[int, ...],
        kv_source: KVSource | None,
    ) -> AsyncIterator[GenerateChunk]:
        self.ctx.metrics.worker_requests.labels(worker=self.ctx.label(worker.name, worker.address)).inc()
        leg_id = self._leg_id()
        self._leg = (worker, leg_id)
        by_hash = bool(self.images)
        try:
            while True:
                images, whole = await self._wire_images(worker, by_hash)
                admitted = False
                try:
                    with self.ctx.router.track(worker):
                        async for chunk in worker.client.generate(
                            leg_id,
                            self.prompt_token_ids,
                            sampling,
                            first_choice_index,
                            generated_token_ids=generated,
                            kv_source=kv_source,
                            group_id=self.group_id,
                            images=images,
                            lora_name=self.lora_name,
                        ):
                            if not admitted:  # the worker holds these images from now on
                                admitted = True
                                for pixel_hash, worker_hash in whole:
                                    worker.sent_images.add(pixel_hash, worker_hash)
                            noted = self._note(chunk)
                            if noted is not None:
                                yield noted
                    return
                except grpc.aio.AioRpcError as exc:
                    if admitted or len(whole) == len(images) or not _image_not_held(exc):
                        raise
                    log.info(
                        "request %s: worker %s no longer holds an image sent by hash; sending the pixels",
                        self.request_id,
                        worker.address,
                    )
                    worker.sent_images.clear()  # out of step with the worker: start over
                    by_hash = False
        except grpc.aio.AioRpcError as exc:
            self._failed(worker, exc)
            raise
        finally:
            self._leg = None

    async def _wire_images(
        self, worker: WorkerState, by_hash: bool
    ) -> tuple[list[Any], list[tuple[str, str]]]:
        """The images of a Generate leg to `worker`: those it holds (with `by_hash`) as their
        hash alone, the others whole (the pixels, or an encode worker's rows); and the
        (pixel hash, hash the worker keys it by) of those sent whole."""
        held: dict[str, str] = {}
        for image in self.images if by_hash else ():
            worker_hash = worker.sent_images.lookup(image.hash)
            if worker_hash is not None:
                held[image.hash] = worker_hash
        encoders = self.ctx.encoders
        to_encode = [
            i for i, image in enumerate(self.images) if image.hash not in held and i not in self._rows
        ]
        if to_encode and encoders is not None:
            encoded = await encoders.encode(self.request_id, [self.images[i] for i in to_encode])
            self._rows.update(zip(to_encode, encoded, strict=True))
        wire: list[Any] = []
        whole: list[tuple[str, str]] = []
        for i, image in enumerate(self.images):
            if image.hash in held:
                wire.append(hash_only_image(image, held[image.hash]))
            else:
                sent = self._rows.get(i, image)
                wire.append(sent)
                whole.append((image.hash, sent.hash))
        return wire, whole

    async def abort(self) -> bool:
        """Ask the worker to abort the open Generate stream (which then ends by itself, its
        choices finished "abort") instead of cancelling the call; False when there is none or
        the Abort rpc failed (the caller cancels then)."""
        if self._leg is None:
            return False
        worker, leg_id = self._leg
        try:
            await worker.client.abort([leg_id])
        except grpc.aio.AioRpcError:
            return False
        return True

    # ---- disaggregated prefill + decode ------------------------------------------------------

    async def _disaggregated(
        self, index: int, sampling: SamplingParams[Guided]
    ) -> AsyncIterator[GenerateChunk]:
        disagg = self.ctx.disagg
        assert disagg is not None
        decode = self._pick_decode()
        prefill = disagg.pick_prefill(
            self.prompt_token_ids, decode, exclude=self.tried, lora_name=self.lora_name
        )
        if prefill is not None and self._layerwise_pair(decode, prefill, sampling):
            no_handle = False
            async for chunk in self._layerwise(index, sampling, decode, prefill):
                if chunk is None:  # no handle from that prefill worker (its last item)
                    no_handle = True
                    continue
                yield chunk
            if not no_handle:
                return
            prefill = disagg.pick_prefill(  # prefill first, as without layer-wise push
                self.prompt_token_ids, decode, exclude=[*self.tried, *self.full], lora_name=self.lora_name
            )
        result = None
        while prefill is not None:
            try:
                with disagg.prefill.track(prefill):
                    result = await prefill.client.prefill(
                        self._leg_id(), self.prompt_token_ids, sampling, index, lora_name=self.lora_name
                    )
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in BACK_PRESSURE and not self._may_resume(exc):
                    raise
                log.warning(
                    "request %s: prefill worker %s failed (%s); trying another",
                    self.request_id,
                    prefill.address,
                    exc.code().name,
                )
                self._failed(prefill, exc)
                if exc.code() not in BACK_PRESSURE and not _refused_at_door(exc):
                    self.num_resumed += 1
                prefill = disagg.pick_prefill(
                    self.prompt_token_ids, decode, exclude=[*self.tried, *self.full], lora_name=self.lora_name
                )
        if prefill is None or result is None:  # no prefill worker: the decode worker computes it
            async for chunk in self._generate(decode, index, sampling, (), None):
                yield chunk
            return
        self.cached_tokens = result.usage.cached_prompt_tokens
        noted = self._note(GenerateChunk(choices=(result.first,), prompt_logprobs=result.prompt_logprobs))
        if noted is not None:
            yield noted
        if result.handle is None:  # the first token ended the choice
            return
        decode_sampling = dataclasses.replace(sampling, prompt_logprobs=None)
        completed = False
        try:
            async for chunk in self._generate(
                decode, index, decode_sampling, result.first.token_ids, result.handle
            ):
                yield chunk
            completed = True
        finally:
            if not completed:  # cancelled or failed: free the KV now unless a fetch holds it
                _release_later(prefill, result.handle.handle_id)

    def _layerwise_pair(
        self, decode: WorkerState, prefill: WorkerState, sampling: SamplingParams[Guided]
    ) -> bool:
        disagg = self.ctx.disagg
        return (
            disagg is not None
            and disagg.layerwise
            and sampling.prompt_logprobs is None  # (they come from the prefill's result)
            and decode.info is not None
            and decode.info.kv_layerwise
            and prefill.info is not None
            and prefill.info.kv_layerwise
        )

    async def _layerwise(
        self, index: int, sampling: SamplingParams[Guided], decode: WorkerState, prefill: WorkerState
    ) -> AsyncIterator[GenerateChunk | None]:
        """Layer-wise push (module docstring). Yields None, and nothing else, when the prefill
        worker failed or refused before sending the handle (the caller prefills first then)."""
        disagg = self.ctx.disagg
        assert disagg is not None
        events = prefill.client.prefill_stream(
            self._leg_id(), self.prompt_token_ids, sampling, index, lora_name=self.lora_name
        )
        loop = asyncio.get_running_loop()
        handle_ready: asyncio.Future[KVSource] = loop.create_future()

        async def run_prefill() -> PrefillResult | None:
            with disagg.prefill.track(prefill):
                async for event in events:
                    if isinstance(event, KVSource):
                        handle_ready.set_result(event)
                    else:
                        return event
            return None

        prefill_task = loop.create_task(run_prefill())
        waiting: list[asyncio.Future[Any]] = [handle_ready, prefill_task]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client went away: the prefill goes too
            prefill_task.cancel()
            raise
        if not handle_ready.done():
            exc = prefill_task.exception()
            if isinstance(exc, grpc.aio.AioRpcError):
                code = exc.code()
                if code not in BACK_PRESSURE | WORKER_GONE | WORKER_STOPPED | _NO_LAYERWISE:
                    raise exc  # about this request: it fails as a Prefill would have
                if code in WORKER_GONE | WORKER_STOPPED and not self._may_resume(exc):
                    raise exc
                log.warning(
                    "request %s: prefill worker %s: no layer-wise handle (%s); prefilling first",
                    self.request_id,
                    prefill.address,
                    exc.code().name,
                )
                self._failed(prefill, exc)
                if exc.code() in WORKER_GONE | WORKER_STOPPED and not _refused_at_door(exc):
                    self.num_resumed += 1
            elif exc is not None:
                raise exc
            yield None
            return
        handle = handle_ready.result()
        completed = False
        try:
            async for chunk in self._generate(decode, index, sampling, (), handle):
                yield chunk
            completed = True
        finally:
            await self._end_layerwise_prefill(prefill, prefill_task, handle, completed)

    async def _end_layerwise_prefill(
        self,
        prefill: WorkerState,
        prefill_task: asyncio.Task[PrefillResult | None],
        handle: KVSource,
        completed: bool,
    ) -> None:
        """The decode leg ended: the prefill's result gives the cached prompt tokens (the leg that
        computed the prompt); a decode leg that did not complete cancels a prefill still running
        (the prefill worker then frees the KV) or releases the handle of one that finished."""
        if not completed:
            if not prefill_task.done():
                prefill_task.cancel()
            else:
                _release_later(prefill, handle.handle_id)
        try:
            result = await prefill_task
        except asyncio.CancelledError:
            if not completed:
                return
            raise
        except grpc.aio.AioRpcError as exc:  # the decode worker computed the prompt after all
            self._failed(prefill, exc)
            return
        if completed and result is not None:
            self.cached_tokens = result.usage.cached_prompt_tokens

    async def _disaggregated_fan_out(
        self, first: int, sampling: SamplingParams[Guided]
    ) -> AsyncIterator[GenerateChunk]:
        """Prefill once, fan out: the prefill worker computes the prompt once and keeps its KV
        under one handle (its sampled token is not used); the decode worker fetches it once and
        forks the block table for every choice, beam or best_of candidate, each sampling its own
        first token there (docs/beam_search.md). Without a prefill worker, or when it fails, the
        decode worker computes the prompt itself."""
        disagg = self.ctx.disagg
        assert disagg is not None
        decode = self._pick_decode()
        prefill = disagg.pick_prefill(self.prompt_token_ids, decode, exclude=[*self.tried, *self.full])
        result = None
        if prefill is not None:
            try:
                with disagg.prefill.track(prefill):
                    result = await prefill.client.prefill(
                        self._leg_id(), self.prompt_token_ids, _KV_ONLY, first
                    )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in BACK_PRESSURE and not self._may_resume(exc):
                    raise
                log.warning(
                    "request %s: prefill worker %s failed (%s); the decode worker computes the prompt",
                    self.request_id,
                    prefill.address,
                    exc.code().name,
                )
                self._failed(prefill, exc)
        handle = result.handle if result is not None else None
        if prefill is None or result is None or handle is None:
            async for chunk in self._generate(decode, first, sampling, (), None):
                yield chunk
            return
        self.cached_tokens = result.usage.cached_prompt_tokens
        completed = False
        try:
            async for chunk in self._generate(decode, first, sampling, (), handle):
                yield chunk
            completed = True
        finally:
            if not completed:  # cancelled or failed: free the KV now unless a fetch holds it
                _release_later(prefill, handle.handle_id)


# What a fan-out's Prefill samples: one token nobody uses (every choice samples its own on the
# decode worker), not an end token (the KV is kept only for a choice that goes on); max_tokens
# unset, so a prompt that fits the context fits this too (one token of room: no handle, and the
# decode worker computes the prompt).
_KV_ONLY: SamplingParams[Guided] = SamplingParams(temperature=0.0, ignore_eos=True)


def _refused_at_door(exc: grpc.aio.AioRpcError) -> bool:
    """A draining worker refused the call before taking it (services/common/drain.py): moving it
    elsewhere costs nothing and says nothing about the request."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and "draining" in (exc.details() or "")


def _client_error(exc: grpc.aio.AioRpcError, sampling: SamplingParams[Guided]) -> APIError:
    """A worker's final failure of this request as the client sees it."""
    guided = worker_error(exc, sampling.guided)
    if guided is not None:
        return guided
    if exc.code() in _REQUEST_INTERNAL:
        error = from_grpc(exc, "worker")
        if error.status == 504:  # the deadline had passed: a timeout
            return error
        log.error("the worker failed a request: %s: %s", exc.code().name, exc.details())
        return APIError(500, f"the worker failed this request: {exc.code().name}")
    if exc.code() in BACK_PRESSURE:
        return APIError(429, "every worker is at capacity; retry shortly", code="overloaded", retry_after_s=1)
    return from_grpc(exc, "worker")


def _image_not_held(exc: grpc.aio.AioRpcError) -> bool:
    """The worker refused an image sent by hash that it does not hold (nothing else happened)."""
    return exc.code() == grpc.StatusCode.FAILED_PRECONDITION and IMAGE_NOT_CACHED in (exc.details() or "")


def _release_later(worker: WorkerState, handle_id: str) -> None:
    async def release() -> None:
        with contextlib.suppress(Exception):
            await worker.client.release_kv(handle_id)

    task = asyncio.get_running_loop().create_task(release())
    _background.add(task)
    task.add_done_callback(_background.discard)
