"""A client that goes away is counted as 499 (nginx's "client closed request"), not as a 500, and
logged at info (issue 27): 5xx counts mean server faults."""

from __future__ import annotations

import time

import httpx
import pytest
from gateway_stack import Stack
from prometheus_client.parser import text_string_to_metric_families

from services.common import metrics

pytestmark = [pytest.mark.e2e]


def _requests_by_status(stack: Stack, route: str) -> dict[str, float]:
    text = httpx.get(stack.url + "/metrics", timeout=30).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metrics.REQUESTS and sample.labels["route"] == route:
                status = sample.labels["status"]
                counts[status] = counts.get(status, 0.0) + sample.value
    return counts


def _wait_for(condition_name: str, check: object, timeout_s: float = 60.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {condition_name}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Once upon a time"}]}),
        ("/v1/completions", {"prompt": "Once upon a time"}),
    ],
)
def test_a_client_that_leaves_mid_stream_is_a_499(
    stories_stack: Stack, path: str, body: dict[str, object]
) -> None:
    before = _requests_by_status(stories_stack, path)
    request = {**body, "ignore_eos": True, "stream": True}  # up to the context length
    with httpx.stream("POST", stories_stack.url + path, json=request, timeout=60) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")) != "data: [DONE]"
    # Leaving the block closed the connection mid-stream.

    def counted() -> bool:
        now = _requests_by_status(stories_stack, path)
        return now.get("499", 0.0) == before.get("499", 0.0) + 1

    _wait_for("the 499 count", counted)
    after = _requests_by_status(stories_stack, path)
    assert {s: v for s, v in after.items() if s.startswith("5")} == {
        s: v for s, v in before.items() if s.startswith("5")
    }
    _wait_for(
        "the info log line",
        lambda: (
            "client closed the connection before the response ended: POST " + path
            in stories_stack.log_tail("gateway", 200)
        ),
    )
    # The stack still serves.
    ok = httpx.post(stories_stack.url + path, json={**body, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
