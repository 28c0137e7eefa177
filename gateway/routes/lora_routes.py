"""vLLM's dynamic LoRA routes: `POST /v1/load_lora_adapter` {lora_name, lora_path} and
`POST /v1/unload_lora_adapter` {lora_name}, fanned out to every tandem worker (decode and prefill
pools alike: a disaggregated request needs its adapter on both). Behind the API key like every
/v1 route. A load that some worker refuses is undone on the others, so the workers never disagree
about which adapters exist; a request then selects one by `model` (gateway/execution.py)."""

from __future__ import annotations

import asyncio
import logging

import grpc
from aiohttp import web

from gateway.appkeys import CONTEXT
from gateway.clients import WorkerClient
from gateway.context import GatewayContext
from gateway.errors import APIError, invalid, one_line
from gateway.router import WorkerState
from gateway.routes.body import read_json

log = logging.getLogger(__name__)


def _workers(ctx: GatewayContext) -> list[WorkerState]:
    pools = [ctx.router] + ([ctx.disagg.prefill] if ctx.disagg is not None else [])
    workers = [w for pool in pools for w in pool.workers if w.healthy and isinstance(w.client, WorkerClient)]
    if not workers:
        raise APIError(503, "no tandem worker is available to load or unload an adapter", retry_after_s=1)
    return workers


def _text_field(body: dict[str, object], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise invalid(f"'{name}' must be a non-empty string", name)
    return value.strip()


async def load_lora_adapter(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = await read_json(request)
    name, path = _text_field(body, "lora_name"), _text_field(body, "lora_path")
    if name == ctx.model_name:
        raise invalid(f"'{name}' is the base model's name", "lora_name")
    workers = _workers(ctx)
    clients = [w.client for w in workers]
    assert all(isinstance(c, WorkerClient) for c in clients)
    results = await asyncio.gather(
        *(c.load_lora(name, path) for c in clients if isinstance(c, WorkerClient)), return_exceptions=True
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        loaded = [w for w, r in zip(workers, results, strict=True) if not isinstance(r, BaseException)]
        await _unload(loaded, name)  # all or nothing
        raise _load_error(failed[0], name)
    for w, digest in zip(workers, results, strict=True):
        assert isinstance(digest, str)
        w.loras[name] = digest
    log.info("LoRA adapter %r loaded from %s on %d worker(s)", name, path, len(workers))
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = await read_json(request)
    name = _text_field(body, "lora_name")
    workers = _workers(ctx)
    if not await _unload(workers, name):
        raise APIError(
            404, f"the LoRA adapter '{name}' is not loaded", param="lora_name", code="model_not_found"
        )
    log.info("LoRA adapter %r unloaded", name)
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


async def _unload(workers: list[WorkerState], name: str) -> int:
    """Unload `name` from each worker that has it; how many had it."""
    clients = [w.client for w in workers if isinstance(w.client, WorkerClient)]
    results = await asyncio.gather(*(c.unload_lora(name) for c in clients), return_exceptions=True)
    num = 0
    for w, r in zip(workers, results, strict=True):
        w.loras.pop(name, None)
        if r is None:
            num += 1
        elif not (isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.NOT_FOUND):
            log.warning("unloading LoRA adapter %r from %s failed: %s", name, w.address, r)
    return num


def _load_error(exc: BaseException, name: str) -> APIError:
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        message = one_line(exc.details() or "")
        param = "lora_name" if "already loaded" in message else "lora_path"
        return invalid(message.removeprefix("lora_path: "), param)
    if isinstance(exc, grpc.aio.AioRpcError):
        return APIError(
            503, f"a worker could not load '{name}': {one_line(exc.details() or '')}", retry_after_s=1
        )
    return APIError(500, f"loading '{name}' failed: {exc}")


def register(app: web.Application) -> None:
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
