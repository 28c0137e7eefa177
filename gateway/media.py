"""Image content parts at the gateway: shape checks at validation, and fetching `http(s)` image
URLs of hosts listed in --allowed-media-domains into `data:` URLs before the styler renders.

The gateway never decodes an image (the styler does, off its event loop, services/styler/images.py);
it checks the part's form, and for a URL the host, the size (`MAX_MEDIA_BYTES`) and the time
(`MEDIA_FETCH_TIMEOUT_S`). A refused part is a 400 naming `messages[i].content[j]`.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from gateway.errors import APIError, invalid

MAX_MEDIA_BYTES = 20 * 1024 * 1024  # one fetched image (the styler's decode limit too)
MEDIA_FETCH_TIMEOUT_S = 10.0
# Images of one request: each costs the styler a decode and the worker an encode, and fetched
# ones are not bounded by --max-request-bytes.
MAX_IMAGES_PER_REQUEST = 16
_DETAILS = ("auto", "low", "high")
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+(;[A-Za-z0-9=.+-]+)*;base64,", re.ASCII)


def check_image_url(url: str, where: str, field: str) -> None:
    """A `data:image/<type>;base64,` URL (its form only) or an http(s) URL; anything else is a 400
    naming `where` (the part), `field` being the URL's name in the message."""
    if url.startswith("data:"):
        if not _DATA_URL.match(url):
            raise invalid(f"'{field}' must be a 'data:image/<type>;base64,' URL", where)
        return
    if urlsplit(url).scheme not in ("http", "https"):
        raise invalid(f"'{field}' must be a data: URL or an http(s) URL", where)


def check_detail(detail: Any, field: str) -> None:
    """OpenAI's `detail`: accepted, and changes nothing (the model's processor fixes the size)."""
    if detail is not None and detail not in _DETAILS:
        raise invalid(f"'{field}' must be one of {', '.join(_DETAILS)}", field)


def check_image_part(part: dict[str, Any], where: str) -> None:
    """An OpenAI `{"type": "image_url", "image_url": {"url": ..., "detail": ...}}` part."""
    image_url = part.get("image_url")
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
        raise invalid(f"'{where}.image_url' must be an object with a string 'url'", f"{where}.image_url")
    check_detail(image_url.get("detail"), f"{where}.image_url.detail")
    check_image_url(image_url["url"], where, f"{where}.image_url.url")


def has_image_urls(messages: Sequence[dict[str, Any]]) -> bool:
    """Whether some image part has an http(s) URL (validated parts: image_url is an object)."""
    return any(
        part.get("type") == "image_url" and not part["image_url"]["url"].startswith("data:")
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
    )


async def inline_image_urls(
    messages: Sequence[dict[str, Any]], allowed_domains: Sequence[str], param: str = "messages"
) -> list[dict[str, Any]]:
    """Messages with every http(s) image URL replaced by a data: URL of its bytes; a host not in
    `allowed_domains` (exact match, or a subdomain of an entry) is a 400 naming the part."""
    out: list[dict[str, Any]] = []
    session: aiohttp.ClientSession | None = None
    try:
        for i, message in enumerate(messages):
            content = message.get("content")
            if not isinstance(content, list):
                out.append(message)
                continue
            parts = []
            for j, part in enumerate(content):
                url = part.get("image_url", {}).get("url") if part.get("type") == "image_url" else None
                if not isinstance(url, str) or url.startswith("data:"):
                    parts.append(part)
                    continue
                where = f"{param}[{i}].content[{j}]"
                host = (urlsplit(url).hostname or "").lower()
                if not any(host == d or host.endswith("." + d) for d in allowed_domains):
                    raise invalid(
                        f"'{where}': image URLs of host {host!r} are not allowed (--allowed-media-domains)",
                        where,
                    )
                if session is None:
                    session = aiohttp.ClientSession(
                        timeout=aiohttp.ClientTimeout(total=MEDIA_FETCH_TIMEOUT_S)
                    )
                data, mime = await _fetch(session, url, where)
                inline = f"data:{mime};base64,{base64.b64encode(data).decode()}"
                parts.append({**part, "image_url": {**part["image_url"], "url": inline}})
            out.append({**message, "content": parts})
    finally:
        if session is not None:
            await session.close()
    return out


async def _fetch(session: aiohttp.ClientSession, url: str, where: str) -> tuple[bytes, str]:
    try:
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise invalid(f"'{where}': fetching the image gave HTTP {resp.status}", where)
            if (resp.content_length or 0) > MAX_MEDIA_BYTES:
                raise invalid(f"'{where}': the image is larger than {MAX_MEDIA_BYTES} bytes", where)
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_MEDIA_BYTES:
                    raise invalid(f"'{where}': the image is larger than {MAX_MEDIA_BYTES} bytes", where)
            mime = resp.content_type if resp.content_type.startswith("image/") else "image/png"
            return bytes(body), mime
    except APIError:
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise invalid(f"'{where}': the image could not be fetched ({type(exc).__name__})", where) from None


_CHAT_PART = re.compile(r"messages\[(\d+)\]\.content\[(\d+)\]")


def rename_image_part(err: APIError, messages: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
    """Name the image part a chat-pipeline error blames (`messages[i].content[j]`, in `param` and
    in the message) in the words of the API the request came in by: `names[k]` is that API's name
    of the k-th image part of the translated chat `messages` (translations keep images in order).
    Errors about anything else are left as they are."""
    match = _CHAT_PART.match(err.param or "")
    if match is None:
        return
    i, j = int(match[1]), int(match[2])
    k = 0
    for mi, message in enumerate(messages[: i + 1]):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for pj, part in enumerate(content):
            if (mi, pj) == (i, j):
                if part.get("type") != "image_url" or k >= len(names):
                    return
                old = match[0]
                err.param = names[k] + (err.param or "")[len(old) :]
                err.message = err.message.replace(old, names[k])
                return
            if isinstance(part, dict) and part.get("type") == "image_url":
                k += 1
