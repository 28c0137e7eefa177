"""tandem's routing as an Endpoint Picker (EPP) for the Gateway API Inference Extension.

The proxy (Envoy, or any Gateway that implements InferencePool) streams each HTTP request through
`envoy.service.ext_proc.v3.ExternalProcessor/Process`. The picker reads the request's headers and
OpenAI JSON body, turns the prompt into the token ids tandem's gateway would send (the styler
renders chat messages and tokenizes text, as gateway/execution.py does), and picks a worker with
the gateway's own router (gateway/router.py: exact prefix hits from the workers' KV events, else
prefix affinity, else least load). It answers as the upstream protocol
(docs/proposals/004-endpoint-picker-protocol) says: the header `x-gateway-destination-endpoint`
and the dynamic metadata `envoy.lb` / `x-gateway-destination-endpoint`, both `host:port` of the
pool member in front of that worker (its HTTP port, `--endpoint-port`, on the worker's host).

Body modes: FULL_DUPLEX_STREAMED (what InferencePool gateways configure, and the default when the
proxy sends no `protocol_config`): the headers answer waits for the whole body, then the body
goes back unchanged as streamed chunks. BUFFERED: the headers are let through at once and the
pick rides on the body answer. A request without a body is picked by load alone.

Errors, as OpenAI's JSON envelope in an ImmediateResponse: a body the gateway would refuse (not
JSON, unknown fields, bad values) is answered with the gateway's own 4xx; no worker in rotation, or
none in the proxy's subset hint (`envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`),
is 503.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict

from gateway import json_text
from gateway.errors import APIError
from gateway.limits import Limits
from gateway.openengine_client import PREFIX as OPENENGINE_PREFIX
from gateway.router import NoWorkerAvailable, Router, WorkerState
from gateway.smg_client import PREFIX as SMG_PREFIX
from gateway.styler_pool import NoStylerAvailable, StylerPool
from gateway.validation import parse_chat, parse_completion
from tandem.ext_proc.envoy.config.core.v3 import base_pb2
from tandem.ext_proc.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from tandem.ext_proc.envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from tandem.ext_proc.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from tandem.ext_proc.envoy.type.v3 import http_status_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
DESTINATION_KEY = "x-gateway-destination-endpoint"
DESTINATION_NAMESPACE = "envoy.lb"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
# Some proxies cap a streamed body chunk at 64 KiB; the upstream picker stays under it too.
BODY_CHUNK_BYTES = 62_000
# The gateway's own request size limit (--max-request-bytes default): a larger body is a 413.
MAX_BODY_BYTES = 16 * 1024 * 1024
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
NO_BODY = processing_mode_pb2.ProcessingMode.NONE
BUFFERED_MODES = (
    processing_mode_pb2.ProcessingMode.BUFFERED,
    processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL,
)
# Only what no gateway accepts is refused here (syntax, types, missing fields): each pool member's
# gateway enforces its own configured limits (--max-tools, --max-logprobs, ...) and answers itself.
NO_LIMITS = Limits(
    max_n=2**31,
    max_stop_strings=2**31,
    max_logprobs=2**31,
    max_tools=2**31,
    max_sequences_per_request=2**31,
)
CHAT_PATHS = ("/v1/chat/completions",)
COMPLETION_PATHS = ("/v1/completions",)


@dataclass
class ExchangeState:
    """One HTTP request's pass through the picker (one Process stream)."""

    headers: dict[str, str] = field(default_factory=dict)
    subset: list[str] | None = None  # the proxy's subset hint, when it sent one
    body: bytearray = field(default_factory=bytearray)
    request_body_mode: int = FULL_DUPLEX
    response_body_mode: int = FULL_DUPLEX
    picked: WorkerState | None = None
    tracked: bool = False  # counted in the picked worker's load

    @property
    def path(self) -> str:
        return self.headers.get(":path", "").split("?", 1)[0]


class EndpointPicker:
    """The choice of a pool member for a request: prompt tokens from the styler, the router's pick."""

    def __init__(self, router: Router, stylers: StylerPool | None, endpoint_port: int) -> None:
        self.router = router
        self.stylers = stylers
        self.endpoint_port = endpoint_port

    def endpoint(self, w: WorkerState) -> str:
        """`host:port` of the pool member (HTTP) in front of worker `w` (its host, --endpoint-port)."""
        address = w.address.removeprefix(OPENENGINE_PREFIX).removeprefix(SMG_PREFIX)
        host = address.rsplit(":", 1)[0]
        return f"{host}:{self.endpoint_port}"

    async def prompt_token_ids(self, path: str, body: bytes) -> tuple[int, ...]:
        """The token ids tandem's gateway would send for this request (empty when the path has no
        prompt, or no styler is configured). Raises APIError (the gateway's own 4xx) for a bad body."""
        if path not in CHAT_PATHS + COMPLETION_PATHS:
            return ()
        fields = json_text.loads(body or b"null")
        if not isinstance(fields, dict):
            raise APIError(400, "request body must be a JSON object")
        if path in CHAT_PATHS:
            chat = parse_chat(fields, NO_LIMITS)
            if self.stylers is None:
                return ()
            rendered = await self._styler(
                lambda c: c.render(
                    chat.messages,
                    chat.tools,
                    chat.add_generation_prompt,
                    chat.continue_final_message,
                    chat.chat_template,
                    chat.chat_template_kwargs,
                    chat.documents,
                )
            )
            return tuple(rendered.token_ids) if rendered is not None else ()
        completion = parse_completion(fields, NO_LIMITS)
        first = completion.prompts[0] if completion.prompts else ""
        if not isinstance(first, str):
            return tuple(first)
        if self.stylers is None:
            return ()
        ids = await self._styler(lambda c: c.tokenize(first, completion.add_special_tokens))
        return tuple(ids) if ids is not None else ()

    async def _styler(self, fn: Any) -> Any:
        """A styler call, or None when it fails: the pick then goes by load, and the member's own
        gateway reports whatever was wrong with the prompt."""
        assert self.stylers is not None
        try:
            return await self.stylers.call(fn)
        except (grpc.aio.AioRpcError, NoStylerAvailable) as exc:
            log.info("cannot tokenize the prompt (%s); picking by load", exc)
            return None

    def pick(self, token_ids: Sequence[int], subset: list[str] | None) -> WorkerState:
        """The worker for a prompt among those whose endpoint is in `subset` (when given)."""
        exclude: list[WorkerState] = []
        if subset is not None:
            allowed = set(subset)
            exclude = [w for w in self.router.workers if self.endpoint(w) not in allowed]
        try:
            return self.router.pick(token_ids, exclude)
        except NoWorkerAvailable:
            where = "in the subset the proxy allows" if subset is not None else "in rotation"
            raise APIError(503, f"no model server is available {where}", retry_after_s=1) from None


def _headers(message: ext_proc_pb2.HttpHeaders) -> dict[str, str]:
    """Header name -> value (Envoy sends `raw_value`; older proxies `value`)."""
    return {
        h.key.lower(): (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
        for h in message.headers.headers
    }


def _subset(request: ext_proc_pb2.ProcessingRequest) -> list[str] | None:
    """The proxy's subset hint: a list of `ip:port`, or one comma-separated string of them."""
    if SUBSET_NAMESPACE not in request.metadata_context.filter_metadata:
        return None
    hint = MessageToDict(request.metadata_context.filter_metadata[SUBSET_NAMESPACE])
    if SUBSET_KEY not in hint:
        return None
    value = hint[SUBSET_KEY]
    items = value if isinstance(value, list) else [value]
    return [e.strip() for item in items if isinstance(item, str) for e in item.split(",") if e.strip()]


def _destination(endpoint: str) -> tuple[ext_proc_pb2.CommonResponse, struct_pb2.Struct]:
    """The header mutation and dynamic metadata that name the picked endpoint (the same value)."""
    common = ext_proc_pb2.CommonResponse(
        clear_route_cache=True,
        header_mutation=ext_proc_pb2.HeaderMutation(
            set_headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=DESTINATION_KEY, raw_value=endpoint.encode()),
                    # A client's own copy of the header never survives.
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            ]
        ),
    )
    metadata = struct_pb2.Struct()
    metadata.update({DESTINATION_NAMESPACE: {DESTINATION_KEY: endpoint}})
    return common, metadata


def immediate(error: APIError) -> ext_proc_pb2.ProcessingResponse:
    """An HTTP error sent straight back to the client, in OpenAI's error envelope."""
    headers = [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()))
        for k, v in {"content-type": "application/json", **error.headers()}.items()
    ]
    return ext_proc_pb2.ProcessingResponse(
        immediate_response=ext_proc_pb2.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=error.status),  # type: ignore[arg-type]
            headers=ext_proc_pb2.HeaderMutation(set_headers=headers),
            body=json.dumps(error.body()).encode(),
            details=f"tandem epp: {error.message}",
        )
    )


def _streamed(body: bytes, end_of_stream: bool, response: bool) -> Iterator[ext_proc_pb2.ProcessingResponse]:
    """`body` handed back unchanged as FULL_DUPLEX_STREAMED chunks."""
    chunks = [body[i : i + BODY_CHUNK_BYTES] for i in range(0, len(body), BODY_CHUNK_BYTES)] or [b""]
    for i, chunk in enumerate(chunks):
        common = ext_proc_pb2.CommonResponse(
            body_mutation=ext_proc_pb2.BodyMutation(
                streamed_response=ext_proc_pb2.StreamedBodyResponse(
                    body=chunk, end_of_stream=end_of_stream and i == len(chunks) - 1
                )
            )
        )
        body_response = ext_proc_pb2.BodyResponse(response=common)
        if response:
            yield ext_proc_pb2.ProcessingResponse(response_body=body_response)
        else:
            yield ext_proc_pb2.ProcessingResponse(request_body=body_response)


class ExternalProcessorServicer(ext_proc_grpc.ExternalProcessorServicer):
    """`Process`: one bidirectional stream per HTTP request, as the EPP protocol says."""

    def __init__(self, picker: EndpointPicker) -> None:
        self.picker = picker

    async def Process(
        self,
        request_iterator: AsyncIterator[ext_proc_pb2.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ext_proc_pb2.ProcessingResponse]:
        state = ExchangeState()
        # The picked worker's load counts this request until the stream ends (with the response,
        # when the proxy sends the response through the picker too).
        with contextlib.ExitStack() as in_flight:
            async for request in request_iterator:
                for answer in await self._answer(state, request):
                    yield answer
                    if answer.HasField("immediate_response"):
                        return
                if state.picked is not None and not state.tracked:
                    in_flight.enter_context(self.picker.router.track(state.picked))
                    state.tracked = True

    async def _answer(
        self, state: ExchangeState, request: ext_proc_pb2.ProcessingRequest
    ) -> list[ext_proc_pb2.ProcessingResponse]:
        """What the proxy gets back for one of its messages (nothing while a body is arriving)."""
        if request.HasField("protocol_config"):  # only on the first message
            state.request_body_mode = request.protocol_config.request_body_mode
            state.response_body_mode = request.protocol_config.response_body_mode
        kind = request.WhichOneof("request")
        if kind == "request_headers":
            state.headers = _headers(request.request_headers)
            state.subset = _subset(request)
            if request.request_headers.end_of_stream or state.request_body_mode == NO_BODY:
                return [await self._pick(state, in_body=False)]
            if state.request_body_mode in BUFFERED_MODES:  # the body comes only after this answer
                return [ext_proc_pb2.ProcessingResponse(request_headers=ext_proc_pb2.HeadersResponse())]
            return []
        if kind == "request_body":
            state.body += request.request_body.body
            if len(state.body) > MAX_BODY_BYTES:
                return [immediate(APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes"))]
            if not request.request_body.end_of_stream:
                return []  # the whole body decides
            buffered = state.request_body_mode in BUFFERED_MODES
            answer = await self._pick(state, in_body=buffered)
            if buffered or answer.HasField("immediate_response"):
                return [answer]
            return [answer, *_streamed(bytes(state.body), True, response=False)]
        if kind == "request_trailers":
            return [ext_proc_pb2.ProcessingResponse(request_trailers=ext_proc_pb2.TrailersResponse())]
        if kind == "response_headers":
            return [ext_proc_pb2.ProcessingResponse(response_headers=ext_proc_pb2.HeadersResponse())]
        if kind == "response_body":
            if state.response_body_mode == FULL_DUPLEX:
                body = request.response_body
                return list(_streamed(body.body, body.end_of_stream, response=True))
            return [ext_proc_pb2.ProcessingResponse(response_body=ext_proc_pb2.BodyResponse())]
        if kind == "response_trailers":
            return [ext_proc_pb2.ProcessingResponse(response_trailers=ext_proc_pb2.TrailersResponse())]
        return []

    async def _pick(self, state: ExchangeState, in_body: bool) -> ext_proc_pb2.ProcessingResponse:
        """The answer that names the picked endpoint (on the body answer when `in_body`, else on
        the headers answer), or the error to send the client."""
        try:
            token_ids = await self.picker.prompt_token_ids(state.path, bytes(state.body))
            worker = self.picker.pick(token_ids, state.subset)
        except APIError as exc:
            log.info("refusing %s: %d %s", state.path, exc.status, exc.message)
            return immediate(exc)
        state.picked = worker
        endpoint = self.picker.endpoint(worker)
        common, metadata = _destination(endpoint)
        log.debug(
            "%s (%d prompt tokens) -> %s (worker %s)", state.path, len(token_ids), endpoint, worker.address
        )
        if in_body:
            return ext_proc_pb2.ProcessingResponse(
                request_body=ext_proc_pb2.BodyResponse(response=common), dynamic_metadata=metadata
            )
        return ext_proc_pb2.ProcessingResponse(
            request_headers=ext_proc_pb2.HeadersResponse(response=common), dynamic_metadata=metadata
        )


def add_to_server(servicer: ExternalProcessorServicer, server: grpc.aio.Server) -> None:
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
