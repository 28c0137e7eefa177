"""Hostile chat templates (files, modules, `__class__` / `__globals__`, huge loops, deep
recursion, huge output, huge widths and paddings, unbounded growth) are refused or stopped with
a clear error, over gRPC and through the gateway, and the styler keeps serving: its memory stays
bounded and other requests go on while a hostile render is stopped."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.v1 import common_pb2, styler_pb2, styler_pb2_grpc

from .rstack import ReliabilityStack, rss_bytes

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
    # Each of these allocated gigabytes inside the styler before widths were bounded.
    "percent_width": '{{ "%2000000000d" % 1 }}',
    "percent_star_width": '{{ "%*d" % (2000000000, 1) }}',
    "center": "{{ messages[0]['content'].center(2000000000) }}",
    "center_filter": "{{ messages[0]['content'] | center(2000000000) }}",
    "format_width": "{{ '{:>2000000000}'.format(1) }}",
    "format_filter": "{{ '%2000000000s' | format('x') }}",
    "indent": "{{ (messages[0]['content'] ~ '\\n') * 1000 | indent(2000000000, true) }}",
    "zfill": "{{ '1'.zfill(2000000000) }}",
    "batch": "{{ messages | batch(2000000000, 'x') | list }}",
    # Growth that no single check sees: stopped by the render process's memory limit or deadline.
    "grow_in_loop": (
        "{% set ns = namespace(x='xxxxxxxx') %}{% for i in range(99999) %}{% set ns.x = ns.x ~ ns.x %}"
        "{% endfor %}{{ ns.x | length }}"
    ),
}
# Templates that keep a render process busy until it is stopped (not refused up front).
SLOW = ("huge_loop", "grow_in_loop")


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


@pytest.mark.parametrize(
    "name", ["percent_width", "center", "format_width", "indent", "grow_in_loop", "huge_loop"]
)
async def test_hostile_template_costs_other_requests_nothing(
    limited_stack: ReliabilityStack, name: str
) -> None:
    """While a hostile render is refused or stopped, a normal render and the health check are
    answered at once, and the styler's own memory does not grow."""
    styler_pid = limited_stack.procs["styler"].pid
    async with grpc.aio.insecure_channel(limited_stack.styler_address) as channel:
        stub = styler_pb2_grpc.StylerStub(channel)
        normal = _render_request("{{ messages[0]['content'] }}")
        await stub.Render(normal, timeout=10)  # the render processes are up
        rss_before = rss_bytes(styler_pid)
        started = time.monotonic()
        hostile = asyncio.ensure_future(stub.Render(_render_request(HOSTILE[name]), timeout=30))
        ok = await stub.Render(normal, timeout=10)
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        if name in SLOW:
            assert not hostile.done(), "the normal render waited for the hostile one"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await hostile
        took = time.monotonic() - started
        assert ok.prompt == "Once upon a time"
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert err.value.details().startswith("chat_template: "), err.value.details()
        assert took < 5, f"{name} took {took:.1f}s (--render-timeout is 1s)"
        # The allocation happened (if at all) in a render process, never in the styler.
        assert rss_bytes(styler_pid) - rss_before < 100 * 2**20


async def test_hostile_template_is_a_400_naming_chat_template(limited_stack: ReliabilityStack) -> None:
    async with aiohttp.ClientSession() as session:
        for name in ("percent_width", "format_width", "grow_in_loop"):
            body = {
                "messages": [{"role": "user", "content": "Once upon a time"}],
                "chat_template": HOSTILE[name],
                "max_tokens": 4,
            }
            async with session.post(limited_stack.url + "/v1/chat/completions", json=body) as reply:
                error = (await reply.json())["error"]
                assert reply.status == 400, (name, error)
                assert error["param"] == "chat_template", (name, error)
