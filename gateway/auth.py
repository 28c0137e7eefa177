"""API keys: who may call the gateway, and each key's rate limits.

Keys come from `--api-key` (repeatable), `TANDEM_API_KEY` (comma-separated) and `--api-key-file`
(one per line, optionally `rpm=N tpm=N` after the key; `#` starts a comment). A presented key is
compared with every configured key in constant time (`hmac.compare_digest`, no early exit), so
timing does not reveal how much of a key was right. Keys never appear in logs or error messages:
a key is named by `key_id`, a short hash.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import APIError


@dataclass(frozen=True)
class ApiKey:
    """One accepted key and its per-minute limits (0 = unlimited)."""

    secret: bytes
    requests_per_minute: int
    tokens_per_minute: int

    @property
    def key_id(self) -> str:
        """A name for logs and metrics that reveals nothing usable about the key."""
        return "key-" + hashlib.sha256(self.secret).hexdigest()[:8]

    def __repr__(self) -> str:  # never print the secret, even by accident
        return f"ApiKey({self.key_id}, rpm={self.requests_per_minute}, tpm={self.tokens_per_minute})"


class KeyFileError(ValueError):
    """The API key file is malformed (the message names the line, never the key)."""


def parse_key_file(text: str, default_rpm: int, default_tpm: int, path: str = "") -> list[ApiKey]:
    keys = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        secret, *options = line.split()
        rpm, tpm = default_rpm, default_tpm
        for option in options:
            name, _, value = option.partition("=")
            if name not in ("rpm", "tpm") or not value.isdigit():
                raise KeyFileError(f"{path}:{number}: expected KEY [rpm=N] [tpm=N], got option {name!r}")
            if name == "rpm":
                rpm = int(value)
            else:
                tpm = int(value)
        keys.append(ApiKey(secret.encode(), rpm, tpm))
    return keys


class KeyRing:
    """The accepted keys; `enabled` is False when none is configured (the gateway is open)."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self.keys = list(keys)

    @classmethod
    def from_config(
        cls, api_keys: Sequence[str], api_key_file: str, default_rpm: int, default_tpm: int
    ) -> KeyRing:
        keys = [ApiKey(k.encode(), default_rpm, default_tpm) for k in api_keys if k]
        if api_key_file:
            keys += parse_key_file(Path(api_key_file).read_text(), default_rpm, default_tpm, api_key_file)
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str) -> ApiKey | None:
        """The key an `Authorization: Bearer <key>` value carries; 401 when it is missing or wrong.

        None when no keys are configured. Every configured key is compared (constant time per
        key, no early exit), so the time taken does not depend on which key matched.
        """
        if not self.keys:
            return None
        # surrogateescape: aiohttp keeps header bytes that are not UTF-8 as surrogate escapes; such
        # a key is wrong (401), not an encoding failure (500).
        raw = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        token = raw.encode("utf-8", "surrogateescape")
        match: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(token, key.secret) and match is None:
                match = key
        if match is None or not token:
            raise APIError(
                401,
                "invalid or missing API key (send Authorization: Bearer <key>)",
                code="invalid_api_key",
            )
        return match
