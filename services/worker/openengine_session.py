"""OpenEngine's disaggregation hand-off (`PrefillReady` / `KvOptions.session`) onto tandem's KV
handles (`Prefill` -> `KVHandle` -> `Generate(kv_source)` -> `FetchKV`, docs/disaggregation.md).

A prefill worker answers an OpenEngine Generate by running tandem's Prefill: it streams the first
token, then ends with `PrefillReady` whose `KvSessionRef` names the handle: `session_id` is the
handle id, `endpoints` the prefill worker's gRPC address, `transfer_backend` "tandem-fetchkv", and
`attributes_struct` what else a decode worker needs (the handle's token count, expiry and
compatibility fingerprint, and the token(s) already generated). A decode worker given that
reference in `kv.session` turns it back into a `kv_source` and pulls the KV with FetchKV; it
streams the tokens after the ones the prefill worker already streamed.
"""

from __future__ import annotations

from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict

from openengine.v1 import kv_pb2
from services.worker.openengine_kv import endpoint
from tandem.v1 import worker_pb2

TRANSFER_BACKEND = "tandem-fetchkv"


class SessionError(ValueError):
    """A KvSessionRef this worker cannot use; `unsupported` ones are UNIMPLEMENTED, the rest
    INVALID_ARGUMENT. The message starts with the field's name."""

    def __init__(self, message: str, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


def session_ref(handle: worker_pb2.KVHandle, generated_token_ids: list[int]) -> kv_pb2.KvSessionRef:
    attributes = struct_pb2.Struct()
    attributes.update(
        {
            "num_tokens": handle.num_tokens,
            # Struct numbers are doubles: milliseconds since 1970 stay exact (< 2^53) but go as text.
            "expires_at_ms": str(handle.expires_at_ms),
            "fingerprint": handle.fingerprint,
            "generated_token_ids": list(generated_token_ids),
        }
    )
    return kv_pb2.KvSessionRef(
        session_id=handle.handle_id,
        transfer_backend=TRANSFER_BACKEND,
        endpoints=[endpoint(handle.address)],
        dp_rank=0,
        attributes_struct=attributes,
    )


def _address(ep: kv_pb2.KvEndpoint) -> str:
    if ep.host.startswith("unix:"):
        return ep.host
    host = f"[{ep.host}]" if ":" in ep.host else ep.host
    return f"{host}:{ep.port}"


def kv_source(ref: kv_pb2.KvSessionRef) -> tuple[worker_pb2.KVHandle, list[int]]:
    """The tandem handle a session reference names, and the tokens its prefill generated."""
    if ref.transfer_backend != TRANSFER_BACKEND:
        raise SessionError(
            f"kv.session.transfer_backend: tandem workers pull KV only with {TRANSFER_BACKEND!r} "
            f"(a tandem prefill worker's PrefillReady), not {ref.transfer_backend!r}",
            unsupported=True,
        )
    if ref.dp_rank != 0:
        raise SessionError(f"kv.session.dp_rank: this worker is data-parallel rank 0 only, not {ref.dp_rank}")
    if not ref.session_id:
        raise SessionError("kv.session.session_id: must be non-empty")
    grpc_endpoints = [e for e in ref.endpoints if e.protocol in ("", "grpc")]
    if not grpc_endpoints:
        raise SessionError("kv.session.endpoints: needs the prefill worker's gRPC endpoint")
    attributes = MessageToDict(ref.attributes_struct)
    try:
        num_tokens = int(attributes["num_tokens"])
        expires_at_ms = int(attributes["expires_at_ms"])
        fingerprint = str(attributes["fingerprint"])
        generated = [int(t) for t in attributes["generated_token_ids"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise SessionError(
            f"kv.session.attributes_struct: num_tokens, expires_at_ms, fingerprint and generated_token_ids "
            f"are required as a tandem prefill worker sends them ({exc})"
        ) from None
    handle = worker_pb2.KVHandle(
        handle_id=ref.session_id,
        address=_address(grpc_endpoints[0]),
        num_tokens=num_tokens,
        expires_at_ms=expires_at_ms,
        fingerprint=fingerprint,
    )
    return handle, generated
