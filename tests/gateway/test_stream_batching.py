"""Batching on the real stack, counted (not timed): a burst of streams sends the styler fewer
messages than it generates tokens, and an SSE stream writes the chunks one update makes in one
transport write (one HTTP chunk)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.request

import aiohttp
from gateway_stack import Stack


def _metrics(stack: Stack) -> dict[str, float]:
    with urllib.request.urlopen(stack.url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    pattern = r"^(tandem:(?:gateway_styler_\S+|generation_tokens_total))\s+(\S+)$"
    return {name: float(value) for name, value in re.findall(pattern, text, re.M)}


async def test_a_burst_of_streams_sends_the_styler_fewer_messages_than_tokens(stories_stack: Stack) -> None:
    before = _metrics(stories_stack)
    body = {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            async with session.post(stories_stack.base_url + "/completions", json=body) as reply:
                assert reply.status == 200
                text = await reply.text()
                assert text.endswith("data: [DONE]\n\n")

        await asyncio.gather(*(one() for _ in range(32)))
    after = _metrics(stories_stack)
    sent = 'tandem:gateway_styler_stream_messages_total{direction="sent"}'
    messages = after[sent] - before.get(sent, 0)
    session_messages = after["tandem:gateway_styler_session_messages_total"] - before.get(
        "tandem:gateway_styler_session_messages_total", 0
    )
    tokens = after["tandem:generation_tokens_total"] - before["tandem:generation_tokens_total"]
    assert tokens == 32 * 24
    # Each request's start, token deltas and close are session messages; the writer sends those
    # that queued up while its previous write was in flight as one message.
    assert session_messages >= 32 * 2
    assert messages < tokens, (messages, session_messages, tokens)
    print(f"\n{tokens:.0f} tokens, {session_messages:.0f} session messages in {messages:.0f} styler messages")


def _http_chunks(port: int, path: str, body: dict[str, object]) -> list[bytes]:
    """The body of a POST as its HTTP/1.1 chunks (each one transport write of the server)."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head + payload)
        raw = b""
        while data := sock.recv(65536):
            raw += data
    headers, _, rest = raw.partition(b"\r\n\r\n")
    assert b" 200 " in headers.split(b"\r\n")[0] and b"chunked" in headers.lower(), headers
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        rest = rest[size + 2 :]


def test_an_sse_stream_writes_what_is_ready_together_at_once(stories_stack: Stack) -> None:
    body = {
        "model": "stories260K",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 6,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = _http_chunks(stories_stack.port, "/v1/chat/completions", body)
    events = [
        [json.loads(e[6:]) if e != b"data: [DONE]" else "[DONE]" for e in c.split(b"\n\n") if e]
        for c in chunks
    ]
    assert all(c.endswith(b"\n\n") for c in chunks)  # every write ends at an event's end
    # The role chunk and the first text come from one update: one write.
    first = events[0]
    assert len(first) == 2 and first[0]["choices"][0]["delta"]["role"] == "assistant", first
    assert first[1]["choices"][0]["delta"]["content"]
    # then the text, the usage chunk and `[DONE]`
    assert events[-1] == ["[DONE]"] and events[-2][0]["usage"]["completion_tokens"] == 6
    text = "".join(
        e["choices"][0]["delta"].get("content", "")
        for c in events
        for e in c
        if e != "[DONE]" and e["choices"]
    )
    assert text
