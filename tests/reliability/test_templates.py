"""Hostile chat templates (files, modules, `__class__` / `__globals__`, huge loops, deep
recursion, huge output) are refused or stopped with a clear error, over gRPC and through the
gateway, and the styler keeps serving."""

from __future__ import annotations

import time

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.v1 import common_pb2, styler_pb2, styler_pb2_grpc

from .rstack import ReliabilityStack

pytestmark = pytest.mark.e2e

HOSTILE = {
    "read_file": "{{ open('/etc/passwd').read() }}",
    "include_file": "{% include '/etc/passwd' %}",
    "import_module": "{% import 'os' as os %}{{ os.getcwd() }}",
    "class_walk": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals_cycler": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "globals_lipsum": "{{ lipsum.__globals__['os'].system('id') }}",
    "globals_macro": "{% macro m() %}{% endmacro %}{{ m.__globals__ }}",
    "raise_exception_globals": "{{ raise_exception.__globals__['__builtins__'] }}",
    "mutate": "{% set x = [] %}{{ x.append(1) }}",
    "format_attr": "{{ '{0.__class__}'.format(messages) }}",
    "huge_loop": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "huge_range": "{% for i in range(10**12) %}{% endfor %}",
    "deep_recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "huge_output": "{% for i in range(99999) %}{{ messages[0]['content'] * 50 }}{% endfor %}",
    "huge_repeat": "{{ 'x' * 10**9 }}",
    "huge_power": "{{ 10 ** 100000000 }}",
}


def _render_request(template: str) -> styler_pb2.RenderRequest:
    return styler_pb2.RenderRequest(
        messages=[common_pb2.ChatMessage(role="user", text="Once upon a time")],
        add_generation_prompt=True,
        chat_template=template,
    )


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_template_is_refused_and_the_styler_keeps_serving(
    limited_stack: ReliabilityStack, name: str
) -> None:
    async with grpc.aio.insecure_channel(limited_stack.styler_address) as channel:
        stub = styler_pb2_grpc.StylerStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Render(_render_request(HOSTILE[name]), timeout=30)
        took = time.monotonic() - started
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert err.value.details(), "the error says what went wrong"
        assert "root:" not in err.value.details() and "uid=" not in err.value.details()
        assert took < 5, f"{name} took {took:.1f}s (--render-timeout is 1s)"
        # Still serving: health and a normal render.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        ok = await stub.Render(_render_request("{{ messages[0]['content'] }}"), timeout=10)
        assert ok.prompt == "Once upon a time"


async def test_hostile_templates_through_the_gateway_are_400(limited_stack: ReliabilityStack) -> None:
    async with aiohttp.ClientSession() as session:
        for name in ("class_walk", "huge_loop", "deep_recursion", "read_file"):
            body = {
                "messages": [{"role": "user", "content": "Once upon a time"}],
                "chat_template": HOSTILE[name],
                "max_tokens": 4,
            }
            async with session.post(limited_stack.url + "/v1/chat/completions", json=body) as reply:
                error = (await reply.json())["error"]
                assert reply.status == 400, (name, error)
                assert error["message"] and "Traceback" not in error["message"]
        async with session.post(
            limited_stack.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 4},
        ) as reply:
            assert reply.status == 200
